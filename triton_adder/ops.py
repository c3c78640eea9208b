"""torch.library registration of the adder op: custom op, fake (meta) kernel, autograd.

Three custom ops (forward, input gradient, weight gradient) so that `torch.compile(fullgraph=True)`
traces models with adder layers, forward and backward: the compiler sees opaque ops with fake
implementations that only compute shapes. At run time each op calls the backend that
`triton_adder.backends.select_backend` picks for its tensors (the Triton kernels or the torch
backend).
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from triton_adder import contract
from triton_adder.backends import backend_for
from triton_adder.geometry import Conv2dGeometry


def _without_autocast(x: torch.Tensor):
    """Autocast off while a backend runs, as aten's autocast wrappers turn it off below their cast.

    The operands already carry the dtype autocast chose (`functional.adder2d` casts them); the
    backends' own torch calls (the conv identity's conv2d, the CPU path's traced reductions) must
    compute in that dtype, with float32 accumulation, rather than be cast again.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _geometry(stride, padding, dilation, groups, out_size) -> Conv2dGeometry:
    return Conv2dGeometry(tuple(stride), tuple(padding), tuple(dilation), int(groups), tuple(out_size))


@torch.library.custom_op("triton_adder::adder2d", mutates_args=())
def _adder2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_size: list[int],
    grad_mode: str,
) -> torch.Tensor:
    # grad_mode is unused here; it rides along so the autograd formula can read it.
    geom = _geometry(stride, padding, dilation, groups, out_size)
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0], *geom.out_size))
    with _without_autocast(x):
        y = backend_for(x).forward(x, weight, bias, geom)
    y = y.contiguous(memory_format=contract.memory_format(x))
    # A backend may return a view of its own buffer (the CPU eager path reshapes a grouped result);
    # autograd forbids in-place ops on a custom op's view output, and models apply them right after
    # a convolution (ReLU(inplace=True) in squeeze-excite blocks), so hand back a tensor of its own.
    return y if y._base is None else y.clone(memory_format=contract.memory_format(x))


@_adder2d_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, out_size, grad_mode):
    shape = (x.shape[0], weight.shape[0], out_size[0], out_size[1])
    return x.new_empty(shape).contiguous(memory_format=contract.memory_format(x))


@torch.library.custom_op("triton_adder::adder2d_grad_input", mutates_args=())
def _adder2d_grad_input(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_size: list[int],
    grad_mode: str,
) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    geom = _geometry(stride, padding, dilation, groups, out_size)
    with _without_autocast(x):
        grad_x = backend_for(x).grad_input(grad_out, x, weight, geom, grad_mode)
    return grad_x.contiguous(memory_format=contract.memory_format(x))


@_adder2d_grad_input.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, out_size, grad_mode):
    return torch.empty_like(x, memory_format=contract.memory_format(x))


@torch.library.custom_op("triton_adder::adder2d_grad_weight", mutates_args=())
def _adder2d_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_size: list[int],
    grad_mode: str,
) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    geom = _geometry(stride, padding, dilation, groups, out_size)
    with _without_autocast(x):
        grad_w = backend_for(x).grad_weight(grad_out, x, weight, geom, grad_mode)
    return grad_w.contiguous()


@_adder2d_grad_weight.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, out_size, grad_mode):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, out_size, grad_mode = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry_args = (stride, padding, dilation, groups, out_size)
    ctx.grad_mode = grad_mode
    ctx.has_bias = bias is not None


_FORWARD_AD_UNSUPPORTED = (
    "triton_adder's adder2d does not support forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
    "torch.autograd.forward_ad): {name} carries a forward-mode tangent, which the op would drop, giving a zero "
    "tangent instead of the derivative. Use reverse mode (loss.backward() or torch.autograd.grad) instead."
)


def _refuse_forward_ad(**tensors) -> None:
    """Raise NotImplementedError if any of `tensors` (None allowed) carries a forward-mode AD tangent.

    `torch.library.register_autograd` has no forward-mode formula, and a custom op whose inputs do
    not require grad runs below autograd: a dual tensor's tangent would be silently dropped
    (torch.func.jvp returned zeros, forward_ad a None tangent). torch.func.jvp and jacfwd open a dual
    level as forward_ad does, so outside one (`fwAD._current_level` < 0, the usual case) nothing can
    carry a tangent and nothing is looked up (a torch without that private attribute looks up each time).
    """
    if getattr(fwAD, "_current_level", 0) < 0:
        return
    for name, tensor in tensors.items():
        if tensor is not None and fwAD.unpack_dual(tensor).tangent is not None:
            raise NotImplementedError(_FORWARD_AD_UNSUPPORTED.format(name=name))


def _backward(ctx, grad_out):
    # A tangent on grad_out (forward-over-reverse through a dual cotangent) would be dropped the same way.
    _refuse_forward_ad(grad_out=grad_out)
    x, weight = ctx.saved_tensors
    geometry_args = (*ctx.geometry_args, ctx.grad_mode)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _adder2d_grad_input(grad_out, x, weight, *geometry_args)
    if ctx.needs_input_grad[1]:
        grad_w = _adder2d_grad_weight(grad_out, x, weight, *geometry_args)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3))
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


_adder2d_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "adder2d does not support double backward (create_graph=True through its gradients): its backward ops "
        "have no derivative formula (and in the default paper mode, eq. 5-6 are not derivatives of the forward)"
    )


def _keep_nothing(ctx, inputs, output):
    pass


# Without these, autograd would say "no autograd formula was registered" (a bug-like message).
_adder2d_grad_input.register_autograd(_no_double_backward, setup_context=_keep_nothing)
_adder2d_grad_weight.register_autograd(_no_double_backward, setup_context=_keep_nothing)


def adder2d_op(x: torch.Tensor, weight: torch.Tensor, bias, geom: Conv2dGeometry, grad_mode: str) -> torch.Tensor:
    """Call the registered op with a resolved geometry (arguments already checked by `functional`)."""
    _refuse_forward_ad(input=x, weight=weight, bias=bias)
    return _adder2d_forward(
        x, weight, bias, list(geom.stride), list(geom.padding), list(geom.dilation), geom.groups,
        list(geom.out_size), grad_mode,
    )
