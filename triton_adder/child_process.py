"""The environment of a child Python process that must import this same copy of triton_adder.

The precompile workers and the screen's compiles run in fresh interpreters (`sys.executable`). A
checkout used without installing (PYTHONPATH, or a script that puts the repository on sys.path)
would otherwise be invisible to them, or a different installed copy would be imported instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def child_env(without: tuple[str, ...] = ()) -> dict[str, str]:
    """os.environ with this package's root first on PYTHONPATH, minus the variables in `without`."""
    env = {key: value for key, value in os.environ.items() if key not in without}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


# Children started in a session of their own (the screen's compiles: `measure.sass`), so that a kill
# reaches their ptxas too; a signal to our process group does not reach them, so they are listed here.
_sessions: set[int] = set()
_sessions_lock = threading.Lock()


def track_session(pid: int, alive: bool) -> None:
    """Record (alive=True) or forget a child that leads its own session (`exit_on_sigterm` kills those)."""
    with _sessions_lock:
        (_sessions.add if alive else _sessions.discard)(pid)


def exit_on_sigterm() -> None:
    """On SIGTERM (what `timeout` sends a step of benchmarks/gpu_run.sh), kill the tracked child sessions
    and exit with status 143, instead of dying at once and leaving compiles running into the next step."""

    def handler(signum, frame):
        with _sessions_lock:
            pids = list(_sessions)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass  # already gone
        sys.exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
