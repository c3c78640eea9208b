"""int8 forward Triton kernel (triton_adder.kernels.forward_int8) against a float64 reference of the
quantized math: exact integer sums on odd shapes (groups, stride, dilation, padding, channels per
group not a multiple of 4 or of the word block), the float epilogue, argument checks, and the SASS
of both inner forms (compile only, in a child process without TRITON_INTERPRET).

Without CUDA the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes; the
"vabsdiff4" form is inline PTX, which the interpreter cannot run, so there it is only compiled.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.cases import geometry
from triton_adder.kernels import forward_int8 as f8
from triton_adder.kernels.launch_config import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The inline-PTX form runs on a GPU only; under the interpreter only the default form is run.
RUN_VARIANTS = f8.VARIANTS if DEVICE == "cuda" else (f8.DEFAULT_VARIANT,)


def reference_sums(x, weight_q, scale, geom, kernel_size):
    """sum |x_q - w_q| in float64: x_q from x by the scheme, zero-padded, unfolded, broadcast per group."""
    x_q = torch.round(x.double() * (1.0 / scale))
    x_q = torch.nan_to_num(x_q, nan=127.0, posinf=127.0, neginf=-127.0).clamp(-127, 127)
    n, c, h, w = x.shape
    cout, cg, kh, kw = weight_q.shape
    ho, wo = geom.out_size
    top, left = geom.padding
    hpad, wpad = geom.padded_extent(kernel_size)
    padded = F.pad(x_q, (left, max(0, wpad - left - w), top, max(0, hpad - top - h)))
    cols = F.unfold(padded, kernel_size, dilation=geom.dilation, stride=geom.stride)  # (N, C*kh*kw, L)
    g = geom.groups
    cols = cols.view(n, g, cg * kh * kw, ho * wo)[:, :, None]  # (N, g, 1, K, L)
    w = weight_q.double().view(g, cout // g, cg * kh * kw)[None, :, :, :, None]  # (1, g, tg, K, 1)
    return (cols - w).abs().sum(3).reshape(n, cout, ho, wo)


# (N, Cin, H, W, Cout, kernel, stride, padding, pad_after, dilation, groups): odd sizes throughout;
# channels per group 5, 1, 3, 7, 9, 6 (never a multiple of 4, words 2, 1, 1, 2, 3, 2).
CASES = [
    (2, 5, 7, 6, 3, (3, 3), (1, 1), (1, 1), None, (1, 1), 1),
    (1, 3, 9, 7, 3, (3, 3), (2, 1), (1, 2), None, (1, 2), 3),  # depthwise, stride, dilation
    (2, 6, 5, 9, 4, (3, 2), (1, 2), (0, 1), (2, 0), (2, 1), 2),  # asymmetric padding, 2 groups
    (1, 7, 6, 5, 5, (1, 1), (2, 2), (0, 0), None, (1, 1), 1),  # 1x1 stride-2
    (1, 9, 4, 5, 3, (2, 2), (1, 1), (1, 1), None, (1, 1), 1),  # even kernel, 3 words
    (1, 12, 5, 5, 6, (3, 3), (1, 1), (1, 1), None, (1, 1), 2),  # 6 channels per group, 3 per output group
]
CONFIGS = [
    KernelConfig(16, 4, 1, num_warps=1),  # tiles that divide neither M nor Cout/groups
    KernelConfig(8, 2, 2, num_warps=1, num_stages=1),  # 2-word steps: a masked tail when words are odd
]


def _case(case, seed=0):
    n, cin, h, w, cout, kernel, stride, padding, pad_after, dilation, groups = case
    generator = torch.Generator().manual_seed(seed)
    geom = geometry((h, w), kernel, stride, padding, dilation, groups, pad_after)
    scale = 0.013
    # Inputs reach past the calibrated range (|x| > 127.5 s) so clamping is exercised.
    x = torch.randn(n, cin, h, w, generator=generator) * 80 * scale
    weight_q = torch.randint(-127, 128, (cout, cin // groups, *kernel), generator=generator, dtype=torch.int8)
    bias = torch.randn(cout, generator=generator)
    return x, weight_q, bias, scale, geom, kernel


@pytest.mark.parametrize("variant", RUN_VARIANTS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"cin{c[1]}-g{c[10]}-k{c[5]}-s{c[6]}")
def test_integer_sums_are_exact(case, config, variant):
    x, weight_q, _, scale, geom, kernel = _case(case)
    expected = reference_sums(x, weight_q, scale, geom, kernel)
    sums = f8.forward(x.to(DEVICE), weight_q.to(DEVICE), None, scale, geom, config, variant=variant, integer=True)
    assert sums.dtype == torch.int32 and sums.shape == expected.shape
    assert torch.equal(sums.cpu().double(), expected)


@pytest.mark.parametrize("variant", RUN_VARIANTS)
def test_default_config_nan_and_inf_inputs(variant):
    x, weight_q, _, scale, geom, kernel = _case(CASES[2], seed=1)
    x[0, 1, 2, 3], x[1, 0, 0, 0], x[1, 5, 4, 8] = float("nan"), float("inf"), -float("inf")
    expected = reference_sums(x, weight_q, scale, geom, kernel)
    sums = f8.forward(x.to(DEVICE), weight_q.to(DEVICE), None, scale, geom, variant=variant, integer=True)
    assert torch.equal(sums.cpu().double(), expected)


def _float32_tolerance(expected_sums, scale, bias):
    """The epilogue's float32 error: float32(acc) (exact below 2**24), s rounded to float32, one product
    and one sum rounded: a few float32 ulps of |s * acc| + |bias|."""
    return 4 * torch.finfo(torch.float32).eps * (scale * expected_sums + bias.double().abs()[None, :, None, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float_output_is_bias_minus_scale_times_sums(dtype, layout):
    x, weight_q, bias, scale, geom, kernel = _case(CASES[0], seed=2)
    x = x.to(dtype)
    expected_sums = reference_sums(x, weight_q, scale, geom, kernel)
    expected = bias.double()[None, :, None, None] - scale * expected_sums
    x_in = x.to(DEVICE)
    if layout == "channels_last":
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    y = f8.forward(x_in, weight_q.to(DEVICE), bias.to(DEVICE), scale, geom, KernelConfig(16, 4, 1, num_warps=1))
    assert y.dtype == dtype and y.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    tolerance = _float32_tolerance(expected_sums, scale, bias)
    if dtype in (torch.float16, torch.bfloat16):  # then rounded once more, to the output's dtype
        tolerance = tolerance + torch.finfo(dtype).eps * expected.abs()
    assert ((y.cpu().double() - expected).abs() <= tolerance).all(), (y.cpu().double() - expected).abs().max()


def test_no_bias_and_empty_batch():
    x, weight_q, _, scale, geom, kernel = _case(CASES[3], seed=3)
    expected = -scale * reference_sums(x, weight_q, scale, geom, kernel)
    y = f8.forward(x.to(DEVICE), weight_q.to(DEVICE), None, scale, geom, KernelConfig(16, 4, 1, num_warps=1))
    assert ((y.cpu().double() - expected).abs() <= 4 * torch.finfo(torch.float32).eps * expected.abs()).all()
    empty = f8.forward(x[:0].to(DEVICE), weight_q.to(DEVICE), None, scale, geom)
    assert empty.shape == (0, *y.shape[1:])


def test_layouts_pad_channels_with_quantized_zeros():
    """quantize_input / pack_weight: bytes x_q + 128, 4 channels per word, filler byte 128."""
    x = torch.tensor([-1.0, 0.0, 0.26, 2.0, 0.5]).view(1, 5, 1, 1)  # 5 channels, one group: 2 words
    words = f8.quantize_input(x, 0.01, 1)
    assert words.shape == (1, 2, 1, 1) and words.dtype == torch.int32
    assert words.view(torch.uint8).flatten().tolist() == [128 - 100, 128, 128 + 26, 128 + 127, 128 + 50, 128, 128, 128]
    weight_q = torch.tensor([[-127, 5, 0]], dtype=torch.int8).view(1, 3, 1, 1)
    packed = f8.pack_weight(weight_q)
    assert packed.shape == (1, 1, 1, 1)
    assert packed.contiguous().view(torch.uint8).flatten().tolist() == [1, 133, 128, 128]


def _good_args():
    x, weight_q, bias, scale, geom, _ = _case(CASES[0])
    return dict(x=x, weight_q=weight_q, bias=bias, scale=scale, geom=geom)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.zeros(5, 7, 6)), ValueError, "x must be a 4-d"),
        (dict(x=torch.zeros(2, 5, 7, 6, dtype=torch.int32)), ValueError, "x.dtype must be one of"),
        (dict(weight_q=torch.zeros(3, 5, 3, 3)), ValueError, "weight_q must be a 4-d int8"),
        (dict(weight_q=torch.zeros(3, 4, 3, 3, dtype=torch.int8)), ValueError, "does not fit x"),
        (dict(bias=torch.zeros(4)), ValueError, "bias must be None or a floating"),
        (dict(scale=0.0), ValueError, "scale must be a positive"),
        (dict(scale=float("nan")), ValueError, "scale must be a positive"),
        (dict(geom=(1, 1)), ValueError, "geom must be a Conv2dGeometry"),
        (dict(variant="dp4a"), ValueError, "variant must be one of"),
        (dict(integer=1), ValueError, "integer must be a bool"),
        (dict(config=KernelConfig(16, 4, 32, num_warps=1)), ValueError, "config.block_k must be at most 16 words"),
        (dict(config=KernelConfig(1024, 64, 1, num_warps=1)), ValueError, "int32 accumulators per thread"),
        (dict(config=(16, 4, 1)), ValueError, "config must be a KernelConfig"),
    ],
)
def test_argument_errors_name_the_argument(change, error, message):
    arguments = _good_args() | change
    with pytest.raises(error, match=message):
        f8.forward(**arguments)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's refusal; on CUDA the form runs")
def test_inline_ptx_form_is_refused_under_the_interpreter():
    with pytest.raises(RuntimeError, match='variant="vabsdiff4" is inline PTX.*TRITON_INTERPRET'):
        f8.forward(**_good_args(), variant="vabsdiff4")


@pytest.mark.skipif(DEVICE != "cuda", reason="QuantizedAdder2d dispatches CUDA inputs to this kernel")
def test_quantized_layer_on_cuda_matches_the_cpu_kernel():
    from triton_adder.nn import Adder2d  # noqa: PLC0415
    from triton_adder.quant import QuantizedAdder2d  # noqa: PLC0415

    layer = QuantizedAdder2d.from_float(Adder2d(6, 4, 3, padding=1, stride=2, groups=2), input_max=2.0)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        cpu = layer.integer_sums(x)
        gpu = layer.cuda().integer_sums(x.cuda())
    assert torch.equal(gpu.cpu(), cpu)


# --- SASS, compile only: both forms for sm_80 and sm_90 (benchmarks/sass_int8.py's screen) ---

_SASS_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.sass_int8 import screen
out = {}
for variant, arch in (("unpacked", 90), ("vabsdiff4", 80), ("vabsdiff4", 90)):
    row = screen(variant, (2, 16, 8, 8), 16, 1, 1, 0, 1, arch, (32, 16, 2, 1))
    opcodes = row.pop("text").split("opcodes in the loop")[1]
    out[f"{variant}-{arch}"] = row | {"opcodes": opcodes}
print(json.dumps(out))
"""


def _sass_tools_available() -> bool:
    from triton_adder.measure import sass  # noqa: PLC0415

    try:
        sass.cuobjdump_path()
        from triton import knobs  # noqa: PLC0415

        return bool(knobs.nvidia.ptxas.path) and os.path.isfile(knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001 - any failure: no toolchain to compile with
        return False


@pytest.mark.skipif(not _sass_tools_available(), reason="ptxas/cuobjdump (shipped in the triton wheel) not found")
def test_both_forms_compile_to_the_expected_sass():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _SASS_CHILD, root], env=env, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, row in out.items():
        assert row["scope"] == "inner loop" and row["local_ops"] == 0 and row["shfl_in_loop"] == 0, (name, row)
    # unpacked: one max per byte term (|a - b| = 2 max(a, b) - a - b), no packed instruction
    unpacked = out["unpacked-90"]
    assert unpacked["abs_diff_per_element"] == 1.0 and "MNMX" in unpacked["opcodes"], unpacked
    assert "VABSDIFF4" not in unpacked["opcodes"], unpacked
    # vabsdiff4: one VABSDIFF4.U8.ACC per 4 byte terms, the PTX not emulated (ptxas lowers the signed
    # .s32 form to per-byte PRMT + IABS + IADD sequences)
    for arch in (80, 90):
        packed = out[f"vabsdiff4-{arch}"]
        assert packed["abs_diff_per_element"] == 0.25 and "VABSDIFF4.U8.ACC" in packed["opcodes"], packed
        assert "IABS" not in packed["opcodes"] and packed["total_per_element"] < 0.6, packed
