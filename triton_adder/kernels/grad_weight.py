"""Weight gradient of the adder layer on Triton (DESIGN.md section 1), paper eq. 5 or the exact derivative::

    dW[t, k, i, j] = sum over (n, p, q) of gY[n, t, p, q] * (Xpad[n, c, p*s_h + i*d_h, q*s_w + j*d_w] - W[t, k, i, j])

`grad_weight_kernel` runs one program per (BLOCK_M output channels, BLOCK_N input channels, kernel
tap, split of the N*Ho*Wo reduction). For grad_mode="paper" it accumulates ``sum gY * Xpad`` and
``sum gY`` and subtracts ``W * sum gY`` once at the end: one FFMA per reduced element instead of an
FADD and an FFMA (the identity `triton_adder.backends.conv_identity` also uses). For
grad_mode="exact" it accumulates ``gY * sign(Xpad - W)`` per element (a compile-time switch of the
same kernel). The N*Ho*Wo reduction is long (200704 for a ResNet-50 stage-1 layer at batch 64)
while Cout*Cg*kh*kw tiles can be few (9 programs for 64 x 64 channels at 64 x 64 tiles), so it is
split: each split writes a float32 partial into a (splits, Cout, Cg, kh, kw) workspace and a second
pass sums them. A workspace rather than float32 atomics keeps the result deterministic (bitwise
reproducible from run to run), at the cost of splits * |dW| * 4 bytes of extra traffic, which is
small next to the reduction itself.

The launcher takes an explicit `KernelConfig` (None: `default_grad_weight_config`) and split count
(None: `default_split_k`); `GRAD_WEIGHT_KERNEL_HASH` identifies the kernel source for the tuner's cache.
Which weight-gradient method a layer uses (this kernel or the convolution identity) is the Triton
backend's policy (`triton_adder.backends.triton`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels.gradients import _sign, accumulate_in_float64, check_grad_mode, check_operands
from triton_adder.kernels.launch_config import KernelConfig, check_config, pow2_between, source_hash

MAX_GRID_YZ = 65535
"""CUDA limit on grid dimensions 1 and 2 (input-channel blocks and groups)."""


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


GRAD_WEIGHT_KERNEL_HASH = source_hash(grad_weight_kernel, _sign)
"""sha256 of the kernel source (with its jitted helper): the tuner's cache key part."""


def default_grad_weight_config(x_shape, weight_shape, geom: Conv2dGeometry, device_type: str = "cuda") -> KernelConfig:
    """Heuristic launch config of `grad_weight_kernel`: BLOCK_M output x BLOCK_N input channels per program.

    BLOCK_K is the number of (n, p, q) reduction steps unrolled per loop iteration. GPU: at most
    64 x 64 channels per program. The full 64 x 64 tile runs on 2 warps with 2 steps unrolled
    (64 accumulators per thread): screened (float32, paper mode; ResNet 64-channel 3x3, 128->256
    stride-2 3x3 and 256-channel 1x1 layers) under Triton 3.6.0 and 3.9.0 for sm_80 and sm_90
    (results/benchmarks/sass_matrix_after.txt): 1.02 FP32 and 1.80-1.93 instructions in all per
    element, no LDL/STL, no SHFL. The previous default for wide layers, 128 x 64 x 8 on 4 warps,
    spilled 8-24 LDL/STL (results/benchmarks/sass_matrix.txt). Smaller tiles (fewer channels) keep
    8 steps unrolled on one warp. Interpreter: 16 x 16 x 4.

    Narrow layers stay index-bound: with Cout = Cg = 16 the 16 x 16 tile is the whole layer, so each
    (n, p, q) step's index advance, range checks and per-step loads are shared by only 8 terms per
    thread (7.75-8.66 instructions in all per term in the matrices). Such layers use the
    convolution identity by default anyway (`backends.triton.DEFAULT_GRAD_WEIGHT_METHOD`).
    """
    cout, cg = weight_shape[:2]
    tg = cout // geom.groups
    if device_type != "cuda":
        return KernelConfig(16, 16, 4, num_warps=4, num_stages=1)
    block_n = pow2_between(cg, 16, 64)
    block_m = pow2_between(tg, 16, 64)
    if block_m * block_n == 64 * 64:
        return KernelConfig(64, 64, 2, num_warps=2, num_stages=2)
    num_warps = max(1, block_m * block_n // (64 * 32))
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
    if k_blocks > MAX_GRID_YZ or geom.groups > MAX_GRID_YZ:
        raise ValueError(f"cdiv(Cg, block_n) = {k_blocks} and groups = {geom.groups} must be <= {MAX_GRID_YZ}")
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


def grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geom: Conv2dGeometry,
    grad_mode: str,
    config: KernelConfig | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Weight gradient of the adder layer with the Triton split-reduction kernel.

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W), any strides; weight: (Cout, Cin/groups, kh, kw).
    grad_mode "paper" (eq. 5: X - W) or "exact" (sign(X - W)). config: launch config, None takes
    `default_grad_weight_config`; split_k: splits of the N*Ho*Wo reduction, None takes
    `default_split_k`. Returns (Cout, Cin/groups, kh, kw), contiguous, in weight's dtype;
    accumulation is float32 (float64 for float64 operands).
    """
    check_grad_mode(grad_mode)
    check_operands(grad_out, x, weight, geom)
    config = default_grad_weight_config(x.shape, weight.shape, geom, x.device.type) if config is None else config
    config = check_config(config)
    if grad_out.numel() == 0 or x.numel() == 0:  # nothing to reduce over
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    cout, cg, kh, kw = weight.shape
    split_k, l_per_split = grad_weight_split(x.shape[0], weight.shape, geom, config, x.device, split_k)
    acc_dtype = torch.float64 if accumulate_in_float64(grad_out, x, weight) else torch.float32
    partial = torch.empty((split_k, cout, cg, kh, kw), dtype=acc_dtype, device=x.device)
    grid, args, kwargs = grad_weight_launch(grad_out, x, weight, partial, geom, grad_mode, config, l_per_split)
    grad_weight_kernel[grid](*args, **kwargs)
    # Second pass of the split reduction: a fixed-order sum, so results are deterministic.
    grad_w = partial[0] if split_k == 1 else partial.sum(dim=0)
    return grad_w.to(weight.dtype)
