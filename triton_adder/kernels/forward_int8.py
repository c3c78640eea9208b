"""int8 adder forward for GPUs: y = bias - s * sum |x_q - w_q|, int32 sums (DESIGN.md section 7).

The quantization scheme is `quant/`'s (DESIGN.md section 7): one scale s per layer for input and
weight, ``x_q = clamp(round(x * (1/s)), -127, 127)`` (1/s a float64, round half to even, NaN ->
+127), a padded tap reads x_q = 0. The input is quantized per call with torch ops on its device
(`quantize_input`, in float64 like the CPU kernel, so both paths see the same x_q); the weight
arrives quantized (int8, `QuantizedAdder2d.weight_q`) and is laid out per call (`pack_weight`, one
pass over Cout * K bytes).

Layout: as the CPU kernel (`quant/sad.c`), a value is stored as the unsigned byte x_q + 128, so
|a - b| of the bytes is |x_q - w_q|; 4 consecutive input channels of a group share one 32-bit word
(byte b = channel 4w + b, little endian), each group's channels padded to a multiple of 4 with
byte 128 (a quantized zero) in both operands. Input words are
(N, groups * Cg4, H, W), Cg4 = ceil(Cg / 4), NCHW-like, so a word load over BLOCK_M positions is
as coalesced as the float kernel's; weight words are (Cout, Cg4, kh, kw) with Cout contiguous
(the float kernel's `output_channels_contiguous`). A filler byte adds |128 - 128| = 0; a padded tap
loads the word 0x80808080 (`ZERO_WORD`, four quantized zeros).

The kernel is the float forward kernel (`forward.py`: BLOCK_M x BLOCK_N tile, taps as
compile-time outer loops, rank-1 updates) over words, BLOCK_K words (4 * BLOCK_K channels) per
step, an int32 accumulator tile and the epilogue ``y = bias - s * float32(acc)`` in float32 math,
stored in the output's dtype (or the int32 sums, `integer=True`). The tail step (Cg4 not a
multiple of BLOCK_K) masks both loads with `k < Cg4`, so its extra words are `ZERO_WORD` in both
operands and add nothing: no select in the loop. Two inner forms (`VARIANTS`):

- "unpacked" (the default): each word's 4 bytes are extracted with shift and mask (once per row
  or column of the tile, not per element) and, since |a - b| = 2 max(a, b) - a - b, the loop adds
  max(x_b, w_b) per element (an IMNMX, and half an IADD3: ptxas adds two terms per IADD3) and
  the bytes themselves per row (x) and per column (w); the epilogue forms 2 acc - x_sum - w_sum.
  The direct form, acc += |x_b - w_b|, compiled to about twice the instructions (a subtract, a
  negate and a max for the |.|, then the add). Runs under the Triton interpreter and is tested
  there.
- "vabsdiff4": one PTX ``vabsdiff4.u32.u32.u32.add`` per word pair (4 unsigned byte differences,
  absolute, summed and added to the accumulator: SASS VABSDIFF4.U8.ACC; ptxas emulates the signed
  form ``.s32`` with about 33 instructions per word, 18 of them PRMT, hence the +128 bytes) through
  `tl.inline_asm_elementwise`. Inline assembly cannot run under the interpreter (the launcher
  refuses it there), so it is only compile-checked (tests/test_kernel_int8.py); it stays opt-in
  until a GPU run compares the two (results/benchmarks/sass_int8.txt has their SASS counts).

Why a module of its own rather than a constexpr switch in forward.py: the operands, the launcher
(quantize, pack, scale) and the limits differ, and the float kernel's source hash keys its tuned
configs and SASS screens, which a switch would invalidate.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from triton_adder.contract import SUPPORTED_DTYPES, memory_format, needs_int64_indexing, next_power_of_two
from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels.launch_config import MAX_ACCUMULATORS_PER_THREAD, KernelConfig, check_config

VARIANTS = ("unpacked", "vabsdiff4")
"""Inner-loop forms: "unpacked" (default, interpreter-tested), "vabsdiff4" (inline PTX, GPU only)."""
DEFAULT_VARIANT = "unpacked"
BYTES_PER_WORD = 4
QMAX = 127
MAX_BLOCK_K = 16
"""Largest BLOCK_K (in words, 4 channels each): the step is unrolled, 4 * BLOCK_K rank-1 updates."""
INT32_MAX = 2**31 - 1
MAX_BYTE = 255
"""Largest operand byte (x_q + 128 <= 255): the unpacked form's 2 * sum max(x_b, w_b) must fit int32."""
ZERO_WORD = tl.constexpr(-0x7F7F7F80)
"""0x80808080 as an int32: four bytes 128, i.e. four quantized zeros (bytes hold x_q + 128)."""


@triton.jit
def _accumulate(acc, x_sum, w_sum, x_word, w_word, VABSDIFF4: tl.constexpr):
    """Add the 4 byte terms |x_word[m].b - w_word[t].b| (unsigned bytes) of one word pair to the tile.

    VABSDIFF4: acc[m, t] += the sum itself (one VABSDIFF4.U8.ACC). Else, with |a - b| =
    2 max(a, b) - a - b: acc[m, t] += max(x_b, w_b) per element, x_sum[m] += x_b and w_sum[t] += w_b
    per row and column (the epilogue forms 2 acc - x_sum - w_sum).
    """
    if VABSDIFF4:
        acc = tl.inline_asm_elementwise(
            "vabsdiff4.u32.u32.u32.add $0, $1, $2, $3;",
            "=r,r,r,r",
            [x_word[:, None], w_word[None, :], acc],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        for b in tl.static_range(4):
            x_b = (x_word >> (8 * b)) & 0xFF
            w_b = (w_word >> (8 * b)) & 0xFF
            acc += tl.maximum(x_b[:, None], w_b[None, :])
            x_sum += x_b
            w_sum += w_b
    return acc, x_sum, w_sum


@triton.jit
def adder2d_forward_int8_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    M, words_per_group, outputs_per_group, H, W, Ho, Wo,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wt, stride_wc, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    scale,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, INTEGER_OUT: tl.constexpr, VABSDIFF4: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M x BLOCK_N tile of y (N, Cout, Ho, Wo) for group program_id(2).

    x: int32 words (N, groups * words_per_group, H, W); w: int32 words (Cout, words_per_group, KH, KW);
    both addressed by strides (in words). bias (Cout,) contiguous; y's rows Wo * stride_yw apart.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_t = offs_t.to(tl.int64)
    m_valid = offs_m < M
    t_valid = offs_t < outputs_per_group
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    out_channel = group * outputs_per_group + offs_t

    x_rows = x_ptr + n * stride_xn + (group * words_per_group) * stride_xc
    w_cols = w_ptr + out_channel * stride_wt

    full_words = words_per_group - words_per_group % BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for i in tl.static_range(KH):
        ih = oh * conv_stride_h - pad_h + i * dil_h
        row_in = m_valid & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * conv_stride_w - pad_w + j * dil_w
            x_in = row_in & (iw >= 0) & (iw < W)
            x_tap = x_rows + ih * stride_xh + iw * stride_xw
            w_tap = w_cols + i * stride_wh + j * stride_ww
            for k0 in range(0, full_words, BLOCK_K):
                for kk in tl.static_range(BLOCK_K):
                    k = k0 + kk
                    if USE_INT64:
                        k = tl.cast(k, tl.int64)
                    x_word = tl.load(x_tap + k * stride_xc, mask=x_in, other=ZERO_WORD)
                    w_word = tl.load(w_tap + k * stride_wc, mask=t_valid, other=ZERO_WORD)
                    acc, x_sum, w_sum = _accumulate(acc, x_sum, w_sum, x_word, w_word, VABSDIFF4)
            if full_words < words_per_group:
                # Words past the group's end load 0 in both operands: |0 - 0| adds nothing.
                for kk in tl.static_range(BLOCK_K):
                    k = full_words + kk
                    k_in = tl.full((1,), k, tl.int32) < words_per_group  # a tensor even when both are constants
                    if USE_INT64:
                        k = tl.cast(k, tl.int64)
                    x_word = tl.load(x_tap + k * stride_xc, mask=x_in & k_in, other=ZERO_WORD)
                    w_word = tl.load(w_tap + k * stride_wc, mask=t_valid & k_in, other=ZERO_WORD)
                    acc, x_sum, w_sum = _accumulate(acc, x_sum, w_sum, x_word, w_word, VABSDIFF4)

    image = offs_m // (Ho * Wo)
    y_rows = image * stride_yn + (offs_m - image * (Ho * Wo)) * stride_yw
    y_ptrs = y_ptr + y_rows[:, None] + out_channel[None, :] * stride_yc
    y_mask = m_valid[:, None] & t_valid[None, :]
    if not VABSDIFF4:
        acc = 2 * acc - x_sum[:, None] - w_sum[None, :]
    if INTEGER_OUT:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:
        y_tile = -scale * acc.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + out_channel, mask=t_valid, other=0.0).to(tl.float32)
            y_tile += bias[None, :]
        tl.store(y_ptrs, y_tile.to(y_ptr.dtype.element_ty), mask=y_mask)


def words_per_group(channels_per_group: int) -> int:
    """ceil(Cg / 4): the 32-bit words one position of one group takes."""
    return -(-channels_per_group // BYTES_PER_WORD)


def _biased_bytes(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-128, 127] -> uint8 bytes q + 128 (the unsigned SAD operands)."""
    return (q.to(torch.int16) + 128).to(torch.uint8)


def quantize_input(x: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """x (N, C, H, W) float -> int32 words (N, groups * ceil(C/groups / 4), H, W), contiguous.

    x_q = clamp(round(x * (1/s)), -127, 127) computed in float64 (NaN -> +127, as `quant`'s C kernel
    and `quantize_tensor`), stored as bytes x_q + 128, each group's channels padded with byte 128
    (a quantized zero) to a multiple of 4, 4 channels per word.
    """
    n, c, h, w = x.shape
    cg = c // groups
    cg4 = words_per_group(cg)
    q = (x.double() * (1.0 / scale)).round_().nan_to_num_(nan=QMAX, posinf=QMAX, neginf=-QMAX)
    q = (q.clamp_(-QMAX, QMAX) + 128).to(torch.uint8).view(n, groups, cg, h, w)
    if cg4 * BYTES_PER_WORD != cg:
        padded = q.new_full((n, groups, cg4 * BYTES_PER_WORD, h, w), 128)
        padded[:, :, :cg] = q
        q = padded
    bytes_last = q.view(n, groups, cg4, BYTES_PER_WORD, h, w).permute(0, 1, 2, 4, 5, 3).contiguous()
    return bytes_last.reshape(-1).view(torch.int32).view(n, groups * cg4, h, w)  # flat: size-1 dims' strides


def pack_weight(weight_q: torch.Tensor) -> torch.Tensor:
    """int8 weight (Cout, Cg, kh, kw) -> int32 words (Cout, ceil(Cg/4), kh, kw) whose storage is
    (ceil(Cg/4), kh, kw, Cout): bytes w_q + 128 (filler 128), 4 input channels per word, Cout
    contiguous (coalesced loads)."""
    cout, cg, kh, kw = weight_q.shape
    cg4 = words_per_group(cg)
    padded = torch.full((cg4 * BYTES_PER_WORD, kh, kw, cout), 128, dtype=torch.uint8, device=weight_q.device)
    padded[:cg] = _biased_bytes(weight_q).permute(1, 2, 3, 0)
    words = padded.view(cg4, BYTES_PER_WORD, kh, kw, cout).permute(0, 2, 3, 4, 1).contiguous()
    return words.reshape(-1).view(torch.int32).view(cg4, kh, kw, cout).permute(3, 0, 1, 2)


def validate_config(config: KernelConfig, argument: str = "config") -> KernelConfig:
    """Generic ranges (KernelConfig.validate), block_k (words) at most MAX_BLOCK_K, accumulators fit."""
    check_config(config, argument)
    if config.block_k > MAX_BLOCK_K:
        raise ValueError(
            f"{argument}.block_k must be at most {MAX_BLOCK_K} words (4 channels each) for the int8 forward "
            f"kernel (its BLOCK_K steps are unrolled), got {config.block_k}"
        )
    per_thread = config.accumulators_per_thread()
    if per_thread > MAX_ACCUMULATORS_PER_THREAD:
        raise ValueError(
            f"{argument}: block_m * block_n / (32 * num_warps) = {per_thread:g} int32 accumulators per thread; "
            f"at most {MAX_ACCUMULATORS_PER_THREAD} fit in registers: use smaller blocks or more warps"
        )
    return config


def default_config(x_shape, weight_shape, geom: Conv2dGeometry, variant: str = DEFAULT_VARIANT) -> KernelConfig:
    """Heuristic config: the float kernel's tile (BLOCK_N follows Cout/groups up to 64, ~64
    accumulators per thread at 4 warps), BLOCK_K 1 word for "unpacked" (4 channels, fewest
    registers) and 4 words for "vabsdiff4", never above Cg4. Screened on SASS only
    (results/benchmarks/sass_int8.txt), never timed."""
    outputs_per_group = weight_shape[0] // geom.groups
    m = x_shape[0] * geom.out_size[0] * geom.out_size[1]
    block_n = min(64, next_power_of_two(outputs_per_group))
    block_m = min(8192 // block_n, 1024, max(16, next_power_of_two(m)))
    block_k = min(1 if variant == "unpacked" else 4, next_power_of_two(words_per_group(weight_shape[1])))
    return KernelConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)


def kernel_launch(x_words, w_words, bias, y, geom: Conv2dGeometry, scale: float, config: KernelConfig,
                  variant: str = DEFAULT_VARIANT, integer: bool = False):  # fmt: skip
    """(grid, positional args, keyword args) of adder2d_forward_int8_kernel writing into y.

    x_words: `quantize_input`'s (N, groups * Cg4, H, W); w_words: `pack_weight`'s (Cout, Cg4, kh, kw).
    Shared by `forward` and the SASS screen (benchmarks/sass_int8.py), so both see the same specialisation.
    """
    n, _, h, w = x_words.shape
    cout, cg4, kh, kw = w_words.shape
    ho, wo = geom.out_size
    if ho > 1 and y.stride(2) != wo * y.stride(3):
        raise ValueError(f"y's rows must be Wo * y.stride(3) apart (NCHW or channels_last); got strides {y.stride()}")
    bias = None if bias is None else bias.contiguous()
    outputs_per_group = cout // geom.groups
    m = n * ho * wo
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(outputs_per_group, config.block_n), geom.groups)
    args = (
        x_words, w_words, bias if bias is not None else y, y,
        m, cg4, outputs_per_group, h, w, ho, wo,
        *x_words.stride(), *w_words.stride(), y.stride(0), y.stride(1), y.stride(3),
        *geom.stride, *geom.padding, *geom.dilation,
        float(scale),
    )  # fmt: skip
    kwargs = dict(
        KH=kh,
        KW=kw,
        HAS_BIAS=bias is not None and not integer,
        INTEGER_OUT=integer,
        VABSDIFF4=variant == "vabsdiff4",
        USE_INT64=needs_int64_indexing(x_words, w_words, y),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grid, args, kwargs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forward(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    geom: Conv2dGeometry,
    config: KernelConfig | None = None,
    *,
    variant: str = DEFAULT_VARIANT,
    integer: bool = False,
) -> torch.Tensor:
    """int8 adder forward on the Triton kernel.

    x: (N, Cin, H, W) float16/bfloat16/float32/float64, any strides (quantized here with `scale`);
    weight_q: int8 (Cout, Cin/groups, kh, kw), values in [-127, 127] (the scheme's quantized weight);
    bias: (Cout,) floating or None; scale: the layer's scale s > 0 (a float); geom: resolved geometry
    (its groups divide Cin and Cout); config: None takes `default_config`; variant: one of VARIANTS
    ("vabsdiff4" needs a GPU: inline PTX does not run under TRITON_INTERPRET); integer: return the
    int32 sums sum |x_q - w_q| instead of y.

    Returns y = bias - s * sum |x_q - w_q| (N, Cout, Ho, Wo) in x's dtype and memory format, the
    rescale done in float32 (int32 sums with integer=True).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-d (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x.dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if not isinstance(weight_q, torch.Tensor) or weight_q.dtype != torch.int8 or weight_q.dim() != 4:
        got = f"{weight_q.dtype} {tuple(weight_q.shape)}" if isinstance(weight_q, torch.Tensor) else type(weight_q)
        raise ValueError(f"weight_q must be a 4-d int8 tensor (Cout, Cin/groups, kh, kw), got {got}")
    if not isinstance(geom, Conv2dGeometry):
        raise ValueError(f"geom must be a Conv2dGeometry, got {type(geom).__name__}")
    cout, cg, kh, kw = weight_q.shape
    groups = geom.groups
    if cout % groups or x.shape[1] != cg * groups:
        raise ValueError(
            f"weight_q {tuple(weight_q.shape)} does not fit x {tuple(x.shape)} with geom.groups={groups}: "
            "Cout must be a multiple of groups and x.shape[1] == weight_q.shape[1] * groups"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (cout,)
    ):
        raise ValueError(f"bias must be None or a floating ({cout},) tensor, got {getattr(bias, 'shape', bias)!r}")
    for name, t in (("weight_q", weight_q), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: they must share a device")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive, finite float, got {scale!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "vabsdiff4" and (_interpreting() or x.device.type != "cuda"):
        raise RuntimeError(
            'variant="vabsdiff4" is inline PTX: it needs a CUDA device and cannot run under TRITON_INTERPRET; '
            f'use variant="{DEFAULT_VARIANT}" (x is on {x.device})'
        )
    if not isinstance(integer, bool):
        raise ValueError(f"integer must be a bool, got {integer!r}")
    terms = words_per_group(cg) * BYTES_PER_WORD * kh * kw
    if 2 * MAX_BYTE * terms > INT32_MAX:
        raise ValueError(f"weight_q reduces over {terms} (padded) terms per output: the int32 sums hold at most "
                         f"{INT32_MAX // (2 * MAX_BYTE)}")  # fmt: skip
    config = validate_config(default_config(x.shape, weight_q.shape, geom, variant) if config is None else config)
    n = x.shape[0]
    out_dtype = torch.int32 if integer else x.dtype
    y = torch.empty((n, cout, *geom.out_size), dtype=out_dtype, device=x.device, memory_format=memory_format(x))
    if y.numel() == 0:
        return y
    x_words = quantize_input(x, float(scale), groups)
    w_words = pack_weight(weight_q)
    grid, args, kwargs = kernel_launch(x_words, w_words, bias, y, geom, float(scale), config, variant, integer)
    adder2d_forward_int8_kernel[grid](*args, **kwargs)
    return y
