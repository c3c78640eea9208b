"""Test session setup.

Without CUDA, the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton decorates any kernel, so it is set here, before anything imports them. Because dispatch
sends CPU tensors to the kernels whenever the interpreter is on, every test starts with the CPU
path forced; kernel tests opt in with `triton_adder.ops.use_backend("triton")` or call the
launchers directly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_adder import ops  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(autouse=True)
def _cpu_path_unless_cuda():
    with ops.use_backend(None if torch.cuda.is_available() else "cpu"):
        yield
