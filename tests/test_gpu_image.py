"""The package runs from a plain checkout with only the GPU machines' image's packages.

`tests/gpu_image.py` builds a venv holding exactly gpu_run.sh's IMAGE_PACKAGES (and what they
require), without the project; every module of the library, the generic tuner and the report
renderer must import there with PYTHONPATH at this checkout, and every benchmark script the GPU
run calls must start. (At 4be0d16 this failed: platformdirs missing, and `triton_adder.tuning` and
`triton_adder.reports`, then mapped onto `tuning/` and `reports/` by pyproject's package-dir, existing
only after `pip install`; they are now the top-level packages `tuning` and `reports`.)
"""

import json
import os
import shutil
import subprocess
import tarfile
import textwrap

import pandas as pd
import pytest

from tests import gpu_image

REPO = gpu_image.REPO


@pytest.fixture(scope="module")
def image_python(tmp_path_factory):
    return gpu_image.make_venv(tmp_path_factory.mktemp("gpu-image") / "venv")


def image_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", **extra})
    return env


def test_the_image_venv_lacks_the_project_and_what_the_image_lacks(image_python, tmp_path):
    names = ("triton_adder", "platformdirs", "scipy", "mlxtend")
    probe = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    result = subprocess.run([str(image_python), "-c", probe], cwd=tmp_path, env=image_env(PYTHONPATH=""),
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_every_module_imports_from_the_checkout(image_python, tmp_path):
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import triton_adder, tuning, reports
        names = []
        for package in (triton_adder, tuning, reports):
            names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        failed = []
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as error:
                failed.append(f"{name}: {error!r}")
        assert tuning.__file__.startswith(sys.argv[1]), tuning.__file__
        print(len(names), "modules")
        sys.exit("\\n".join(failed) or None)
    """)
    result = subprocess.run([str(image_python), "-c", script, str(REPO / "tuning")], cwd=tmp_path, env=image_env(),
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.split()[0]) > 50


@pytest.mark.parametrize("script", ["kernel_vs_cudnn.py", "sass_screen.py"])
def test_gpu_run_scripts_start(image_python, tmp_path, script):
    result = subprocess.run([str(image_python), str(REPO / "benchmarks" / script), "--help"], cwd=tmp_path,
                            env=image_env(), capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["triton_adder.tune", "triton_adder.bench"])
def test_gpu_run_clis_start(image_python, tmp_path, module):
    result = subprocess.run([str(image_python), "-m", module, "--help"], cwd=tmp_path, env=image_env(),
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


def _gpu_run(python, out, *steps, checkout=REPO, **env):
    environment = image_env(OUT=str(out), PYTHON=str(python), **env)
    environment.pop("TRITON_INTERPRET")  # the script sets it where a rehearsal needs it
    environment["PYTHONPATH"] = ""
    return subprocess.run(["bash", str(checkout / "benchmarks" / "gpu_run.sh"), *steps], env=environment,
                          capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip


def test_the_whole_gpu_run_rehearsed_on_the_cpu(image_python, tmp_path):
    """REHEARSAL=1: every step the GPU run takes executes here, in the image's package set."""
    out = tmp_path / "out"
    result = _gpu_run(image_python, out, REHEARSAL="1")
    log = (out / "gpu_run.log").read_text()
    assert result.returncode == 0, log[-6000:] + result.stderr[-3000:]
    assert "CPU REHEARSAL" in log and "IMPORT FAILED" not in log
    for step in ("info", "tests", "kernel_vs_cudnn", "sass", "tune", "report"):
        assert f"=== {step}: ok after" in log, step
    # kernel_vs_cudnn: every variant ran and every adder output passed its float64 slice check
    (csv,) = out.glob("kernel_vs_cudnn_*.csv")
    frame = pd.read_csv(csv)
    assert (frame["status"] == "ok").all() and (frame[frame["role"] == "adder"]["check"] == "pass").all()
    assert len(frame) == 12
    # tune: a winner in the interpreter's cache file
    (cache,) = out.glob("cpu__interpreter__triton-*.json")
    entries = json.loads(cache.read_text())["entries"]
    assert entries and all(entry["config"] and entry["op"] == "forward" for entry in entries), entries
    # report: a page in report.tar.gz
    with tarfile.open(out / "report.tar.gz") as tar:
        names = tar.getnames()
    assert any(name.endswith("lenet5bn-cpu/report.html") for name in names), names


def test_the_dry_run_fails_when_the_package_cannot_import(image_python, tmp_path):
    """A checkout whose library needs a package the image lacks (the failure of 4be0d16) fails the
    plain dry run at its info step instead of skipping every GPU step and exiting 0."""
    checkout = tmp_path / "checkout"
    ignored = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "runs", "*.egg-info")
    shutil.copytree(REPO, checkout, ignore=ignored)
    lookup = checkout / "triton_adder" / "autotune" / "lookup.py"
    missing = "import platformdirs  # not in the image\nimport torch\n"
    lookup.write_text(lookup.read_text().replace("import torch\n", missing, 1))
    result = _gpu_run(image_python, tmp_path / "out", "info", "kernel_vs_cudnn", checkout=checkout)
    log = (tmp_path / "out" / "gpu_run.log").read_text()
    assert result.returncode == 1, log
    assert "IMPORT FAILED: triton_adder.backends.triton: ModuleNotFoundError" in log
    assert "info             FAILED" in log


def test_a_tune_step_cut_short_keeps_what_it_tuned(image_python, tmp_path):
    """A lease running out mid-tune is expected: the step is 'partial', not a failure, and the cache
    file that comes back holds the winners stored so far."""
    out = tmp_path / "out"
    # A 25 s cap (5 x 5 in a rehearsal): ResNet-50's 66 problems take about a minute here, the first a second.
    result = _gpu_run(image_python, out, "tune", REHEARSAL="1", TUNE_CAP_S="5", MODEL="resnet50", TUNE_OPS="fwd,bwd")
    log = (out / "gpu_run.log").read_text()
    assert result.returncode == 0, log[-4000:]
    assert "tune             partial" in log
    (cache,) = out.glob("cpu__interpreter__triton-*.json")
    assert json.loads(cache.read_text())["entries"]
