"""CPU forward: ``Y = bias - sum_{kh, kw, Cg} |taps - W|``, one fused reduction over the taps view."""

from __future__ import annotations

import torch

from triton_adder.backends.cpu import common
from triton_adder.geometry import Conv2dGeometry


def _forward_body(taps, weight, bias=None, *, out_dtype, channels_last):
    """taps (N, Ho, Wo, kh, kw, G, Cg) view, weight (G, Tg, kh, kw, Cg), bias (G*Tg,) or None.

    Returns y (N, Cout, Ho, Wo) in out_dtype, NCHW-contiguous unless channels_last. Written over
    the full broadcast: compiled, inductor fuses it into one loop nest with no temporaries;
    eager, it runs on chunks.
    """
    n, ho, wo = taps.shape[:3]
    groups, tg = weight.shape[:2]
    diff = taps.permute(0, 1, 2, 5, 3, 4, 6)[:, :, :, :, None] - weight  # N, Ho, Wo, G, Tg, kh, kw, Cg
    y = diff.abs().sum(dim=(-3, -2, -1)).reshape(n, ho, wo, groups * tg)
    y = -y if bias is None else bias - y
    y = y.to(out_dtype).permute(0, 3, 1, 2)
    return y if channels_last else y.contiguous()


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: Conv2dGeometry) -> torch.Tensor:
    """Y[n,t,p,q] = bias[t] - sum_{k,i,j} |Xpad[n, g*Cg+k, p*s+i*d, q*s+j*d] - W[t,k,i,j]|.

    x: (N, Cin, H, W) any layout; weight: (Cout, Cin/groups, kh, kw); bias: (Cout,) or None.
    Returns (N, Cout, Ho, Wo) in x.dtype, channels_last if x is, else NCHW-contiguous.
    """
    common.check(x, weight, geom)
    x, weight = x.detach(), weight.detach()
    dtype = common.compute_dtype(x.dtype)
    kernel_size = tuple(weight.shape[2:])
    taps = common.taps_view(common.padded_channels_last(x, kernel_size, geom, dtype), kernel_size, geom)
    w = common.weight_taps_last(weight, geom.groups, dtype)
    b = None if bias is None else bias.detach().to(dtype)
    options = {"out_dtype": x.dtype, "channels_last": common.is_channels_last(x)}
    if common.use_compiler(x):
        y = _forward_compiled(taps, w, b, options)
        if y is not None:
            return y
    return _forward_eager(taps, w, b, options)


def _forward_compiled(taps, w, b, options):
    """The compiled forward, over blocks of output channels whose weights fit in about
    `common.WEIGHT_BLOCK_BYTES`: the kernel streams the whole weight block once per output
    position, so a block that stays in the L2 cache matters for wide layers (measured 256ch@14x14 3x3)."""
    groups, tg, kh, kw, cg = w.shape
    per_channel = groups * kh * kw * cg * w.element_size()
    blocks = common.weight_blocks(tg * per_channel)
    if blocks <= 1:
        return common.compiled_call(_forward_body, options, (taps, w) if b is None else (taps, w, b))
    block = common.channel_block(tg, blocks)
    n, ho, wo = taps.shape[:3]
    y = taps.new_empty((n, groups * tg, ho, wo), dtype=options["out_dtype"])
    if options["channels_last"]:
        y = y.contiguous(memory_format=torch.channels_last)
    for t0 in range(0, tg, block):
        t1 = min(tg, t0 + block)
        args = (taps, w[:, t0:t1].contiguous())
        if b is not None:
            args += (b.reshape(groups, tg)[:, t0:t1].reshape(-1),)
        y_block = common.compiled_call(_forward_body, {**options, "channels_last": True}, args)
        if y_block is None:
            return None
        for g in range(groups):
            y[:, g * tg + t0 : g * tg + t1] = y_block[:, g * (t1 - t0) : (g + 1) * (t1 - t0)]
    return y


def _forward_eager(taps, w, b, options):
    n, ho, wo, kh, kw, groups, cg = taps.shape
    tg = w.shape[1]
    y = taps.new_empty((n, groups, tg, ho, wo), dtype=options["out_dtype"])
    budget = common.memory_budget_bytes()
    item = taps.element_size() * common.TEMPORARIES_PER_ELEMENT * groups * kh * kw * cg
    for t0, t1 in common.chunks(tg, wo * item, budget):  # channel chunks only when one row of all is too big
        bias = None if b is None else b.reshape(groups, tg)[:, t0:t1].reshape(-1)
        for n0, n1, r0, r1 in common.row_blocks(n, ho, wo * (t1 - t0) * item, budget):
            y_chunk = _forward_body(
                taps[n0:n1, r0:r1], w[:, t0:t1], bias, out_dtype=options["out_dtype"], channels_last=True
            )
            y[n0:n1, :, t0:t1, r0:r1] = y_chunk.reshape(n1 - n0, groups, t1 - t0, r1 - r0, wo)
    y = y.reshape(n, groups * tg, ho, wo)
    return y.contiguous(memory_format=torch.channels_last) if options["channels_last"] else y
