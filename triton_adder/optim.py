"""Adaptive learning-rate scaling for adder layers (arXiv 1912.13200, eq. 7-8).

The published code rescales each adder layer's weight gradient inside the layer's backward:

    dW_l  <-  eta * sqrt(k_l) * dW_l / max(||dW_l||_2, 1e-12)        k_l = W_l.numel(), eta = 0.2

Inside backward, that normalises the gradient of whatever batch this process saw: under data
parallelism each replica would normalise its own shard before the all-reduce, under gradient
accumulation each micro-batch separately, and under AMP the loss-scaled gradient. Here the adder
layer's backward returns the plain eq. 5 gradient, and the scaling is a separate step on the
final gradient, run the way `torch.nn.utils.clip_grad_norm_` is::

    loss.backward()                    # DDP all-reduces here
    scaler.unscale_(optimizer)         # only with AMP's GradScaler
    adaptive_lr_(model)                # eq. 7-8 on the adder weights' .grad
    optimizer.step()                   # momentum and weight decay see the scaled gradient, as published
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from triton_adder.nn import Adder2d

PUBLISHED_ETA = 0.2  # the published adder.py divides by 5


def adder_weights(model: nn.Module) -> list[nn.Parameter]:
    """The `weight` of every `Adder2d` in `model` (each once), in `model.modules()` order."""
    return [module.weight for module in model.modules() if isinstance(module, Adder2d)]


@torch.no_grad()
def adaptive_lr_(model_or_params: nn.Module | torch.Tensor | Iterable[torch.Tensor], eta: float = PUBLISHED_ETA):
    """Scale each adder weight gradient in place to eta * sqrt(numel) / ||grad||_2 times itself (eq. 7-8).

    model_or_params: a module (the weights of its `Adder2d` layers are scaled; biases, BatchNorm
    and multiplicative layers are not), or a tensor or iterable of tensors taken to be adder
    weights and each scaled as its own layer (see `adder_weights`). Tensors whose `.grad` is None
    are skipped. eta: the paper's hyperparameter, 0.2 in the published code.

    Each layer's gradient then has L2 norm eta * sqrt(numel), i.e. root-mean-square eta per
    element. Returns a float32 tensor (L,) of the L2 norms the L scaled gradients had before,
    computed in float32 or wider and kept on the device (no host synchronisation). A gradient norm below
    1e-12 is clamped to 1e-12, as published.

    Where it goes in a step: after ``loss.backward()`` (and DDP's all-reduce) and, with
    `torch.amp.GradScaler`, after ``scaler.unscale_(optimizer)`` and before
    ``scaler.step(optimizer)`` (see the module docstring): on a still-scaled gradient the
    normalisation would cancel the loss scale, and the scaler's later unscaling would then shrink
    the adder weights' step by the scale. A step the scaler skips (inf/NaN found by ``unscale_``)
    is skipped whatever this function wrote into the gradients.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta must be a positive finite number, got {eta!r}")
    if isinstance(model_or_params, nn.Module):
        params = adder_weights(model_or_params)
    elif isinstance(model_or_params, torch.Tensor):
        params = [model_or_params]
    else:
        params = list(model_or_params)
    grads = [p.grad for p in params if p.grad is not None]
    if any(grad.is_sparse for grad in grads):
        raise ValueError("adaptive_lr_ needs dense gradients; got a sparse .grad")
    norms = []
    for grad in grads:
        # At least float32: a float16 gradient's sum of squares overflows float16.
        norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        grad.mul_((eta * math.sqrt(grad.numel())) / norm.clamp_min(1e-12))
        norms.append(norm.float())
    if not norms:
        return torch.empty(0, dtype=torch.float32)
    return torch.stack([norm.to(norms[0].device) for norm in norms])
