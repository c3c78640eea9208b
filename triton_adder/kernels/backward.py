"""Triton backward kernels of the adder layer: input gradient and weight gradient (DESIGN.md section 1).

Input gradient (paper eq. 6, or the exact derivative)::

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

Weight gradient (paper eq. 5, or the exact derivative)::

    dW[t, k, i, j] = sum over (n, p, q) of gY[n, t, p, q] * (Xpad[n, c, p*s_h + i*d_h, q*s_w + j*d_w] - W[t, k, i, j])

Two methods, selectable with `grad_weight(..., method=)`:

- "triton": `grad_weight_kernel`, one program per (BLOCK_M output channels, BLOCK_N input channels,
  kernel tap, split of the N*Ho*Wo reduction). For grad_mode="paper" it accumulates
  ``sum gY * Xpad`` and ``sum gY`` and subtracts ``W * sum gY`` once at the end: that is one FFMA
  per reduced element instead of an FADD and an FFMA, and it is the same identity method (b) uses.
  For grad_mode="exact" it accumulates ``gY * sign(Xpad - W)`` per element (a compile-time switch
  of the same kernel). The N*Ho*Wo reduction is long (200704 for a ResNet-50 stage-1 layer at
  batch 64) while Cout*Cg*kh*kw tiles can be few (9 programs for 64 x 64 channels at 64 x 64
  tiles), so it is split: each split writes a float32 partial into a (splits, Cout, Cg, kh, kw)
  workspace and a second pass sums them. A workspace rather than float32 atomics keeps the
  result deterministic (bitwise reproducible from run to run), at the cost of splits * |dW| * 4
  bytes of extra traffic, which is small next to the reduction itself.
- "conv_identity": ``dW = conv2d_weight(Xpad, gY) - W * sum(gY)`` (exact, DESIGN.md section 1)
  on the vendor's convolution weight-gradient routine, in float32 with TF32 off (float64 on the
  CPU), so it never silently runs at reduced precision. Paper mode only: the exact derivative
  needs a sign per element.

Every launcher takes an explicit `KernelConfig` (None: the heuristic `default_*_config`), so the
tuner can search the launch space. `GRAD_INPUT_KERNEL_HASH` / `GRAD_WEIGHT_KERNEL_HASH` identify the
kernel sources for the tuner's cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels.launch_config import KernelConfig

GRAD_MODES = ("paper", "exact")
GRAD_WEIGHT_METHODS = ("triton", "conv_identity")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Per device type, the faster weight-gradient method for grad_mode="paper". Both are one
# multiply-add per reduced element, but the kernel's sm_90 loop issues 1.8-1.9 instructions per
# element (SASS screen, see default_grad_weight_config) where cuDNN's tuned FFMA loops come near 1,
# and the identity's correction is a cheap (Cout,) reduction: the identity is the default until a
# GPU measurement says otherwise. The interpreter is far slower than aten on the CPU.
DEFAULT_GRAD_WEIGHT_METHOD = {"cuda": "conv_identity", "cpu": "conv_identity"}

_MAX_GRID_YZ = 65535  # CUDA limit on grid dimensions 1 and 2
_MAX_INT32_ELEMENTS = 2**31 - 1  # kernels index with int32 offsets


@triton.jit
def _sign(d):
    """sign(d) with sign(0) = 0 and NaN propagated, as torch.sign."""
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))


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


@triton.jit
def grad_weight_kernel(
    grad_out_ptr, x_ptr, weight_ptr, partial_ptr,
    N, H, W, HO, WO, CG, TG, T_BLOCKS, L_PER_SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sg_n, sg_c, sg_h, sg_w,
    sw_t, sw_k, sw_i, sw_j,
    sp_s, sp_t, sp_k, sp_i, sp_j,
    KH: tl.constexpr, KW: tl.constexpr, EXACT: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partial dW over one split of (n, p, q) for BLOCK_M output x BLOCK_N input channels of one tap.

    Grid: (splits * KH * KW * cdiv(Tg, BLOCK_M), cdiv(Cg, BLOCK_N), groups); axis 0 enumerates
    (split, tap, output-channel block). Writes partial[split, t, k, i, j].
    EXACT=False: paper eq. 5 as sum(gY * Xpad) - W * sum(gY); EXACT=True: sum gY * sign(Xpad - W).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    t_block = pid0 % T_BLOCKS
    tap = (pid0 // T_BLOCKS) % (KH * KW)
    split = pid0 // (T_BLOCKS * KH * KW)
    i = tap // KW
    j = tap % KW

    t_in_group = t_block * BLOCK_M + tl.arange(0, BLOCK_M)
    t_valid = t_in_group < TG
    t = g * TG + t_in_group
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_valid = k < CG
    tile_mask = t_valid[:, None] & k_valid[None, :]
    wt = tl.load(
        weight_ptr + (t * sw_t)[:, None] + (k * sw_k)[None, :] + i * sw_i + j * sw_j, mask=tile_mask, other=0.0
    ).to(acc_dtype)

    # Row/column of Xpad the tap reads, minus the padding: input coordinates p*s + tap offset.
    tap_h = i * dil_h - pad_h
    tap_w = j * dil_w - pad_w
    gy_ptrs = grad_out_ptr + t * sg_c
    x_ptrs = x_ptr + (g * CG + k) * sx_c

    total = N * HO * WO
    l_start = split * L_PER_SPLIT
    l_end = tl.minimum(l_start + L_PER_SPLIT, total)
    # (n, p, q) of l_start, then advanced incrementally: no division inside the loop.
    q = l_start % WO
    p = (l_start // WO) % HO
    n_img = l_start // (WO * HO)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    gy_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    for l0 in range(l_start, l_end, BLOCK_K):
        for kk in tl.static_range(BLOCK_K):
            l_valid = l0 + kk < l_end  # l_end is a tensor, so this is one (also under the interpreter)
            row = p * stride_h + tap_h
            col = q * stride_w + tap_w
            inside = l_valid & (row >= 0) & (row < H) & (col >= 0) & (col < W)
            gy_mask = tl.where(l_valid, t_valid, False)  # (see grad_input_kernel on scalar masks)
            gy = tl.load(gy_ptrs + (n_img * sg_n + p * sg_h + q * sg_w), mask=gy_mask, other=0.0).to(acc_dtype)
            # Taps in the zero padding read 0 (DESIGN.md section 1): other=0 is Xpad there.
            x_mask = tl.where(inside, k_valid, False)
            xv = tl.load(x_ptrs + (n_img * sx_n + row * sx_h + col * sx_w), mask=x_mask, other=0.0).to(acc_dtype)
            if EXACT:
                acc += gy[:, None] * _sign(xv[None, :] - wt)
            else:
                acc += gy[:, None] * xv[None, :]
                gy_sum += gy
            q += 1
            wrap_q = q == WO
            q = tl.where(wrap_q, 0, q)
            p = tl.where(wrap_q, p + 1, p)
            wrap_p = p == HO
            p = tl.where(wrap_p, 0, p)
            n_img = tl.where(wrap_p, n_img + 1, n_img)
    if not EXACT:
        acc -= wt * gy_sum[:, None]

    out_offs = split * sp_s + (t * sp_t)[:, None] + (k * sp_k)[None, :] + i * sp_i + j * sp_j
    tl.store(partial_ptr + out_offs, acc.to(partial_ptr.dtype.element_ty), mask=tile_mask)


def _source_hash(*kernels) -> str:
    """sha256 of the kernels' Python source (jitted helpers included): the tuner's cache key part."""
    digest = hashlib.sha256()
    for kernel in kernels:
        digest.update(inspect.getsource(kernel.fn).encode())
    return digest.hexdigest()


GRAD_INPUT_KERNEL_HASH = _source_hash(grad_input_kernel, _grad_input_step, _sign)
GRAD_WEIGHT_KERNEL_HASH = _source_hash(grad_weight_kernel, _sign)


# ----------------------------------------------------------------------------------------------
# Argument checks and launch-config heuristics
# ----------------------------------------------------------------------------------------------


def _check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def _check_operands(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> None:
    """Shapes, dtypes and devices the kernels rely on (functional.py has checked the user's arguments)."""
    for name, tensor in (("grad_out", grad_out), ("x", x), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got {getattr(tensor, 'shape', type(tensor).__name__)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; all operands must share a device")
        reach = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        if tensor.numel() > _MAX_INT32_ELEMENTS or reach > _MAX_INT32_ELEMENTS:
            raise ValueError(
                f"{name} spans {max(tensor.numel(), reach + 1)} elements; the backward kernels index with int32 "
                "and support at most 2**31 - 1"
            )
    n, cin = x.shape[:2]
    cout, cg = weight.shape[:2]
    if geom.groups < 1 or cin % geom.groups or cout % geom.groups or cin // geom.groups != cg:
        raise ValueError(
            f"groups={geom.groups} does not fit x channels {cin} and weight shape {tuple(weight.shape)}: "
            "need in_channels = groups * weight.shape[1] and out_channels divisible by groups"
        )
    expected = (n, cout, *geom.out_size)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out must have shape {expected} (N, Cout, Ho, Wo), got {tuple(grad_out.shape)}")


def _check_config(config, argument: str = "config") -> KernelConfig:
    if not isinstance(config, KernelConfig):
        raise ValueError(f"{argument} must be a KernelConfig or None, got {type(config).__name__}")
    return config.validate(argument)


def _pow2_between(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, value))))


def default_grad_input_config(x_shape, weight_shape, geom: Conv2dGeometry, device_type: str = "cuda") -> KernelConfig:
    """Heuristic launch config of `grad_input_kernel` for x (N, Cin, H, W) and weight (Cout, Cg, kh, kw).

    GPU: 64 positions x 32 input channels, 4 output channels per step, 2 warps (32 accumulators
    and 32 X/2 values per thread). Screened on sm_90 SASS (ResNet 64-channel 3x3 layer, float32):
    2.09 FP32 and 2.88 instructions in all per element, no spills; 128 x 64 tiles or 8 output
    channels per step spill (the X tile doubles the live registers of the forward's loop).
    Narrower groups take 16 channels and twice the positions. Interpreter (CPU): 16 x 16 x 4.

    Narrow layers (same screen): when W is a multiple of 16, Triton's launcher specialisation lets
    the compiler see that positions are contiguous and it picks a position-major register layout,
    in which the per-channel W/2 + 1/2 and per-position 2gY are amortised over fewer elements
    (2.31-2.38 FP32 per element at 2 warps). For 17-32 channels at stride 1, 64 x 32 x 2 on ONE warp
    gets 2.08-2.14 FP32 / 2.58-2.77 in all (NCHW and channels_last), but the same config spills
    hundreds of LDL/STL when W is not a multiple of 16 or the stride is 2 (channel-major layout), so
    it is taken only there. 16 channels stay at 2.38 FP32 / 3.48: no screened config (block_m
    32-512, block_k 1-8, 1-4 warps) beats it without spilling. Depthwise (Cg == 1): a 16-wide
    channel tile is 15/16 masked lanes and spilled 88 LDL/STL; 1024 positions x 1 channel on 4
    warps has no spills and ~21 instructions per useful term (was ~160 counted per useful term):
    one term per (position, tap), so per-position index math and range checks dominate.
    """
    cout, cg = weight_shape[:2]
    tg = cout // geom.groups
    if device_type != "cuda":
        return KernelConfig(16, 16, 4, num_warps=4, num_stages=1)
    if cg == 1:
        return KernelConfig(1024, 1, 1, num_warps=4, num_stages=2)
    if 16 < cg <= 32 and tuple(geom.stride) == (1, 1) and x_shape[-1] % 16 == 0:
        return KernelConfig(64, 32, _pow2_between(tg, 1, 2), num_warps=1, num_stages=2)
    block_n = _pow2_between(cg, 16, 32)
    return KernelConfig(2048 // block_n, block_n, _pow2_between(tg, 1, 4), num_warps=2, num_stages=2)


def default_grad_weight_config(x_shape, weight_shape, geom: Conv2dGeometry, device_type: str = "cuda") -> KernelConfig:
    """Heuristic launch config of `grad_weight_kernel`: BLOCK_M output x BLOCK_N input channels per program.

    BLOCK_K is the number of (n, p, q) reduction steps unrolled per loop iteration. GPU: at most
    64 accumulators per thread (64 x 64 with 2 warps, 128 x 64 with 4), 8 steps unrolled; screened
    on sm_90 SASS (float32, paper mode): 1.02 FP32 and 1.82 instructions in all per element, no
    spills in the loop. 64 x 64 with 4 warps and 128 x 128 with 8 warps spill. Interpreter: 16 x 16 x 4.

    Narrow layers stay index-bound: with Cout = Cg = 16 the 16 x 16 tile is the whole layer, so each
    (n, p, q) step's index advance, range checks and per-step loads (~38 integer/load instructions)
    are shared by only 8 terms per thread (7.75 in all per term). Screened alternatives: block_k 4,
    16, 32, 64 (7.77-8.69, 32 spills) and 2 warps (12.0); wider tiles would be masked lanes. Such
    layers use the "conv_identity" method by default anyway (DEFAULT_GRAD_WEIGHT_METHOD).
    """
    cout, cg = weight_shape[:2]
    tg = cout // geom.groups
    if device_type != "cuda":
        return KernelConfig(16, 16, 4, num_warps=4, num_stages=1)
    block_n = _pow2_between(cg, 16, 64)
    block_m = _pow2_between(tg, 16, 8192 // block_n if block_n == 64 else 64)
    num_warps = max(1, min(4, block_m * block_n // (64 * 32)))
    return KernelConfig(block_m, block_n, 8, num_warps=num_warps, num_stages=2)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_split_k(tiles: int, reduction_length: int, block_k: int, device: torch.device) -> int:
    """How many splits of the N*Ho*Wo reduction `grad_weight_kernel` runs.

    Enough programs to give every SM about 4 (tiles x splits >= 4 * SMs), but never a split with
    fewer than 64 unrolled steps of BLOCK_K: a shorter split would spend more on its workspace
    write than on its reduction.
    """
    wanted = -(-4 * _sm_count(device) // max(1, tiles))
    longest = max(1, reduction_length // (64 * block_k))
    return max(1, min(wanted, longest))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _acc_fp64(*tensors: torch.Tensor) -> bool:
    """float64 operands accumulate in float64 (so the float64 tolerance holds); all others in float32."""
    return any(t.dtype == torch.float64 for t in tensors)


def grad_input_launch(grad_out, x, weight, grad_x, geom: Conv2dGeometry, grad_mode: str, config: KernelConfig):
    """(grid, args, kwargs) of `grad_input_kernel` writing into grad_x (shape of x, any strides).

    Separate from `grad_input` so that tools (the sm_90 SASS screen) can compile the exact launch.
    """
    n, _, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    phase_programs = geom.groups * sh * sw
    if phase_programs > _MAX_GRID_YZ:
        raise ValueError(f"groups * stride_h * stride_w = {phase_programs} exceeds the grid limit {_MAX_GRID_YZ}")
    grid = (
        triton.cdiv(n * triton.cdiv(h, sh) * triton.cdiv(w, sw), config.block_m),
        triton.cdiv(cg, config.block_n),
        phase_programs,
    )
    args = (
        grad_out, x, weight, grad_x,
        n, h, w, geom.out_size[0], geom.out_size[1], cg, cout // geom.groups,
        sh, sw, ph, pw, dh, dw,
        *x.stride(), *grad_out.stride(), *weight.stride(), *grad_x.stride(),
    )  # fmt: skip
    kwargs = dict(
        KH=kh, KW=kw, EXACT=grad_mode == "exact", ACC_FP64=_acc_fp64(grad_out, x, weight),
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
    """
    _check_grad_mode(grad_mode)
    _check_operands(grad_out, x, weight, geom)
    config = default_grad_input_config(x.shape, weight.shape, geom, x.device.type) if config is None else config
    config = _check_config(config)
    grad_x = torch.empty_like(x)
    if grad_x.numel() == 0:
        return grad_x
    if grad_out.numel() == 0:  # Ho or Wo is 0: nothing reads x
        return grad_x.zero_()
    grid, args, kwargs = grad_input_launch(grad_out, x, weight, grad_x, geom, grad_mode, config)
    grad_input_kernel[grid](*args, **kwargs)
    return grad_x


def grad_weight_launch(
    grad_out, x, weight, partial, geom: Conv2dGeometry, grad_mode: str, config: KernelConfig, l_per_split: int
):
    """(grid, args, kwargs) of `grad_weight_kernel` writing partial (splits, Cout, Cg, kh, kw) sums.

    l_per_split: reduction steps (of N*Ho*Wo) per split, a multiple of config.block_k.
    """
    n, _, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    tg = cout // geom.groups
    ho, wo = geom.out_size
    t_blocks = triton.cdiv(tg, config.block_m)
    k_blocks = triton.cdiv(cg, config.block_n)
    if k_blocks > _MAX_GRID_YZ or geom.groups > _MAX_GRID_YZ:
        raise ValueError(f"cdiv(Cg, block_n) = {k_blocks} and groups = {geom.groups} must be <= {_MAX_GRID_YZ}")
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    grid = (partial.shape[0] * kh * kw * t_blocks, k_blocks, geom.groups)
    args = (
        grad_out, x, weight, partial,
        n, h, w, ho, wo, cg, tg, t_blocks, l_per_split,
        sh, sw, ph, pw, dh, dw,
        *x.stride(), *grad_out.stride(), *weight.stride(), *partial.stride(),
    )  # fmt: skip
    kwargs = dict(
        KH=kh, KW=kw, EXACT=grad_mode == "exact", ACC_FP64=partial.dtype == torch.float64,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return grid, args, kwargs


def grad_weight_split(
    batch: int, weight_shape, geom: Conv2dGeometry, config: KernelConfig, device: torch.device, split_k=None
) -> tuple[int, int]:
    """(split_k, l_per_split): how the N*Ho*Wo reduction of `grad_weight_kernel` is split.

    split_k None: `default_split_k`. l_per_split is a whole number of BLOCK_K steps, and split_k is
    recomputed from it so that no split is empty.
    """
    cout, cg, kh, kw = weight_shape
    total = max(batch * geom.out_size[0] * geom.out_size[1], 1)
    if split_k is None:
        tiles = triton.cdiv(cout // geom.groups, config.block_m) * triton.cdiv(cg, config.block_n)
        split_k = default_split_k(tiles * geom.groups * kh * kw, total, config.block_k, device)
    if not (isinstance(split_k, int) and split_k >= 1):
        raise ValueError(f"split_k must be a positive int or None, got {split_k!r}")
    l_per_split = triton.cdiv(triton.cdiv(total, split_k), config.block_k) * config.block_k
    return triton.cdiv(total, l_per_split), l_per_split


def _grad_weight_triton(grad_out, x, weight, geom, grad_mode, config, split_k):
    cout, cg, kh, kw = weight.shape
    split_k, l_per_split = grad_weight_split(x.shape[0], weight.shape, geom, config, x.device, split_k)
    acc_dtype = torch.float64 if _acc_fp64(grad_out, x, weight) else torch.float32
    partial = torch.empty((split_k, cout, cg, kh, kw), dtype=acc_dtype, device=x.device)
    grid, args, kwargs = grad_weight_launch(grad_out, x, weight, partial, geom, grad_mode, config, l_per_split)
    grad_weight_kernel[grid](*args, **kwargs)
    # Second pass of the split reduction: a fixed-order sum, so results are deterministic.
    grad_w = partial[0] if split_k == 1 else partial.sum(dim=0)
    return grad_w.to(weight.dtype)


@contextlib.contextmanager
def _ieee_float32():
    """Run cuDNN convolutions and cuBLAS matmuls in full float32 (TF32 off); restore the user's flags.

    Uses the per-operator `fp32_precision` flags where this torch has them (reading the legacy
    `allow_tf32` after the user set the new per-operator API can raise), else the legacy flags.
    """
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        saved = (cudnn_conv.fp32_precision, matmul.fp32_precision)
        cudnn_conv.fp32_precision = "ieee"
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def _grad_weight_conv_identity(grad_out, x, weight, geom):
    """dW = conv2d_weight(Xpad, gY) - W * sum_{n,p,q} gY (exact, including the zero padding)."""
    cout, cg, kh, kw = weight.shape
    # float32 with TF32 off on CUDA; float64 on the CPU, whose conv may also run at reduced
    # precision (oneDNN's fp32_precision) and is not the fast path anyway.
    compute_dtype = torch.float64 if x.dtype == torch.float64 or x.device.type != "cuda" else torch.float32
    hpad, wpad = geom.padded_extent((kh, kw))
    top, left = geom.padding
    h, w = x.shape[2:]
    bottom, right = hpad - top - h, wpad - left - w
    x_compute = x.to(compute_dtype)
    if (bottom, right) == (top, left):
        padding = [top, left]  # symmetric: the convolution pads itself, no copy of x
    else:
        # Pad (or crop: negative padding) to exactly the rows/columns the taps read, so that a
        # convolution without padding produces exactly out_size.
        x_compute = F.pad(x_compute, (left, right, top, bottom))
        padding = [0, 0]
    gy = grad_out.to(compute_dtype)
    w_compute = weight.to(compute_dtype)
    with _ieee_float32() if x.device.type == "cuda" else contextlib.nullcontext():
        _, gy_x, _ = torch.ops.aten.convolution_backward(
            gy, x_compute, w_compute, None, list(geom.stride), padding, list(geom.dilation), False, [0, 0],
            geom.groups, [False, True, False],
        )  # fmt: skip
    gy_sum = gy.sum(dim=(0, 2, 3))
    return (gy_x - w_compute * gy_sum[:, None, None, None]).to(weight.dtype)


def default_grad_weight_method(device: torch.device, grad_mode: str) -> str:
    """The weight-gradient method used when `grad_weight(method=None)`: exact mode needs the kernel."""
    if grad_mode == "exact":
        return "triton"
    return DEFAULT_GRAD_WEIGHT_METHOD.get(device.type, "triton")


def grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geom: Conv2dGeometry,
    grad_mode: str,
    config: KernelConfig | None = None,
    method: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Weight gradient of the adder layer.

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W), any strides; weight: (Cout, Cin/groups, kh, kw).
    grad_mode "paper" (eq. 5: X - W) or "exact" (sign(X - W)). method: "triton" (the kernel; config
    and split_k apply to it, split_k None = `default_split_k`), "conv_identity" (paper mode only)
    or None (`default_grad_weight_method`). Returns (Cout, Cin/groups, kh, kw), contiguous, in
    weight's dtype; accumulation is float32 (float64 for float64 operands).
    """
    _check_grad_mode(grad_mode)
    _check_operands(grad_out, x, weight, geom)
    if method is None:
        method = default_grad_weight_method(x.device, grad_mode)
    if method not in GRAD_WEIGHT_METHODS:
        raise ValueError(f"method must be one of {GRAD_WEIGHT_METHODS} or None, got {method!r}")
    if method == "conv_identity" and grad_mode == "exact":
        raise ValueError(
            "method='conv_identity' computes the paper's gradient (X - W) only; grad_mode='exact' needs "
            "sign(X - W) per element: use method='triton' or None"
        )
    if method == "triton" or config is not None:
        config = default_grad_weight_config(x.shape, weight.shape, geom, x.device.type) if config is None else config
        config = _check_config(config)
    if grad_out.numel() == 0 or x.numel() == 0:  # nothing to reduce over
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if method == "conv_identity":
        return _grad_weight_conv_identity(grad_out, x, weight, geom)
    return _grad_weight_triton(grad_out, x, weight, geom, grad_mode, config, split_k)
