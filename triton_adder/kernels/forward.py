"""Adder forward as an implicit GEMM: Y[n,t,p,q] = bias[t] - sum_{k,i,j} |Xpad[...] - W[t,k,i,j]|.

DESIGN.md section 1 for the math, section 2 for why the kernel is shaped this way. Each program
owns a BLOCK_M x BLOCK_N output tile: BLOCK_M positions of the flattened (n, oh, ow) axis (M =
N*Ho*Wo) by BLOCK_N output channels of one group; the grid is (cdiv(M, BLOCK_M), cdiv(Cout/groups,
BLOCK_N), groups). Nothing is unfolded in memory: the kernel taps (i, j) are compile-time outer
loops (their row offsets and padding masks computed once per tap), the group's input channels the
inner runtime loop in BLOCK_K steps, each step BLOCK_K unrolled rank-1 updates

    acc[m, t] += |x[m, k] - w[k, t]|

which compile to two FADDs per element (the |.| is a free operand modifier). A 3-D broadcast with
`tl.sum(axis=1)` instead splits the K reduction across lanes and costs warp shuffles.

Padding, stride and dilation are index arithmetic: a tap reading outside the input loads a zero and
so contributes -|w| (the published code unfolds with zero padding). Layouts are strides: NCHW,
channels_last and non-contiguous inputs are read in place and the output takes the input's memory
format. Index math is int32 unless a tensor has 2^31 elements or more (constexpr USE_INT64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_adder.contract import KERNEL_DTYPES, memory_format, needs_int64_indexing, next_power_of_two
from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels.launch_config import MAX_ACCUMULATORS_PER_THREAD, KernelConfig, check_config, source_hash

MAX_BLOCK_K = 64
"""Largest BLOCK_K this kernel takes: its BLOCK_K rank-1 updates are unrolled, so compile time grows
linearly with it (KernelConfig.validate covers the generic ranges)."""


@triton.jit
def adder2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    M, channels_per_group, outputs_per_group, H, W, Ho, Wo,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wt, stride_wc, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M x BLOCK_N tile of y (N, Cout, Ho, Wo) for group program_id(2).

    x: (N, Cin, H, W) and w: (Cout, Cin/groups, KH, KW) are addressed via their strides; bias (Cout,)
    must be contiguous, and y's rows Wo * stride_yw apart, as in NCHW and channels_last (`kernel_launch`
    sees to both).
    float16/bfloat16 values are widened to float32 as they are loaded (once per row or column, not per
    element), so the loop is the float32 one; packed-half variants measured worse (see sass.py notes).
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

    x_rows = x_ptr + n * stride_xn + (group * channels_per_group) * stride_xc  # (BLOCK_M,) pointers
    w_cols = w_ptr + out_channel * stride_wt  # (BLOCK_N,) pointers

    full_channels = channels_per_group - channels_per_group % BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(KH):
        ih = oh * conv_stride_h - pad_h + i * dil_h
        row_in = m_valid & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * conv_stride_w - pad_w + j * dil_w
            x_in = row_in & (iw >= 0) & (iw < W)
            x_tap = x_rows + ih * stride_xh + iw * stride_xw
            w_tap = w_cols + i * stride_wh + j * stride_ww
            # Full BLOCK_K steps need no channel mask; the tail (if any) clamps k and zeroes its terms.
            for k0 in range(0, full_channels, BLOCK_K):
                for kk in tl.static_range(BLOCK_K):
                    k = k0 + kk
                    if USE_INT64:
                        k = tl.cast(k, tl.int64)  # k * stride_xc reaches Cin*H*W
                    x_k = tl.load(x_tap + k * stride_xc, mask=x_in, other=0.0)
                    w_k = tl.load(w_tap + k * stride_wc, mask=t_valid, other=0.0)
                    acc += tl.abs(x_k.to(tl.float32)[:, None] - w_k.to(tl.float32)[None, :])
            if full_channels < channels_per_group:
                for kk in tl.static_range(BLOCK_K):
                    k = full_channels + kk
                    k_safe = tl.minimum(k, channels_per_group - 1)
                    if USE_INT64:
                        k_safe = tl.cast(k_safe, tl.int64)
                    x_k = tl.load(x_tap + k_safe * stride_xc, mask=x_in, other=0.0)
                    w_k = tl.load(w_tap + k_safe * stride_wc, mask=t_valid, other=0.0)
                    term = tl.abs(x_k.to(tl.float32)[:, None] - w_k.to(tl.float32)[None, :])
                    acc += tl.where(k < channels_per_group, term, 0.0)

    y_tile = -acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + out_channel, mask=t_valid, other=0.0).to(tl.float32)
        y_tile += bias[None, :]
    # y is allocated by the launcher, NCHW-contiguous or channels_last: in both, position
    # (oh, ow) sits at (oh * Wo + ow) * stride_yw from the image start. One division per row instead
    # of the two div/mod pairs above keeps the epilogue (recomputed in the store layout) out of spills.
    image = offs_m // (Ho * Wo)
    y_rows = image * stride_yn + (offs_m - image * (Ho * Wo)) * stride_yw
    y_ptrs = y_ptr + y_rows[:, None] + out_channel[None, :] * stride_yc
    tl.store(y_ptrs, y_tile.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & t_valid[None, :])


KERNEL_SOURCE_HASH = source_hash(adder2d_forward_kernel)
"""sha256 of the kernel source: the tuner's cache keys on it so a kernel change invalidates winners."""


def validate_config(config: KernelConfig, argument: str = "config") -> KernelConfig:
    """Check the generic ranges (KernelConfig.validate) and the limits of this kernel; return config."""
    check_config(config, argument)
    if config.block_k > MAX_BLOCK_K:
        raise ValueError(
            f"{argument}.block_k must be at most {MAX_BLOCK_K} for the forward kernel (its BLOCK_K steps are "
            f"unrolled), got {config.block_k}"
        )
    threads = 32 * config.num_warps
    per_thread = config.accumulators_per_thread()
    if per_thread > MAX_ACCUMULATORS_PER_THREAD:
        raise ValueError(
            f"{argument}: block_m * block_n / (32 * num_warps) = {config.block_m}*{config.block_n}/{threads} = "
            f"{per_thread:g} float32 accumulators per thread; at most {MAX_ACCUMULATORS_PER_THREAD} fit in "
            f"registers: use smaller blocks or more warps"
        )
    return config


def default_config(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> KernelConfig:
    """Heuristic launch config for one shape, used when the tuner has nothing cached.

    BLOCK_N follows Cout/groups (no idle columns for depthwise layers) up to 64, BLOCK_M fills
    ~64 float32 accumulators per thread at 4 warps, BLOCK_K is 4 and never above Cin/groups.
    Screened on sm_90 SASS (`python benchmarks/sass_screen.py --all-defaults`): no spills and
    ~2.4-2.6 instructions per element; BLOCK_K 8 spilled at 1x1 (128x64), 16 outputs per group
    (512x16) and 16-bit inputs; 64x64x8 (4 warps) and 128x128x4 (8 warps) spilled thousands.
    """
    outputs_per_group = weight.shape[0] // geom.groups
    channels_per_group = weight.shape[1]
    m = x.shape[0] * geom.out_size[0] * geom.out_size[1]
    block_n = min(64, next_power_of_two(outputs_per_group))
    block_m = min(8192 // block_n, 1024, max(16, next_power_of_two(m)))
    block_k = min(4, next_power_of_two(channels_per_group))
    return KernelConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)


def output_channels_contiguous(weight: torch.Tensor) -> torch.Tensor:
    """weight (Cout, Cg, kh, kw) as a view of the same shape whose storage is (Cg, kh, kw, Cout).

    A tile's k step loads BLOCK_N output channels of one (input channel, tap); in the
    (Cout, Cg, kh, kw) layout they sit Cg*kh*kw elements apart, one 32-byte sector each. With Cout
    contiguous (stride 1, which Triton specialises and so the compiler sees) they are one contiguous
    run, so the loads are coalesced: 1.00 byte fetched per byte used instead of 8.00
    (results/benchmarks/sass_matrix_after.txt against sass_matrix.txt). They are still scalar
    LDG.E, not vector loads (0 of 8 in the matrix): each thread holds one element of the 1-D weight
    row. The copy is one pass over W per call (Cout*Cg*kh*kw elements), small beside the
    N*Ho*Wo*Cout*Cg*kh*kw-term reduction; a weight already in this layout is passed as is.
    """
    return weight.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def kernel_launch(x, weight, bias, y, geom: Conv2dGeometry, config: KernelConfig):
    """(grid, positional args, keyword args) for adder2d_forward_kernel writing into y.

    Shared by `forward` and the SASS screen (benchmarks/sass_screen.py), so both see the same
    specialisation. The kernel reads the weight through `output_channels_contiguous` (args[1]).
    """
    n, cin, h, w = x.shape
    cout, channels_per_group, kh, kw = weight.shape
    ho, wo = geom.out_size
    if ho > 1 and y.stride(2) != wo * y.stride(3):
        raise ValueError(
            f"y's rows must be Wo * y.stride(3) apart, as in NCHW-contiguous and channels_last tensors (the kernel "
            f"finds row oh at oh * Wo * y.stride(3)); got strides {y.stride()} for shape {tuple(y.shape)}"
        )
    # The kernel reads bias[t] at bias_ptr + t, without a stride, so a view (a slice with a step, an expand
    # with stride 0) is copied: Cout elements once per call, nothing beside the reduction.
    bias = None if bias is None else bias.contiguous()
    outputs_per_group = cout // geom.groups
    m = n * ho * wo
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(outputs_per_group, config.block_n), geom.groups)
    weight = output_channels_contiguous(weight)
    args = (
        x, weight, bias if bias is not None else y, y,
        m, channels_per_group, outputs_per_group, h, w, ho, wo,
        *x.stride(), *weight.stride(), y.stride(0), y.stride(1), y.stride(3),
        *geom.stride, *geom.padding, *geom.dilation,
    )  # fmt: skip
    kwargs = dict(
        KH=kh,
        KW=kw,
        HAS_BIAS=bias is not None,
        USE_INT64=needs_int64_indexing(x, weight, y),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grid, args, kwargs


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geom: Conv2dGeometry,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Adder forward on the Triton kernel (backend contract).

    x: (N, Cin, H, W) float32/float16/bfloat16, any strides (NCHW, channels_last, views);
    weight: (Cout, Cin/groups, kh, kw) in x's dtype; bias: (Cout,) or None.
    Returns y (N, Cout, Ho, Wo) in x's dtype and memory format; accumulation is float32.
    config: launch config; None takes `default_config(x, weight, geom)`.
    """
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x.dtype must be one of {KERNEL_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"weight and bias must have x's dtype {x.dtype}, got {weight.dtype}"
            f"{'' if bias is None else ' and ' + str(bias.dtype)}"
        )
    config = validate_config(default_config(x, weight, geom) if config is None else config)
    n, cout = x.shape[0], weight.shape[0]
    y = torch.empty((n, cout, *geom.out_size), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if y.numel() == 0:
        return y
    grid, args, kwargs = kernel_launch(x, weight, bias, y, geom, config)
    adder2d_forward_kernel[grid](*args, **kwargs)
    return y
