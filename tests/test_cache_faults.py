"""Damaged tuning caches and unusable cache locations (issue 28): the tuner and the layer never break on them.

One rule for both: an entry is used only if the kernels would launch it (`lookup.accept_entry`); anything
else is ignored with one warning naming the file, and the tuner tunes it again. A cache location that
cannot be written ends `tune` with one error line (exit 2); the layer warns once and runs with defaults.
Through the interpreter (conftest) on small problems: LeNet-5-BN's forward (tune) and a 3->4 channel layer.
"""

import copy
import errno
import json
import os
import random
import stat
import warnings
from contextlib import contextmanager

import pytest
import torch

from tests.tolerance import assert_matches_reference
from triton_adder import Adder2d, backends, reference, tune
from triton_adder.autotune import lookup as configs
from triton_adder.autotune import tuner
from triton_adder.functional import resolve_geometry
from triton_adder.geometry import LayerShape
from triton_adder.kernels import forward
from tuning import CacheLocationError, DeviceIdentity, TuningCache

RAW = "__raw__"  # a string placeholder, replaced by raw JSON text json.dumps cannot write (1e400, 10**400)


def _set(path: tuple, value):
    def edit(entry):
        target = entry
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


# Damages of one entry: (edit of the entry, raw JSON text for the placeholder, if any).
ENTRY_DAMAGES = {
    "batch 1e400": (_set(("problem", "batch"), RAW), "1e400"),
    "batch 10**400": (_set(("problem", "batch"), RAW), "1" + "0" * 400),
    "block 1024x128": (lambda e: e["config"].update(block_m=1024, block_n=128), None),
    "string value": (lambda e: e["config"].update(block_m=str(e["config"]["block_m"])), None),
    "bool value": (_set(("config", "block_k"), True), None),
    "float value": (lambda e: e["config"].update(block_m=float(e["config"]["block_m"])), None),
    "nested value": (lambda e: e["config"].update(block_m=[e["config"]["block_m"]]), None),
    "problem field of another type": (_set(("problem", "kernel"), "5x5"), None),
    "time as a string": (_set(("time_s",), "fast"), None),
}
WHOLE_ENTRY_DAMAGES = {"entry is a list": [], "entry is null": None}
FILE_DAMAGES = ("random bytes", "invalid utf-8", "nesting depth 100000")
DAMAGES = (*ENTRY_DAMAGES, *WHOLE_ENTRY_DAMAGES, *FILE_DAMAGES)


def damaged(document: dict, index: int, kind: str) -> bytes:
    """`document` (a cache file's JSON) with entry `index` (or the whole file) damaged as `kind` says."""
    if kind == "random bytes":
        return b"\xff" + random.Random(0).randbytes(4096)
    if kind == "invalid utf-8":
        return json.dumps(document).encode().replace(b'"float32"', b'"float\xff32"')
    document = copy.deepcopy(document)
    raw = None
    if kind == "nesting depth 100000":
        document["entries"][index]["config"]["block_m"], raw = RAW, "[" * 100000 + "]" * 100000
    elif kind in WHOLE_ENTRY_DAMAGES:
        document["entries"][index] = WHOLE_ENTRY_DAMAGES[kind]
    else:
        edit, raw = ENTRY_DAMAGES[kind]
        edit(document["entries"][index])
    text = json.dumps(document, indent=1)
    return (text if raw is None else text.replace(json.dumps(RAW), raw)).encode()


@contextmanager
def cache_warnings(path):
    """The RuntimeWarnings that name `path` (every one recorded, none deduplicated by Python)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        named = []
        yield named
    named.extend(str(w.message) for w in caught
                 if issubclass(w.category, RuntimeWarning) and str(path) in str(w.message))  # fmt: skip


def read_only_file_system(monkeypatch):
    """Every os.open that could write fails with EROFS (the lock file, the temp file), as on a read-only mount;
    root ignores chmod, this does not. os.replace too (moving a corrupt file aside)."""
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def refuse_replace(source, target, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source))

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "replace", refuse_replace)


# --- the layer ------------------------------------------------------------------------------------

X_SHAPE, W_SHAPE = (1, 3, 8, 8), (4, 3, 3, 3)
OTHER_X_SHAPE = (1, 3, 10, 10)  # another family: its entry survives the damage of X_SHAPE's


def layer_document(config: dict) -> dict:
    """A cache file holding `config` for the forwards of X_SHAPE and OTHER_X_SHAPE (in that order) x W_SHAPE."""
    cache = TuningCache("unused", configs.identity(torch.device("cpu")))
    entries = []
    for x_shape in (X_SHAPE, OTHER_X_SHAPE):
        shape = LayerShape.of(x_shape, W_SHAPE, resolve_geometry(x_shape[2:], W_SHAPE[2:]))
        problem = configs.op_problem("forward", configs.problem_key(shape), "paper")
        entries.append(cache.make_entry("forward", configs.kernel_hash("forward"), "float32", "contiguous", problem,
                                        config, 1e-3, 2e-3, True))  # fmt: skip
    return {"format": "tuning-cache", "version": 1, "device": cache.identity.as_dict(), "entries": entries}


def looked_up(x_shape):
    found = configs.lookup("forward", torch.empty(x_shape), torch.empty(W_SHAPE),
                           resolve_geometry(x_shape[2:], W_SHAPE[2:]))  # fmt: skip
    return None if found is None else found.as_dict()


def run_layer() -> None:
    """Forwards of Adder2d on the Triton kernels (three input shapes: three lookups), checked against the reference."""
    torch.manual_seed(0)
    layer = Adder2d(3, 4, 3)
    with backends.use_backend("triton"), torch.no_grad():
        for shape in (X_SHAPE, (2, 3, 8, 8), OTHER_X_SHAPE):
            x = torch.randn(shape)
            geom = resolve_geometry(shape[2:], W_SHAPE[2:])
            expected = reference.adder2d_forward(x.double(), layer.weight.double(), None, geom)
            assert_matches_reference(layer(x), expected, torch.float32, reduction_length=27)


def tuned_config() -> dict:
    """A valid config that is not the launcher's default (so finding it proves the entry matched)."""
    geom = resolve_geometry(X_SHAPE[2:], W_SHAPE[2:])
    default = forward.default_config(torch.empty(X_SHAPE), torch.empty(W_SHAPE), geom).as_dict()
    return {**default, "num_stages": 1 if default["num_stages"] != 1 else 2}


def test_the_layer_takes_a_valid_entry(cache_dir):
    cache_dir.mkdir()
    path = cache_dir / configs.identity(torch.device("cpu")).filename
    path.write_text(json.dumps(layer_document(tuned_config())))
    with cache_warnings(path) as named:
        assert looked_up(X_SHAPE) == looked_up(OTHER_X_SHAPE) == tuned_config()
        run_layer()
    assert named == []


@pytest.mark.parametrize("kind", DAMAGES)
def test_the_layer_ignores_a_damaged_cache_with_one_warning(cache_dir, kind):
    cache_dir.mkdir()
    path = cache_dir / configs.identity(torch.device("cpu")).filename
    path.write_bytes(damaged(layer_document(tuned_config()), 0, kind))
    with cache_warnings(path) as named:
        run_layer()
        assert looked_up(X_SHAPE) is None  # the launcher's default
        # One bad entry costs only itself; a file that does not parse as a whole is moved aside.
        assert looked_up(OTHER_X_SHAPE) == (None if kind in FILE_DAMAGES else tuned_config())
    assert len(named) == 1, named


@pytest.mark.parametrize("where", ["file is a directory", "directory is a file", "read-only file system"])
def test_the_layer_runs_with_defaults_where_the_cache_cannot_be_used(cache_dir, monkeypatch, where):
    path = cache_dir / configs.identity(torch.device("cpu")).filename
    if where == "file is a directory":
        path.mkdir(parents=True)
    elif where == "directory is a file":
        cache_dir.write_text("not a directory")
        path = cache_dir
    else:  # a corrupt file it cannot move aside
        cache_dir.mkdir()
        path.write_text("{ not json")
        read_only_file_system(monkeypatch)
    with cache_warnings(path) as named:
        run_layer()
    assert len(named) == 1, named


# --- the tune CLI ---------------------------------------------------------------------------------

TUNE_ARGV = ["--model", "lenet5bn", "--quick", "--ops", "fwd", "--batch-size", "1", "--full-size", "--no-report"]
LAYER_OF_CHANNELS = {6: "conv2", 16: "conv3", 120: "conv4"}  # LeNet-5-BN's adder layers by input channels


@pytest.fixture(scope="module")
def tuned_lenet(tmp_path_factory):
    """The cache file (as JSON) of one tune run of LeNet-5-BN's forward at batch 1: every test damages a copy."""
    directory = tmp_path_factory.mktemp("tuned")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(configs.CACHE_DIR_ENV, str(directory))
        configs.clear()
        assert tune.main([*TUNE_ARGV, "--cache-dir", str(directory)]) == 0
        configs.clear()
    (path,) = directory.glob("*.json")
    return json.loads(path.read_text())


def table(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if " forward " in line}


@pytest.mark.parametrize("kind", DAMAGES)
def test_tune_retunes_a_damaged_entry_with_one_warning(tuned_lenet, cache_dir, capsys, kind):
    # Damage conv4's entry (the cheapest to tune again); a whole-file damage loses all three.
    index = next(i for i, e in enumerate(tuned_lenet["entries"]) if e["problem"]["in_channels"] == 120)
    cache_dir.mkdir()
    path = cache_dir / configs.identity(torch.device("cpu")).filename
    path.write_bytes(damaged(tuned_lenet, index, kind))
    with cache_warnings(path) as named:
        assert tune.main([*TUNE_ARGV, "--cache-dir", str(cache_dir)]) == 0
    assert len(named) == 1, named
    rows = table(capsys.readouterr().out)
    retuned = {"conv2", "conv3", "conv4"} if kind in FILE_DAMAGES else {"conv4"}
    assert {name for name, line in rows.items() if " tuned " in f"{line} "} == retuned
    assert {name for name, line in rows.items() if " cached " in f"{line} "} == {"conv2", "conv3", "conv4"} - retuned
    # The file is whole again: every layer's entry is used, without a warning.
    fresh = TuningCache(cache_dir, configs.identity(torch.device("cpu")), accept_entry=configs.accept_entry)
    with cache_warnings(path) as named:
        usable = [e for e in fresh.entries() if not fresh._refusal(e)]
    assert named == [] and sorted(LAYER_OF_CHANNELS[e["problem"]["in_channels"]] for e in usable) == [
        "conv2", "conv3", "conv4"]


@pytest.mark.parametrize("where", ["file is a directory", "directory is a file", "file under a file",
                                   "read-only directory", "read-only file system"])
def test_tune_names_an_unusable_cache_location_in_one_line(cache_dir, tmp_path, capsys, monkeypatch, where):
    def unreachable(*args, **kwargs):
        raise AssertionError("tuned although the cache cannot be written")

    monkeypatch.setattr(tuner, "search", unreachable)
    target = cache_dir
    if where == "file is a directory":
        (cache_dir / configs.identity(torch.device("cpu")).filename).mkdir(parents=True)
    elif where == "directory is a file":
        cache_dir.write_text("")
    elif where == "file under a file":
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "cache"
    elif where == "read-only directory":
        cache_dir.mkdir()
        cache_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
        probe = cache_dir / "probe"
        try:
            probe.write_text("")  # root (as in CI containers) writes anyway: the EROFS case below covers it
            probe.unlink()
            pytest.skip("this user writes into a read-only directory (root)")
        except PermissionError:
            pass
    else:
        read_only_file_system(monkeypatch)
    try:
        assert tune.main([*TUNE_ARGV, "--cache-dir", str(target)]) == 2
    finally:
        if cache_dir.is_dir():
            cache_dir.chmod(stat.S_IRWXU)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(target) in errors[0] and "Traceback" not in err, err


def test_tune_stops_with_one_line_when_a_store_fails(cache_dir, capsys, monkeypatch):
    """The location was writable when the run started but a write fails later (a remount, a full disk)."""
    def failing_replace(source, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))

    monkeypatch.setattr(os, "replace", failing_replace)
    assert tune.main([*TUNE_ARGV, "--cache-dir", str(cache_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write the tuning cache" in err and "No space left" in err and "Traceback" not in err


# --- the generic cache ----------------------------------------------------------------------------

IDENTITY = DeviceIdentity("NVIDIA H100 80GB HBM3", "sm90", "3.6.0")
PROBLEM = {"batch": 8, "in_channels": 16}


def entry_of(cache, config, problem=PROBLEM):
    return cache.make_entry("forward", "h", "float32", "contiguous", problem, config, 1e-3, 2e-3, False)


def test_accept_entry_hides_refused_entries_and_warns_once(tmp_path):
    def accept(entry):
        if entry["config"]["block_m"] > 64:
            raise ValueError("block_m too large for the launcher")

    writer = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    writer.store([entry_of(writer, {"block_m": 128}), entry_of(writer, {"block_m": 32}, {**PROBLEM, "in_channels": 8})])
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=(), accept_entry=accept)
    with cache_warnings(cache.path) as named:
        for _ in range(3):
            assert cache.lookup("forward", "h", "float32", "contiguous", PROBLEM) is None
        assert cache.lookup("forward", "h", "float32", "contiguous", {**PROBLEM, "in_channels": 8}) is not None
        cache.store([entry_of(cache, {"block_m": 16}, {**PROBLEM, "in_channels": 4})])  # and drops the refused one
        assert cache.lookup("forward", "h", "float32", "contiguous", PROBLEM) is None
    assert len(named) == 1 and "block_m too large" in named[0], named
    stored = TuningCache(tmp_path, IDENTITY, shipped_dirs=()).entries()
    assert sorted(e["config"]["block_m"] for e in stored) == [16, 32]
    with pytest.raises(ValueError, match="would ignore: block_m too large"):
        cache.store([entry_of(cache, {"block_m": 128})])
    cache.store([entry_of(cache, {"block_m": 64})])  # a re-tuned entry
    assert cache.lookup("forward", "h", "float32", "contiguous", PROBLEM).config == {"block_m": 64}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
        cache.store([entry_of(cache, {"block_m": 64})])
        cache.store([entry_of(cache, {"block_m": 32})])  # a rewrite too
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o666 & ~umask


def test_store_on_a_read_only_file_system_raises_one_clear_error(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "cache", IDENTITY, shipped_dirs=())
    cache.store([entry_of(cache, {"block_m": 64})])
    read_only_file_system(monkeypatch)
    with pytest.raises(CacheLocationError, match=f"cannot write the tuning cache {cache.path}: Read-only file system"):
        cache.store([entry_of(cache, {"block_m": 32})])
    with pytest.raises(CacheLocationError, match="Read-only file system"):
        cache.check_writable()
    monkeypatch.undo()
    assert TuningCache(tmp_path / "cache", IDENTITY, shipped_dirs=()).lookup(
        "forward", "h", "float32", "contiguous", PROBLEM).config == {"block_m": 64}
