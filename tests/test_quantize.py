"""int8 inference (`triton_adder.quantize`, `triton_adder.quant`) against an independent float64
reference of the quantized math.

The reference quantizes in float64 from the layer's scale (x_q = clamp(round(x * (1/s)), -127, 127),
w_q from the FLOAT layer's weight, not from the quantized layer's buffers; or, for the folded bias,
w_q unclamped) and sums |x_q - w_q| with `F.unfold` (whose zero padding is the quantized zero) and
broadcasting: every integer is exact in float64, so the kernel's int32 sums must equal it exactly.
Every test compiles into its own empty cache directory, so nothing passes on a library a previous
run left behind. The float layers run on the eager CPU path (TRITON_ADDER_CPU_COMPILE=0): no
inductor compile time here.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_adder
from triton_adder import models
from triton_adder.autotune import lookup
from triton_adder.nn import Adder2d, Adder2dSame
from triton_adder.quant import QuantizedAdder2d, native, quantize

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_ISAS = native.cpu_isas()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """An empty library cache per test, no forced ISA or compiler from the developer's shell, eager float path."""
    monkeypatch.setenv(lookup.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    monkeypatch.delenv(native.COMPILER_ENV, raising=False)
    monkeypatch.delenv(native.IFMA_ENV, raising=False)
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    native.clear()
    yield
    native.clear()


def isa_param(isa):
    reason = f"this CPU lacks {'/'.join(native.ISA_CPU_FLAGS[isa])} (it runs {', '.join(CPU_ISAS)})"
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in CPU_ISAS, reason=reason), id=isa)


ALL_ISAS = [isa_param(isa) for isa in native.ISAS]


# ------------------------------------------------------------------------------------------------
# The independent reference
# ------------------------------------------------------------------------------------------------


def q64(t: torch.Tensor, scale: float, clamp: bool = True) -> torch.Tensor:
    q = torch.round(t.detach().double() * (1.0 / scale))
    return q.clamp(-127, 127) if clamp else q


def tf_same_pads(size, k, s, d):
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def reference_sums(x, layer: Adder2d, scale: float, tf_same: bool = False, clamp_weight: bool = True) -> torch.Tensor:
    """sum_k |x_q - w_q| in float64, (N, Cout, Ho, Wo), by unfold and broadcasting (w_q unclamped, beyond
    +-127, if not clamp_weight)."""
    xq, wq = q64(x, scale), q64(layer.weight, scale, clamp=clamp_weight)
    if xq.dim() == 3:
        xq = xq[None]
    (kh, kw), stride, dilation, g = layer.kernel_size, layer.stride, layer.dilation, layer.groups
    if tf_same:
        (top, bottom), (left, right) = (
            tf_same_pads(n, k, s, d) for n, k, s, d in zip(xq.shape[-2:], layer.kernel_size, stride, dilation)
        )
        xq, padding = F.pad(xq, (left, right, top, bottom)), (0, 0)
    else:
        padding = (0, 0) if layer.padding == "valid" else layer.padding
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, layer.kernel_size)]
            xq = F.pad(xq, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = (0, 0)
    n, cin, h, w = xq.shape
    cols = F.unfold(xq, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, Cin*kh*kw, L)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    cout = wq.shape[0]
    cols = cols.reshape(n, g, cin // g * kh * kw, 1, -1)  # (N, G, Kg, 1, L), K in (channel, i, j) order
    weights = wq.reshape(g, cout // g, cin // g * kh * kw).permute(0, 2, 1)[None, :, :, :, None]  # (1, G, Kg, Tg, 1)
    sums = (cols - weights).abs().sum(2)  # (N, G, Tg, L)
    return sums.reshape(n, cout, ho, -1)


def make_layer(cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=False, seed=0, cls=Adder2d):
    torch.manual_seed(seed)
    layer = cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(0.7)
        if bias:
            layer.bias.normal_()
    return layer.eval()


# (cin, cout, kernel, stride, padding, dilation, groups, batch, h, w): padding, stride, dilation,
# groups (incl. depthwise), odd channel counts, K = Cin/groups*kh*kw not a multiple of 8 or 64,
# 1x1 layers (the no-copy path when Cin is a multiple of 8), batch 1 and > 1, tiny and wide K.
CASES = [
    (6, 10, 3, 2, 1, 1, 1, 2, 9, 11),
    (3, 5, 1, 1, 0, 1, 1, 1, 7, 7),
    (64, 24, 1, 1, 0, 1, 1, 2, 5, 6),
    (8, 12, 3, 1, 2, 2, 4, 3, 8, 9),
    (130, 7, 3, 1, 1, 1, 1, 1, 6, 5),
    (16, 16, 3, 1, 1, 1, 16, 1, 6, 7),
    (5, 9, (2, 3), (2, 1), (0, 2), (1, 2), 1, 2, 7, 8),
    (40, 33, 5, 3, 2, 1, 1, 1, 11, 10),
    (12, 20, 1, 2, 0, 1, 2, 2, 9, 9),
]


def integer_case(case):
    cin, cout, k, stride, padding, dilation, groups, n, h, w = case
    layer = make_layer(cin, cout, k, stride, padding, dilation, groups, seed=cin * 31 + cout)
    torch.manual_seed(cout)
    x = torch.randn(n, cin, h, w) * 1.3
    # the calibrated max below the largest input: some values clip to +-127
    return layer, x, QuantizedAdder2d.from_float(layer, 0.8 * float(x.abs().max()))


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_integer_sums_exact_on_every_path(isa, monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, isa)
    blockings = [
        None,
        native.Blocking(1, 8, 1, 8, 8),
        native.Blocking(3, 16, 9, 24, 16),
        native.Blocking(8, 32, 16, 40, 64),
        native.Blocking(6, 24, 96, 48, 1024),
    ]
    for number, case in enumerate(CASES):
        layer, x, q = integer_case(case)
        expected = reference_sums(x, layer, q.scale_value)
        # every input layout the quantizer reads differently, and float64 input
        inputs = {
            "nchw": x,
            "channels_last": x.contiguous(memory_format=torch.channels_last),
            "strided": torch.stack([x, x], dim=-1)[..., 0],
            "float64": x.double(),
        }
        for layout, xin in inputs.items():
            q.blocking = blockings[number % len(blockings)] if layout == "nchw" else None
            got = q.integer_sums(xin)
            assert got.dtype == torch.int32 and got.shape == expected.shape, (case, layout)
            difference = (got - expected).abs().max()
            assert torch.equal(got.double(), expected), f"{isa} {case} {layout}: max diff {difference}"
    assert native.load().isa == isa and native.load().lib.ta_isa() == native.ISA_CODES[isa]


def test_every_register_block_and_k_chunk():
    """The best variant this CPU has, over every register block, tiles that do not divide the layer
    and K chunks shorter than K (K = 37 * 9 = 333)."""
    layer = make_layer(37, 45, 3, padding=1, groups=1, seed=3)
    x = torch.randn(2, 37, 7, 6)
    q = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    expected = reference_sums(x, layer, q.scale_value)
    for mr in native.MICRO_MR:
        for nr in native.MICRO_NR:
            for mc, nc, kc in ((mr, 8, 8), (mr * 5, nr + 8, 40), (mr * 16, 64, 1024)):
                q.blocking = native.Blocking(mr, nr, mc, nc, kc)
                assert torch.equal(q.integer_sums(x).double(), expected), q.blocking


@pytest.mark.skipif(
    "avx512ifma" not in native.cpu_flags() or "avx512bw" not in CPU_ISAS,
    reason="this CPU lacks avx512ifma (or avx512bw): TRITON_ADDER_INT8_IFMA has nothing to switch off",
)
def test_ifma_switch_builds_a_second_library_with_identical_sums(monkeypatch):
    """$TRITON_ADDER_INT8_IFMA=0 builds the AVX-512BW variant without -mavx512ifma (VPADDQ accumulation
    instead of VPMADD52LUQ): a second library, and both give the reference's exact sums on long
    reductions (K = 1170 and 1000) over several blockings."""
    monkeypatch.setenv(native.ISA_ENV, "avx512bw")
    blockings = [None, native.Blocking(3, 16, 9, 24, 16), native.Blocking(8, 32, 16, 40, 64)]
    cases = [integer_case(CASES[4]), integer_case(CASES[7])]
    libraries, sums = {}, {}
    for setting in ("default", "0"):
        if setting == "default":
            monkeypatch.delenv(native.IFMA_ENV, raising=False)
        else:
            monkeypatch.setenv(native.IFMA_ENV, setting)
        assert ("-mavx512ifma" in native.isa_flags("avx512bw")) == (setting == "default")
        libraries[setting] = native.load()
        assert libraries[setting].isa == "avx512bw"
        sums[setting] = []
        for _, x, q in cases:
            for blocking in blockings:
                q.blocking = blocking
                sums[setting].append(q.integer_sums(x))
    assert libraries["default"].path != libraries["0"].path
    expected = [reference_sums(x, layer, q.scale_value) for layer, x, q in cases for _ in blockings]
    for with_ifma, without, reference in zip(sums["default"], sums["0"], expected):
        assert torch.equal(with_ifma, without) and torch.equal(with_ifma.double(), reference)
    objdump = shutil.which("objdump")
    if objdump:  # the switch changes the instructions, not just the file name
        text = {
            setting: subprocess.run([objdump, "-d", str(lib.path)], capture_output=True, text=True, check=True).stdout
            for setting, lib in libraries.items()
        }
        assert "vpmadd52luq" in text["default"] and "vpmadd52luq" not in text["0"]


def test_outputs_are_bias_minus_scale_times_sums():
    layer = make_layer(7, 11, 3, stride=1, padding=1, bias=True, seed=5)
    x = torch.randn(3, 7, 6, 5)
    q = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    expected = layer.bias.double()[None, :, None, None] - q.scale_value * reference_sums(x, layer, q.scale_value)
    # float64 in, float64 out, one rounding
    torch.testing.assert_close(q(x.double()), expected, rtol=1e-15, atol=1e-12)
    # float32, NCHW and channels_last (the output keeps the input's memory format), unbatched
    y = q(x)
    assert y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y.double(), expected, rtol=2**-23, atol=0)
    y_cl = q(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(y_cl, y)
    torch.testing.assert_close(q(x[1]), y[1], rtol=0, atol=0)
    for dtype, rtol in ((torch.float16, 2**-10), (torch.bfloat16, 2**-7)):
        xh = x.to(dtype)
        yh = q(xh)
        assert yh.dtype == dtype
        sums = reference_sums(xh.double(), layer, q.scale_value)
        ref = layer.bias.double()[None, :, None, None] - q.scale_value * sums
        torch.testing.assert_close(yh.double(), ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("padding", ["same", "valid", (1, 0)])
def test_string_and_asymmetric_padding(padding):
    layer = make_layer(6, 8, (2, 3), padding=padding, seed=9)
    x = torch.randn(2, 6, 7, 6)
    q = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    assert torch.equal(q.integer_sums(x).double(), reference_sums(x, layer, q.scale_value))


def test_adder2d_same_pads_from_each_input():
    assert issubclass(Adder2dSame, Adder2d)
    layer = make_layer(5, 6, 3, stride=2, seed=2, cls=Adder2dSame)
    q = QuantizedAdder2d.from_float(layer, 2.0)
    assert q.tf_same
    for h, w in ((7, 8), (9, 6)):
        x = torch.randn(2, 5, h, w)
        expected = reference_sums(x, layer, q.scale_value, tf_same=True)
        got = q.integer_sums(x)
        assert got.shape == (2, 6, math.ceil(h / 2), math.ceil(w / 2))
        assert torch.equal(got.double(), expected)


# ------------------------------------------------------------------------------------------------
# The clamp folded into the bias, the error bound
# ------------------------------------------------------------------------------------------------


def grid_layer(cin, cout, k, stride, padding, seed, s):
    """A layer whose weights are integers -400..400 times s (most beyond +-127 s, so clamped) and an
    input within +-127 s reaching 127 s: with s a power of two every float64 step below is exact."""
    layer = make_layer(cin, cout, k, stride=stride, padding=padding, bias=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-400, 401, layer.weight.shape, generator=generator) * s)
    return layer


def grid_input(shape, s, seed):
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * (127 * s)
    x[0, 0, 0, 0] = 127 * s  # the calibrated max: 127 s / 127 = s exactly
    return x


@pytest.mark.parametrize("path", ["kernel", "no-compiler fallback"])
def test_clamped_weights_fold_exactly_into_the_bias(path, monkeypatch, tmp_path):
    """Weights beyond the calibrated input range are clamped to +-127 (w_q) and what the clamp removed
    is in the bias: for inputs within range the layer equals ``bias - s * sum |x_q - w_q|`` with w_q
    NOT clamped (up to 400 here), exactly: |x - w| = |x - c| + (|w| - |c|) for |x| <= 127 s <= |c|.
    Padded taps (x = 0) included. s = 2**-5 and weights on its grid make every float64 step exact."""
    if path != "kernel":
        monkeypatch.setenv(native.COMPILER_ENV, str(tmp_path / "no-such-cc"))
        warnings.simplefilter("ignore", RuntimeWarning)
    s = 2.0**-5
    layer = grid_layer(5, 7, 3, 2, 1, seed=11, s=s)
    x = grid_input((2, 5, 9, 8), s, seed=11)
    q = quantize(layer, [x])
    assert q.scale_value == s  # the rule: max |x| / 127, the weights play no part
    unclamped = q64(layer.weight, s, clamp=False)
    assert 0.3 < (unclamped.abs() > 127).double().mean() < 0.9  # clamped and unclamped taps both
    assert torch.equal(q.weight_q.double(), unclamped.clamp(-127, 127))
    expected = layer.bias.double()[None, :, None, None] - s * reference_sums(x, layer, s, clamp_weight=False)
    assert torch.equal(q(x.double()), expected)
    torch.testing.assert_close(q(x).double(), expected, rtol=2**-23, atol=0)
    # on the grid the weights round exactly, so against the float layer only the input's rounding is left
    with torch.no_grad():
        exact = layer.double()(x.double())
    assert (q(x.double()) - exact).abs().max() <= 3 * 3 * 5 * s / 2


def test_triton_path_gets_the_folded_bias():
    """The CUDA path (`QuantizedAdder2d._triton`, kernels/forward_int8.py) rescales with the folded bias:
    under the interpreter on the CPU (tests/conftest.py), or on a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = 2.0**-5
    layer = grid_layer(6, 5, 3, 1, 1, seed=12, s=s)
    x = grid_input((1, 6, 5, 4), s, seed=12)
    q = quantize(layer, [x])
    expected = layer.bias.double()[None, :, None, None] - s * reference_sums(x, layer, s, clamp_weight=False)
    folded = layer.bias.double() - q.bias
    assert folded.min() > 10  # the fold is large: without it the outputs would be far off
    q = q.to(device)
    with torch.no_grad():
        y = q._triton(x.to(device), q._geometry(tuple(x.shape[-2:])), integer=False)
    assert y.dtype == torch.float32
    # the kernel's epilogue is float32: bias (rounded to float32) - s * float32(acc)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=0, atol=8 * 2**-24 * float(q.bias.abs().max()))
    if device == "cuda":
        assert torch.equal(q(x.to(device)), y)


@pytest.mark.parametrize("reach", [1.0, 0.6], ids=["in-range", "beyond-range"])
def test_error_against_the_float_layer_within_the_bound(reach):
    """Per output, against the float layer on the same input (DESIGN.md section 7):
    |y_int8 - y| <= sum_k |x_k - s x_q,k| + sum_k |c_k - s w_q,k|, c = clamp(w, +-127 s). Within the
    calibrated range each input term is <= s/2 and each weight term <= s/2 (0 where clamped), so
    <= K s; an input beyond it clips to 127 s and its term becomes |x| - 127 s (reach 0.6: the scale
    from 0.6 max |x|). Weights doubled so some are clamped."""
    layer = make_layer(16, 12, 3, padding=1, bias=True, seed=4)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    x = torch.randn(2, 16, 8, 8)
    q = QuantizedAdder2d.from_float(layer, reach * float(x.abs().max()))
    s, k = q.scale_value, 16 * 9
    assert (layer.weight.abs() > 127 * s).any() and (layer.weight.abs() < 127 * s).any()
    with torch.no_grad():
        y = q(x.double())
        exact = layer.double()(x.double())
    error = (y - exact).abs()
    input_terms = (x.double() - s * q64(x, s)).abs()
    clamped = layer.weight.detach().double().clamp(-127 * s, 127 * s)
    weight_terms = (clamped - s * q.weight_q.double()).abs().sum(dim=(1, 2, 3))
    bound = F.unfold(input_terms, 3, padding=1).sum(1).view(2, 1, 8, 8) + weight_terms[None, :, None, None]
    assert (error <= bound + 1e-12 * exact.abs().max()).all()
    if reach == 1.0:
        assert bound.max() <= k * s * (1 + 1e-12)
        assert 0 < error.max() < 0.5 * k * s  # the bound is not vacuous: rounding errors partly cancel
    else:
        assert (x.abs() > 127.5 * s).any() and bound.max() > k * s  # clipping exceeds K s, the bound follows


# ------------------------------------------------------------------------------------------------
# quantize(): calibration, the copy, the model end to end
# ------------------------------------------------------------------------------------------------


def test_calibration_picks_the_input_max_scale():
    """s = max |x| over every calibration batch / 127, from the input alone (weights of 40 and -900 do not
    change it); those weights are clamped to +-127 and the clamped amount is the bias."""
    torch.manual_seed(0)
    first, second = Adder2d(2, 3, 3, padding=1), Adder2d(3, 4, 1)
    with torch.no_grad():
        first.weight.uniform_(-0.5, 0.5)
        first.weight[0, 0, 0, 0] = 40.0
        second.weight.uniform_(-0.9, 0.9)
        second.weight[1, 2, 0, 0] = -900.0
    model = nn.Sequential(first, nn.Softsign(), second)
    batches = [torch.full((1, 2, 4, 4), 0.25), torch.randn(2, 2, 4, 4)]
    batches[1][1, 1, 2, 3] = -3.0  # the largest input of the first layer, in the second batch
    q = quantize(model, batches)
    assert q[0].scale_value == 3.0 / 127
    with torch.no_grad():
        softsign_max = max(float(F.softsign(first(b)).abs().max()) for b in batches)
    assert 0.5 < softsign_max < 1
    assert q[2].scale_value == softsign_max / 127
    assert torch.equal(q[0].weight_q.double(), q64(first.weight, 3.0 / 127))
    assert q[0].weight_q[0, 0, 0, 0] == 127 and q[2].weight_q[1, 2, 0, 0] == -127
    # the first layer: one weight beyond +-3, in channel 0; no bias of its own
    torch.testing.assert_close(q[0].bias, torch.tensor([-(40.0 - 3.0), 0.0, 0.0], dtype=torch.float64))
    excess = (second.weight.detach().double().abs() - softsign_max).clamp_min(0).sum(dim=(1, 2, 3))
    assert excess[1] > 899 - softsign_max
    torch.testing.assert_close(q[2].bias, -excess, rtol=1e-14, atol=1e-14)
    # the copy: the original model is untouched, the copy is in eval mode and needs no no_grad
    assert isinstance(model[0], Adder2d) and model.training and model[0].weight.requires_grad
    assert isinstance(q[0], QuantizedAdder2d) and isinstance(q[1], nn.Softsign) and not q.training
    y = q(batches[1])
    assert y.shape == (2, 4, 4, 4) and not y.requires_grad


def test_calibration_accepts_tuples_and_dicts_and_adder_itself():
    layer = make_layer(3, 4, 3, seed=1)
    x = torch.randn(1, 3, 5, 5) * 2
    assert float(layer.weight.detach().abs().max()) < float(x.abs().max())  # nothing clamped: no bias appears
    for calibration in ([(x,)], [{"input": x}], iter([x])):
        q = quantize(layer, calibration)
        assert isinstance(q, QuantizedAdder2d) and q.scale_value == float(x.abs().max()) / 127
        assert q.bias is None


def test_lenet_end_to_end_within_the_propagated_bound():
    """LeNet-5-BN AdderNet: logits of the int8 model vs the float model, adder weights 8x their
    initial size so that, as in the trained network (DESIGN.md section 7), they reach far beyond
    their inputs' range and every adder layer clamps and folds.

    Bound, in max-norm, propagated layer by layer (relu and max-pool do not increase it): an adder
    layer with K terms per output, scale s and input error d gives <= K * (d + s + clip), clip =
    max(0, max|x'| - 127.5 s) for the inputs x' it actually sees (the folded clamp is exact, so
    clamped weights add nothing); BatchNorm multiplies by max |gamma / sqrt(var + eps)|; the
    multiplicative 1x1 classifier by its largest row sum of |W|.
    """
    torch.manual_seed(0)
    model = models.build("lenet5bn", adder=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Adder2d):
                module.weight.mul_(8)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative averages: the statistics of the batches below
    with torch.no_grad():  # realistic BatchNorm statistics instead of 0 / 1
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28))
    model.eval()
    data = torch.randn(16, 1, 28, 28)
    q = quantize(model, [data[:8], data[8:]], fold_batchnorm=False)
    assert {name for name, m in q.named_modules() if isinstance(m, QuantizedAdder2d)} == {"conv2", "conv3", "conv4"}
    for name in ("conv2", "conv3", "conv4"):  # weights clamped in every layer, the clamp folded into a bias
        layer = getattr(q, name)
        assert (layer.weight_q.abs() == 127).sum() > 0.1 * layer.weight_q.numel() and layer.bias.max() < 0, name
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].abs().max().item()))
        for name, m in q.named_modules()
        if isinstance(m, QuantizedAdder2d)
    ]
    with torch.no_grad():
        logits_float, logits_int8 = model(data), q(data)
    for hook in hooks:
        hook.remove()

    def gain(bn):
        return (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().item()

    bound = 0.0
    for adder, bn in (("conv2", "bn2"), ("conv3", "bn3"), ("conv4", "bn4")):
        layer = getattr(q, adder)
        s, k = layer.scale_value, layer.weight_q[0].numel()
        clip = max(0.0, seen[adder] - 127.5 * s)
        bound = (k * (bound + s + clip)) * gain(getattr(model, bn))
    bound *= model.fc.weight.abs().sum(dim=(1, 2, 3)).max().item() * gain(model.bn5)
    error = (logits_int8 - logits_float).abs().max().item()
    assert 0 < error <= bound, (error, bound)
    # the argmax agrees on most images (not guaranteed by the bound; a wrong kernel would scramble it)
    agree = (logits_int8.argmax(1) == logits_float.argmax(1)).float().mean().item()
    assert agree >= 0.75, agree
    # the default folds bn2-bn4 into the adder layers' rescale: the same integer sums, so the same bound holds
    # (float roundings differ, and can move a later layer's input across a quantization step)
    folded = quantize(model, [data[:8], data[8:]])
    assert [name for name in ("bn2", "bn3", "bn4") if isinstance(getattr(folded, name), nn.Identity)] == [
        "bn2",
        "bn3",
        "bn4",
    ]
    with torch.no_grad():
        logits_folded = folded(data)
    assert 0 < (logits_folded - logits_float).abs().max().item() <= bound
    assert (logits_folded.argmax(1) == logits_float.argmax(1)).float().mean().item() >= 0.75


def test_state_dict_round_trip_repacks_the_weight():
    layer = make_layer(9, 10, 3, padding=1, bias=True, seed=6)
    x = torch.randn(1, 9, 5, 5)
    q = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    other = QuantizedAdder2d.from_float(make_layer(9, 10, 3, padding=1, bias=True, seed=7), 1.0)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other(x), q(x))
    assert set(q.state_dict()) == {"scale", "weight_q", "bias"}


# ------------------------------------------------------------------------------------------------
# BatchNorm folded into the rescale
# ------------------------------------------------------------------------------------------------


def random_norm(channels: int, seed: int, affine: bool = True) -> nn.BatchNorm2d:
    """An eval BatchNorm2d with statistics and affine parameters far from the identity (some gammas negative)."""
    generator = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels, affine=affine, eps=1e-3).eval()
    norm.running_mean.copy_(torch.randn(channels, generator=generator) * 20)
    norm.running_var.copy_(torch.rand(channels, generator=generator) * 50 + 0.5)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=generator) * 2)
            norm.bias.copy_(torch.randn(channels, generator=generator))
    return norm


def normalised_reference(x, layer: Adder2d, q: QuantizedAdder2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """The norm applied in float64 to the unfolded quantized layer's float64 output (bias b' - s * sums)."""
    bias = torch.zeros(layer.out_channels, dtype=torch.float64) if q.bias is None else q.bias
    y = bias[None, :, None, None] - q.scale_value * reference_sums(x, layer, q.scale_value)
    ones = torch.ones(layer.out_channels, dtype=torch.float64)
    gamma = norm.weight.detach().double() if norm.weight is not None else ones
    beta = norm.bias.detach().double() if norm.bias is not None else 0 * ones
    mean, var = norm.running_mean.double(), norm.running_var.double()
    per_channel = [t[:, None, None] for t in (gamma, beta, mean, var)]
    gamma, beta, mean, var = per_channel
    return (y - mean) / torch.sqrt(var + norm.eps) * gamma + beta


@pytest.mark.parametrize("path", ["kernel", "no-compiler fallback", "triton"])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, False)], ids=["bias-affine", "no-bias-no-affine"])
def test_folded_batchnorm_equals_the_norm_of_the_layer_output(path, bias, affine, monkeypatch, tmp_path):
    if path == "no-compiler fallback":
        monkeypatch.setenv(native.COMPILER_ENV, str(tmp_path / "no-such-cc"))
        warnings.simplefilter("ignore", RuntimeWarning)
    layer = make_layer(10, 12, 3, stride=2, padding=1, groups=2, bias=bias, seed=21)
    x = torch.randn(2, 10, 9, 7)
    q = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    norm = random_norm(12, seed=21, affine=affine)
    expected = normalised_reference(x, layer, q, norm)
    assert q.fold_batchnorm_(norm) is q and q.output_scale.dtype == torch.float64
    if path == "triton":
        with torch.no_grad():
            y = q._triton(x, q._geometry(tuple(x.shape[-2:])), integer=False)
    else:
        y = q(x.double())
        # float64 out: b'' - (a s) * sum vs a * (b' - s * sum) + c, a few float64 roundings apart
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
        y = q(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=2**-23, atol=2**-23 * float(expected.abs().max()))
    assert "batchnorm folded" in repr(q)


def test_fold_batchnorm_errors():
    q = QuantizedAdder2d.from_float(make_layer(4, 6, 1, seed=1), 1.0)
    with pytest.raises(ValueError, match="BatchNorm2d over 6 channels"):
        q.fold_batchnorm_(nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="BatchNorm2d over 6 channels"):
        q.fold_batchnorm_(nn.GroupNorm(2, 6))
    with pytest.raises(ValueError, match="no running statistics"):
        q.fold_batchnorm_(nn.BatchNorm2d(6, track_running_stats=False))
    zero_var = nn.BatchNorm2d(6, eps=0.0).eval()
    zero_var.running_var.zero_()
    with pytest.raises(ValueError, match="non-finite"):
        q.fold_batchnorm_(zero_var)
    assert q.output_scale is None  # a refused fold changes nothing


class ActNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass with an activation inside, as timm's BatchNormAct2d: never folded."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class Blocks(nn.Module):
    """One adder layer per folding rule: a = its norm alone reads it (folded); b = its output also feeds a
    residual addition; c = its norm is called twice; d = a BatchNorm2d subclass; e = a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (make_layer(6, 6, 3, padding=1, seed=i) for i in range(5))
        self.norm_a, self.norm_b, self.norm_c = (random_norm(6, seed=i) for i in range(3))
        self.norm_d = ActNorm(6).eval()
        self.norm_e = nn.GroupNorm(2, 6)

    def forward(self, x):
        x = self.norm_a(self.a(x))
        y = self.b(x)
        x = self.norm_b(y) + y
        x = self.norm_c(self.norm_c(self.c(x)))
        x = self.norm_d(self.d(x))
        return self.norm_e(self.e(x))


def test_quantize_folds_only_a_norm_that_alone_reads_an_adder_layer():
    torch.manual_seed(3)
    model = Blocks().double().eval()  # float64 throughout: the two models agree to float64 roundings
    calibration = [torch.randn(2, 6, 7, 7, dtype=torch.float64)]
    folded = quantize(model, calibration)
    kept = quantize(model, calibration, fold_batchnorm=False)
    assert isinstance(folded.norm_a, nn.Identity) and folded.a.output_scale is not None
    for name in ("b", "c", "d", "e"):
        assert getattr(folded, name).output_scale is None, name
        assert type(getattr(folded, f"norm_{name}")) is type(getattr(model, f"norm_{name}")), name
    assert all(type(module) is not nn.Identity for module in kept.modules())
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        y_folded, y_kept = folded(x), kept(x)
    torch.testing.assert_close(y_folded, y_kept, rtol=1e-9, atol=1e-9)
    assert isinstance(model.norm_a, nn.BatchNorm2d) and model.a.__class__ is Adder2d  # the model is untouched


class ValueBranch(nn.Module):
    """Control flow on a value: fx cannot trace it, so nothing is folded."""

    def __init__(self):
        super().__init__()
        self.a = make_layer(4, 4, 1, seed=4)
        self.norm = random_norm(4, seed=4)

    def forward(self, x):
        y = self.norm(self.a(x))
        return y if float(y.mean()) > -1e30 else -y


def test_quantize_keeps_the_norms_of_a_model_fx_cannot_trace():
    model = ValueBranch().eval()
    x = torch.randn(1, 4, 5, 5)
    quantized = quantize(model, [x])
    assert isinstance(quantized.norm, nn.BatchNorm2d) and quantized.a.output_scale is None
    expected = normalised_reference(x, model.a, quantized.a, model.norm)
    y = quantized(x)  # the layer's float32 output, then the float32 norm: a few float32 roundings
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_folded_state_dict_round_trip():
    model = nn.Sequential(make_layer(5, 8, 3, padding=1, bias=True, seed=9), random_norm(8, seed=9)).eval()
    x = torch.randn(2, 5, 6, 6)
    first = quantize(model, [x])
    second = quantize(nn.Sequential(make_layer(5, 8, 3, padding=1, bias=True, seed=10), random_norm(8, seed=10)), [x])
    assert not torch.equal(second(x), first(x))
    second.load_state_dict(first.state_dict())
    assert torch.equal(second(x), first(x))
    assert set(first.state_dict()) == {"0.scale", "0.weight_q", "0.bias", "0.output_scale"}


# ------------------------------------------------------------------------------------------------
# Errors: training, gradients, arguments, settings
# ------------------------------------------------------------------------------------------------


def test_training_mode_and_backward_are_errors():
    layer = make_layer(3, 4, 3, seed=0)
    model = quantize(nn.Sequential(layer), [torch.randn(1, 3, 5, 5)])
    x = torch.randn(1, 3, 5, 5)
    model.train()
    with pytest.raises(RuntimeError, match="inference-only.*eval"):
        model(x)
    model.eval()
    with pytest.raises(RuntimeError, match="no backward.*no_grad"):
        model(x.requires_grad_())
    with torch.no_grad():
        assert model(x).shape == (1, 4, 3, 3)  # an input that requires grad is fine without autograd
    with pytest.raises(ValueError, match="CPU only"):
        model[0](torch.randn(1, 3, 5, 5, device="meta"))
    with pytest.raises(ValueError, match="expects 3"):
        model[0](torch.randn(1, 2, 5, 5))
    with pytest.raises(TypeError, match="dtype"):
        model[0](torch.ones(1, 3, 5, 5, dtype=torch.int32))


def test_quantize_argument_errors():
    model = nn.Sequential(make_layer(3, 4, 3))
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match=r"rule must be one of \('input_max',\)"):
        quantize(model, [x], rule="max")  # the shared max(max |x|, max |w|) rule is gone
    with pytest.raises(ValueError, match="calibration gave no batches"):
        quantize(model, [])
    with pytest.raises(TypeError, match="calibration .*bare tensor.*list"):
        quantize(model, x)
    with pytest.raises(TypeError, match="calibration must be an iterable"):
        quantize(model, 5)
    with pytest.raises(TypeError, match="calibration batch 0 must be a tensor"):
        quantize(model, ["abc"])
    with pytest.raises(ValueError, match="no triton_adder Adder2d.*convert"):
        quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), [x])
    with pytest.raises(TypeError, match="model must be"):
        quantize("model", [x])

    class Skips(nn.Module):  # calls only one of its two adder layers
        def __init__(self):
            super().__init__()
            self.used, self.unused = make_layer(3, 4, 3), make_layer(3, 4, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"never ran adder layers \['unused'\]"):
        quantize(Skips(), [x])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(model, [bad])
    with pytest.raises(ValueError, match="input_max"):
        QuantizedAdder2d.from_float(make_layer(3, 4, 3), -1.0)
    infinite = make_layer(3, 4, 3)
    with torch.no_grad():
        infinite.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight holds non-finite"):
        QuantizedAdder2d.from_float(infinite, 1.0)
    with pytest.raises(TypeError, match="Adder2d"):
        QuantizedAdder2d.from_float(nn.Conv2d(3, 4, 3), 1.0)


def test_blocking_errors_name_the_field():
    for blocking, pattern in (
        (native.Blocking(5, 8, 5, 8, 8), "mr must be one of"),
        (native.Blocking(4, 12, 4, 16, 8), "nr one of"),
        (native.Blocking(4, 8, 6, 8, 8), "mc must be a multiple of mr"),
        (native.Blocking(4, 8, 4, 8, 12), "kc of 8"),
        (native.Blocking(4, 8, 0, 8, 8), "mc must be a positive int"),
    ):
        with pytest.raises(ValueError, match=pattern):
            blocking.check()


def test_isa_setting_errors(monkeypatch):
    q = QuantizedAdder2d.from_float(make_layer(3, 4, 3), 1.0)
    x = torch.randn(1, 3, 5, 5)
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"TRITON_ADDER_INT8_ISA must be one of avx512bw, avx2, portable or auto"):
        q(x)
    monkeypatch.setenv(native.ISA_ENV, "avx512bw")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    if native.platform.machine().lower() in ("x86_64", "amd64"):
        with pytest.raises(RuntimeError, match="TRITON_ADDER_INT8_ISA=avx512bw but this CPU lacks avx512f/avx512bw"):
            q(x)
        monkeypatch.delenv(native.ISA_ENV)
        assert native.selected_isa() == "avx2"  # auto: the best the (pretended) CPU has
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset())
    assert native.selected_isa() == "portable"


# ------------------------------------------------------------------------------------------------
# No compiler, the on-disk cache, two processes at once
# ------------------------------------------------------------------------------------------------


def test_no_compiler_warns_once_and_computes_the_same_numbers(monkeypatch, tmp_path):
    monkeypatch.setenv(native.COMPILER_ENV, str(tmp_path / "no-such-cc"))
    layer = make_layer(10, 9, 3, stride=2, padding=1, groups=1, bias=True, seed=8)
    x = torch.randn(2, 10, 7, 9)
    q = QuantizedAdder2d.from_float(layer, 0.9 * float(x.abs().max()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums = q.integer_sums(x)
        y = q(x)
        q(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "could not build" in messages[0] and "no-such-cc" in messages[0], messages
    expected = reference_sums(x, layer, q.scale_value)
    assert sums.dtype == torch.int32 and torch.equal(sums.double(), expected)
    ref = layer.bias.double()[None, :, None, None] - q.scale_value * expected
    torch.testing.assert_close(y.double(), ref, rtol=2**-23, atol=0)
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_compiles_once_into_the_cache_then_loads_from_disk(tmp_path):
    before = native.compile_count
    library = native.load()
    assert native.compile_count == before + 1
    assert library.path.parent == tmp_path / "cache" / "int8" and library.path.exists()
    assert library.isa == CPU_ISAS[0]
    native.clear()  # a new process, as far as the loader knows
    assert native.load().path == library.path and native.compile_count == before + 1
    assert [p.name for p in library.path.parent.iterdir()] == [library.path.name]  # no temporary left


CHILD = """
import os, sys, time
from pathlib import Path
from triton_adder.quant import native
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
library = native.load()
assert library is not None, "no library"
print(library.path, library.lib.ta_isa(), native.compile_count)
"""


def test_two_processes_compiling_at_once_both_get_a_working_library(tmp_path):
    env = {**os.environ, lookup.CACHE_DIR_ENV: str(tmp_path / "shared"), "PYTHONPATH": str(REPO_ROOT)}
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / f"ready{i}"), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start compiling into the same empty cache now
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err
    paths = {out.split()[0] for out, _ in outputs}
    assert len(paths) == 1 and all(out.split()[1] == str(native.ISA_CODES[CPU_ISAS[0]]) for out, _ in outputs)
    folder = tmp_path / "shared" / "int8"
    assert [p.name for p in folder.iterdir()] == [Path(paths.pop()).name]


def test_exported():
    assert triton_adder.quantize is quantize and "quantize" in triton_adder.__all__
