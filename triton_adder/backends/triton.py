"""The Triton backend as `ops` calls it: look up the tuned launch config, then launch.

Implements the backend contract (`forward`, `grad_input`, `grad_weight`). The config comes from
the tuner's cache (`triton_adder.autotune.lookup.lookup`, memoised per shape); None makes each launcher
use its heuristic default. float64 has no kernel (no fast float64 path exists on these GPUs, and
the kernels are written for float32 accumulation), so float64 tensors take the portable
torch path in `triton_adder.backends.cpu`, which is written with device-agnostic torch operations.
"""

from __future__ import annotations

import torch

from triton_adder.autotune import lookup as configs
from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels import backward
from triton_adder.kernels import forward as forward_kernel


def _portable(x: torch.Tensor) -> bool:
    return x.dtype == torch.float64


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: Conv2dGeometry) -> torch.Tensor:
    if _portable(x):
        from triton_adder.backends import cpu  # noqa: PLC0415

        return cpu.forward(x, weight, bias, geom)
    return forward_kernel.forward(x, weight, bias, geom, configs.lookup("forward", x, weight, geom))


def grad_input(grad_out, x, weight, geom: Conv2dGeometry, grad_mode: str) -> torch.Tensor:
    if _portable(x):
        from triton_adder.backends import cpu  # noqa: PLC0415

        return cpu.grad_input(grad_out, x, weight, geom, grad_mode)
    return backward.grad_input(grad_out, x, weight, geom, grad_mode, configs.lookup("grad_input", x, weight, geom))


def grad_weight(grad_out, x, weight, geom: Conv2dGeometry, grad_mode: str) -> torch.Tensor:
    if _portable(x):
        from triton_adder.backends import cpu  # noqa: PLC0415

        return cpu.grad_weight(grad_out, x, weight, geom, grad_mode)
    config = configs.lookup("grad_weight", x, weight, geom)
    return backward.grad_weight(grad_out, x, weight, geom, grad_mode, config)
