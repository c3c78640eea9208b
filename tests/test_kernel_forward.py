"""Forward Triton kernel (triton_adder.kernels.forward) against the float64 reference: the core
forward grid (tests/cases.py FORWARD_CASES), launch configs whose tiles do not divide the problem,
layouts, dtypes, int64 indexing and config errors (the sm_90 SASS instruction-mix screen is tested in
tests/test_sass.py). Without CUDA the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so
shapes and tiles stay tiny (interpreter cost grows with the tile)."""

import re

import pytest
import torch

from tests.cases import FORWARD_CASES as CASES
from tests.cases import forward_inputs as _inputs
from tests.tolerance import assert_matches_reference
from triton_adder import reference
from triton_adder.contract import INT32_LIMIT, needs_int64_indexing
from triton_adder.functional import resolve_geometry
from triton_adder.kernels import forward as fwd
from triton_adder.kernels.launch_config import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

# Small tiles for the interpreter; none divides the odd shapes below (M = N*Ho*Wo, Cout/groups, Cin/groups).
SMALL_CONFIGS = [
    KernelConfig(16, 16, 4, num_warps=4),
    KernelConfig(8, 4, 2, num_warps=1),
    KernelConfig(32, 8, 1, num_warps=2, num_stages=1),
    KernelConfig(16, 2, 8, num_warps=1, num_stages=3),  # BLOCK_K above Cin/groups: only the masked tail runs
]


def _geometry(x, weight, kwargs):
    return resolve_geometry(tuple(x.shape[-2:]), tuple(weight.shape[2:]), **kwargs)


def _reduction_length(weight):
    return weight.shape[1] * weight.shape[2] * weight.shape[3]


def _check(case, dtype, config, layout="contiguous"):
    x, weight, bias, kwargs = _inputs(case, dtype)
    geom = _geometry(x, weight, kwargs)
    expected = reference.adder2d_forward(x, weight, bias, geom)
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    bias = None if bias is None else bias.to(DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        # every other column of a wider channels-last buffer: no stride is the natural one
        n, c, h, w = x.shape
        view = torch.zeros(n, h, 2 * w, c, dtype=dtype, device=DEVICE).permute(0, 3, 1, 2)[..., ::2]
        x = view.copy_(x)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    y = fwd.forward(x, weight, bias, geom, config)
    assert y.dtype == dtype and y.device == x.device
    assert_matches_reference(y, expected, dtype, _reduction_length(weight))
    return x, y


@pytest.mark.parametrize("index", range(len(CASES)))
def test_core_grid_matches_reference(index):
    _check(CASES[index], torch.float32, SMALL_CONFIGS[index % len(SMALL_CONFIGS)])


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}")
def test_tiles_that_do_not_divide(config):
    # Cin/groups = 5: BLOCK_K 1 has no tail, 2 and 4 a tail of 1, 8 only a tail; bias, padding, stride 2.
    case = (2, 5, 7, 9, 6, 3, (1, 2), 1, 1, 1, True)
    _check(case, torch.float32, config)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_layouts_read_in_place_and_output_keeps_format(layout):
    x, y = _check(CASES[1], torch.float32, SMALL_CONFIGS[0], layout)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    else:
        assert y.is_contiguous()


def test_float16_accumulates_in_float32():
    _check(CASES[2], torch.float16, SMALL_CONFIGS[0])
    _check(CASES[3], torch.float16, SMALL_CONFIGS[1], "channels_last")  # depthwise, dilated
    # 2048 terms |0.5 - (-0.625)| = 1.125 sum to 2304 (a float16 value); a float16 accumulator would
    # stall past 2048, where its spacing is 2 and each +1.125 rounds.
    x = torch.full((1, 2048, 1, 1), 0.5, dtype=torch.float16, device=DEVICE)
    weight = torch.full((2, 2048, 1, 1), -0.625, dtype=torch.float16, device=DEVICE)
    geom = resolve_geometry((1, 1), (1, 1))
    y = fwd.forward(x, weight, None, geom, KernelConfig(1, 2, 64, num_warps=1))
    assert y.dtype == torch.float16
    assert y.float().flatten().tolist() == [-2304.0, -2304.0]


@pytest.mark.skipif(INTERPRETED, reason="bfloat16 gives NaN in the Triton interpreter (DESIGN.md section 4)")
def test_bfloat16_on_gpu():
    for index, case in enumerate(CASES):
        _check(case, torch.bfloat16, SMALL_CONFIGS[index % len(SMALL_CONFIGS)])


def test_default_config_runs_and_is_valid():
    x, weight, bias, kwargs = _inputs(CASES[5])
    geom = _geometry(x, weight, kwargs)
    config = fwd.default_config(x, weight, geom)
    assert fwd.validate_config(config) is config
    _check(CASES[5], torch.float32, None)


def test_default_config_follows_the_shape():
    geom = resolve_geometry((56, 56), (3, 3), padding=1)
    x = torch.empty(32, 64, 56, 56, device="meta")
    dense = fwd.default_config(x, torch.empty(64, 64, 3, 3, device="meta"), geom)
    depthwise_geom = resolve_geometry((56, 56), (3, 3), padding=1, groups=64)
    depthwise = fwd.default_config(x, torch.empty(64, 1, 3, 3, device="meta"), depthwise_geom)
    assert dense.block_n == 64 and depthwise.block_n <= 16 and depthwise.block_k == 1


def test_empty_batch_returns_empty_output():
    x, weight, bias, kwargs = _inputs(CASES[1])
    x = x[:0].to(DEVICE)
    y = fwd.forward(x, weight.to(DEVICE), None, _geometry(x, weight, kwargs), SMALL_CONFIGS[0])
    assert y.shape == (0, weight.shape[0], 6, 7)


def test_int64_flag_follows_tensor_extent():
    small = torch.empty(2, 3, 4, 5, device="meta")
    huge = torch.empty(INT32_LIMIT, device="meta")  # meta: no memory
    strided = torch.empty(2, 3, device="meta").as_strided((2, 3), (INT32_LIMIT, 1))
    assert not needs_int64_indexing(small)
    assert needs_int64_indexing(small, huge)
    assert needs_int64_indexing(strided)
    assert not needs_int64_indexing(torch.empty(INT32_LIMIT - 1, device="meta"))
    geom = resolve_geometry((1, 1), (1, 1))
    weight = torch.empty(1, 1, 1, 1, device="meta")
    x_reaching = torch.empty(2, 1, 1, 1, device="meta").as_strided((2, 1, 1, 1), (INT32_LIMIT, 1, 1, 1))
    y = torch.empty(2, 1, 1, 1, device="meta")
    # The launcher switches at the threshold where the gradient kernels refuse.
    assert fwd.kernel_launch(x_reaching, weight, None, y, geom, KernelConfig(16, 16, 4))[2]["USE_INT64"] is True


def test_launch_reads_the_weight_with_output_channels_contiguous():
    # A k step loads BLOCK_N output channels of one (input channel, tap): stride 1 between them (which
    # Triton specialises) is what lets a warp's lanes share 32-byte sectors instead of one sector each.
    x, weight, bias, kwargs = _inputs((2, 6, 7, 5, 4, 3, 1, 1, 1, 2, True))  # groups=2: Cin/g=3, Cout/g=2
    geom = _geometry(x, weight, kwargs)
    y = torch.empty(x.shape[0], weight.shape[0], *geom.out_size)
    _, args, _ = fwd.kernel_launch(x, weight, bias, y, geom, SMALL_CONFIGS[0])
    launched = args[1]
    assert launched.shape == weight.shape and torch.equal(launched, weight)
    cout, cg, kh, kw = weight.shape
    assert launched.stride() == (1, kh * kw * cout, kw * cout, cout)
    assert args[15:19] == launched.stride()  # the kernel's stride_wt, stride_wc, stride_wh, stride_ww
    # Already Cout-contiguous: passed as is, no copy.
    assert fwd.output_channels_contiguous(launched).data_ptr() == launched.data_ptr()


def test_int64_indexing_path_matches_reference():
    # Force the 64-bit index math on a small shape: the flag must change arithmetic width only.
    x, weight, bias, kwargs = _inputs(CASES[2])
    geom = _geometry(x, weight, kwargs)
    expected = reference.adder2d_forward(x, weight, bias, geom)
    x, weight, bias = x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)
    y = torch.empty(x.shape[0], weight.shape[0], *geom.out_size, device=DEVICE)
    grid, args, kwargs = fwd.kernel_launch(x, weight, bias, y, geom, SMALL_CONFIGS[0])
    assert kwargs["USE_INT64"] is False
    kwargs["USE_INT64"] = True
    fwd.adder2d_forward_kernel[grid](*args, **kwargs)
    assert_matches_reference(y, expected, torch.float32, _reduction_length(weight))


def _strided(view: str, x, weight, bias):
    """(x, weight, bias) with one of them replaced by a view of the same values whose strides are not the
    contiguous ones: a slice with a step, a permutation, or stride 0 (an expand)."""
    cout, cg, kh, kw = weight.shape
    if view == "bias sliced":
        bias = torch.zeros(2 * cout, device=DEVICE)[1::2].copy_(bias)
    elif view == "bias expanded":
        bias = bias[:1].expand(cout)
    elif view == "weight permuted":
        weight = torch.zeros(kh, cout, kw, cg, device=DEVICE).permute(1, 3, 0, 2).copy_(weight)
    elif view == "weight sliced":
        weight = torch.zeros(cout, cg, kh, 2 * kw, device=DEVICE)[..., ::2].copy_(weight)
    elif view == "x expanded":
        x = x[:1].expand_as(x)
    return x, weight, bias


@pytest.mark.parametrize("view", ["bias sliced", "bias expanded", "weight permuted", "weight sliced", "x expanded"])
def test_views_of_every_operand_are_read_through_their_strides(view):
    """Issue 28: the kernel loaded bias[t] at bias_ptr + t, so bias[::2] gave [0, 1, 2, 3] for [0, 2, 4, 6] and
    an expanded bias read memory it does not own. Every operand, as a view, must give the reference's output."""
    x, weight, bias, kwargs = _inputs(CASES[1])  # groups 2, stride 2, padding 1, bias
    x, weight, bias = _strided(view, x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE))
    assert not (x.is_contiguous() and weight.is_contiguous() and bias.is_contiguous())
    geom = _geometry(x, weight, kwargs)
    expected = reference.adder2d_forward(x.cpu(), weight.cpu(), bias.cpu(), geom)
    assert_matches_reference(fwd.forward(x, weight, bias, geom, SMALL_CONFIGS[0]), expected, torch.float32, 18)


def test_launch_refuses_an_output_it_cannot_address():
    # The kernel finds output row oh at oh * Wo * y.stride(3): a y with other row strides would be written wrong.
    x, weight, bias, kwargs = _inputs(CASES[1])
    geom = _geometry(x, weight, kwargs)
    y = torch.empty(x.shape[0], weight.shape[0], 2 * geom.out_size[0], geom.out_size[1])[:, :, ::2]
    with pytest.raises(ValueError, match=r"y's rows must be Wo \* y\.stride\(3\) apart"):
        fwd.kernel_launch(x, weight, bias, y, geom, SMALL_CONFIGS[0])


BAD_CONFIGS = [
    ((128, 64, 8), ValueError, r"config must be a KernelConfig or None, got tuple"),
    (KernelConfig(48, 16, 4), ValueError, r"config\.block_m must be a power of two in \[1, 1024\], got 48"),
    (KernelConfig(16, 16, 128), ValueError, r"config\.block_k must be at most 64"),
    (KernelConfig(16, 16, 4, num_warps=3), ValueError, r"config\.num_warps must be one of \(1, 2, 4, 8, 16\)"),
    (KernelConfig(16, 16, 4, num_stages=0), ValueError, r"config\.num_stages must be one of"),
    (KernelConfig(256, 128, 4, num_warps=4), ValueError, r"256 float32 accumulators per thread; at most 128"),
]


@pytest.mark.parametrize(("config", "error", "message"), BAD_CONFIGS)
def test_invalid_config_raises_clear_error(config, error, message):
    x, weight, bias, kwargs = _inputs(CASES[0])
    with pytest.raises(error, match=message):
        fwd.forward(x.to(DEVICE), weight.to(DEVICE), None, _geometry(x, weight, kwargs), config)


def test_unsupported_dtypes_raise():
    x, weight, bias, kwargs = _inputs(CASES[0])
    geom = _geometry(x, weight, kwargs)
    with pytest.raises(ValueError, match=r"x\.dtype must be one of"):
        fwd.forward(x.double(), weight.double(), None, geom, SMALL_CONFIGS[0])
    with pytest.raises(ValueError, match=r"weight and bias must have x's dtype torch\.float32, got torch\.float16"):
        fwd.forward(x, weight.half(), None, geom, SMALL_CONFIGS[0])


def test_kernel_source_hash_is_a_sha256():
    assert re.fullmatch(r"[0-9a-f]{64}", fwd.KERNEL_SOURCE_HASH)

