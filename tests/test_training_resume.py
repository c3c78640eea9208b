"""Kill a training run with SIGKILL after a checkpoint, `--resume` it, and compare with a run never interrupted.

The run is deterministic on the CPU (eager chunked path, one thread, data order and augmentation
seeded by (seed, epoch)), so the resumed run must end with bitwise the same weights: any state the
checkpoint forgot (momentum, schedule position, RNG, epoch) changes them.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = ["--epochs", "4", "--train-subset", "64", "--batch-size", "16", "--threads", "1"]
RUN = "lenet5bn-adder-paper-alr"


def _train(output_dir, *extra, wait=True):
    # The CPU backend, eager (no compile time), as a user without TRITON_INTERPRET runs it.
    env = {**os.environ, "TRITON_ADDER_CPU_COMPILE": "0", "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "triton_adder.train", *ARGS, "--output-dir", str(output_dir), *extra]
    # stderr to a file, not a pipe: the progress bars would fill an unread pipe and block the run.
    log = output_dir.parent / f"{output_dir.name}-{len(extra)}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    if wait:
        try:
            process.wait(timeout=300)
        finally:
            process.kill()  # never leave a run behind when the wait times out
        assert process.returncode == 0, log.read_text()[-2000:]
    return process


def _completed_epochs(checkpoint) -> int:
    try:
        return int(torch.load(checkpoint, weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0  # not written yet (the atomic replace means a partial file is never seen)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    _train(tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    process = _train(interrupted, wait=False)
    checkpoint = interrupted / f"{RUN}.ckpt"
    deadline = time.monotonic() + 240
    while _completed_epochs(checkpoint) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is not None or _completed_epochs(checkpoint) < 2:
        process.kill()
        pytest.fail("the run ended (or never reached its epoch-2 checkpoint) before it could be killed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _completed_epochs(checkpoint)
    assert 2 <= killed_at < 4
    assert not (interrupted / f"{RUN}.pt").exists()  # the final weights were not written: it really stopped
    _train(interrupted, "--resume")
    whole = torch.load(tmp_path / "whole" / f"{RUN}.pt", weights_only=True)
    resumed = torch.load(interrupted / f"{RUN}.pt", weights_only=True)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
