"""Model code reads attributes off the convolutions `convert` replaces: the replacements must answer as they did.

The class of failure (issue 26): timm's EdgeNeXt positional encoding reads ``self.token_projection.weight``, and
`insert_norm=True` had replaced that convolution with a plain ``Sequential(adder, BatchNorm2d)``, which has no
``.weight``, so the converted model failed to run. Every public attribute of the convolution is checked here, on a
plain replacement and on one with an inserted norm, and on the `QuantizedAdder2d` that `quantize` puts in their place.
"""

import copy
import io

import pytest
import torch
from torch import nn

from triton_adder import Adder2d, convert, quantize
from triton_adder.backends import use_backend
from triton_adder.backends.cpu import common
from triton_adder.nn import Adder2dWithNorm


@pytest.fixture(autouse=True)
def eager_cpu_path(monkeypatch):
    monkeypatch.setenv(common.COMPILE_ENV, "0")  # the eager CPU path: compiling tiny layers would dominate
    with use_backend("cpu"):
        yield


CONVS = {
    "grouped_dilated_bias": dict(in_channels=6, out_channels=9, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1),
                                 dilation=(2, 1), groups=3, bias=True),
    "same_padding": dict(in_channels=5, out_channels=7, kernel_size=3, padding="same", bias=False),
    "pointwise": dict(in_channels=5, out_channels=3, kernel_size=1),
}  # fmt: skip


def _public_attributes(conv: nn.Conv2d) -> list[str]:
    """nn.Conv2d's public instance attributes, parameters included (its hyperparameters, weight and bias)."""
    names = {name for name in vars(conv) if not name.startswith("_")} | set(conv._parameters)
    return sorted(names - {"training"})


def _replacement(conv: nn.Conv2d, insert_norm: bool) -> nn.Module:
    """What convert puts in place of `conv` when its output feeds a ReLU (kept unless insert_norm) or a norm."""
    after = nn.ReLU() if insert_norm else nn.BatchNorm2d(conv.out_channels, dtype=conv.weight.dtype)
    converted = convert(nn.Sequential(conv, after), keep_first=False, keep_last=False, insert_norm=insert_norm)
    return converted[0]


@pytest.mark.parametrize("insert_norm", [False, True], ids=["adder", "adder_with_norm"])
@pytest.mark.parametrize("spec", list(CONVS.values()), ids=list(CONVS))
def test_replacement_answers_every_public_attribute_of_the_convolution(spec, insert_norm):
    conv = nn.Conv2d(**spec, dtype=torch.float64)
    replacement = _replacement(conv, insert_norm)
    assert isinstance(replacement, Adder2dWithNorm if insert_norm else Adder2d)
    attributes = _public_attributes(conv)
    assert {"weight", "bias", "in_channels", "out_channels", "kernel_size", "padding", "groups"} <= set(attributes)
    for name in attributes:
        expected, got = getattr(conv, name), getattr(replacement, name)
        if isinstance(expected, torch.Tensor):
            assert (got.shape, got.dtype, got.device, got.requires_grad) == (
                expected.shape, expected.dtype, expected.device, expected.requires_grad
            ), name  # fmt: skip
        else:
            assert got == expected, name
    if insert_norm:
        assert replacement.weight is replacement[0].weight
        with pytest.raises(AttributeError, match="no_such_attribute"):
            replacement.no_such_attribute  # noqa: B018 - a missing name still raises


@pytest.mark.parametrize("spec", list(CONVS.values()), ids=list(CONVS))
def test_quantized_layer_answers_every_public_attribute_of_the_convolution(spec):
    conv = nn.Conv2d(**spec)
    adder = _replacement(conv, insert_norm=False)
    quantized = quantize(nn.Sequential(adder), [torch.randn(2, conv.in_channels, 7, 7)])[0]
    for name in _public_attributes(conv):
        expected, got = getattr(conv, name), getattr(quantized, name)
        if name == "bias":  # float64, and present whenever weights were clamped: their amount is folded into it
            assert expected is None or got.shape == expected.shape
        elif isinstance(expected, torch.Tensor):
            assert (got.shape, got.dtype, got.device) == (expected.shape, expected.dtype, expected.device), name
        else:
            assert got == expected, name


class ReadsItsProjection(nn.Module):
    """EdgeNeXt's pattern: the forward reads the projection convolution's weight dtype and channel count."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x).to(self.proj.weight.dtype)
        x = torch.relu(self.proj(x))
        return self.head(x.mean((2, 3)).reshape(-1, self.proj.out_channels))


def test_model_reading_a_converted_convolution_runs_and_learns_with_insert_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 7)
    model = convert(ReadsItsProjection(), keep_first=True, keep_last=False, insert_norm=True)
    assert isinstance(model.proj, Adder2dWithNorm)
    model(x).sum().backward()
    assert model.proj[0].weight.grad.abs().sum() > 0
    assert torch.equal(torch.compile(model, backend="eager")(x), model(x))  # dynamo traces the attribute lookups


def test_adder_with_norm_keeps_sequential_checkpoints_and_pickles():
    torch.manual_seed(0)
    model = convert(ReadsItsProjection(), keep_last=False, insert_norm=True)
    # A checkpoint saved when the replacement was a plain nn.Sequential(adder, norm) loads strictly.
    plain = copy.deepcopy(model)
    plain.proj = nn.Sequential(*model.proj)
    assert plain.state_dict().keys() == model.state_dict().keys()
    assert {"proj.0.weight", "proj.1.running_mean"} <= model.state_dict().keys()
    fresh = convert(ReadsItsProjection(), keep_last=False, insert_norm=True)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(fresh.proj.weight, model.proj.weight)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # pickling and deepcopy rebuild the module before _modules exists
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 5, 5)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x)) and torch.equal(copy.deepcopy(model)(x), model(x))


def test_quantize_folds_the_inserted_norm_and_the_quantized_layer_answers_too():
    torch.manual_seed(0)
    model = convert(ReadsItsProjection(), keep_last=False, insert_norm=True)
    x = torch.randn(4, 3, 6, 6)
    model.train()(x)  # running statistics that are not the identity
    model.eval()
    folded, unfolded = quantize(model, [x]), quantize(model, [x], fold_batchnorm=False)
    assert isinstance(folded.proj, Adder2dWithNorm) and isinstance(folded.proj[1], nn.Identity)
    assert isinstance(unfolded.proj[1], nn.BatchNorm2d)
    layer = folded.proj[0]
    assert folded.proj.weight.dtype == torch.float32 and folded.proj.out_channels == 8
    torch.testing.assert_close(layer.weight.double(), layer.weight_q.double() * layer.scale, rtol=1e-7, atol=0)
    # Same integer sums; the norm applied in the float64 epilogue instead of after a float32 output: float32 rounding.
    torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-5, atol=1e-5)


class RepBlock(nn.Module):
    """A re-parameterisable block (MobileOne's pattern): conv + BN branches that `reparameterize` fuses into one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.fused = None

    def forward(self, x):
        return torch.relu(self.fused(x) if self.fused is not None else self.bn(self.conv(x)))

    def reparameterize(self):
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        self.fused = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 3, padding=1)
        self.fused.weight.data = self.conv.weight * scale[:, None, None, None]
        self.fused.bias.data = self.bn.bias - self.bn.running_mean * scale

    def fuse(self):
        self.reparameterize()
        return self


class RepNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = RepBlock(3), RepBlock(3), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))

    def reparameterize(self):
        for block in (self.stem, self.block):
            block.reparameterize()


def test_fusing_a_block_that_holds_adder_layers_is_refused_and_other_blocks_still_fuse():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    cnn = RepNet().eval()
    expected = cnn(x)
    RepNet.reparameterize(fused := copy.deepcopy(cnn))
    torch.testing.assert_close(fused(x), expected)  # the fusion is right for convolutions
    converted = convert(cnn)  # keep_first keeps stem.conv; block.conv becomes an adder layer
    assert isinstance(converted.block.conv, Adder2d) and type(converted.stem.conv) is nn.Conv2d
    refused = [(converted.block, "reparameterize"), (converted.block, "fuse"), (converted, "reparameterize")]
    for module, method in refused:
        with pytest.raises(RuntimeError, match=rf"RepBlock.{method}|RepNet.{method}") as error:
            getattr(module, method)()
        assert "block.conv" in str(error.value) and "adder" in str(error.value)
    converted.stem.reparameterize()  # no adder layer under it
    assert converted.stem.fused is not None
    for clone in (copy.deepcopy(converted), torch.load(_saved(converted), weights_only=False)):
        with pytest.raises(RuntimeError, match="adder"):
            clone.block.reparameterize()


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer
