"""CPU input gradient (both grad modes) as a GATHER over stride phases.

An input element is read by the taps (i, j) with ``p*s + i*d == row``. Rows are split into ``s``
phases by ``row mod s``; inside a phase the taps that read it form a regular sub-kernel and the
grad_out rows they come from form a strided view of a zero-padded copy of grad_out (flipped
kernel). Each phase is then the same kind of fused reduction as the forward (over the taps of
the phase and the Tg output channels of the group), writing its rows of grad_input directly;
stride 1 is a single phase.
"""

from __future__ import annotations

import math

import torch

from triton_adder.backends.cpu import common
from triton_adder.geometry import Conv2dGeometry


def _grad_input_body(grad_taps, weight, x, inside=None, *, exact, compute_dtype):
    """One phase of the input-gradient gather (eq. 6, or sign(W - X) when exact).

    grad_taps (N, M, M', U, V, G, Tg): the grad_out values each input element's taps read (view);
    weight (G, U, V, Tg, Cg): the phase's taps, flipped; x (N, M, M', G, Cg): the input values
    (any float dtype, a view of x); inside: None, or (M, M', U, V) bool, whether tap (u, v) of
    element (m, m') reads a real grad_out position rather than the zero padding of grad_taps (the
    padded taps' terms are then selected out). Returns dX = sum_{u, v, t} gY * clamp(W - X, -1, 1)
    (or sign(W - X)) as a contiguous (N, M, M', Cin) tensor of compute_dtype.

    Why it is written this way: Cg is the innermost axis of weight, x and the result, so the
    compiled loop keeps one vector accumulator per 16 input channels and streams the reduction
    (no horizontal sums). Returning NCHW from here made inductor vectorise along the width
    (60x slower), so the caller transposes. The clamp is computed as
    ``1 - clamp(W - X, -1, 1) = relu(2 - relu(W - (X - 1)))`` because inductor lowers relu to a
    plain vector max, while clamp/maximum/minimum become NaN-propagating sequences of about 4
    instructions each (measured: 2.6x slower); the ``1`` summed over the taps is ``sum gY``, taken
    once per input position, not per channel. Nested, the relus saturate at 0 and 2 for any W - X,
    infinite or huge; the former difference ``relu(W - (X-1)) - relu(W - (X+1))`` gave inf - inf =
    NaN at X = -inf, and 0 instead of 2 once X -+ 1 rounded to X (|X| >= 2**24 in float32).
    """
    n, m_h, m_w, groups, cg = x.shape
    x = x.to(compute_dtype)[:, :, :, :, None, None, None, :]  # N, M, M', G, 1, 1, 1, Cg
    grad = grad_taps.permute(0, 1, 2, 5, 3, 4, 6)[..., None]  # N, M, M', G, U, V, Tg, 1
    if exact:
        terms = grad * (weight - x).sign()
    else:
        terms = grad * (2.0 - (weight - (x - 1.0)).relu()).relu()  # gY * (1 - clamp(W - X, -1, 1))
    if inside is not None:
        terms = torch.where(inside[None, :, :, None, :, :, None, None], terms, 0.0)
    out = terms.sum(dim=(4, 5, 6))
    if not exact:
        out = grad.sum(dim=(4, 5, 6)) - out
    return out.reshape(n, m_h, m_w, groups * cg)


def _phases(size: int, pad: int, stride: int, dilation: int, kernel: int, out: int):
    """Per axis: the input-gradient phases, one per residue a = row mod stride of the padded row.

    Yields (first, count, taps, step, grad_lo, grad_len): the phase covers input indices
    first, first + stride, ... (`count` of them); `taps` are the kernel indices that read it,
    in flipped order; the grad_out indices tap taps[u] reads for the phase's m-th element are
    grad_lo + m + u * step, to be read from a zero-padded grad_out of length grad_len starting
    at grad_out index grad_lo (it may start below 0 or end past `out`).
    """
    for a in range(stride):
        taps = [i for i in range(kernel) if (i * dilation) % stride == a]
        m_lo = -((a - pad) // stride)  # ceil((pad - a) / stride)
        m_hi = (pad + size - 1 - a) // stride
        count = m_hi - m_lo + 1
        if not taps or count <= 0:
            continue
        step = dilation // math.gcd(stride, dilation)
        offset0 = (taps[0] * dilation - a) // stride
        grad_lo = m_lo - offset0 - (len(taps) - 1) * step
        yield a + stride * m_lo - pad, count, taps[::-1], step, grad_lo, count + (len(taps) - 1) * step


def _zero_padded_rows(grad, lo_h: int, len_h: int, lo_w: int, len_w: int, dtype: torch.dtype) -> torch.Tensor:
    """buf[n, r, c, :] = grad[n, lo_h + r, lo_w + c, :] where that index exists, else 0 (contiguous, `dtype`)."""
    n, ho, wo, cout = grad.shape
    buf = grad.new_zeros((n, len_h, len_w, cout), dtype=dtype)
    r0, r1 = max(0, lo_h), min(ho, lo_h + len_h)
    c0, c1 = max(0, lo_w), min(wo, lo_w + len_w)
    if r1 > r0 and c1 > c0:
        buf[:, r0 - lo_h : r1 - lo_h, c0 - lo_w : c1 - lo_w] = grad[:, r0:r1, c0:c1]
    return buf


def _maybe_nonfinite(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """False only if every element of x and weight is finite. A sum is finite only if all its terms are, and
    costs ~1/40 of isfinite().all(); one that overflows (rare in `dtype`, float32 or float64, unlike float16)
    only costs the masked path. Meta tensors hold no values."""
    return x.is_meta or not bool(torch.isfinite(x.sum(dtype=dtype) + weight.sum(dtype=dtype)))


def _reads_output(lo: int, count: int, taps: int, step: int, out: int, device) -> torch.Tensor:
    """(count, taps) bool: whether grad_out index lo + m + u * step, which tap u of a phase's m-th element
    reads (`_phases`), lies in [0, out) rather than in the zero padding of the phase's buffer."""
    index = lo + torch.arange(count, device=device)[:, None] + step * torch.arange(taps, device=device)
    return (index >= 0) & (index < out)


def grad_input(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str = "paper"
) -> torch.Tensor:
    """dX = sum over the taps reading X of gY * clamp(W - X, -1, 1) (eq. 6; "exact": sign(W - X)).

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W); weight: (Cout, Cin/groups, kh, kw).
    Returns (N, Cin, H, W) in x.dtype, channels_last if x is, else NCHW-contiguous. Padded taps
    receive no gradient.
    """
    common.check(x, weight, geom, grad_mode)
    grad_out, x, weight = grad_out.detach(), x.detach(), weight.detach()
    dtype = common.compute_dtype(x.dtype)
    n, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    groups = geom.groups
    tg = cout // groups
    if _fully_connected(x, weight, geom):
        return _grad_input_fully_connected(grad_out, x, weight, geom, grad_mode, dtype)
    # Channels-last copy (a no-op view when x is channels_last float32): with a channels-strided
    # view of an NCHW x, inductor vectorised along the width instead of the channels (50x slower).
    x_nhwc = x.to(dtype).permute(0, 2, 3, 1).contiguous()
    grad_nhwc = grad_out.permute(0, 2, 3, 1)
    w_grouped = weight.to(dtype).reshape(groups, tg, cg, kh, kw)
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    top, left = geom.padding
    # A padded tap reads gY = 0 from the phase's zero-padded buffer, and 0 * its clamp term is 0 unless
    # that term is NaN: a NaN operand, or inf - inf. Only then are padded taps selected out of the sum
    # (`_grad_input_body`'s `inside`, ~5% slower), so that a NaN weight tap that only ever meets the
    # padding, or a NaN input no tap reads, does not reach other elements' gradients. The exact mode
    # never needs it: the sign of NaN is 0 (torch.sign).
    mask_padding = grad_mode == "paper" and _maybe_nonfinite(x, weight, dtype)
    rows_phases = list(_phases(h, top, sh, dh, kh, ho))
    cols_phases = list(_phases(w, left, sw, dw, kw, wo))
    single_phase = len(rows_phases) == len(cols_phases) == 1 and rows_phases[0][1] == h and cols_phases[0][1] == w
    channels_last = common.is_channels_last(x)
    grad_x = None if single_phase else x.new_zeros((n, h, w, cin), dtype=dtype)
    for h0, mh, taps_h, step_h, lo_h, len_h in rows_phases:
        for w0, mw, taps_w, step_w, lo_w, len_w in cols_phases:
            buf = _zero_padded_rows(grad_nhwc, lo_h, len_h, lo_w, len_w, dtype)
            s_n, s_h, s_w, _ = buf.stride()
            grad_taps = buf.as_strided(
                (n, mh, mw, len(taps_h), len(taps_w), groups, tg), (s_n, s_h, s_w, step_h * s_h, step_w * s_w, tg, 1)
            )
            index_h = torch.tensor(taps_h, device=x.device)
            index_w = torch.tensor(taps_w, device=x.device)
            w_phase = w_grouped.index_select(3, index_h).index_select(4, index_w)
            w_phase = w_phase.permute(0, 3, 4, 1, 2).contiguous()  # (G, U, V, Tg, Cg)
            rows = slice(h0, h0 + (mh - 1) * sh + 1, sh)
            cols = slice(w0, w0 + (mw - 1) * sw + 1, sw)
            x_phase = x_nhwc[:, rows, cols].reshape(n, mh, mw, groups, cg)
            inside = None
            if mask_padding and (lo_h < 0 or lo_h + len_h > ho or lo_w < 0 or lo_w + len_w > wo):  # padded taps
                rows_in = _reads_output(lo_h, mh, len(taps_h), step_h, ho, x.device)
                cols_in = _reads_output(lo_w, mw, len(taps_w), step_w, wo, x.device)
                inside = rows_in[:, None, :, None] & cols_in[None, :, None, :]  # (M, M', U, V)
            options = {"exact": grad_mode == "exact", "compute_dtype": dtype}
            out = _grad_input_phase(grad_taps, w_phase, x_phase, options, inside)
            if single_phase:
                grad_x = out  # (N, H, W, Cin): the phase is all of x
            else:
                grad_x[:, rows, cols] = out
    grad_x = grad_x.to(x.dtype).permute(0, 3, 1, 2)
    return grad_x if channels_last else grad_x.contiguous()


def _fully_connected(x, weight, geom: Conv2dGeometry) -> bool:
    """Whether the one output position reads every input element through exactly one tap (VGG's
    classifier as a 7x7 convolution on a 7x7 map): a 1x1 output, no padding or dilation, input = kernel."""
    return geom.out_size == (1, 1) and geom.padding == (0, 0) and geom.dilation == (1, 1) and (
        x.shape[2:] == weight.shape[2:]
    )


def _grad_input_fully_connected(grad_out, x, weight, geom: Conv2dGeometry, grad_mode: str, dtype):
    """The input gradient of a `_fully_connected` layer as one reduction over output channels.

    Every input element (c, i, j) is read by tap (i, j) alone, so dX[n, c, i, j] = sum_t gY[n, t] *
    clamp(W[t, c, i, j] - X[n, c, i, j]): the same body as a phase, with the kernel's taps folded into
    the channel axis. The gather over phases would instead visit all kh * kw taps for every input
    element, of which one is in range (49x the work for a 7x7 kernel).
    """
    n, cin, kh, kw = x.shape
    groups = geom.groups
    taps = cin // groups * kh * kw
    # contiguous: a sum()'s gradient is a stride-0 expansion, which would be a signature of its own
    grad_taps = grad_out.to(dtype).reshape(n, 1, 1, 1, 1, groups, -1).contiguous()  # (N, M, M', U, V, G, Tg)
    w_flat = weight.to(dtype).reshape(groups, 1, 1, -1, taps)  # (G, U, V, Tg, Cg * kh * kw)
    x_flat = x.to(dtype).reshape(n, 1, 1, groups, taps)  # (c, i, j) in the weight's order
    options = {"exact": grad_mode == "exact", "compute_dtype": dtype}
    grad_x = _grad_input_phase(grad_taps, w_flat.contiguous(), x_flat, options).reshape(n, cin, kh, kw)
    grad_x = grad_x.to(x.dtype)
    return grad_x.contiguous(memory_format=torch.channels_last) if common.is_channels_last(x) else grad_x


def _grad_input_compiled(grad_taps, w_phase, x_phase, options, inside=None):
    """The compiled phase, over blocks of input channels whose weights fit in about
    `common.WEIGHT_BLOCK_BYTES` (the kernel streams the weight block once per input position)."""
    groups, u, v, tg, cg = w_phase.shape
    blocks = common.weight_blocks(groups * u * v * tg * cg * w_phase.element_size())
    masks = () if inside is None else (inside,)
    if blocks <= 1:
        return common.compiled_call(_grad_input_body, options, (grad_taps, w_phase, x_phase, *masks))
    block = common.channel_block(cg, blocks)
    n, mh, mw = x_phase.shape[:3]
    out = x_phase.new_empty((n, mh, mw, groups, cg), dtype=options["compute_dtype"])
    for k0 in range(0, cg, block):
        k1 = min(cg, k0 + block)
        args = (grad_taps, w_phase[..., k0:k1].contiguous(), x_phase[..., k0:k1], *masks)
        out_block = common.compiled_call(_grad_input_body, options, args)
        if out_block is None:
            return None
        out[..., k0:k1] = out_block.reshape(n, mh, mw, groups, k1 - k0)
    return out.reshape(n, mh, mw, groups * cg)


def _grad_input_phase(grad_taps, w_phase, x_phase, options, inside=None):
    """Run `_grad_input_body` compiled, else eagerly on chunks of rows (and input channels)."""
    if common.use_compiler(x_phase):
        out = _grad_input_compiled(grad_taps, w_phase, x_phase, options, inside)
        if out is not None:
            return out
    n, mh, mw, u, v, groups, tg = grad_taps.shape
    cg = w_phase.shape[-1]
    out = x_phase.new_empty((n, mh, mw, groups, cg), dtype=options["compute_dtype"])
    budget = common.memory_budget_bytes()
    item = grad_taps.element_size() * common.TEMPORARIES_PER_ELEMENT * groups * u * v * tg
    for k0, k1 in common.chunks(cg, mw * item, budget):
        for n0, n1, r0, r1 in common.row_blocks(n, mh, mw * (k1 - k0) * item, budget):
            chunk = _grad_input_body(
                grad_taps[n0:n1, r0:r1],
                w_phase[..., k0:k1],
                x_phase[n0:n1, r0:r1, :, :, k0:k1],
                None if inside is None else inside[r0:r1],
                **options,
            )
            out[n0:n1, r0:r1, :, :, k0:k1] = chunk.reshape(n1 - n0, r1 - r0, mw, groups, k1 - k0)
    return out.reshape(n, mh, mw, groups * cg)
