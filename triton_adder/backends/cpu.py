"""The fast, memory-bounded CPU path of the adder layer (DESIGN.md sections 1-2).

Implements the backend contract (`forward`, `grad_input`, `grad_weight`) for CPU tensors of dtype
float32/float64/float16/bfloat16; float16/bfloat16 are computed in float32 and returned in their
own dtype.

Layout (DESIGN.md section 2 measured it: layout decides everything). The input is padded once
into a channels-last buffer ``xpad`` of shape (N, Hpad, Wpad, Cin). The kernel taps are then a
strided VIEW of that buffer, shape (N, Ho, Wo, kh, kw, G, Cg): no im2col copy. The reduction over
(kh, kw, Cg) runs over memory whose innermost run (kw * Cg values when dilation is 1) is
contiguous, so the compiled loop vectorises it as ``acc += |x - w|`` on full vectors.

- forward: ``Y = bias - sum_{kh, kw, Cg} |taps - W|``, one fused compiled reduction.
- grad_weight, grad_mode="paper" (eq. 5): the exact identity
  ``dW = conv2d_weight_grad(Xpad, gY) - W * sum_{n,p,q} gY`` runs at convolution speed on oneDNN
  (float32 arithmetic; see `_conv_weight_grad` for the reduced-precision guard).
- grad_input (both modes) is a GATHER: an input element is read by the taps (i, j) with
  ``p*s + i*d == row``. Rows are split into ``s`` phases by ``row mod s``; inside a phase the taps
  that read it form a regular sub-kernel and the grad_out rows they come from form a strided view
  of a zero-padded copy of grad_out (flipped kernel). Each phase is then the same kind of fused
  reduction as the forward (over the taps of the phase and the Tg output channels of the group),
  writing its rows of grad_input directly; stride 1 is a single phase.
- grad_weight, grad_mode="exact": ``sum_{n,p,q} gY * sign(taps - W)``, a fused reduction over
  the batch and output positions.

Compilation. Each reduction is a plain torch function (`_forward_body`, ...) traced with
``make_fx`` (fake tensors, so nothing is materialised while tracing) and compiled with
``torch._inductor.compile`` once per (function, shapes, strides, dtype). This deliberately
bypasses dynamo: there are no guards and no per-code-object ``recompile_limit`` (default 8) to run
into with a model of many layer shapes, no global dynamo setting is touched, and the compiled
callables are plain functions that also run fine when the whole model is under
``torch.compile(fullgraph=True)`` (the custom op is opaque there, so this code runs eagerly inside
the compiled graph). The first call of a new shape costs about 1-20 s of compilation (inductor
caches the generated code on disk, so later processes are faster); later calls reuse the cached
callable.

Memory. The compiled reductions are fused: their only allocations are the padded input copy,
padded grad_out copies and the outputs, all O(activation size); the [Cout, Cin*kh*kw, N*Ho*Wo]
broadcast of the published unfold implementation never exists. Where no compiler works
(compilation raises, e.g. no C++ compiler; a warning is issued once) or
``TRITON_ADDER_CPU_COMPILE=0``, or when called while dynamo is tracing, the SAME functions run
eagerly on chunks of output rows (and of channels, for very wide layers), sized so each chunk's
broadcast temporaries stay within the budget ``TRITON_ADDER_CPU_MEMORY_MB`` (megabytes, default
`DEFAULT_MEMORY_BUDGET_MB`). The smallest chunk is one output row of one image and one channel,
so a budget below that size is exceeded by that much.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import threading
import warnings

import torch

from triton_adder.geometry import Conv2dGeometry

DEFAULT_MEMORY_BUDGET_MB = 256
"""Default budget (MB) for the broadcast temporaries of one eager chunk; env TRITON_ADDER_CPU_MEMORY_MB overrides."""

MEMORY_BUDGET_ENV = "TRITON_ADDER_CPU_MEMORY_MB"
COMPILE_ENV = "TRITON_ADDER_CPU_COMPILE"
"""Set to 0 to skip compilation and always run the chunked eager path."""

WEIGHT_BLOCK_BYTES = 512 * 1024
"""The compiled forward splits the output channels into blocks whose weights take about this many bytes."""

COMPILED_CACHE_SIZE = 512
"""How many compiled (function, shape) callables are kept (least recently used are dropped)."""

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_GRAD_MODES = ("paper", "exact")

# Eager chunks hold a few full-size broadcast temporaries at once (difference, its abs/sign,
# the product); count 3 per broadcast element when sizing chunks.
_TEMPORARIES_PER_ELEMENT = 3


def memory_budget_bytes() -> int:
    """The eager path's per-chunk temporary budget in bytes (env TRITON_ADDER_CPU_MEMORY_MB, else the default)."""
    raw = os.environ.get(MEMORY_BUDGET_ENV)
    if raw is None or raw == "":
        return DEFAULT_MEMORY_BUDGET_MB * 2**20
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"{MEMORY_BUDGET_ENV} must be a positive number of megabytes, got {raw!r}") from None
    if megabytes <= 0:
        raise ValueError(f"{MEMORY_BUDGET_ENV} must be a positive number of megabytes, got {raw!r}")
    return int(megabytes * 2**20)


def compiler_enabled() -> bool:
    """False when TRITON_ADDER_CPU_COMPILE=0 or a compilation failed earlier in this process."""
    return os.environ.get(COMPILE_ENV, "1") not in ("0", "") and _compiler_failure is None


# --------------------------------------------------------------------------------------------
# The reductions. Each is written over full broadcasts: compiled, inductor fuses them into one
# loop nest with no temporaries; eager, they run on chunks (see `_run`).
# --------------------------------------------------------------------------------------------


def _forward_body(taps, weight, bias=None, *, out_dtype, channels_last):
    """taps (N, Ho, Wo, kh, kw, G, Cg) view, weight (G, Tg, kh, kw, Cg), bias (G*Tg,) or None.

    Returns y (N, Cout, Ho, Wo) in out_dtype, NCHW-contiguous unless channels_last.
    """
    n, ho, wo = taps.shape[:3]
    groups, tg = weight.shape[:2]
    diff = taps.permute(0, 1, 2, 5, 3, 4, 6)[:, :, :, :, None] - weight  # N, Ho, Wo, G, Tg, kh, kw, Cg
    y = diff.abs().sum(dim=(-3, -2, -1)).reshape(n, ho, wo, groups * tg)
    y = -y if bias is None else bias - y
    y = y.to(out_dtype).permute(0, 3, 1, 2)
    return y if channels_last else y.contiguous()


def _grad_input_body(grad_taps, weight, x, *, exact, compute_dtype):
    """One phase of the input-gradient gather (eq. 6, or sign(W - X) when exact).

    grad_taps (N, M, M', U, V, G, Tg): the grad_out values each input element's taps read (view);
    weight (G, U, V, Tg, Cg): the phase's taps, flipped; x (N, M, M', G, Cg): the input values
    (any float dtype, a view of x). Returns dX = sum_{u, v, t} gY * clamp(W - X, -1, 1) (or
    sign(W - X)) as a contiguous (N, M, M', Cin) tensor of compute_dtype.

    Why it is written this way: Cg is the innermost axis of weight, x and the result, so the
    compiled loop keeps one vector accumulator per 16 input channels and streams the reduction
    (no horizontal sums). Returning NCHW from here instead made inductor vectorise along the width
    (60x slower), so the caller transposes. The clamp is computed as ``relu(W - (X-1)) - relu(W - (X+1)) - 1``
    because inductor lowers relu to a plain vector max, while clamp/maximum/minimum become
    NaN-propagating sequences of about 4 instructions each (measured: 2.6x slower); the ``- 1``
    summed over the taps is ``sum gY``, taken once per input position, not per channel.
    """
    n, m_h, m_w, groups, cg = x.shape
    x = x.to(compute_dtype)[:, :, :, :, None, None, None, :]  # N, M, M', G, 1, 1, 1, Cg
    grad = grad_taps.permute(0, 1, 2, 5, 3, 4, 6)[..., None]  # N, M, M', G, U, V, Tg, 1
    if exact:
        out = (grad * (weight - x).sign()).sum(dim=(4, 5, 6))
    else:
        shifted = (weight - (x - 1.0)).relu() - (weight - (x + 1.0)).relu()  # clamp(W - X, -1, 1) + 1
        out = (grad * shifted).sum(dim=(4, 5, 6)) - grad.sum(dim=(4, 5, 6))
    return out.reshape(n, m_h, m_w, groups * cg)


def _grad_weight_exact_body(taps, grad_out, weight):
    """dW = sum_{n,p,q} gY * sign(X - W) (the exact derivative).

    taps (N, Ho, Wo, kh, kw, G, Cg) view, grad_out (N, Ho, Wo, G, Tg), weight (G, Tg, kh, kw, Cg).
    Returns (G, Tg, kh, kw, Cg).
    """
    diff = taps.permute(0, 1, 2, 5, 3, 4, 6)[:, :, :, :, None] - weight  # N, Ho, Wo, G, Tg, kh, kw, Cg
    return (diff.sign() * grad_out[..., None, None, None]).sum(dim=(0, 1, 2))


# --------------------------------------------------------------------------------------------
# Compiled-callable cache and eager fallback.
# --------------------------------------------------------------------------------------------

_compiled = collections.OrderedDict()
_compile_lock = threading.Lock()
_compiler_failure: str | None = None


def _inductor_compile(fn, args):
    """Trace `fn` on fake copies of `args` and compile the graph with inductor (no dynamo)."""
    from torch._inductor import compile as inductor_compile  # noqa: PLC0415  (slow import, only when needed)
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    graph = make_fx(fn, tracing_mode="fake")(*args)
    return inductor_compile(graph, list(args))


def _signature(args) -> tuple:
    return tuple(
        None if a is None else (tuple(a.shape), a.stride(), a.storage_offset(), a.dtype) for a in args
    )


def _compiled_call(fn, options: dict, args):
    """Run fn(*args, **options) through a cached compiled callable; None if compiling is not possible."""
    global _compiler_failure
    key = (fn.__name__, tuple(sorted(options.items())), _signature(args))
    with _compile_lock:
        compiled = _compiled.get(key)
        if compiled is None:
            try:
                with torch.no_grad():
                    compiled = _inductor_compile(functools.partial(fn, **options), args)
            except Exception as error:  # noqa: BLE001  (any compiler failure -> eager fallback)
                _compiler_failure = f"{type(error).__name__}: {error}"
                warnings.warn(
                    "triton_adder.backends.cpu: compiling the CPU adder kernels with torch inductor failed "
                    f"({_compiler_failure.splitlines()[0][:300]}); falling back to the chunked eager "
                    "implementation, which is correct and memory-bounded but ~10-100x slower.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            _compiled[key] = compiled
            if len(_compiled) > COMPILED_CACHE_SIZE:
                _compiled.popitem(last=False)
        else:
            _compiled.move_to_end(key)
    out = compiled(*args)
    return out[0] if isinstance(out, (list, tuple)) else out


def _use_compiler() -> bool:
    return compiler_enabled() and not torch.compiler.is_compiling()


def _chunks(length: int, per_item_bytes: int, budget: int, minimum: int = 1):
    """Split range(length) into [start, stop) chunks of at most budget // per_item_bytes items."""
    step = max(minimum, min(length, budget // max(1, per_item_bytes)))
    for start in range(0, length, step):
        yield start, min(length, start + step)


def _row_blocks(batch: int, rows: int, per_row_bytes: int, budget: int):
    """(n0, n1, r0, r1) blocks of (image, output row) with about `budget` bytes of temporaries each."""
    rows_per_block = max(1, budget // max(1, per_row_bytes))
    if rows_per_block >= rows:
        for n0, n1 in _chunks(batch, rows * per_row_bytes, budget):
            yield n0, n1, 0, rows
    else:
        for n in range(batch):
            for r0 in range(0, rows, rows_per_block):
                yield n, n + 1, r0, min(rows, r0 + rows_per_block)


# --------------------------------------------------------------------------------------------
# Layout helpers.
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str | None = None):
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"triton_adder.backends.cpu takes CPU tensors, got x on {x.device} and weight on {weight.device}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype must be one of {_SUPPORTED_DTYPES}, got {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-D, got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    if grad_mode is not None and grad_mode not in _GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _padded_channels_last(x: torch.Tensor, kernel_size, geom: Conv2dGeometry, dtype: torch.dtype) -> torch.Tensor:
    """Zero-padded copy of x as a contiguous (N, Hpad, Wpad, Cin) buffer of `dtype`.

    Hpad/Wpad is exactly what the taps read (`geom.padded_extent`): input rows past it are
    dropped, missing rows (bottom/right padding) are zeros.
    """
    n, cin, h, w = x.shape
    hpad, wpad = geom.padded_extent(kernel_size)
    top, left = geom.padding
    xpad = x.new_zeros((n, hpad, wpad, cin), dtype=dtype)
    rows, cols = min(h, hpad - top), min(w, wpad - left)
    if rows > 0 and cols > 0:
        xpad[:, top : top + rows, left : left + cols] = x[:, :, :rows, :cols].permute(0, 2, 3, 1)
    return xpad


def _taps_view(xpad: torch.Tensor, kernel_size, geom: Conv2dGeometry) -> torch.Tensor:
    """The strided view (N, Ho, Wo, kh, kw, G, Cg) of xpad: taps[n,p,q,i,j,g,k] = Xpad[n, p*s+i*d, q*s+j*d, g*Cg+k]."""
    n, _, _, cin = xpad.shape
    s_n, s_h, s_w, _ = xpad.stride()
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    cg = cin // geom.groups
    return xpad.as_strided(
        (n, ho, wo, *kernel_size, geom.groups, cg),
        (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, cg, 1),
        xpad.storage_offset(),
    )


def _weight_taps_last(weight: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """weight (Cout, Cg, kh, kw) -> contiguous (G, Tg, kh, kw, Cg) of `dtype`."""
    cout, cg, kh, kw = weight.shape
    return weight.to(dtype).reshape(groups, cout // groups, cg, kh, kw).permute(0, 1, 3, 4, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Backend contract.
# --------------------------------------------------------------------------------------------


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: Conv2dGeometry) -> torch.Tensor:
    """Y[n,t,p,q] = bias[t] - sum_{k,i,j} |Xpad[n, g*Cg+k, p*s+i*d, q*s+j*d] - W[t,k,i,j]|.

    x: (N, Cin, H, W) any layout; weight: (Cout, Cin/groups, kh, kw); bias: (Cout,) or None.
    Returns (N, Cout, Ho, Wo) in x.dtype, channels_last if x is, else NCHW-contiguous.
    """
    _check(x, weight, geom)
    x, weight = x.detach(), weight.detach()
    dtype = _compute_dtype(x.dtype)
    kernel_size = tuple(weight.shape[2:])
    taps = _taps_view(_padded_channels_last(x, kernel_size, geom, dtype), kernel_size, geom)
    w = _weight_taps_last(weight, geom.groups, dtype)
    b = None if bias is None else bias.detach().to(dtype)
    options = {"out_dtype": x.dtype, "channels_last": _is_channels_last(x)}
    if _use_compiler():
        y = _forward_compiled(taps, w, b, options)
        if y is not None:
            return y
    return _forward_eager(taps, w, b, options)


def _weight_blocks(weight_bytes: int) -> int:
    """How many channel blocks to split a weight of this size into (measured: unsplit up to about
    2 blocks' worth, because splitting costs an output copy; 256ch 3x3 went from 5.2x to 3.2x conv2d)."""
    return 1 if weight_bytes <= 2 * WEIGHT_BLOCK_BYTES else -(-weight_bytes // WEIGHT_BLOCK_BYTES)


def _forward_compiled(taps, w, b, options):
    """The compiled forward, over blocks of output channels whose weights fit in about
    `WEIGHT_BLOCK_BYTES`: the kernel streams the whole weight block once per output position, so
    a block that stays in the L2 cache matters for wide layers (measured 256ch@14x14 3x3)."""
    groups, tg, kh, kw, cg = w.shape
    per_channel = groups * kh * kw * cg * w.element_size()
    blocks = _weight_blocks(tg * per_channel)
    if blocks <= 1:
        return _compiled_call(_forward_body, options, (taps, w) if b is None else (taps, w, b))
    block = -(-tg // blocks)
    n, ho, wo = taps.shape[:3]
    y = taps.new_empty((n, groups * tg, ho, wo), dtype=options["out_dtype"])
    if options["channels_last"]:
        y = y.contiguous(memory_format=torch.channels_last)
    for t0 in range(0, tg, block):
        t1 = min(tg, t0 + block)
        args = (taps, w[:, t0:t1].contiguous())
        if b is not None:
            args += (b.reshape(groups, tg)[:, t0:t1].reshape(-1),)
        y_block = _compiled_call(_forward_body, {**options, "channels_last": True}, args)
        if y_block is None:
            return None
        for g in range(groups):
            y[:, g * tg + t0 : g * tg + t1] = y_block[:, g * (t1 - t0) : (g + 1) * (t1 - t0)]
    return y


def _forward_eager(taps, w, b, options):
    n, ho, wo, kh, kw, groups, cg = taps.shape
    tg = w.shape[1]
    y = taps.new_empty((n, groups, tg, ho, wo), dtype=options["out_dtype"])
    budget = memory_budget_bytes()
    item = taps.element_size() * _TEMPORARIES_PER_ELEMENT * groups * kh * kw * cg
    for t0, t1 in _chunks(tg, wo * item, budget):  # channel chunks only when one row of all is too big
        bias = None if b is None else b.reshape(groups, tg)[:, t0:t1].reshape(-1)
        for n0, n1, r0, r1 in _row_blocks(n, ho, wo * (t1 - t0) * item, budget):
            y_chunk = _forward_body(
                taps[n0:n1, r0:r1], w[:, t0:t1], bias, out_dtype=options["out_dtype"], channels_last=True
            )
            y[n0:n1, :, t0:t1, r0:r1] = y_chunk.reshape(n1 - n0, groups, t1 - t0, r1 - r0, wo)
    y = y.reshape(n, groups * tg, ho, wo)
    return y.contiguous(memory_format=torch.channels_last) if options["channels_last"] else y


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


def grad_input(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str = "paper"
) -> torch.Tensor:
    """dX = sum over the taps reading X of gY * clamp(W - X, -1, 1) (eq. 6; "exact": sign(W - X)).

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W); weight: (Cout, Cin/groups, kh, kw).
    Returns (N, Cin, H, W) in x.dtype, channels_last if x is, else NCHW-contiguous. Padded taps
    receive no gradient.
    """
    _check(x, weight, geom, grad_mode)
    grad_out, x, weight = grad_out.detach(), x.detach(), weight.detach()
    dtype = _compute_dtype(x.dtype)
    n, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    groups = geom.groups
    tg = cout // groups
    # Channels-last copy (a no-op view when x is channels_last float32): with a channels-strided
    # view of an NCHW x, inductor vectorised along the width instead of the channels (50x slower).
    x_nhwc = x.to(dtype).permute(0, 2, 3, 1).contiguous()
    grad_nhwc = grad_out.permute(0, 2, 3, 1)
    w_grouped = weight.to(dtype).reshape(groups, tg, cg, kh, kw)
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    top, left = geom.padding
    rows_phases = list(_phases(h, top, sh, dh, kh, ho))
    cols_phases = list(_phases(w, left, sw, dw, kw, wo))
    single_phase = len(rows_phases) == len(cols_phases) == 1 and rows_phases[0][1] == h and cols_phases[0][1] == w
    layout = "channels_last" if _is_channels_last(x) else "nchw"
    grad_x = None if single_phase else x.new_zeros((n, h, w, cin), dtype=dtype)
    for h0, mh, taps_h, step_h, lo_h, len_h in rows_phases:
        for w0, mw, taps_w, step_w, lo_w, len_w in cols_phases:
            buf = _zero_padded_rows(grad_nhwc, lo_h, len_h, lo_w, len_w, dtype)
            s_n, s_h, s_w, _ = buf.stride()
            grad_taps = buf.as_strided(
                (n, mh, mw, len(taps_h), len(taps_w), groups, tg), (s_n, s_h, s_w, step_h * s_h, step_w * s_w, tg, 1)
            )
            w_phase = w_grouped.index_select(3, torch.tensor(taps_h)).index_select(4, torch.tensor(taps_w))
            w_phase = w_phase.permute(0, 3, 4, 1, 2).contiguous()  # (G, U, V, Tg, Cg)
            rows = slice(h0, h0 + (mh - 1) * sh + 1, sh)
            cols = slice(w0, w0 + (mw - 1) * sw + 1, sw)
            x_phase = x_nhwc[:, rows, cols].reshape(n, mh, mw, groups, cg)
            options = {"exact": grad_mode == "exact", "compute_dtype": dtype}
            out = _grad_input_phase(grad_taps, w_phase, x_phase, options)
            if single_phase:
                grad_x = out  # (N, H, W, Cin): the phase is all of x
            else:
                grad_x[:, rows, cols] = out
    grad_x = grad_x.to(x.dtype).permute(0, 3, 1, 2)
    return grad_x if layout == "channels_last" else grad_x.contiguous()


def _grad_input_compiled(grad_taps, w_phase, x_phase, options):
    """The compiled phase, over blocks of input channels whose weights fit in about
    `WEIGHT_BLOCK_BYTES` (the kernel streams the weight block once per input position)."""
    groups, u, v, tg, cg = w_phase.shape
    blocks = _weight_blocks(groups * u * v * tg * cg * w_phase.element_size())
    if blocks <= 1:
        return _compiled_call(_grad_input_body, options, (grad_taps, w_phase, x_phase))
    block = -(-cg // blocks)
    n, mh, mw = x_phase.shape[:3]
    out = x_phase.new_empty((n, mh, mw, groups, cg), dtype=options["compute_dtype"])
    for k0 in range(0, cg, block):
        k1 = min(cg, k0 + block)
        args = (grad_taps, w_phase[..., k0:k1].contiguous(), x_phase[..., k0:k1])
        out_block = _compiled_call(_grad_input_body, options, args)
        if out_block is None:
            return None
        out[..., k0:k1] = out_block.reshape(n, mh, mw, groups, k1 - k0)
    return out.reshape(n, mh, mw, groups * cg)


def _grad_input_phase(grad_taps, w_phase, x_phase, options):
    """Run `_grad_input_body` compiled, else eagerly on chunks of rows (and input channels)."""
    if _use_compiler():
        out = _grad_input_compiled(grad_taps, w_phase, x_phase, options)
        if out is not None:
            return out
    n, mh, mw, u, v, groups, tg = grad_taps.shape
    cg = w_phase.shape[-1]
    out = x_phase.new_empty((n, mh, mw, groups, cg), dtype=options["compute_dtype"])
    budget = memory_budget_bytes()
    item = grad_taps.element_size() * _TEMPORARIES_PER_ELEMENT * groups * u * v * tg
    for k0, k1 in _chunks(cg, mw * item, budget):
        for n0, n1, r0, r1 in _row_blocks(n, mh, mw * (k1 - k0) * item, budget):
            chunk = _grad_input_body(
                grad_taps[n0:n1, r0:r1], w_phase[..., k0:k1], x_phase[n0:n1, r0:r1, :, :, k0:k1], **options
            )
            out[n0:n1, r0:r1, :, :, k0:k1] = chunk.reshape(n1 - n0, r1 - r0, mw, groups, k1 - k0)
    return out.reshape(n, mh, mw, groups * cg)


def grad_weight(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str = "paper"
) -> torch.Tensor:
    """dW = sum_{n,p,q} gY * (X - W) (eq. 5; "exact": sign(X - W)), X the input value tap (i, j) reads.

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W); weight: (Cout, Cin/groups, kh, kw).
    Returns (Cout, Cin/groups, kh, kw) contiguous, in weight.dtype.
    """
    _check(x, weight, geom, grad_mode)
    grad_out, x, weight = grad_out.detach(), x.detach(), weight.detach()
    dtype = _compute_dtype(x.dtype)
    kernel_size = tuple(weight.shape[2:])
    xpad = _padded_channels_last(x, kernel_size, geom, dtype)
    if grad_mode == "paper":
        return _grad_weight_paper(grad_out.to(dtype), xpad, weight, geom).to(weight.dtype)
    groups = geom.groups
    cout, cg, kh, kw = weight.shape
    taps = _taps_view(xpad, kernel_size, geom)
    grad_cl = grad_out.to(dtype).permute(0, 2, 3, 1).reshape(*grad_out.shape[:1], *geom.out_size, groups, -1)
    grad_cl = grad_cl.contiguous()
    w = _weight_taps_last(weight, groups, dtype)
    dw = None
    if _use_compiler():
        dw = _compiled_call(_grad_weight_exact_body, {}, (taps, grad_cl, w))
    if dw is None:
        dw = _grad_weight_exact_eager(taps, grad_cl, w)
    # (G, Tg, kh, kw, Cg) -> (Cout, Cg, kh, kw)
    return dw.reshape(cout, kh, kw, cg).permute(0, 3, 1, 2).contiguous().to(weight.dtype)


def _grad_weight_exact_eager(taps, grad_cl, w):
    n, ho, wo, kh, kw, groups, cg = taps.shape
    tg = w.shape[1]
    dw = w.new_zeros(w.shape)
    budget = memory_budget_bytes()
    item = taps.element_size() * _TEMPORARIES_PER_ELEMENT * groups * kh * kw * cg
    for t0, t1 in _chunks(tg, wo * item, budget):
        for n0, n1, r0, r1 in _row_blocks(n, ho, wo * (t1 - t0) * item, budget):
            dw[:, t0:t1] += _grad_weight_exact_body(taps[n0:n1, r0:r1], grad_cl[n0:n1, r0:r1, :, :, t0:t1], w[:, t0:t1])
    return dw


def _reduced_precision_conv() -> bool:
    """True when the user let oneDNN run float32 convolutions in TF32/BF16 (torch >= 2.9 setting)."""
    mkldnn = torch.backends.mkldnn
    conv = getattr(getattr(mkldnn, "conv", None), "fp32_precision", "none")
    overall = getattr(mkldnn, "fp32_precision", "none")
    return (conv if conv not in ("none", None) else overall) in ("tf32", "bf16")


def _grad_weight_paper(grad_out: torch.Tensor, xpad: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry):
    """Eq. 5 through the identity dW = conv2d_weight_grad(Xpad, gY) - W * sum_{n,p,q} gY (per output channel t).

    grad_out (N, Cout, Ho, Wo) and xpad (N, Hpad, Wpad, Cin) in the compute dtype. The identity is
    exact; it needs the convolution to run in true float32/float64, so a reduced-precision oneDNN
    setting makes it run in float64 instead.
    """
    dtype = xpad.dtype
    if dtype == torch.float32 and _reduced_precision_conv():
        return _grad_weight_paper(grad_out.double(), xpad.double(), weight, geom).float()
    w = weight.to(dtype)
    conv_grad = torch.ops.aten.convolution_backward(
        grad_out,
        xpad.permute(0, 3, 1, 2),  # a channels_last NCHW view: oneDNN's preferred layout
        w,
        None,
        list(geom.stride),
        [0, 0],
        list(geom.dilation),
        False,
        [0, 0],
        geom.groups,
        [False, True, False],
    )[1]
    return conv_grad - w * grad_out.sum(dim=(0, 2, 3))[:, None, None, None]
