"""A virtual environment holding only what the GPU machines' image holds, built from this one.

The image (benchmarks/gpu_run.sh's header lists it, from the device tool's KINDS.md) runs the
package from a checkout through PYTHONPATH, and nothing can be installed there. `make_venv`
builds a fresh venv whose site-packages links the distributions of that list and what they
require, taken from the running environment (no download, a few seconds), so a test can import
every module, and run the whole GPU script, with exactly that set and the project not installed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
GPU_RUN = REPO / "benchmarks" / "gpu_run.sh"


def image_packages() -> list[str]:
    """The distribution names on gpu_run.sh's `# IMAGE_PACKAGES:` header line (one home for the list)."""
    for line in GPU_RUN.read_text().splitlines():
        if match := re.match(r"#\s*IMAGE_PACKAGES:\s*(.+)", line):
            return match.group(1).split()
    raise AssertionError(f"{GPU_RUN} has no '# IMAGE_PACKAGES:' line")


def _installed() -> dict[str, metadata.Distribution]:
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        found.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return found


def closure(names: list[str]) -> tuple[list[metadata.Distribution], list[str]]:
    """The installed distributions of `names` and everything they require (markers evaluated,
    no extras), and the names not installed here (the image's optional pytest plugins, say)."""
    installed = _installed()
    todo, seen, missing = [canonicalize_name(n) for n in names], {}, []
    while todo:
        name = todo.pop()
        if name in seen or name in missing:
            continue
        dist = installed.get(name)
        if dist is None:
            missing.append(name)
            continue
        seen[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return list(seen.values()), missing


def make_venv(path: Path, names: list[str] | None = None) -> Path:
    """A venv at `path` with links to the files of `names`' closure (default: the image's list); returns its
    python. What of the list is not installed here (the image's optional pytest plugins) is left out; the
    project itself is never linked."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    dists, _not_here = closure(names if names is not None else image_packages())
    for dist in dists:
        assert canonicalize_name(dist.metadata["Name"]) != "triton-adder"
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or (site / top).exists():
                continue
            source = Path(dist.locate_file(top))
            if source.exists():
                (site / top).symlink_to(source)
    return python
