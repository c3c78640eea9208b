"""The environment of a child Python process that must import this same copy of triton_adder.

The precompile workers and the screen's compiles run in fresh interpreters (`sys.executable`). A
checkout used without installing (PYTHONPATH, or a script that puts the repository on sys.path)
would otherwise be invisible to them, or a different installed copy would be imported instead.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def child_env(without: tuple[str, ...] = ()) -> dict[str, str]:
    """os.environ with this package's root first on PYTHONPATH, minus the variables in `without`."""
    env = {key: value for key, value in os.environ.items() if key not in without}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env
