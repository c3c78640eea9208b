"""The memory-bounded torch backend of the adder layer: fast on CPU tensors, portable to any device.

Implements the backend contract (`forward`, `grad_input`, `grad_weight`) for tensors of dtype
float32/float64/float16/bfloat16; float16/bfloat16 are computed in float32 and returned in their
own dtype. On CPU tensors each reduction is compiled with inductor (`common`); on other devices
(float64 on CUDA, where the Triton kernels have no float64 version) the same torch functions run
eagerly in memory-bounded chunks.

Layout decides the speed here more than anything else. The input is padded once
into a channels-last buffer ``xpad`` of shape (N, Hpad, Wpad, Cin). The kernel taps are then a
strided VIEW of that buffer, shape (N, Ho, Wo, kh, kw, G, Cg): no im2col copy. The reduction over
(kh, kw, Cg) runs over memory whose innermost run (kw * Cg values when dilation is 1) is
contiguous, so the compiled loop vectorises it as ``acc += |x - w|`` on full vectors.

One module per pass:

- `forward`: ``Y = bias - sum_{kh, kw, Cg} |taps - W|``, one fused reduction.
- `grad_input` (both modes): a gather over the ``stride`` phases of each axis (eq. 6, or the
  sign derivative).
- `grad_weight`, grad_mode="paper" (eq. 5): the exact identity
  ``dW = conv2d_weight_grad(Xpad, gY) - W * sum_{n,p,q} gY`` at convolution speed;
  grad_mode="exact": ``sum_{n,p,q} gY * sign(taps - W)``, a fused reduction.
"""

from triton_adder.backends.cpu.common import (
    COMPILE_ENV,
    COMPILED_CACHE_SIZE,
    DEFAULT_MEMORY_BUDGET_MB,
    MEMORY_BUDGET_ENV,
    compiler_enabled,
    memory_budget_bytes,
)
from triton_adder.backends.cpu.forward import forward
from triton_adder.backends.cpu.grad_input import grad_input
from triton_adder.backends.cpu.grad_weight import grad_weight

__all__ = [
    "COMPILE_ENV",
    "COMPILED_CACHE_SIZE",
    "DEFAULT_MEMORY_BUDGET_MB",
    "MEMORY_BUDGET_ENV",
    "compiler_enabled",
    "forward",
    "grad_input",
    "grad_weight",
    "memory_budget_bytes",
]
