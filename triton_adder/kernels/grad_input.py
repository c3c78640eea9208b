"""Input gradient of the adder layer on Triton (DESIGN.md section 1), paper eq. 6 or the exact derivative::

    dX[n, c, h, w] = sum over (t, i, j) with h + pad_h = p*s_h + i*d_h and w + pad_w = q*s_w + j*d_w
                     of gY[n, t, p, q] * clamp(W[t, k, i, j] - X[n, c, h, w], -1, 1)      (c = g*Cg + k)

`grad_input_kernel` gathers: each program owns BLOCK_M input positions of one stride phase
(h % s_h, w % s_w) and one group by BLOCK_N of that group's input channels, and writes every
element it owns exactly once, so there are no atomics and the result is deterministic. Splitting
the positions by stride phase makes "does tap (i, j) reach this position" a property of the whole
program (one scalar branch per tap) rather than a per-lane mask, so a stride-2 layer does not
spend 3/4 of its instructions on masked-out taps. The taps are compile-time loops (their offsets
are computed once per tap), the group's output channels are the inner loop, BLOCK_K of them
unrolled per step in the rank-1 update form DESIGN.md section 2 found to compile best.

The launcher takes an explicit `KernelConfig` (None: `default_grad_input_config`), so the tuner can
search the launch space; `GRAD_INPUT_KERNEL_HASH` identifies the kernel source for the tuner's cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels.gradients import _sign, accumulate_in_float64, check_grad_mode, check_operands
from triton_adder.kernels.launch_config import KernelConfig, check_config, pow2_between, source_hash

MAX_GRID_YZ = 65535
"""CUDA limit on grid dimensions 1 and 2 (axis 2 enumerates groups * stride_h * stride_w)."""


@triton.jit
def _grad_input_step(acc, gy_sum, gy, wt, x, EXACT: tl.constexpr):
    """One output channel's rank-1 update of the input gradient; x is X (EXACT) or X/2 (paper).

    Paper eq. 6: gY * clamp(W - X, -1, 1) = 2gY * sat(W/2 + 1/2 - X/2) - gY with sat = clamp to
    [0, 1], which compiles to one FFMA.SAT: 2 FP32 instructions per element instead of 4 (FADD, two
    FMNMX, FFMA). The -gY does not depend on the channel, so it is summed per position (gy_sum)
    and subtracted once at the end.
    """
    if EXACT:
        acc += gy[:, None] * _sign(wt[None, :] - x)
    else:
        saturated = tl.minimum(tl.maximum((wt * 0.5 + 0.5)[None, :] - x, 0.0), 1.0)
        acc += (gy + gy)[:, None] * saturated
        gy_sum += gy
    return acc, gy_sum


@triton.jit
def grad_input_kernel(
    grad_out_ptr, x_ptr, weight_ptr, grad_x_ptr,
    N, H, W, HO, WO, CG, TG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sg_n, sg_c, sg_h, sg_w,
    sw_t, sw_k, sw_i, sw_j,
    sdx_n, sdx_c, sdx_h, sdx_w,
    KH: tl.constexpr, KW: tl.constexpr, EXACT: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX for BLOCK_M input positions of one stride phase x BLOCK_N input channels of one group.

    Grid: (cdiv(N * cdiv(H, s_h) * cdiv(W, s_w), BLOCK_M), cdiv(Cg, BLOCK_N), groups * s_h * s_w).
    EXACT=False: paper eq. 6, gY * clamp(W - X, -1, 1); EXACT=True: gY * sign(W - X).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_gp = tl.program_id(2)
    phases = stride_h * stride_w
    g = pid_gp // phases
    phase = pid_gp % phases
    phase_h = phase // stride_w
    phase_w = phase % stride_w
    # Positions of this phase: h = phase_h + hh * s_h for hh < rows (rows = 0 when phase_h >= H).
    rows = (H - phase_h + stride_h - 1) // stride_h
    cols = (W - phase_w + stride_w - 1) // stride_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < N * rows * cols
    ww = offs_m % cols
    hh = (offs_m // cols) % rows
    n = offs_m // (cols * rows)
    h = phase_h + hh * stride_h
    w = phase_w + ww * stride_w
    # Few live (BLOCK_M,) vectors across the tap loops (registers are the limit, DESIGN.md
    # section 2): per-position row offsets, and hh/ww for the taps' range checks, pushed out of
    # every range for positions past the end.
    x_rows = n * sx_n + h * sx_h + w * sx_w
    dx_rows = n * sdx_n + h * sdx_h + w * sdx_w
    gy_rows = n * sg_n + hh * sg_h + ww * sg_w + (g * TG) * sg_c
    hh = tl.where(m_valid, hh, -(1 << 30))

    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_valid = k < CG
    c = g * CG + k
    x_mask = m_valid[:, None] & k_valid[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + (c * sx_c)[None, :], mask=x_mask, other=0.0).to(acc_dtype)
    if not EXACT:
        x = x * 0.5  # exact (power-of-two scale): the paper branch works on X/2, see _grad_input_step
    w_cols = (g * TG) * sw_t + k * sw_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    gy_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    full_t = TG - TG % BLOCK_K
    for i in tl.static_range(KH):
        # h + pad_h - i*d_h = p * s_h: integral for the whole phase or for none of it.
        offset_h = phase_h + pad_h - i * dil_h
        for j in tl.static_range(KW):
            offset_w = phase_w + pad_w - j * dil_w
            if (offset_h % stride_h == 0) & (offset_w % stride_w == 0):
                # Exact division (checked above), so truncating and flooring division agree.
                p_shift = offset_h // stride_h
                q_shift = offset_w // stride_w
                p = hh + p_shift
                q = ww + q_shift
                pos_valid = (p >= 0) & (p < HO) & (q >= 0) & (q < WO)
                gy_tap = grad_out_ptr + (gy_rows + (p_shift * sg_h + q_shift * sg_w))
                w_tap = weight_ptr + (w_cols + (i * sw_i + j * sw_j))
                # Whole BLOCK_K steps need no output-channel mask; the tail clamps t and zeroes gY.
                for t0 in range(0, full_t, BLOCK_K):
                    for kk in tl.static_range(BLOCK_K):
                        gy = tl.load(gy_tap + (t0 + kk) * sg_c, mask=pos_valid, other=0.0).to(acc_dtype)
                        wt = tl.load(w_tap + (t0 + kk) * sw_t, mask=k_valid, other=0.0).to(acc_dtype)
                        acc, gy_sum = _grad_input_step(acc, gy_sum, gy, wt, x, EXACT)
                if full_t < TG:
                    for kk in tl.static_range(BLOCK_K):
                        t_safe = tl.minimum(full_t + kk, TG - 1)
                        gy = tl.load(gy_tap + t_safe * sg_c, mask=pos_valid, other=0.0).to(acc_dtype)
                        gy = tl.where(full_t + kk < TG, gy, 0.0)
                        wt = tl.load(w_tap + t_safe * sw_t, mask=k_valid, other=0.0).to(acc_dtype)
                        acc, gy_sum = _grad_input_step(acc, gy_sum, gy, wt, x, EXACT)

    if not EXACT:
        acc -= gy_sum[:, None]
    dx_ptrs = grad_x_ptr + dx_rows[:, None] + (c * sdx_c)[None, :]
    tl.store(dx_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=(offs_m < N * rows * cols)[:, None] & k_valid[None, :])


GRAD_INPUT_KERNEL_HASH = source_hash(grad_input_kernel, _grad_input_step, _sign)
"""sha256 of the kernel source (with its jitted helpers): the tuner's cache key part."""


def default_grad_input_config(x_shape, weight_shape, geom: Conv2dGeometry, device_type: str = "cuda") -> KernelConfig:
    """Heuristic launch config of `grad_input_kernel` for x (N, Cin, H, W) and weight (Cout, Cg, kh, kw).

    GPU, more than 16 channels per group: 32 positions x 32 input channels, 2 output channels per
    step, ONE warp (32 accumulators and 32 X/2 values per thread), the same config under Triton 3.6
    and 3.9. Screened with the weight read Cg-contiguous (`input_channels_contiguous`), float32,
    paper mode, sm_80 and sm_90, Triton 3.6.0 and 3.9.0 (results/benchmarks/sass_matrix_after.txt):
    on the ResNet 64-channel 3x3, 128->256 stride-2 3x3, 256-channel 1x1 and 32-channel 3x3 layers
    2.09 FP32 and 2.77-2.92 instructions in all per element, no LDL/STL, no SHFL in the loop. The
    previous defaults, in results/benchmarks/sass_matrix.txt: 64 x 32 x 4 on 2 warps, 3.06 FP32 /
    4.3-6.6 in all under 3.6, spilling 40-190 LDL/STL on the 3x3 layers with the old weight layout;
    64 x 32 x 2 on one warp (the 17-32-channel branch), 8 SHFL in the loop under both versions.
    At most 16 channels per group: 128 positions x 16 channels x 4 output channels, 2 warps (2.38
    FP32 / 3.47-3.49 in all on the 16-channel 3x3 layer, no spills, no SHFL, both versions). Depthwise
    (Cg == 1): 1024 positions x 1 channel on 4 warps has no spills and about 20 instructions per
    element: one term per (position, tap), so per-position index math and range checks dominate.
    Interpreter (CPU): 16 x 16 x 4.
    """
    cout, cg = weight_shape[:2]
    tg = cout // geom.groups
    if device_type != "cuda":
        return KernelConfig(16, 16, 4, num_warps=4, num_stages=1)
    if cg == 1:
        return KernelConfig(1024, 1, 1, num_warps=4, num_stages=2)
    if cg > 16:
        return KernelConfig(32, 32, pow2_between(tg, 1, 2), num_warps=1, num_stages=2)
    return KernelConfig(128, 16, pow2_between(tg, 1, 4), num_warps=2, num_stages=2)


def input_channels_contiguous(weight: torch.Tensor) -> torch.Tensor:
    """weight (Cout, Cg, kh, kw) as a view of the same shape whose storage is (Cout, kh, kw, Cg).

    The kernel tiles input channels and reduces over output channels: each step loads BLOCK_N
    input channels of one (output channel, tap), kh*kw elements apart in the (Cout, Cg, kh, kw)
    layout (one 32-byte sector each for 3x3). With Cg contiguous (stride 1, specialised by Triton)
    they are one contiguous run the compiler can load as vectors. The copy is one pass over W per
    call, small beside the reduction's N*H*W*Cg*Cout/groups*kh*kw/(s_h*s_w) terms; a weight
    already in this layout is passed as is.
    """
    return weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def grad_input_launch(grad_out, x, weight, grad_x, geom: Conv2dGeometry, grad_mode: str, config: KernelConfig):
    """(grid, args, kwargs) of `grad_input_kernel` writing into grad_x (shape of x, any strides).

    Separate from `grad_input` so that the SASS screen (benchmarks/sass_screen.py) compiles the exact launch.
    The kernel reads the weight through `input_channels_contiguous` (args[2]).
    """
    n, _, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    phase_programs = geom.groups * sh * sw
    if phase_programs > MAX_GRID_YZ:
        raise ValueError(f"groups * stride_h * stride_w = {phase_programs} exceeds the grid limit {MAX_GRID_YZ}")
    grid = (
        triton.cdiv(n * triton.cdiv(h, sh) * triton.cdiv(w, sw), config.block_m),
        triton.cdiv(cg, config.block_n),
        phase_programs,
    )
    weight = input_channels_contiguous(weight)
    args = (
        grad_out, x, weight, grad_x,
        n, h, w, geom.out_size[0], geom.out_size[1], cg, cout // geom.groups,
        sh, sw, ph, pw, dh, dw,
        *x.stride(), *grad_out.stride(), *weight.stride(), *grad_x.stride(),
    )  # fmt: skip
    kwargs = dict(
        KH=kh, KW=kw, EXACT=grad_mode == "exact", ACC_FP64=accumulate_in_float64(grad_out, x, weight),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return grid, args, kwargs


def grad_input(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geom: Conv2dGeometry,
    grad_mode: str,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Input gradient of the adder layer with the Triton gather kernel.

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W), any strides (NCHW, channels_last, views);
    weight: (Cout, Cin/groups, kh, kw). grad_mode "paper" (eq. 6: clamp(W - X, -1, 1)) or "exact"
    (sign(W - X)). Returns grad_x with x's shape, dtype and (where dense) memory format;
    accumulation is float32 (float64 for float64 operands).
    config: launch config; None takes `default_grad_input_config`.
    """
    check_grad_mode(grad_mode)
    check_operands(grad_out, x, weight, geom)
    config = default_grad_input_config(x.shape, weight.shape, geom, x.device.type) if config is None else config
    config = check_config(config)
    grad_x = torch.empty_like(x)
    if grad_x.numel() == 0:
        return grad_x
    if grad_out.numel() == 0:  # Ho or Wo is 0: nothing reads x
        return grad_x.zero_()
    grid, args, kwargs = grad_input_launch(grad_out, x, weight, grad_x, geom, grad_mode, config)
    grad_input_kernel[grid](*args, **kwargs)
    return grad_x
