"""Test session setup.

Without CUDA, the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton decorates any kernel, so it is set here, before anything imports them. Because
`triton_adder.backends.select_backend` sends CPU tensors to the kernels whenever the interpreter
is on, every test starts with the CPU backend forced; kernel tests opt in with
`triton_adder.backends.use_backend("triton")` or call the launchers directly.
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A developer's own tuning cache must not change which configs the tests launch.
_test_cache_dir = tempfile.mkdtemp(prefix="triton-adder-test-cache-")
os.environ["TRITON_ADDER_CACHE_DIR"] = _test_cache_dir
atexit.register(shutil.rmtree, _test_cache_dir, ignore_errors=True)

from triton_adder import backends  # noqa: E402  (after TRITON_INTERPRET is set)
from triton_adder.autotune import lookup  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_path_unless_cuda():
    with backends.use_backend(None if torch.cuda.is_available() else "cpu"):
        yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private tuning cache for one test (the tune CLI's --cache-dir also sets this variable)."""
    monkeypatch.setenv(lookup.CACHE_DIR_ENV, str(tmp_path / "cache"))
    lookup.clear()
    yield tmp_path / "cache"
    lookup.clear()
