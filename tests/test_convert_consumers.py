"""`convert` decides per convolution from what consumes its output (issue 26), and `trainability.check` shows it.

Hand-written miniatures of the torchvision/timm patterns that left converted networks untrainable: SqueezeNet's
fire module and AlexNet (conv -> ReLU), MobileNetV3's squeeze-excitation (1x1 convs on a 1x1 map, Hardsigmoid gate),
a ResNet basic block, a ConvNeXt block (conv -> permute -> LayerNorm) and a classifier conv on a pooled map.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from triton_adder import Adder2d, convert
from triton_adder.backends import use_backend
from triton_adder.backends.cpu import common
from triton_adder.models.convert import auto_weight_std
from triton_adder.models.trainability import check, fit_mode, perturbation_gain

CLASSES = 4


@pytest.fixture(autouse=True)
def eager_cpu_path(monkeypatch):
    # The chunked eager CPU path: compiling each tiny layer shape would dominate these tests.
    monkeypatch.setenv(common.COMPILE_ENV, "0")
    with use_backend("cpu"):
        yield


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze, self.squeeze_act = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_act = nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_act = nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_act(self.squeeze(x))
        return torch.cat([self.expand1x1_act(self.expand1x1(x)), self.expand3x3_act(self.expand3x3(x))], 1)


class TinySqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
            Fire(8, 4, 4), Fire(8, 4, 4),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Dropout(0.0), nn.Conv2d(8, CLASSES, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def tiny_alexnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    )  # fmt: skip


class SqueezeExcitation(nn.Module):
    """torchvision's: fully connected layers written as 1x1 convolutions on the pooled 1x1 map."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.activation = nn.Conv2d(channels, squeeze, 1), nn.ReLU()
        self.fc2, self.scale_activation = nn.Conv2d(squeeze, channels, 1), nn.Hardsigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


def conv_bn_act(cin, cout, kernel=1, groups=1, stride=1, act=nn.Hardswish):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class InvertedResidual(nn.Module):
    def __init__(self, channels, expanded):
        super().__init__()
        self.block = nn.Sequential(
            conv_bn_act(channels, expanded),
            conv_bn_act(expanded, expanded, 3, groups=expanded),
            SqueezeExcitation(expanded, 8),
            conv_bn_act(expanded, channels, act=None),
        )

    def forward(self, x):
        return x + self.block(x)


class TinyMobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, stride=2), InvertedResidual(8, 16), InvertedResidual(8, 16), conv_bn_act(8, 16)
        )
        self.avgpool, self.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.downsample(x)
        return self.relu(out)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.act = nn.LayerNorm(dim), nn.GELU()
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class PooledHead(nn.Module):
    """Conv features, global pooling, then a 1x1 convolution as the classifier (a fully connected layer)."""

    def __init__(self, stem=None):
        super().__init__()
        self.stem = stem or conv_bn_act(3, 8, 3, act=nn.ReLU)
        self.body = nn.Sequential(BasicBlock(8, 8, 2), ConvNeXtBlock(8))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, CLASSES, 1)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x)))).flatten(1)


class Untraceable(PooledHead):
    """Data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x):
        if x.sum() > -1e30:
            x = x * 1.0
        return super().forward(x)


def _decisions(model, **kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        converted, report = convert(model, report=True, **kwargs)
    return converted, {r.name: (r.decision, r.reason) for r in report}, [str(w.message) for w in record]


def _batch(seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, size, size, generator=g), torch.arange(8) % CLASSES


X = _batch()[0]
ANALYSES = pytest.mark.parametrize("example_input", [None, X], ids=["fx", "example_input"])


@ANALYSES
def test_squeezenet_fire_convs_feed_relu_and_are_kept_with_one_warning(example_input):
    converted, decisions, messages = _decisions(TinySqueezeNet(), example_input=example_input)
    fire = [f"features.{i}.{c}" for i in (3, 4) for c in ("squeeze", "expand1x1", "expand3x3")]
    assert decisions["features.0"] == ("kept", "keep_first") and decisions["classifier.1"] == ("kept", "keep_last")
    kept = ("kept", "output reaches ReLU without a normalisation")
    assert {name: decisions[name] for name in fire} == dict.fromkeys(fire, kept)
    assert not any(isinstance(m, Adder2d) for m in converted.modules())
    assert len(messages) == 1 and "insert_norm=True" in messages[0] and all(f"{n} (ReLU)" in messages[0] for n in fire)


@ANALYSES
def test_alexnet_convs_before_relu_are_kept_and_insert_norm_converts_them_with_batchnorm(example_input):
    _, decisions, messages = _decisions(tiny_alexnet(), example_input=example_input)
    assert decisions["3"] == ("kept", "output reaches ReLU without a normalisation") and len(messages) == 1
    converted, decisions, messages = _decisions(tiny_alexnet(), example_input=example_input, insert_norm=True)
    assert messages == [] and decisions["3"][0] == "converted_with_norm" and decisions["6"][0] == "kept"
    layer = converted[3]
    assert isinstance(layer, nn.Sequential) and isinstance(layer[0], Adder2d) and isinstance(layer[1], nn.BatchNorm2d)
    assert converted(X).shape == (8, CLASSES)


@ANALYSES
def test_mobilenet_se_convs_are_fully_connected_and_kept_the_rest_converted(example_input):
    converted, decisions, messages = _decisions(TinyMobileNetV3(), example_input=example_input)
    assert messages == []
    for block in ("features.1.block", "features.2.block"):
        assert decisions[f"{block}.0.0"] == ("converted", "followed by BatchNorm2d")
        assert decisions[f"{block}.1.0"] == ("converted", "followed by BatchNorm2d")
        assert decisions[f"{block}.3.0"] == ("converted", "followed by BatchNorm2d")
        for fc in ("fc1", "fc2"):
            assert decisions[f"{block}.2.{fc}"] == ("kept", "fully connected (its input is 1x1 spatially)")
            assert type(converted.get_submodule(f"{block}.2.{fc}")) is nn.Conv2d


@ANALYSES
def test_resnet_convnext_and_pooled_head_decisions(example_input):
    converted, decisions, messages = _decisions(PooledHead(), example_input=example_input, keep_last=False)
    assert messages == []
    assert decisions == {
        "stem.0": ("kept", "keep_first"),
        "body.0.conv1": ("converted", "followed by BatchNorm2d"),
        "body.0.conv2": ("converted", "followed by BatchNorm2d"),
        "body.0.downsample.0": ("converted", "followed by BatchNorm2d"),
        "body.1.dwconv": ("converted", "followed by LayerNorm"),  # through the permute
        "head": ("kept", "fully connected (its input is 1x1 spatially)"),
    }
    assert isinstance(converted.body[1].dwconv, Adder2d)


class GateAndPreActivation(nn.Module):
    """Spatial attention (conv -> sigmoid -> multiply) and a pre-activation residual (conv -> add, no norm)."""

    def __init__(self):
        super().__init__()
        self.stem, self.attention = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.bn, self.residual, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x * torch.sigmoid(self.attention(x))
        return self.head(x + self.residual(torch.relu(self.bn(x))))


@ANALYSES
def test_gate_and_addition_without_norm_are_kept(example_input):
    _, decisions, messages = _decisions(GateAndPreActivation(), example_input=example_input)
    assert decisions["attention"] == ("kept", "output reaches sigmoid without a normalisation")
    assert decisions["residual"] == ("kept", "output reaches add without a normalisation")
    assert len(messages) == 1 and "attention (sigmoid), residual (add)" in messages[0]


class TimmSqueezeExcite(nn.Module):
    """timm's: a keepdim mean instead of a pooling module, SiLU, and a sigmoid gate through a tensor method."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv_reduce, self.conv_expand = nn.Conv2d(channels, 4, 1), nn.Conv2d(4, channels, 1)

    def forward(self, x):
        x_se = self.conv_expand(nn.functional.silu(self.conv_reduce(torch.mean(x, (2, 3), keepdim=True))))
        return x * x_se.sigmoid()


@ANALYSES
def test_timm_style_squeeze_excite_is_fully_connected(example_input):
    model = nn.Sequential(conv_bn_act(3, 8, 3), TimmSqueezeExcite(), conv_bn_act(8, 8, 3), TimmSqueezeExcite())
    _, decisions, messages = _decisions(model, example_input=example_input, keep_last=False)
    assert messages == [] and decisions["2.0"] == ("converted", "followed by BatchNorm2d")
    for name in ("1.conv_reduce", "1.conv_expand", "3.conv_reduce", "3.conv_expand"):
        assert decisions[name] == ("kept", "fully connected (its input is 1x1 spatially)"), name


def test_untraceable_model_is_run_on_a_guessed_input_with_one_warning_unless_given_one():
    converted, decisions, messages = _decisions(Untraceable(), keep_last=False)
    assert len(messages) == 1 and "torch.fx could not trace Untraceable" in messages[0]
    assert "running it on a random (2, 3, 224, 224) input" in messages[0]
    assert decisions["head"][0] == "kept" and decisions["body.1.dwconv"][0] == "converted"
    _, decisions, messages = _decisions(Untraceable(), keep_last=False, example_input=X)
    assert messages == [] and decisions["head"][0] == "kept" and decisions["body.1.dwconv"][0] == "converted"


class UntraceableOnTokens(nn.Module):
    """Neither traceable (control flow) nor runnable on an image batch: it takes (N, L) token ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv, self.act = nn.Embedding(10, 4), nn.Conv2d(4, 4, 1), nn.ReLU()

    def forward(self, tokens):
        if tokens.sum() < 0:
            tokens = -tokens
        x = self.embed(tokens).permute(0, 2, 1)[..., None]
        return self.act(self.conv(x))


def test_model_neither_traceable_nor_runnable_on_a_guess_is_converted_with_two_warnings():
    converted, decisions, messages = _decisions(UntraceableOnTokens(), keep_first=False, keep_last=False)
    assert len(messages) == 2 and all("example_input=" in m for m in messages)
    assert "could not trace" in messages[0] and "running it on random inputs failed ((2, 4, 224, 224)" in messages[0]
    assert 'weight_std="auto") could not run' in messages[1] and "N(0, 1)" in messages[1]
    assert converted.conv.weight.std().item() == pytest.approx(1.0, rel=0.5)  # 16 draws of N(0, 1)
    assert decisions["conv"] == ("converted", "consumer analysis skipped") and isinstance(converted.conv, Adder2d)
    tokens = torch.tensor([[1, 2, 3]])
    _, decisions, messages = _decisions(UntraceableOnTokens(), keep_first=False, keep_last=False, example_input=tokens)
    assert decisions["conv"] == ("kept", "output reaches ReLU without a normalisation")
    assert len(messages) == 1 and "conv (ReLU)" in messages[0]


def test_default_return_is_the_model_and_analyse_false_is_the_old_behaviour():
    assert isinstance(convert(TinyMobileNetV3()), TinyMobileNetV3)
    _, decisions, messages = _decisions(TinySqueezeNet(), analyse=False)
    assert messages == [] and decisions["features.3.squeeze"] == ("converted", "consumer analysis off (analyse=False)")


@pytest.mark.parametrize(
    "build, kwargs", [(TinySqueezeNet, {"insert_norm": True}), (TinyMobileNetV3, {})], ids=["squeezenet", "mobilenet"]
)
def test_converted_model_learns_and_forcing_every_conv_leaves_dead_layers(build, kwargs):
    torch.manual_seed(0)
    cnn, batch = build(), _batch()
    result = check(cnn, convert(cnn, **kwargs), batch, steps=30, lr=0.05)  # a larger step than the default suits these
    assert result.adders > 0 and result.dead == [], result
    assert result.learns(), result.losses
    forced = check(cnn, convert(cnn, analyse=False), batch, steps=5)
    assert forced.dead, forced  # fire convs before ReLU; the SE's first fc before ReLU and the layers it gates
    assert not forced.learns()


class LinearBottleneck(nn.Module):
    """MobileNetV2/V3's inverted residual without the depthwise conv: 1x1 expand, BN, Hardswish, 1x1 project, BN, +x.

    The residual stream is BatchNorm output with no activation, so it is wide (std above 1) next to N(0, 1) adder
    templates: each adder layer folds it (|x - w| with w inside the inputs' spread)."""

    def __init__(self, channels: int, expanded: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip

    def forward(self, x):
        return x + self.body(x)


def deep_bottleneck_net(depth: int = 16, channels: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        *[LinearBottleneck(channels, 3 * channels) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    )  # fmt: skip


def test_perturbation_gain_is_one_for_a_linear_map_and_the_relative_change_otherwise():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert perturbation_gain(nn.Identity(), x) == pytest.approx(1.0, rel=1e-3)
    scale = nn.Conv2d(3, 3, 1, bias=False)
    nn.init.dirac_(scale.weight)
    with torch.no_grad():
        scale.weight.mul_(7.0)  # a scaled identity: the relative change is the input's
    assert perturbation_gain(scale, x) == pytest.approx(1.0, rel=1e-3)
    # x -> x^2 (elementwise): the relative change is computed here by hand from the same perturbation
    square = nn.Sequential()
    square.forward = lambda t: t * t
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    delta = 1e-4 * x.pow(2).mean().sqrt() * noise
    expected = (((x + delta) ** 2 - x**2).norm() / (x**2).norm() / (delta.norm() / x.norm())).item()
    assert perturbation_gain(square, x) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("wider", [3.0, "auto"])
def test_deep_converted_bottleneck_is_chaotic_at_the_published_init_and_learns_with_wider_templates(wider):
    """The class of MobileNetV3-Large's slow fit (results/zoo/README.md): 32 adder layers in series on a wide
    residual stream amplify a small input change hundreds of times more than the CNN does at N(0, 1), and the
    short fit stalls; N(0, 3^2) templates, or convert's default (5 times a signed input's spread), keep it near
    the CNN's gain and the batch is fitted."""
    torch.manual_seed(0)
    cnn = deep_bottleneck_net()
    x, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    torch.manual_seed(0)
    published = convert(cnn, weight_std=1.0)
    torch.manual_seed(0)
    wide, decisions = convert(cnn, weight_std=wider, report=True)
    stds = {d.name: d.weight_std for d in decisions}
    for name, module in published.named_modules():  # the same draw, scaled
        if isinstance(module, Adder2d):
            expected = module.weight * stds[name]
            torch.testing.assert_close(wide.get_submodule(name).weight, expected, rtol=0, atol=0)
    cnn_gain = perturbation_gain(fit_mode(cnn), x)
    assert cnn_gain < 3
    assert perturbation_gain(fit_mode(published), x) > 100 * cnn_gain
    assert perturbation_gain(fit_mode(wide), x) < 10 * cnn_gain
    slow, fits = check(cnn, published, (x, y)), check(cnn, wide, (x, y))
    assert slow.dead == [] and fits.dead == []
    assert fits.gain == pytest.approx(perturbation_gain(fit_mode(wide), x)) and fits.cnn_gain == pytest.approx(cnn_gain)
    assert fits.learns() and fits.loss_best < 0.1 * fits.loss_start, fits.losses
    assert slow.loss_best > 0.3 * slow.loss_start, slow.losses  # no dead layer, but a fraction of the fit


@pytest.mark.parametrize("weight_std", [0, -1.0, float("nan"), float("inf"), True, "3"])
def test_weight_std_must_be_a_positive_finite_number(weight_std):
    with pytest.raises(ValueError, match="weight_std"):
        convert(TinyMobileNetV3(), weight_std=weight_std)


def test_weight_std_sets_the_spread_of_new_weights_and_is_refused_with_copy_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64))
    converted, decisions = convert(model, keep_first=False, keep_last=False, weight_std=2.5, report=True)
    weight = converted[0].weight
    assert isinstance(converted[0], Adder2d) and weight.std().item() == pytest.approx(2.5, rel=0.02)
    assert abs(weight.mean().item()) < 0.05 and decisions[0].weight_std == 2.5
    with pytest.raises(ValueError, match="copy_weights"):
        convert(TinyMobileNetV3(), copy_weights=True, weight_std=2.0)
    for weight_std in (1.0, "auto"):  # the default does not stop copy_weights: the copied weights are kept
        copied, decisions = convert(
            model, keep_first=False, keep_last=False, copy_weights=True, report=True, weight_std=weight_std
        )
        assert torch.equal(copied[0].weight, model[0].weight) and decisions[0].weight_std is None


def _input_statistics_float64(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Each convolution's input (standard deviation, smallest value) in a training-mode float64 pass (the
    independent reference)."""
    model = copy.deepcopy(model).double().train()
    statistics = {}

    def record(name, args):  # returns None: a pre-hook's return would replace the input
        statistics.setdefault(name, (args[0].std().item(), args[0].min().item()))

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args, name=name: record(name, args))
    with torch.no_grad():
        model(x.double())
    return statistics


class FixedHead(nn.Module):
    """A CIFAR-style net whose linear head takes 32 x 32 inputs only, with dropout (a random draw in training).
    body.0 reads the (signed) image, body.4 a ReLU's output (never negative), body.6 a BatchNorm's (signed)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def test_auto_weight_std_rule():
    assert auto_weight_std(0.7, 0.0) == 1.0 and auto_weight_std(3.0, 2.0) == 1.0  # never negative: published
    assert auto_weight_std(0.7, -1e-3) == pytest.approx(5 * 0.7) and auto_weight_std(2.0, -5.0) == pytest.approx(10)


def test_auto_weight_std_follows_each_layers_input_on_the_first_guess_that_runs():
    torch.manual_seed(0)
    cnn = FixedHead().eval()
    guess = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 224 x 224 does not run
    expected = _input_statistics_float64(cnn, guess)  # Dropout draws differ: only what follows it moves
    before = copy.deepcopy(cnn.state_dict())
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the 32 x 32 guess ran
        converted, decisions = convert(cnn, keep_first=False, keep_last=False, report=True)
    after_convert = torch.get_rng_state()
    torch.manual_seed(1)
    convert(cnn, keep_first=False, keep_last=False, weight_std=1.0)
    assert torch.equal(after_convert, torch.get_rng_state())  # the measuring pass drew nothing from the global RNG
    for name, value in before.items():  # running statistics untouched, the CNN's and the copy's
        assert torch.equal(cnn.state_dict()[name], value), name
    stds = {d.name: d.weight_std for d in decisions}
    assert expected["body.0"][1] < 0 and stds["body.0"] == pytest.approx(5 * expected["body.0"][0], rel=1e-6)
    assert expected["body.4"][1] == 0 and stds["body.4"] == 1.0  # after ReLU and dropout: the published N(0, 1)
    # after the dropout, whose draw differs: its mask moves the spread of 8192 values by a few percent
    assert expected["body.6"][1] < 0 and stds["body.6"] == pytest.approx(5 * expected["body.6"][0], rel=0.05)
    for name, std in stds.items():
        weight = converted.get_submodule(name).weight
        assert weight.std().item() == pytest.approx(std, rel=0.15), name  # >= 432 draws: sample std within 15%
    assert not any(m.training for m in [*cnn.modules(), *converted.modules()])  # modes restored (eval)


def test_auto_weight_std_uses_example_input_and_warns_when_nothing_runs():
    torch.manual_seed(0)
    cnn = FixedHead()
    x = 3.0 * torch.randn(4, 3, 32, 32)
    _, decisions = convert(cnn, keep_first=False, keep_last=False, report=True, example_input=x)
    assert decisions[0].weight_std == pytest.approx(5 * _input_statistics_float64(cnn, x)["body.0"][0], rel=1e-6)
    with pytest.warns(UserWarning, match=r'weight_std="auto"\) could not run FixedHead.*example_input: RuntimeError'):
        _, decisions = convert(cnn, report=True, example_input=torch.randn(4, 3, 16, 16), analyse=False)
    assert [d.weight_std for d in decisions if d.decision != "kept"] == [1.0]


def assert_runs_compiled_and_under_bf16_autocast(model: nn.Module, x: torch.Tensor) -> None:
    """torch.compile (fullgraph, aot_eager) gives the eager output; bf16 autocast stays finite; every adder learns."""
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # dynamo + AOT autograd, no C++ build
    got = compiled(x)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    adders = [m for m in model.modules() if isinstance(m, Adder2d)]
    assert adders and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in adders)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(torch.isfinite(m.weight.grad).all() and m.weight.grad.abs().sum() > 0 for m in adders)


def test_converted_model_runs_under_torch_compile_and_bf16_autocast():
    torch.manual_seed(0)
    assert_runs_compiled_and_under_bf16_autocast(convert(TinyMobileNetV3()), X[:2, :, :8, :8])
