"""Persistent tuning cache: one JSON file per device identity, safe under concurrent tuners.

File: ``<cache_dir>/<device-identity>.json`` (device name, compute capability, Triton version)::

    {"format": "tuning-cache", "version": 1,
     "device": {"name": ..., "capability": ..., "triton_version": ...},
     "entries": [{"op", "kernel_hash", "dtype", "layout", "problem", "config", "time_s",
                  "default_time_s", "functional", "triton_version", "measured", "created"}, ...]}

An entry is keyed by (op, kernel_hash, dtype, layout, problem), with the problem's batch field
bucketed to the next power of two, so a new batch size reuses a neighbour's config. Lookup:
exact bucket, then the nearest bucket of the same family (everything but the batch equal), then
None (the caller's heuristic default). Entries from another kernel hash never match (the hash
is in the key), entries from another Triton version are ignored.

Never pickle. Writes take an exclusive lock (`filelock.FileLock`) on a sidecar ``.lock`` file,
re-read the file, merge, and atomically replace it (temp file + os.replace), so two tuners at
once lose nothing. A file that does not parse is moved aside (``.corrupt-<time>``) with a
warning and rebuilt. Read-only "shipped" directories (tuned configs for known GPUs) sit beneath
the user's cache: a user entry wins over a shipped entry with the same key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .space import next_power_of_two

FORMAT = "tuning-cache"
VERSION = 1
REQUIRED_FIELDS = ("op", "kernel_hash", "dtype", "layout", "problem", "config")
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class DeviceIdentity:
    """What a timing is valid for. capability: "sm90" style on CUDA, "interpreter" for the Triton interpreter."""

    name: str
    capability: str
    triton_version: str

    @property
    def filename(self) -> str:
        def slug(text: str) -> str:
            return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"

        return f"{slug(self.name)}__{slug(self.capability)}__triton-{slug(self.triton_version)}.json"

    def as_dict(self) -> dict:
        return asdict(self)


def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return "none"


def device_identity(device) -> DeviceIdentity:
    """Identity of a torch device: the GPU's name and capability on CUDA, "interpreter" on CPU."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        return DeviceIdentity(name, f"sm{major}{minor}", triton_version())
    return DeviceIdentity(f"{kind}", "interpreter", triton_version())


def bucket(value: int) -> int:
    """The batch bucket of `value`: the next power of two."""
    return next_power_of_two(value)


@dataclass(frozen=True)
class CacheHit:
    """A lookup result. match: "exact" (same bucket) or "nearest" (other batch bucket); source: "user"|"shipped"."""

    config: dict
    entry: dict
    match: str
    source: str


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class TuningCache:
    """The cache of one device identity.

    cache_dir: the user's (writable) directory; shipped_dirs: read-only directories searched
    beneath it; bucket_field: the problem field bucketed to a power of two (the batch).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        identity: DeviceIdentity,
        shipped_dirs: Sequence[str | os.PathLike] = (SHIPPED_DIR,),
        bucket_field: str = "batch",
    ):
        self.cache_dir = Path(cache_dir)
        self.identity = identity
        self.shipped_dirs = [Path(d) for d in shipped_dirs]
        self.bucket_field = bucket_field
        self._user: dict[str, dict] | None = None
        self._shipped: dict[str, dict] | None = None
        self._families: dict[str, dict[int, tuple[dict, str]]] | None = None

    @property
    def path(self) -> Path:
        return self.cache_dir / self.identity.filename

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # --- keys -------------------------------------------------------------------------------

    def bucketed(self, problem: Mapping) -> dict:
        problem = dict(problem)
        if self.bucket_field in problem:
            problem[self.bucket_field] = bucket(problem[self.bucket_field])
        return problem

    def _family(self, op: str, kernel_hash: str, dtype: str, layout: str, problem: Mapping) -> str:
        rest = {k: v for k, v in problem.items() if k != self.bucket_field}
        return _canonical([op, kernel_hash, dtype, layout, rest])

    def key(self, op: str, kernel_hash: str, dtype: str, layout: str, problem: Mapping) -> str:
        """The entry key: problem with its batch bucketed, as canonical JSON."""
        return _canonical([op, kernel_hash, dtype, layout, self.bucketed(problem)])

    def _entry_key(self, entry: Mapping) -> str:
        return self.key(entry["op"], entry["kernel_hash"], entry["dtype"], entry["layout"], entry["problem"])

    # --- reading ----------------------------------------------------------------------------

    def _parse(self, text: str, origin: Path) -> dict[str, dict]:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"{origin} is not a {FORMAT} file")
        if data.get("version") != VERSION:
            raise ValueError(f"{origin} has version {data.get('version')!r}, expected {VERSION}")
        entries = {}
        for entry in data["entries"]:
            missing = [f for f in REQUIRED_FIELDS if f not in entry] if isinstance(entry, dict) else REQUIRED_FIELDS
            if missing or not isinstance(entry["problem"], dict) or not isinstance(entry["config"], dict):
                raise ValueError(f"{origin} has a malformed entry (missing {missing}): {str(entry)[:200]}")
            entries[self._entry_key(entry)] = entry
        return entries

    def _read_user(self) -> dict[str, dict]:
        """The user file's entries; a corrupt file is moved aside (under the lock) and reads as empty."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            return self._parse(text, self.path)
        except (ValueError, KeyError, TypeError) as error:
            with FileLock(self.lock_path):
                return self._recover_corrupt(error)

    def _recover_corrupt(self, error: Exception) -> dict[str, dict]:
        """Called with the lock held: re-check (another process may have repaired it), else move it aside."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            return self._parse(text, self.path)
        except (ValueError, KeyError, TypeError) as again:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(self.path, aside)
            warnings.warn(
                f"tuning cache {self.path} is corrupt ({again}); moved it to {aside} and starting a new one",
                RuntimeWarning,
                stacklevel=3,
            )
            return {}

    def _read_shipped(self) -> dict[str, dict]:
        entries: dict[str, dict] = {}
        for directory in self.shipped_dirs:
            path = directory / self.identity.filename
            if not path.is_file() or path.resolve() == self.path.resolve():
                continue
            try:
                entries.update(self._parse(path.read_text(), path))
            except (ValueError, KeyError, TypeError) as error:
                warnings.warn(f"ignoring unreadable shipped tuning file {path}: {error}", RuntimeWarning, stacklevel=3)
        return entries

    def _load(self):
        if self._user is None:
            self._user = self._read_user()
        if self._shipped is None:
            self._shipped = self._read_shipped()
        if self._families is None:
            families: dict[str, dict[int, tuple[dict, str]]] = {}
            # Shipped first, so a user entry with the same key replaces it.
            for source, entries in (("shipped", self._shipped), ("user", self._user)):
                for entry in entries.values():
                    if entry.get("triton_version") != self.identity.triton_version:
                        continue  # another Triton compiles another kernel: its timing says nothing here
                    family = self._family(entry["op"], entry["kernel_hash"], entry["dtype"], entry["layout"],
                                          entry["problem"])
                    batch = entry["problem"].get(self.bucket_field, 1)
                    families.setdefault(family, {})[batch] = (entry, source)
            self._families = families

    def reload(self):
        """Forget what was read; the next lookup re-reads the files (after another process tuned)."""
        self._user = self._shipped = self._families = None

    def entries(self) -> list[dict]:
        """Every entry of the user file (including ignored ones), as stored."""
        self._load()
        return list(self._user.values())

    def lookup(
        self,
        op: str,
        kernel_hash: str,
        dtype: str,
        layout: str,
        problem: Mapping,
        allow_functional: bool = True,
        allow_nearest: bool = True,
    ) -> CacheHit | None:
        """The cached config for this problem: exact bucket, else the nearest batch bucket, else None.

        allow_functional=False skips entries timed by wall clock (CPU/interpreter), as a GPU must.
        Nearest is by |log2| distance of the buckets; a tie goes to the larger bucket.
        """
        self._load()
        candidates = self._families.get(self._family(op, kernel_hash, dtype, layout, problem))
        if not candidates:
            return None
        target = bucket(problem.get(self.bucket_field, 1))
        usable = {b: hit for b, hit in candidates.items() if allow_functional or not hit[0].get("functional")}
        if target in usable:
            entry, source = usable[target]
            return CacheHit(dict(entry["config"]), entry, "exact", source)
        if not allow_nearest or not usable:
            return None
        nearest = min(usable, key=lambda b: (abs(math.log2(b) - math.log2(target)), -b))
        entry, source = usable[nearest]
        return CacheHit(dict(entry["config"]), entry, "nearest", source)

    # --- writing ----------------------------------------------------------------------------

    def make_entry(
        self,
        op: str,
        kernel_hash: str,
        dtype: str,
        layout: str,
        problem: Mapping,
        config: Mapping,
        time_s: float | None,
        default_time_s: float | None,
        functional: bool,
    ) -> dict:
        """An entry dict for `store`; `measured` keeps the unbucketed problem the timing was taken on."""
        return {
            "op": op,
            "kernel_hash": kernel_hash,
            "dtype": dtype,
            "layout": layout,
            "problem": self.bucketed(problem),
            "measured": dict(problem),
            "config": dict(config),
            "time_s": time_s,
            "default_time_s": default_time_s,
            "functional": bool(functional),
            "triton_version": self.identity.triton_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def store(self, entries: Iterable[Mapping]):
        """Add or replace entries: lock, re-read the file (keeping other processes' entries), merge, replace."""
        new = {self._entry_key(e): dict(e) for e in entries}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_path):
            try:
                current = self._parse(self.path.read_text(), self.path)
            except FileNotFoundError:
                current = {}
            except (ValueError, KeyError, TypeError) as error:
                current = self._recover_corrupt(error)
            current.update(new)
            document = {
                "format": FORMAT,
                "version": VERSION,
                "device": self.identity.as_dict(),
                "entries": [current[k] for k in sorted(current)],
            }
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.cache_dir)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(document, handle, indent=1, sort_keys=True)
                    handle.write("\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._user = current
        self._families = None
