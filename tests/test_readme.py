"""The README's API example runs as written, and CI runs the README's test command."""

import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_example_runs():
    code = re.search(r"## API\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 128, 16, 16)
    converted = [type(m).__name__ for m in namespace["net"]]
    assert converted == ["Conv2d", "Adder2d", "Conv2d"]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in namespace["net"].parameters())


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts its command from the README; check it extracts the documented one."""
    command = re.search(r"<!-- test-command -->\n```\n(.*?)\n```", README, re.S).group(1)
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    extraction = re.search(r'test_command="\$\((.*)\)"', ci).group(1)
    extracted = subprocess.run(["bash", "-c", extraction], cwd=ROOT, capture_output=True, text=True, check=True)
    assert extracted.stdout.strip() == command
