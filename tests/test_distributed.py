"""torchrun with 2 CPU processes (gloo): data-parallel training and sharded tuning.

Each test starts `python -m torch.distributed.run --standalone` (a free port of its own) as a
subprocess, with the CPU path eager (no compile time) and the interpreter off for training.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests import ddp_worker
from triton_adder.autotune import problems
from triton_adder.models import build
from triton_adder.training import distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(arguments, log: Path, interpreter: bool = False, timeout: int = 300):
    env = {**os.environ, "TRITON_ADDER_CPU_COMPILE": "0", "TRITON_INTERPRET": "1" if interpreter else "0",
           "OMP_NUM_THREADS": "1"}
    # Output to a file, not a pipe: progress bars would fill an unread pipe and block the run.
    with open(log, "w") as out:
        process = subprocess.Popen([*TORCHRUN, *arguments], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=timeout)
        finally:
            process.kill()  # never leave the launcher (and its workers) behind on a timeout
    assert process.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def test_two_processes_end_where_one_process_on_the_whole_batch_ends(tmp_path):
    _torchrun([str(Path(ddp_worker.__file__)), str(tmp_path / "ddp.pt")], tmp_path / "ddp.log")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    torch.set_num_threads(1)
    single = ddp_worker.train(distributed.Context(0, 1, 0, torch.device("cpu")))
    initial = ddp_worker.adder_net().state_dict()
    assert ddp.keys() == single.keys()
    for name in single:
        # float32, 4 SGD steps: the all-reduced mean of two half-batch gradients differs from the
        # whole-batch mean by summation order only (~1e-7 relative per step). A wrong data split, or
        # the adaptive learning rate taken before the all-reduce, moves weights by ~1e-2 (the step
        # size), far outside the tolerance; the weights must also have moved that far from init.
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
        assert (single[name] - initial[name]).abs().max() > 1e-3, f"{name} did not train"


def test_train_cli_under_torchrun_logs_world_size_from_rank_0(tmp_path):
    out = tmp_path / "run"
    _torchrun(["-m", "triton_adder.train", "--epochs", "1", "--train-subset", "32", "--batch-size", "16",
               "--threads", "1", "--no-progress", "--output-dir", str(out)], tmp_path / "train.log")
    summary = json.loads((out / "lenet5bn-adder-paper-alr.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.suffix for p in out.iterdir()) == [".ckpt", ".csv", ".json", ".pt"]


def test_two_rank_tuning_fills_one_cache_with_every_problem_once(tmp_path):
    cache_dir = tmp_path / "cache"
    text = _torchrun(["-m", "triton_adder.tune", "--model", "lenet5bn", "--quick", "--ops", "fwd", "--full-size",
                      "--batch-size", "1", "--no-report", "--cache-dir", str(cache_dir)], tmp_path / "tune.log",
                     interpreter=True, timeout=600)
    expected = problems.collect_problems(build("lenet5bn", adder=True), (1, 1, 28, 28))
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1
    entries = json.loads(files[0].read_text())["entries"]
    assert sorted(json.dumps(e["problem"], sort_keys=True) for e in entries) == sorted(
        json.dumps(p.cache_problem(), sort_keys=True) for p in expected)
    # Rank 0's joined table: every problem once, each tuned (not found cached) by one of the two ranks.
    # (Table rows: "<layer> forward ..."; the ranks' "stored forward of <layer> ..." log lines are not rows.)
    table = [line.split() for line in text.splitlines() if " forward " in line and not line.startswith("stored ")]
    assert [line[0] for line in table] == [p.layers[0] for p in expected]
    assert all("tuned" in line for line in table)
    assert sorted(line[-1] for line in table) == ["0", "0", "1"]
