"""Shipped screening verdicts: compile-time screen results that a search takes instead of compiling.

A verdict (`prune.ScreenResult`) depends only on the compiler (Triton version), the target
(e.g. "sm90"), the kernel source (its hash), the op, the problem and the config, so one computed
on any machine (compiling needs no GPU) holds on every other with the same five. A tunable names
the first four, plus the problem as its verdicts key it, in its `screen_identity`
(`ScreenIdentity`); `search` loads the matching verdicts of the files in its `verdict_dirs`
(default: ``tuning/screens/``, shipped with the package) into the tunable's `screen_cache`, so
those configs are never compiled and cost nothing. Anything else in the files is ignored.

File: ``<dir>/<target>__triton-<version>.json`` (`verdict_filename`)::

    {"format": "screen-verdicts", "version": 1, "triton_version": "3.6.0", "target": "sm90",
     "entries": [{"op", "kernel_hash", "problem", "config", "ok", "reason", "score"}, ...]}

"config" is the tunable's `screen_key(config)` (for the adder's weight gradient: the kernel's
tile, without the run-time split and the method). A file whose header names another Triton
version or target, or that does not parse, is ignored (with a warning for the latter); so is an
entry of another kernel hash, op or problem. `write_verdicts` merges entries into a file (a new
entry replaces one with the same key) and writes it atomically. Never pickle.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from .cache import replace_text
from .prune import ScreenResult
from .space import config_key

FORMAT = "screen-verdicts"
VERSION = 1
SHIPPED_SCREENS_DIR = Path(__file__).resolve().parent / "screens"
ENTRY_FIELDS = ("op", "kernel_hash", "problem", "config", "ok", "reason", "score")


@dataclass(frozen=True)
class ScreenIdentity:
    """What a tunable's screening verdicts are valid for, besides the config.

    triton_version: the compiler's; target: the compile target ("sm90"); kernel_hash: the kernel
    source's (plus anything else the verdict depends on that the caller wants to pin, e.g. the
    screen's rules); problem: the problem as the verdicts are keyed (JSON-serialisable; include
    whatever the compile depends on, such as dtype and memory layout).
    """

    triton_version: str
    target: str
    kernel_hash: str
    problem: Mapping[str, Any] = field(default_factory=dict, hash=False)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def verdict_filename(triton_version: str, target: str) -> str:
    """The file that holds the verdicts of one (target, Triton version)."""

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-") or "unknown"

    return f"{slug(target)}__triton-{slug(triton_version)}.json"


def _entry_key(entry: Mapping) -> str:
    return _canonical([entry["op"], entry["kernel_hash"], entry["problem"], entry["config"]])


def _parse(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path} is not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has version {data.get('version')!r}, expected {VERSION}")
    for entry in data["entries"]:
        missing = [f for f in ENTRY_FIELDS if f not in entry] if isinstance(entry, dict) else list(ENTRY_FIELDS)
        if missing or not isinstance(entry["problem"], dict) or not isinstance(entry["config"], dict):
            raise ValueError(f"{path} has a malformed entry (missing {missing}): {str(entry)[:200]}")
    return data


_parsed: dict[Path, tuple[float, int, dict]] = {}


def _read(path: Path) -> dict | None:
    """The parsed file (memoised by modification time and size), or None when absent or unreadable."""
    try:
        stat = path.stat()
    except OSError:
        return None
    memo = _parsed.get(path)
    if memo is not None and memo[:2] == (stat.st_mtime, stat.st_size):
        return memo[2]
    try:
        data = _parse(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"ignoring unreadable screen verdict file {path}: {error}", RuntimeWarning, stacklevel=3)
        return None
    _parsed[path] = (stat.st_mtime, stat.st_size, data)
    return data


def load_verdicts(
    directories: Sequence[str | os.PathLike], identity: ScreenIdentity, op: str
) -> dict[tuple, ScreenResult]:
    """config_key(screen key) -> ScreenResult of every entry in `directories` valid for (identity, op)."""
    found: dict[tuple, ScreenResult] = {}
    name = verdict_filename(identity.triton_version, identity.target)
    problem = _canonical(dict(identity.problem))
    for directory in directories:
        data = _read(Path(directory) / name)
        if data is None:
            continue
        if data.get("triton_version") != identity.triton_version or data.get("target") != identity.target:
            continue  # another compiler or target: its verdicts say nothing here
        for entry in data["entries"]:
            if (entry["op"] != op or entry["kernel_hash"] != identity.kernel_hash
                    or _canonical(entry["problem"]) != problem):  # fmt: skip
                continue
            found[config_key(entry["config"])] = ScreenResult(bool(entry["ok"]), str(entry["reason"]),
                                                              float(entry["score"]))  # fmt: skip
    return found


def verdict_entries(identity: ScreenIdentity, op: str, verdicts: Iterable[tuple[Mapping, ScreenResult]]) -> list[dict]:
    """File entries for (screen key, verdict) pairs; verdicts where the screen raised are left out
    (an error is not a verdict: it may not recur elsewhere)."""
    return [
        {"op": op, "kernel_hash": identity.kernel_hash, "problem": dict(identity.problem), "config": dict(config),
         "ok": verdict.ok, "reason": verdict.reason, "score": verdict.score}
        for config, verdict in verdicts
        if not verdict.raised
    ]  # fmt: skip


def write_verdicts(path: str | os.PathLike, triton_version: str, target: str, entries: Iterable[Mapping]) -> int:
    """Merge `entries` (`verdict_entries`) into the verdict file at `path` (created if absent); returns
    how many entries it holds. Refuses a file of another Triton version or target (ValueError). The
    read-merge-replace holds a lock on ``<path>.lock``, so two screening runs writing one file lose nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        return _merge_into(path, triton_version, target, entries)


def _merge_into(path: Path, triton_version: str, target: str, entries: Iterable[Mapping]) -> int:
    current: dict[str, dict] = {}
    if path.exists():
        data = _parse(path)
        if data.get("triton_version") != triton_version or data.get("target") != target:
            raise ValueError(f"{path} holds verdicts for {data.get('target')} / Triton {data.get('triton_version')}, "
                             f"not {target} / Triton {triton_version}")  # fmt: skip
        current = {_entry_key(e): e for e in data["entries"]}
    for entry in entries:
        current[_entry_key(entry)] = dict(entry)
    header = {"format": FORMAT, "version": VERSION, "triton_version": triton_version, "target": target}
    # One entry per line: a shipped file diffs line by line.
    text = _canonical(header)[:-1] + ',"entries":[\n' + ",\n".join(_canonical(current[k]) for k in sorted(current))
    text += "\n]}\n"
    replace_text(path, text)
    return len(current)
