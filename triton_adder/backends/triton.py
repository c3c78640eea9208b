"""The Triton backend as `ops` calls it: look up the tuned launch config, then launch.

Implements the backend contract (`forward`, `grad_input`, `grad_weight`). The config comes from
the tuner's cache (`triton_adder.autotune.lookup.lookup`, memoised per shape); None makes each
launcher use its heuristic default. float64 has no kernel path here (no fast float64 path exists
on these GPUs, and the kernels are written for float32 accumulation), so float64 tensors take the
portable torch path in `triton_adder.backends.cpu`, which is written with device-agnostic torch
operations.

The weight gradient has two methods (`contract.GRAD_WEIGHT_METHODS`):

- "triton": the split-reduction kernel `triton_adder.kernels.grad_weight` (both grad modes);
- "conv_identity": `triton_adder.backends.conv_identity` (paper mode only; exact mode needs a sign
  per element, so it always takes the kernel).

Which one a layer call takes is what the tuner cached for its shape (`lookup.grad_weight_choice`:
method, kernel config and split, searched together), else `default_grad_weight_method`.
"""

from __future__ import annotations

import torch

from triton_adder.autotune import lookup as configs
from triton_adder.backends import conv_identity
from triton_adder.contract import GRAD_WEIGHT_METHODS
from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels import forward as forward_kernel
from triton_adder.kernels import grad_input as grad_input_kernel
from triton_adder.kernels import grad_weight as grad_weight_kernel
from triton_adder.kernels.gradients import check_grad_mode, check_operands
from triton_adder.kernels.launch_config import KernelConfig, check_config

DEFAULT_GRAD_WEIGHT_METHOD = {"cuda": "conv_identity", "cpu": "conv_identity"}
"""Per device type, the faster weight-gradient method for grad_mode="paper". Both are one
multiply-add per reduced element, but the kernel's sm_90 loop issues 1.8-1.9 instructions per
element (SASS screen, see `kernels.grad_weight.default_grad_weight_config`) where cuDNN's tuned FFMA
loops come near 1, and the identity's correction is a cheap (Cout,) reduction: the identity is the
default until a GPU measurement says otherwise, and the tuner's cached choice overrides it per shape.
The interpreter is far slower than aten on the CPU."""


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
    config = configs.lookup("grad_input", x, weight, geom, grad_mode)
    return grad_input_kernel.grad_input(grad_out, x, weight, geom, grad_mode, config)


def default_grad_weight_method(device: torch.device, grad_mode: str) -> str:
    """The weight-gradient method a call takes when none is named: exact mode needs the kernel."""
    if grad_mode == "exact":
        return "triton"
    return DEFAULT_GRAD_WEIGHT_METHOD.get(torch.device(device).type, "triton")


def grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geom: Conv2dGeometry,
    grad_mode: str,
    *,
    method: str | None = None,
    config: KernelConfig | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Weight gradient (Cout, Cin/groups, kh, kw), contiguous, in weight's dtype.

    method, config and split_k all None: the tuner's cached choice for this shape and grad_mode
    (`lookup.grad_weight_choice`), else `default_grad_weight_method` with the kernel's defaults;
    float64 operands then take the portable path. method: "triton", "conv_identity" (paper mode
    only) or None (`default_grad_weight_method`). config and split_k apply to the kernel: config
    None takes the tuner's cached kernel config for this shape, else the kernel's heuristic
    default; a config given with method="conv_identity" is still checked, and unused.
    """
    unspecified = method is None and config is None and split_k is None
    if unspecified and _portable(x):
        from triton_adder.backends import cpu  # noqa: PLC0415

        return cpu.grad_weight(grad_out, x, weight, geom, grad_mode)
    check_grad_mode(grad_mode)
    if unspecified and (choice := configs.grad_weight_choice(x, weight, geom, grad_mode)) is not None:
        method, config, split_k = choice.method, choice.config, choice.split_k
    if method is None:
        method = default_grad_weight_method(x.device, grad_mode)
    if method not in GRAD_WEIGHT_METHODS:
        raise ValueError(f"method must be one of {GRAD_WEIGHT_METHODS} or None, got {method!r}")
    if method == "conv_identity" and grad_mode == "exact":
        raise ValueError(
            "method='conv_identity' computes the paper's gradient (X - W) only; grad_mode='exact' needs "
            "sign(X - W) per element: use method='triton' or None"
        )
    if method == "conv_identity":
        if config is not None:
            check_config(config)
        check_operands(grad_out, x, weight, geom)
        return conv_identity.grad_weight(grad_out, x, weight, geom)
    if config is None:
        config = configs.lookup("grad_weight", x, weight, geom, grad_mode)
    return grad_weight_kernel.grad_weight(grad_out, x, weight, geom, grad_mode, config, split_k)
