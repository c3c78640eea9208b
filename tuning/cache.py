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
once lose nothing; the new file's mode follows the umask. A file that does not parse is moved aside
(``.corrupt-<time>``) with a warning and rebuilt. Any content is safe to read (bytes, nesting, huge numbers,
wrong types): an entry is used only if well-formed and accepted by the owner's `accept_entry` (e.g. its
launcher would launch the config); the others are ignored with one warning per file, and a file or
directory that cannot be read is ignored with one warning. A location that cannot be written makes
`store` / `check_writable` raise `CacheLocationError`, one line naming the path and why.
Read-only "shipped" directories (tuned configs for known GPUs) sit beneath the user's cache: a user
entry wins over a shipped entry with the same key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .space import next_power_of_two

FORMAT = "tuning-cache"
VERSION = 1
REQUIRED_FIELDS = ("op", "kernel_hash", "dtype", "layout", "problem", "config")
MAX_PROBLEM_DEPTH = 3  # problem -> a nested problem (e.g. what a shrunk problem was reduced from) -> a list
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


def _is_number(value: Any) -> bool:
    """An int or a finite float, not a bool (json reads 1e400 as inf, and Python's json accepts NaN)."""
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _plain(value: Any, depth: int) -> bool:
    """value is a JSON object or list whose leaves are strings, bools, nulls or finite numbers, `depth` levels deep
    at most (bounded, so no nesting can exhaust the stack later)."""
    if isinstance(value, (str, bool)) or value is None or _is_number(value):
        return True
    if depth <= 0:
        return False
    if isinstance(value, dict):
        return all(_plain(v, depth - 1) for v in value.values())
    return isinstance(value, list) and all(_plain(v, depth - 1) for v in value)


def _why(error: OSError) -> str:
    """An OSError as one short line: 'Permission denied: /path' (no errno, no traceback)."""
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason


class CacheLocationError(OSError):
    """The cache directory or file cannot be written; the message names the path and why, in one line."""


class TuningCache:
    """The cache of one device identity.

    cache_dir: the user's (writable) directory; shipped_dirs: read-only directories searched
    beneath it; bucket_field: the problem field bucketed to a power of two (the batch);
    accept_entry: the owner's check of an entry (raises to refuse it: e.g. a config its launcher would not
    launch). The cache itself checks only the structure. Refused or malformed entries are never returned by
    `lookup` (so a tuner re-tunes them), and each file read warns once about all of them.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        identity: DeviceIdentity,
        shipped_dirs: Sequence[str | os.PathLike] = (SHIPPED_DIR,),
        bucket_field: str = "batch",
        accept_entry: Callable[[dict], object] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.identity = identity
        self.shipped_dirs = [Path(d) for d in shipped_dirs]
        self.bucket_field = bucket_field
        self.accept_entry = accept_entry
        self._warned: set[str] = set()
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

    def _parse(self, data: bytes, origin: Path) -> tuple[dict[str, dict], list[str]]:
        """(well-formed entries by key, why each other entry was dropped); ValueError if the file as a whole is not
        a cache. Any bytes are safe: decoding, nesting depth and number overflow all end in ValueError."""
        try:
            document = json.loads(data.decode("utf-8"))
        except RecursionError as error:  # json's C scanner recurses once per nesting level
            raise ValueError("nested too deeply") from error
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{origin} is not a {FORMAT} file")
        version = document.get("version")
        if type(version) is not int or version != VERSION:  # never repr it: it may be nested 900 deep
            raise ValueError(f"{origin} has version {version if type(version) is int else '(not an int)'}, "
                             f"expected {VERSION}")
        if not isinstance(document.get("entries"), list):
            raise ValueError(f"{origin} has no entries list")
        entries, dropped = {}, []
        for index, entry in enumerate(document["entries"]):
            why = self._malformed(entry)
            if why:
                dropped.append(f"entry {index}: {why}")
            else:
                entries[self._entry_key(entry)] = entry
        return entries, dropped

    def _malformed(self, entry: Any) -> str | None:
        """Why `entry` cannot be keyed or read by this class (None: well-formed); what it means is accept_entry's."""
        if not isinstance(entry, dict):
            return f"not an object but {type(entry).__name__}"
        missing = [f for f in REQUIRED_FIELDS if f not in entry]
        if missing:
            return f"missing {missing}"
        for name in ("op", "kernel_hash", "dtype", "layout", "triton_version"):
            if name in entry and not isinstance(entry[name], str):
                return f"{name} is not a string"
        for name in ("time_s", "default_time_s"):  # the tuner prints them
            if entry.get(name) is not None and not (_is_number(entry[name]) and entry[name] >= 0):
                return f"{name} is not a finite number >= 0"
        if not isinstance(entry.get("functional", False), bool):
            return "functional is not a bool"
        if not (isinstance(entry["problem"], dict) and _plain(entry["problem"], MAX_PROBLEM_DEPTH)):
            return f"problem is not an object of numbers, strings and lists (at most {MAX_PROBLEM_DEPTH} deep)"
        if not (isinstance(entry["config"], dict) and _plain(entry["config"], 1)):
            return "config is not an object of numbers and strings"
        batch = entry["problem"].get(self.bucket_field, 1)
        if not (type(batch) is int and batch >= 1):
            return f"problem.{self.bucket_field} is not an int >= 1"
        return None

    def _refusal(self, entry: dict) -> str | None:
        """Why the owner's accept_entry refuses `entry`, or None."""
        if self.accept_entry is None:
            return None
        try:
            self.accept_entry(entry)
        except Exception as error:  # noqa: BLE001 -- any refusal (or a validator's own bug) means: do not use it
            return str(error)[:300] or type(error).__name__
        return None

    def _warn_once(self, message: str) -> None:
        # Once per cache object and message: a layer looking up many shapes must not repeat it per call.
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _read(self, path: Path, user: bool) -> dict[str, dict]:
        """The well-formed entries of `path` (refused ones too, skipped by `_load`), warning once about the rest.

        Never raises: a file that cannot be read, or (shipped) parsed, is ignored; a corrupt user file is moved aside.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            self._warn_once(f"ignoring the tuning cache {path}: {_why(error)}")
            return {}
        try:
            entries, dropped = self._parse(data, path)
        except ValueError as error:
            if not user:
                self._warn_once(f"ignoring unreadable shipped tuning file {path}: {error}")
                return {}
            try:
                with FileLock(self.lock_path):
                    entries, dropped = self._recover_corrupt(error)
            except OSError as failure:  # a read-only cache: leave the file as it is
                self._warn_once(f"ignoring the corrupt tuning cache {path} ({error}); cannot move it aside: "
                                f"{_why(failure)}")
                return {}
        dropped += [why for entry in entries.values() if (why := self._refusal(entry))]
        if dropped:
            more = f"; and {len(dropped) - 3} more" if len(dropped) > 3 else ""
            self._warn_once(f"tuning cache {path}: ignoring {len(dropped)} unusable "
                            f"entr{'y' if len(dropped) == 1 else 'ies'} ({'; '.join(dropped[:3])}{more})")
        return entries

    def _recover_corrupt(self, error: Exception) -> tuple[dict[str, dict], list[str]]:
        """Called with the lock held: re-check (another process may have repaired it), else move it aside."""
        try:
            return self._parse(self.path.read_bytes(), self.path)
        except FileNotFoundError:
            return {}, []
        except ValueError as again:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(self.path, aside)
            self._warn_once(f"tuning cache {self.path} is corrupt ({str(again)[:200]}); moved it to {aside} and "
                            "starting a new one")
            return {}, []

    def _load(self):
        if self._user is None:
            self._user = self._read(self.path, user=True)
        if self._shipped is None:
            self._shipped = {}
            for directory in self.shipped_dirs:
                path = directory / self.identity.filename
                if path.is_file() and path.resolve() != self.path.resolve():
                    self._shipped.update(self._read(path, user=False))
        if self._families is None:
            families: dict[str, dict[int, tuple[dict, str]]] = {}
            # Shipped first, so a user entry with the same key replaces it.
            for source, entries in (("shipped", self._shipped), ("user", self._user)):
                for entry in entries.values():
                    if entry.get("triton_version") != self.identity.triton_version:
                        continue  # another Triton compiles another kernel: its timing says nothing here
                    if self._refusal(entry):
                        continue  # the owner would not launch it: as if not cached (the tuner re-tunes it)
                    family = self._family(entry["op"], entry["kernel_hash"], entry["dtype"], entry["layout"],
                                          entry["problem"])
                    batch = bucket(entry["problem"].get(self.bucket_field, 1))
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
        """Add or replace entries: lock, re-read the file (keeping other processes' entries), merge, replace.

        Entries the file holds that are malformed or refused (warned about when read) are dropped, so a
        rewrite heals the file. Raises CacheLocationError (one line naming the path and why) if the cache
        cannot be written, ValueError if a new entry is one this cache would never return.
        """
        new = {self._entry_key(e): dict(e) for e in entries}
        for entry in new.values():
            why = self._malformed(entry) or self._refusal(entry)
            if why:  # the caller's search and its accept_entry disagree: a bug to see now, not a silent re-tune
                raise ValueError(f"refusing to store an entry the cache would ignore: {why}")
        with self._writing():
            try:
                current, _ = self._parse(self.path.read_bytes(), self.path)
            except FileNotFoundError:
                current = {}
            except ValueError as error:
                current, _ = self._recover_corrupt(error)
            current = {key: entry for key, entry in current.items() if not self._refusal(entry)}
            current.update(new)
            document = {
                "format": FORMAT,
                "version": VERSION,
                "device": self.identity.as_dict(),
                "entries": [current[k] for k in sorted(current)],
            }
            replace_text(self.path, json.dumps(document, indent=1, sort_keys=True) + "\n")
        self._user = current
        self._families = None

    def check_writable(self) -> None:
        """Raise CacheLocationError unless `store` can write here (a tuner calls it before spending hours)."""
        with self._writing():
            handle, tmp = _temp_file(self.path)
            handle.close()
            os.unlink(tmp)

    @contextlib.contextmanager
    def _writing(self):
        """Hold the lock; turn any OSError into a CacheLocationError naming the cache file and why."""
        where = f"cannot write the tuning cache {self.path}"
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:  # mkdir's way of saying "a file is in the way"
            raise CacheLocationError(f"{where}: a file is in the way of the directory {self.cache_dir}") from error
        except OSError as error:
            raise CacheLocationError(f"{where}: {_why(error)}") from error
        if self.path.is_dir():  # os.replace would say "Is a directory" only after the whole run
            raise CacheLocationError(f"{where}: it is a directory")
        try:
            with FileLock(self.lock_path):
                yield
        except OSError as error:
            raise CacheLocationError(f"{where}: {_why(error)}") from error


def _temp_file(path: Path):
    """(text handle, path) of a new temp file beside `path`, mode 0o666 less the umask as for any new file
    (tempfile.mkstemp would make it 0600, and os.replace keeps that); O_EXCL: never someone else's file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "w"), tmp


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temp file beside it, synced, then os.replace, so a reader (or a
    crash) sees the old file or the new one, never half of one; the new file's mode follows the umask."""
    handle, tmp = _temp_file(Path(path))
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
