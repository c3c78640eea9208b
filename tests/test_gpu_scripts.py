"""The GPU-session scripts: benchmarks/kernel_vs_cudnn.py and benchmarks/gpu_run.sh, checked without a GPU.

- kernel_vs_cudnn.py exits cleanly (status 0, a message, no files) when there is no CUDA device;
- its goal arithmetic on hand-made timings (ratios, verdicts, the layer_count-weighted total);
- its whole pipeline (implementations, float64 slice checks, timing, tables, CSV/JSON) on the CPU
  through the Triton interpreter, on one tiny ResNet-20 layer and the cheap variants, and that a
  wrong kernel output fails the check;
- gpu_run.sh parses (`bash -n`) and its dry run without a GPU skips the GPU steps and succeeds.
The CPU runs are functional only: their times are interpreter wall clock, never GPU figures.
"""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernel_vs_cudnn.py"
GPU_RUN = REPO / "benchmarks" / "gpu_run.sh"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


def _load_script():
    spec = importlib.util.spec_from_file_location("kernel_vs_cudnn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


kvc = _load_script()


@NO_CUDA
def test_kernel_vs_cudnn_without_cuda_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert kvc.NEEDS_GPU_MESSAGE in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def _rows(times: dict[str, dict[str, float]], counts: dict[str, int]) -> pd.DataFrame:
    rows = []
    for layer, by_variant in times.items():
        for key, ms in by_variant.items():
            variant = kvc.VARIANT_BY_KEY[key]
            rows.append(dict(layer=layer, layer_count=counts[layer], variant=key, op=variant.op, role=variant.role,
                             status="ok" if ms is not None else "error", median_ms=ms))  # fmt: skip
    return pd.DataFrame(rows)


def _goal(goals, layer, text):
    (match,) = [g for g in goals if g["layer"] == layer and g["ratio_name"] == text]
    return match


def test_goal_ratios_verdicts_and_weighted_total():
    frame = _rows(
        {
            "A": {"adder_fp32": 2.0, "conv_fp32": 1.0, "adder_fp16": 1.0, "adder_grad_input": 4.0,
                  "cudnn_grad_input": 1.0},
            "B": {"adder_fp32": 3.0, "conv_fp32": 1.0, "adder_fp16": 3.0, "adder_grad_input": None,
                  "cudnn_grad_input": 1.0},
        },  # fmt: skip
        {"A": 3, "B": 1},
    )
    goals = kvc.evaluate_goals(frame)
    g1, g2, g3 = (goal.text for goal in kvc.GOALS[:3])
    assert _goal(goals, "A", g1)["ratio"] == pytest.approx(2.0) and _goal(goals, "A", g1)["met"] is True
    assert _goal(goals, "B", g1)["ratio"] == pytest.approx(3.0) and _goal(goals, "B", g1)["met"] is False
    # total: (2*3 + 3*1) / (1*3 + 1*1) = 9/4 for the forward, weighted by layer_count
    assert _goal(goals, kvc.TOTAL, g1)["ratio"] == pytest.approx(9 / 4)
    # the fp16 goal is a speedup (>=): A 2.0 met, B 1.0 missed
    assert _goal(goals, "A", g2)["met"] is True and _goal(goals, "B", g2)["met"] is False
    # B's grad_input errored: no ratio for B, none for the total (a total over some layers would mislead)
    assert _goal(goals, "A", g3)["ratio"] == pytest.approx(4.0) and _goal(goals, "A", g3)["met"] is False
    assert math.isnan(_goal(goals, "B", g3)["ratio"]) and _goal(goals, "B", g3)["met"] is None
    assert math.isnan(_goal(goals, kvc.TOTAL, g3)["ratio"])
    text = kvc.format_tables(frame, goals)
    assert "G1" in text and "2.25 met" in text and "3.00 MISSED" in text and "L2" in text


@NO_CUDA
def test_pipeline_on_the_cpu_interpreter(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs the Triton interpreter (tests/conftest.py turns it on without CUDA)")
    variants = "adder_fp32,conv_fp32,cudnn_grad_input,adder_grad_weight_conv_identity,cudnn_grad_weight"
    args = kvc.parse_args(["--model", "resnet20", "--batch", "1", "--max-layers", "1", "--quick",
                           "--check-images", "1", "--out", str(tmp_path), "--variants", variants])  # fmt: skip
    frame, metadata, goals, (csv_path, json_path) = kvc.run(args, torch.device("cpu"), "test")
    assert list(frame["variant"]) == variants.split(",")
    assert (frame["status"] == "ok").all(), frame[["variant", "status", "reason"]]
    adder = frame[frame["role"] == "adder"]
    assert (adder["check"] == "pass").all() and (adder["rel_err"] < 1e-5).all()
    assert (frame[frame["role"] == "baseline"]["check"] == "info").all()
    assert adder.iloc[0]["config"].startswith("default {'block_m'")
    assert kvc.failures(frame).empty
    saved = json.loads(json_path.read_text())
    assert saved["metadata"]["device_kind"] == "cpu" and "not GPU timings" in saved["metadata"]["note"]
    assert {g["ratio_name"] for g in saved["metadata"]["goals"]} == {goal.text for goal in kvc.GOALS}
    assert len(pd.read_csv(csv_path)) == len(frame)

    # The check must be able to fail: a forward kernel off by one is caught and reported.
    from triton_adder.kernels import forward as fwd

    real_forward = fwd.forward
    monkeypatch.setattr(fwd, "forward", lambda *a, **k: real_forward(*a, **k) + 1)
    args = kvc.parse_args(["--model", "resnet20", "--batch", "1", "--max-layers", "1", "--quick",
                           "--check-images", "1", "--out", str(tmp_path), "--variants", "adder_fp32"])  # fmt: skip
    frame, *_ = kvc.run(args, torch.device("cpu"), "test")
    assert frame.iloc[0]["check"] == "FAIL" and len(kvc.failures(frame)) == 1


def test_unknown_variant_is_rejected(capsys):
    with pytest.raises(SystemExit):
        kvc.parse_args(["--variants", "adder_fp32,adder_fp64"])
    assert "adder_fp64" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_script_parses():
    result = subprocess.run(["bash", "-n", str(GPU_RUN)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@NO_CUDA
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_dry_run_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, TOTAL_S="120")
    command = ["bash", str(GPU_RUN), "info", "kernel_vs_cudnn", "tests", "tune", "report"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "out" / "gpu_run.log").read_text()
    assert "NO CUDA DEVICE" in log and kvc.NEEDS_GPU_MESSAGE in log
    for step in ("tests", "tune", "report"):
        assert f"=== {step}: skipped (no CUDA device)" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_run.log"]
    # An unknown step is an error, named in the log.
    result = subprocess.run(["bash", str(GPU_RUN), "benchmark"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 1 and "unknown step 'benchmark'" in result.stdout


def test_sigterm_kills_tracked_compile_sessions_and_exits():
    """What `timeout` sends a gpu_run.sh step: the CLIs' handler (`child_process.exit_on_sigterm`) kills the
    screen's compile children, which lead sessions of their own that a signal to our group does not reach."""
    script = (
        "import subprocess, sys, time\n"
        "from triton_adder import child_process\n"
        "child = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "child_process.track_session(child.pid, alive=True)\n"
        "child_process.exit_on_sigterm()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    child_pid = int(process.stdout.readline())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143
    for _ in range(100):  # the killed sleep is reaped by init once its parent is gone
        if not os.path.exists(f"/proc/{child_pid}") or "Z" in open(f"/proc/{child_pid}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"compile session {child_pid} outlived the SIGTERM")
