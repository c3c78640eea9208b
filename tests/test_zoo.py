"""`convert` on real model zoos: torchvision's and timm's CNNs convert to models that learn (issue 26).

Runs where torchvision (and timm) import: the README's test command runs this file a second time in a venv
with torch 2.14.1, torchvision 0.29.1 and timm (see README, "Model-zoo tests"); in the main venv, whose CPU
torch has no matching torchvision, it is skipped. `benchmarks/zoo_trainability.py` runs the same check over
every torchvision classifier (results in `results/zoo/`); this file keeps the models that failed before the
consumer analysis, plus a ResNet and a MobileNetV2, within a CI budget.

Per model: every convolution is converted or kept with a reason; the layers kept for feeding an activation,
a gate or an addition are exactly the ones the warning names; each adder layer's output has its
convolution's shape; no adder layer is dead (all-zero weight gradient where the CNN's convolution has a
non-zero one); and the model fits one batch (`Trainability.learns`).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from tests.test_convert_consumers import assert_runs_compiled_and_under_bf16_autocast
from triton_adder import Adder2d, convert
from triton_adder.backends import use_backend
from triton_adder.backends.cpu import common
from triton_adder.models.trainability import check, fit_mode
from triton_adder.nn import Adder2dSame, Adder2dWithNorm

tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed (see README, Model-zoo tests)")
try:
    import timm
except ImportError:  # the torchvision tests still run
    timm = None

SIZE, BATCH = 64, 4
# (zoo, architecture, insert_norm, fit steps: 0 = decisions and dead layers only[, convert's weight_std]). Models
# whose default conversion keeps every unnormalised layer (SqueezeNet, AlexNet, VGG) are fitted with insert_norm=True
# too. MobileNetV3-Large and the GhostNets at the published N(0, 1) adder initialisation (weight_std=1) are chaotic
# (a small input change grows thousands of times through them, about ten times through their CNNs) and do not fit
# in 40 steps; at convert's default (templates 5 times as wide as a signed input) they do (results/zoo/README.md).
CASES = [
    ("torchvision", "squeezenet1_1", False, 0),
    ("torchvision", "squeezenet1_1", True, 40),
    ("torchvision", "alexnet", False, 0),
    ("torchvision", "alexnet", True, 40),
    ("torchvision", "mobilenet_v3_small", False, 40),
    ("torchvision", "mobilenet_v3_large", False, 40),
    ("torchvision", "efficientnet_b0", False, 40),
    ("torchvision", "regnet_y_400mf", False, 40),
    ("torchvision", "mobilenet_v2", False, 40),
    ("torchvision", "resnet18", False, 20),
    ("timm", "vgg11", False, 0),
    ("timm", "mobilenetv3_small_100", False, 40),
    ("timm", "ghostnet_100", False, 40),
    ("timm", "tf_efficientnet_b0", False, 40),
    ("timm", "convnext_atto", False, 40),
    ("timm", "regnety_002", False, 40),
    ("timm", "resnetv2_50x1_bit", False, 0),  # weight-standardised StdConv2d: kept, named in a warning
    # Its positional encoding reads its projection convolution's .weight, which insert_norm replaces.
    ("timm", "edgenext_xx_small", True, 40),
]


@pytest.fixture(autouse=True)
def eager_cpu_path(monkeypatch):
    # The chunked eager CPU path: compiling each layer shape of a model would take minutes on 2 cores.
    monkeypatch.setenv(common.COMPILE_ENV, "0")
    with use_backend("cpu"):
        yield


def build(zoo: str, arch: str) -> nn.Module:
    torch.manual_seed(0)
    if zoo == "torchvision":
        return tvm.get_model(arch, weights=None, num_classes=10)
    if timm is None:
        pytest.skip("timm is not installed")
    return timm.create_model(arch, pretrained=False, num_classes=10)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)), torch.arange(BATCH) % 10


def output_shapes(model: nn.Module, x: torch.Tensor, names) -> dict:
    shapes, handles = {}, []
    for name in names:
        hook = lambda module, args, out, name=name: shapes.__setitem__(name, tuple(out.shape))  # noqa: E731
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            fit_mode(model)(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def warned_layers(messages: list[str]) -> tuple[set[str], set[str]]:
    """The layers convert's two warnings name: (unnormalised ones, ones whose class has its own forward)."""
    unnormalised, own_forward = set(), set()
    for message in messages:
        if "reaches an activation, a gate or an addition" in message:  # "name (reached), name (reached)"
            listed = re.search(r"close the gate: (.*); pass insert_norm", message).group(1)
            unnormalised.update(re.findall(r"([\w.]+) \(", listed))
        elif "own forward or _conv_forward" in message:  # "module.Class: name, name; module.Class: name"
            for entry in re.search(r"reproduce \((.*)\); pass", message).group(1).split("; "):
                own_forward.update(entry.partition(": ")[2].split(", "))
    return unnormalised, own_forward


CASES = [case if len(case) == 5 else (*case, "auto") for case in CASES]


@pytest.mark.parametrize(
    "zoo, arch, insert_norm, steps, weight_std",
    CASES,
    ids=[f"{c[1]}{'-norm' * c[2]}{f'-std{c[4]}' * (c[4] != 'auto')}" for c in CASES],
)
def test_converted_zoo_model_keeps_shapes_names_kept_layers_and_learns(zoo, arch, insert_norm, steps, weight_std):
    cnn = build(zoo, arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adder, decisions = convert(cnn, report=True, insert_norm=insert_norm, weight_std=weight_std)
    messages = [str(w.message) for w in caught]
    # A model fx cannot trace (timm's VGG: control flow on shapes) is analysed by running it on a guessed input.
    assert not any("skipped the consumer analysis" in m for m in messages), messages
    assert not any('weight_std="auto") could not run' in m for m in messages), messages

    convs = [name for name, m in cnn.named_modules(remove_duplicate=False) if isinstance(m, nn.Conv2d)]
    assert [d.name for d in decisions] == convs
    assert all(d.reason for d in decisions)
    unnormalised = {d.name for d in decisions if d.decision == "kept" and d.reason.startswith("output reaches")}
    own_forward = {d.name for d in decisions if d.decision == "kept" and "own forward" in d.reason}
    assert warned_layers(messages) == (unnormalised, own_forward)
    converted = {d.name for d in decisions if d.decision != "kept"}
    for d in decisions:  # each name now holds what its decision says, the adder class matching the conv's padding
        layer, conv = adder.get_submodule(d.name), cnn.get_submodule(d.name)
        if d.decision == "kept":
            assert type(layer) is type(conv), d
            continue
        assert d.weight_std > 0 and (weight_std == "auto" or d.weight_std == weight_std), d
        if d.decision == "converted_with_norm":
            assert isinstance(layer, Adder2dWithNorm) and isinstance(layer[1], nn.BatchNorm2d), d
            layer = layer[0]
        # timm's TF-style "same" convolution pads from the input size at run time, as Adder2dSame does
        assert isinstance(layer, Adder2d) and isinstance(layer, Adder2dSame) == (type(conv).__name__ == "Conv2dSame"), d
    assert sum(isinstance(m, Adder2d) for m in adder.modules()) == len(converted)
    if insert_norm:
        assert not unnormalised and converted, "insert_norm converts every unnormalised layer"

    x, y = batch()
    if converted:
        names = sorted(converted)
        adder_names = [n + ".0" if isinstance(adder.get_submodule(n), nn.Sequential) else n for n in names]
        expected = output_shapes(cnn, x, names)
        got = output_shapes(adder, x, adder_names)
        assert [got[n] for n in adder_names] == [expected[n] for n in names]
    result = check(cnn, adder, (x, y), steps=max(steps, 1))
    assert result.dead == [], result.dead
    if steps:
        assert result.adders > 0 and result.learns(), result.losses


@pytest.mark.parametrize("zoo, arch", [("torchvision", "mobilenet_v3_small"), ("timm", "convnext_atto")])
def test_converted_zoo_model_runs_under_torch_compile_and_bf16_autocast(zoo, arch):
    assert_runs_compiled_and_under_bf16_autocast(fit_mode(convert(build(zoo, arch))), batch()[0][:2, :, :32, :32])


@pytest.mark.parametrize("arch", ["mobileone_s0", "fastvit_t8", "repvgg_a0"])
def test_reparameterising_a_converted_timm_model_is_refused(arch):
    """timm's `reparameterize_model` would fold adder templates into convolution kernels: a model that computes
    something else, silently (tests/test_convert_attributes.py has the torch-only case)."""
    from timm.utils.model import reparameterize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kept layers are named in warnings; not the subject here
        adder = convert(build("timm", arch))
    with pytest.raises(RuntimeError, match="an adder template is not a kernel"):
        reparameterize_model(adder)
