"""Faithful conversion (`triton_adder.convert`) and the CPU path's one compilation per layer shape."""

import math
import warnings

import pytest
import torch
from torch import nn

from tests.tolerance import assert_matches_reference
from triton_adder import Adder2d, convert, reference
from triton_adder.backends import use_backend
from triton_adder.backends.cpu import common
from triton_adder.geometry import Conv2dGeometry
from triton_adder.nn import Adder2dSame


class StandardisedConv2d(nn.Conv2d):
    """A subclass with its own forward (weight standardisation, like timm's StdConv2d)."""

    def forward(self, x):
        mean, std = self.weight.mean(dim=(1, 2, 3), keepdim=True), self.weight.std(dim=(1, 2, 3), keepdim=True)
        w = (self.weight - mean) / std
        return self._conv_forward(x, w, self.bias)


class ConvForwardStandardisedConv2d(nn.Conv2d):
    """Keeps nn.Conv2d.forward but standardises the weight in _conv_forward, which forward calls."""

    def _conv_forward(self, x, weight, bias):
        mean, std = weight.mean(dim=(1, 2, 3), keepdim=True), weight.std(dim=(1, 2, 3), keepdim=True)
        return super()._conv_forward(x, (weight - mean) / std, bias)


class RenamedConv2d(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward: converting it is faithful."""


def _tf_same_conv_class():
    """A stand-in for timm's Conv2dSame (same module and class name, TF "SAME" padding), without timm."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            out = math.ceil(size / s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return nn.functional.conv2d(
            nn.functional.pad(x, (left, right, top, bottom)),
            self.weight,
            self.bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )

    return type("Conv2dSame", (nn.Conv2d,), {"forward": forward, "__module__": "timm.layers.conv2d_same"})


def _net(middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), middle, nn.Conv2d(6, 2, 1))


def test_subclass_with_own_forward_is_kept_with_one_warning():
    model = _net(nn.Sequential(StandardisedConv2d(4, 6, 3), StandardisedConv2d(6, 6, 1)))
    with pytest.warns(UserWarning) as record:
        converted = convert(model)
    messages = [str(w.message) for w in record if "own forward" in str(w.message)]
    assert len(messages) == 1
    assert "StandardisedConv2d" in messages[0] and "1.0" in messages[0] and "1.1" in messages[0]
    assert all(type(m) is StandardisedConv2d for m in converted[1])


def test_subclass_overriding_conv_forward_is_kept_with_the_warning():
    model = _net(ConvForwardStandardisedConv2d(4, 6, 3))
    with pytest.warns(UserWarning, match="own forward") as record:
        converted = convert(model)
    assert type(converted[1]) is ConvForwardStandardisedConv2d
    assert "ConvForwardStandardisedConv2d: 1" in str(record[0].message)


def test_excluded_subclass_is_kept_silently_and_mapped_class_is_converted():
    model = _net(StandardisedConv2d(4, 6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = convert(model, exclude=["1"])
        mapped = convert(
            model,
            mapping={
                StandardisedConv2d: lambda conv: Adder2d(
                    conv.in_channels, conv.out_channels, conv.kernel_size, padding=7
                )
            },
        )
    assert type(kept[1]) is StandardisedConv2d
    assert type(mapped[1]) is Adder2d and mapped[1].padding == (7, 7)
    with pytest.raises(TypeError, match="mapping"):
        convert(model, mapping={nn.Linear: Adder2d})


def test_subclass_keeping_conv2d_forward_is_converted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert(_net(RenamedConv2d(4, 6, 3, stride=2, padding=1)))
    layer = converted[1]
    assert type(layer) is Adder2d and layer.stride == (2, 2) and layer.padding == (1, 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 8), (9, 5)])
def test_tf_same_padding_adder_matches_the_convolution_and_float64(size, stride):
    conv = _tf_same_conv_class()(3, 4, (3, 4), stride=stride, dilation=(1, 2))
    converted = convert(nn.Sequential(nn.Identity(), conv, nn.Identity()), keep_first=False, keep_last=False)
    adder = converted[1].double()
    assert type(adder) is Adder2dSame
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with use_backend("cpu"):
        y = adder(x.double())
    assert y.shape == conv(x).shape  # TF "SAME": ceil(size / stride) positions
    # Independent truth: the convolution's own padding (as it computes it) around the float64 reference.
    pads = [max((math.ceil(n / stride) - 1) * stride + d * (k - 1) + 1 - n, 0) for n, k, d in zip(size, (3, 4), (1, 2))]
    xpad = nn.functional.pad(x.double(), (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
    geom = Conv2dGeometry((stride, stride), (0, 0), (1, 2), 1, tuple(y.shape[-2:]))
    expected = reference.adder2d_forward(xpad, adder.weight.double(), None, geom)
    assert_matches_reference(y, expected, torch.float64, 3 * 3 * 4)


@pytest.mark.parametrize("mode, cout, most", [("1", 4096, 1), ("1", 4092, 2), (common.SYMBOLIC, 4096, 1)])
def test_blocked_layer_compiles_at_most_two_callables_per_pass(mode, cout, most, monkeypatch):
    """A 2.4 MB weight is split into channel blocks: 4096 channels into 4 equal blocks of 1024 (a
    divisor near the 5-block split), one callable; 4092 has no such divisor, so 5 blocks of 820 and
    a shorter last one, at most two callables, which symbolic sizes cover with one (keying on the
    storage offset compiled one per block: 5)."""
    monkeypatch.setenv(common.COMPILE_ENV, mode)
    if not common.compiler_enabled():
        pytest.skip("the CPU compiler is disabled here")
    torch.manual_seed(0)
    layer = Adder2d(16, cout, 3, padding=1)
    x = torch.randn(1, 16, 4, 3)
    with use_backend("cpu"):
        before = common.compile_count
        y = layer(x)
        compiled = common.compile_count - before
    assert compiled <= most, compiled
    geom = Conv2dGeometry((1, 1), (1, 1), (1, 1), 1, (4, 3))
    assert_matches_reference(
        y, reference.adder2d_forward(x.double(), layer.weight.double(), None, geom), torch.float32, 16 * 9
    )


def test_symbolic_compile_shares_one_compilation_across_sizes(monkeypatch):
    """TRITON_ADDER_CPU_COMPILE=symbolic: sizes and strides are symbols in the compiled CPU
    reductions (guarded), so a second 3x3 layer with other channel counts, batch and image size
    compiles nothing for either pass, a 1x1 layer (a specialised size) is still computed right, and
    every output matches the float64 reference."""
    monkeypatch.setenv(common.COMPILE_ENV, common.SYMBOLIC)
    if not common.compiler_enabled():
        pytest.skip("the CPU compiler is disabled here")
    torch.manual_seed(0)
    cases = [((2, 6, 9, 8), Adder2d(6, 10, 3, padding=1)), ((3, 5, 7, 11), Adder2d(5, 7, 3, padding=1)),
             ((2, 6, 5, 5), Adder2d(6, 3, 1))]  # fmt: skip
    compiled = []
    for x_shape, layer in cases:
        x = torch.randn(x_shape, requires_grad=True)
        with use_backend("cpu"):
            before = common.compile_count
            y = layer(x)
            grad_out = torch.randn_like(y)
            (grad_x,) = torch.autograd.grad(y, x, grad_out)
            compiled.append(common.compile_count - before)
        pad = layer.padding[0]
        geom = Conv2dGeometry((1, 1), (pad, pad), (1, 1), 1, tuple(y.shape[-2:]))
        terms = layer.weight[0].numel()
        assert_matches_reference(y, reference.adder2d_forward(x.double(), layer.weight.double(), None, geom),
                                 torch.float32, terms)  # fmt: skip
        expected_x, _ = reference.adder2d_backward(grad_out.double(), x.double(), layer.weight.double(), geom, "paper")
        assert_matches_reference(grad_x, expected_x, torch.float32, layer.weight.shape[0] * 9)
    assert compiled[1] == 0, compiled  # forward and input gradient reuse the first layer's compilations
