"""Run from a plain checkout (PYTHONPATH=<repository root>), not only from an installed package.

The generic tuner and the report renderer live in the repository's top-level `tuning/` and
`reports/` folders but are installed as `triton_adder.tuning` and `triton_adder.reports`
(pyproject's package-dir), so that an installed environment gets no generic top-level name.
From a checkout those two names do not exist on disk under `triton_adder/`; the GPU machines'
image runs the package that way (nothing can be installed there), so `register()` adds an import
finder that maps them to the sibling folders. It is consulted after every other finder, so an
installed (or editable) package's own mapping always wins, and it is only added when the
folders beside `triton_adder/` are this repository's (its pyproject.toml names the project).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACKAGE = "triton_adder"
SIBLING_FOLDERS = {f"{PACKAGE}.tuning": "tuning", f"{PACKAGE}.reports": "reports"}  # pyproject's package-dir
PROJECT_NAME_LINE = 'name = "triton-adder"'


class SiblingFolderFinder(importlib.abc.MetaPathFinder):
    """Finds `triton_adder.tuning` / `triton_adder.reports` in the checkout's top-level folders.
    Their submodules are then found the usual way, through the package's `__path__`."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        folder = SIBLING_FOLDERS.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def checkout_root(package_dir: Path) -> Path | None:
    """The repository root when `package_dir` is `triton_adder/` of a checkout (not an install)."""
    root = package_dir.parent
    pyproject = root / "pyproject.toml"
    if any((package_dir / folder).exists() for folder in SIBLING_FOLDERS.values()):
        return None  # installed layout: the folders are inside the package
    if not pyproject.is_file() or PROJECT_NAME_LINE not in pyproject.read_text(encoding="utf-8", errors="replace"):
        return None
    return root


def register(package_dir: Path) -> None:
    root = checkout_root(package_dir)
    if root is None or any(isinstance(f, SiblingFolderFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(SiblingFolderFinder(root))
