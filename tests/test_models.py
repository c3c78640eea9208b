"""Models: published topology, convert(), published-checkpoint loading."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

from triton_adder import Adder2d
from triton_adder.geometry import Conv2dGeometry
from triton_adder.models import MODELS, build, convert, from_published_state_dict, load_published
from triton_adder.reference import adder2d_forward

# name -> (adder layers, blocks' 3x3/1x1 layers + downsample shortcuts), counted from the papers:
# ResNet-20 = 18 block layers + 2 shortcuts; ResNet-32 = 30 + 2; ResNet-18 = 16 + 3;
# ResNet-50 = 48 + 4; LeNet-5-BN = C3, C5, F6.
EXPECTED_ADDER_LAYERS = {"lenet5bn": 3, "resnet20": 20, "resnet32": 32, "resnet18": 19, "resnet50": 52}


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    # These tests check model wiring on tiny inputs; the CPU path's eager mode skips its per-shape
    # compilation (seconds per shape) and computes the same numbers.
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """name -> "adder" / "conv" for every adder layer and convolution of `model`."""
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Adder2d):
            kinds[name] = "adder"
        elif isinstance(module, nn.Conv2d):
            kinds[name] = "conv"
    return kinds


def modules_in_call_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if not m._modules]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return order


@pytest.mark.parametrize("name", sorted(MODELS))
def test_published_topology(name):
    adder_net, cnn = build(name, adder=True), build(name, adder=False)
    kinds = layer_kinds(adder_net)
    assert [n for n, k in kinds.items() if k == "conv"] == ["conv1", "fc"]
    assert sum(k == "adder" for k in kinds.values()) == EXPECTED_ADDER_LAYERS[name]
    assert set(layer_kinds(cnn).values()) == {"conv"}
    assert list(layer_kinds(cnn)) == list(kinds)
    # Same parameter names and shapes: only the layer type differs.
    assert {k: v.shape for k, v in cnn.state_dict().items()} == {k: v.shape for k, v in adder_net.state_dict().items()}
    shortcuts = [n for n in kinds if n.endswith("downsample.0")]
    assert all(kinds[n] == "adder" for n in shortcuts)
    assert all(adder_net.get_submodule(n).kernel_size == (1, 1) for n in shortcuts)


@pytest.mark.parametrize("name", ["lenet5bn", "resnet20", "resnet18", "resnet50"])
def test_batchnorm_follows_every_layer(name):
    """In call order (CNN variant: cheap), every convolution is immediately followed by a BatchNorm."""
    model = build(name, adder=False, num_classes=7)
    size = 28 if name == "lenet5bn" else 32
    x = torch.randn(2, model.conv1.in_channels, size, size)
    order = modules_in_call_order(model, x)
    convs = [i for i, m in enumerate(order) if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(order[i + 1], nn.BatchNorm2d) for i in convs)
    last_bn = model.bn5 if name == "lenet5bn" else model.bn2
    assert order[convs[-1]] is model.fc and order[-1] is last_bn
    assert model(x).shape == (2, 7)


def test_adder_models_forward_and_backward():
    x = torch.randn(3, 1, 28, 28)
    model = build("lenet5bn", adder=True, num_classes=10)
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    resnet = build("resnet20", adder=True, num_classes=5)
    assert resnet(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_build_rejects_unknown_name_and_grad_mode():
    with pytest.raises(ValueError, match="name must be one of"):
        build("vgg16")
    with pytest.raises(ValueError, match="grad_mode"):
        build("resnet20", grad_mode="sign")


def test_grad_mode_reaches_every_adder_layer():
    model = build("resnet20", grad_mode="exact")
    assert {m.grad_mode for m in model.modules() if isinstance(m, Adder2d)} == {"exact"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_cnn_gives_the_published_adder_topology(name):
    cnn = build(name, adder=False)
    converted = convert(cnn)
    assert layer_kinds(converted) == layer_kinds(build(name, adder=True))
    assert set(layer_kinds(cnn).values()) == {"conv"}, "convert must not modify its input by default"


class Torchvisionish(nn.Module):
    """A module tree shaped like torchvision's ResNet: conv stem, blocks in Sequentials, Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.features = nn.Sequential(
            nn.Conv2d(8, 12, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1, bias=True),
            nn.BatchNorm2d(12),
            nn.Sequential(nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3, bias=False), nn.BatchNorm2d(12)),
            nn.Conv2d(12, 6, 1),
        )
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(self.conv1(x)).mean((2, 3)))


def test_convert_keeps_hyperparameters_and_weight_shapes():
    model = Torchvisionish().double()
    converted = convert(model, keep_last=False, copy_weights=True)
    assert isinstance(converted.conv1, nn.Conv2d) and isinstance(converted.head, nn.Linear)
    for name in ("features.0", "features.2.0", "features.3"):
        conv, adder = model.get_submodule(name), converted.get_submodule(name)
        assert isinstance(adder, Adder2d)
        for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            assert getattr(adder, attribute) == getattr(conv, attribute), attribute
        assert adder.weight.shape == conv.weight.shape and adder.weight.dtype == torch.float64
        assert torch.equal(adder.weight, conv.weight)
        assert (adder.bias is None) == (conv.bias is None)
        if conv.bias is not None:
            assert torch.equal(adder.bias, conv.bias)
    # The converted layer computes the adder of its (copied) weights: compare one with the reference.
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    layer, conv = converted.features[0], model.features[0]
    geom = Conv2dGeometry((2, 1), (1, 0), (1, 1), 1, (4, 5))
    torch.testing.assert_close(layer(x), adder2d_forward(x, conv.weight, conv.bias, geom))
    assert converted(torch.randn(2, 3, 9, 9, dtype=torch.float64)).shape == (2, 4)


def test_convert_options():
    model = Torchvisionish()
    default = layer_kinds(convert(model))
    assert default == {"conv1": "conv", "features.0": "adder", "features.2.0": "adder", "features.3": "conv"}
    everything = layer_kinds(convert(model, keep_first=False, keep_last=False))
    assert set(everything.values()) == {"adder"}
    excluded = layer_kinds(convert(model, exclude=["features.2.0"]))
    assert excluded["features.2.0"] == "conv" and excluded["features.0"] == "adder"
    fresh = convert(model, keep_last=False, grad_mode="exact")
    assert fresh.features[3].grad_mode == "exact"
    assert not torch.equal(fresh.features[3].weight, model.features[3].weight), "default: adder initialisation"
    same = convert(model, inplace=True)
    assert same is model and isinstance(model.features[0], Adder2d)


def test_convert_shared_convolution_stays_shared():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, shared, nn.Conv2d(4, 2, 1))
    converted = convert(model)
    assert isinstance(converted[1], Adder2d) and converted[1] is converted[2]


def test_convert_errors_name_the_problem():
    with pytest.raises(ValueError, match="exclude names modules that are not nn.Conv2d.*'nope'"):
        convert(Torchvisionish(), exclude=["nope"])
    with pytest.raises(TypeError, match="exclude must be an iterable"):
        convert(Torchvisionish(), exclude="features.0")
    reflect = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 1)
    )
    with pytest.raises(ValueError, match="'1' has padding_mode='reflect'"):
        convert(reflect)
    assert isinstance(convert(reflect, exclude=["1"])[1], nn.Conv2d)
    with pytest.raises(ValueError, match="grad_mode"):
        convert(reflect, grad_mode="hard")
    assert isinstance(convert(nn.Conv2d(1, 1, 1), keep_first=False, keep_last=False), Adder2d)


def published_format(state_dict: dict, adder_names: set[str], data_parallel: bool = True) -> collections.OrderedDict:
    """`state_dict` rewritten the way the published code saves it (written independently of the loader)."""
    published = collections.OrderedDict()
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module in adder_names:
            leaf = {"weight": "adder", "bias": "b"}[leaf]
        published[("module." if data_parallel else "") + f"{module}.{leaf}"] = value
    return published


class PublishedAdder(nn.Module):
    """The published adder layer's interface: parameter `adder`, optional `b`, bool `bias` flag."""

    def __init__(self, layer: Adder2d):
        super().__init__()
        self.geometry = (layer.stride, layer.padding)
        self.adder = nn.Parameter(torch.empty_like(layer.weight))
        self.bias = layer.bias is not None
        if self.bias:
            self.b = nn.Parameter(torch.empty_like(layer.bias))

    def forward(self, x):
        (stride, padding), (kh, kw) = self.geometry, self.adder.shape[2:]
        out = tuple((size + 2 * p - k) // s + 1 for size, p, k, s in zip(x.shape[2:], padding, (kh, kw), stride))
        geom = Conv2dGeometry(stride, padding, (1, 1), 1, out)
        return adder2d_forward(x, self.adder, self.b if self.bias else None, geom).to(x.dtype)


def as_published_model(model: nn.Module) -> nn.Module:
    """A copy of `model` whose adder layers are `PublishedAdder`s (the published module tree)."""
    published = copy.deepcopy(model)
    for name, module in list(published.named_modules()):
        if isinstance(module, Adder2d):
            parent, _, child = name.rpartition(".")
            published.get_submodule(parent).add_module(child, PublishedAdder(module))
    return published


def test_published_checkpoint_loads_and_computes_the_same():
    torch.manual_seed(0)
    ours = build("resnet20", adder=True, num_classes=10).double()
    published = as_published_model(ours)
    for tensor in published.state_dict().values():  # a "trained" checkpoint: every value distinct
        if tensor.is_floating_point():
            tensor.copy_(torch.randn_like(tensor) if tensor.dim() > 1 else torch.rand_like(tensor) + 0.5)
    # What the published scripts save: nn.DataParallel(model).state_dict(), keys prefixed "module.".
    checkpoint = nn.DataParallel(published).state_dict()
    assert "module.layer1.0.conv1.adder" in checkpoint and "module.layer2.0.downsample.0.adder" in checkpoint
    result = load_published(ours, checkpoint)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), published.eval()(x))


def test_published_checkpoint_file_with_bias(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 3, 1), Adder2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4))
    expected = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save(published_format(expected, {"1"}, data_parallel=False), path)
    load_published(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    renamed = from_published_state_dict({"module.1.adder": 1, "module.1.b": 2, "module.0.b": 3}, model)
    assert renamed == {"1.weight": 1, "1.bias": 2, "0.b": 3}, "only adder layers' `b` is renamed"


def test_published_checkpoint_mismatch_is_reported():
    model = build("resnet20", adder=True)
    checkpoint = published_format(model.state_dict(), set())  # adder layers NOT renamed to `adder`
    checkpoint["module.layer1.0.conv1.adder"] = checkpoint.pop("module.layer1.0.conv1.weight")
    checkpoint["module.layer1.0.conv1.b"] = torch.zeros(16)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*layer1.0.conv1.bias"):
        load_published(model, checkpoint)
    with pytest.raises(TypeError, match="checkpoint must be a path or a state dict"):
        load_published(model, [1, 2])


def test_bad_build_arguments_and_input_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="num_classes must be None or a positive int"):
        build("resnet20", num_classes=-1)
    with pytest.raises(ValueError, match="in_channels must be None or a positive int"):
        build("resnet20", in_channels=0)
    with pytest.raises(ValueError, match="adder must be True"):
        build("resnet20", adder="no")
    lenet = build("lenet5bn", adder=False).eval()
    assert lenet(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="needs 28x28 inputs"):
        lenet(torch.randn(2, 1, 32, 32))
