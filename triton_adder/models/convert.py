"""`convert`: turn the convolutions of any module tree into adder layers."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from triton_adder.contract import GRAD_MODES
from triton_adder.models import consumers
from triton_adder.nn import Adder2d, Adder2dSame, Adder2dWithNorm

TIMM_CONV2D_SAME = ("timm.layers.conv2d_same", "Conv2dSame")
"""timm's TF-style "same" convolution, matched by module and class name so timm is never imported here."""
AUTO_WEIGHT_STD_RATIO = 5.0
"""weight_std="auto": an adder layer whose input takes negative values gets weights N(0, (5 sigma)^2), sigma the
standard deviation of its input (`auto_weight_std`)."""
GUESSED_IMAGE_SIZES = ((224, 224), (32, 32), (28, 28))
"""H x W of the inputs `convert` tries, in order, on a model that names no input size: ImageNet's, CIFAR's, MNIST's."""


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What `convert(..., report=True)` did with one convolution (one record per name of a shared module)."""

    name: str
    decision: str  # "converted", "converted_with_norm" or "kept"
    reason: str
    weight_std: float | None = None  # the new adder weights' standard deviation (None: kept, or copy_weights)


def convert(
    model: nn.Module,
    *,
    keep_first: bool = True,
    keep_last: bool = True,
    exclude: Iterable[str] = (),
    copy_weights: bool = False,
    grad_mode: str = "paper",
    inplace: bool = False,
    mapping: Mapping[type, Callable[[nn.Conv2d], nn.Module]] | None = None,
    analyse: bool = True,
    example_input=None,
    insert_norm: bool = False,
    report: bool = False,
    weight_std: float | str = "auto",
):
    """Replace each `nn.Conv2d` of `model` by an `Adder2d` with the same hyperparameters.

    The adder layer gets the convolution's in/out channels, kernel size, stride, padding,
    dilation, groups, bias presence, device and dtype, so its weight has the same shape
    (Cout, Cin/groups, kh, kw). Works on any module tree (torchvision's ResNets included).

    keep_first / keep_last: leave the first / last `nn.Conv2d` in `model.named_modules()` order
    multiplicative, the AdderNet recipe (the first layer sees raw pixels; in our models the last
    convolution is the 1x1 classifier, so `convert(build(name, adder=False))` has the same
    topology as `build(name, adder=True)`). In a model whose classifier is an `nn.Linear`, such as
    torchvision's, the classifier is never converted and keep_last keeps its last convolution.
    exclude: qualified names (as in `named_modules()`) of further convolutions to keep.
    copy_weights: copy the convolution's weight and bias into the adder layer. Default False:
    the adder layer keeps its own initialisation (weights ~ N(0, 1)), because a convolution's
    weights, trained or Kaiming-initialised, are not useful adder templates.
    grad_mode: the adder layers' backward, "paper" or "exact" (see `triton_adder.adder2d`).
    inplace: modify `model` itself; by default a deep copy is converted and returned.
    mapping: {Conv2d subclass: factory}; factory(conv) returns the adder module that replaces a
    convolution of exactly that class (it handles copy_weights, grad_mode and weight_std itself).
    weight_std: the spread of the new adder weights. "auto" (the default): per layer, `auto_weight_std` of that
    convolution's input when the CNN runs once in training mode (batch statistics; running statistics, modes and
    the random state are restored) on example_input, or else on the guessed input described below: the published
    N(0, 1) for an input that is never negative (after a ReLU, as in the paper's networks), N(0, (5 sigma)^2) for
    one that takes negative values, sigma its standard deviation. A layer that pass does not reach keeps N(0, 1),
    and if the pass fails every layer does, with one warning. A number S: N(0, S^2) for every layer (1.0 is the
    published initialisation). Not allowed (other than 1.0) with copy_weights. `report=True` gives each layer's.

    Why "auto": an adder layer is -sum|x - w|. Where a template w lies inside the spread of its input x the output
    is folded (V-shaped in x), and the BatchNorm after it rescales the fold, so a small change of the input grows
    by up to 1/sqrt(1 - 2/pi) (about 1.66) per layer; dozens in series make the network chaotic and SGD barely
    fits. N(0, 1) templates against a post-ReLU input (values >= 0, sigma about 0.58 after BatchNorm) leave every
    negative template outside it: the paper's setting, and converted ResNets, ShuffleNets and MobileOnes fit at it.
    Against a signed input of sigma 1.4 to 3 (the linear-bottleneck residual streams of MobileNets, GhostNet's
    linear ghost modules) most N(0, 1) templates fold: torchvision's MobileNetV3-Large at N(0, 1) amplifies a small
    input change 4.2e3 times against 11.5 for its CNN (`trainability.perturbation_gain`) and does not fit a batch.
    Templates 5 sigma wide start such a layer nearly linear in its input (|x - w| = |w| - sign(w) x where
    |w| > |x|), and the converted zoo models fit (`results/zoo/README.md`). With grad_mode="exact" a template
    outside its inputs' range gets no gradient (the sign derivative is constant there and BatchNorm's backward sums
    to zero); the paper's gradient (x - w) still moves it.

    What happens to each kind of convolution:

    - `nn.Conv2d`, and subclasses that keep both `nn.Conv2d.forward` and `nn.Conv2d._conv_forward`
      (`type(m).forward is nn.Conv2d.forward`, likewise `_conv_forward`): replaced by an `Adder2d`
      with the same hyperparameters.
    - a class in `mapping`: replaced by `mapping[cls](conv)`.
    - timm's `Conv2dSame` (TF-style "same" padding computed from the input size at run time):
      replaced by `triton_adder.nn.Adder2dSame`, which pads the same way, unless `mapping` names it.
    - any other subclass with its own `forward` or `_conv_forward` (weight standardisation, custom
      padding, ...; `forward` calls `_conv_forward`, so overriding either changes the result): kept
      as it is, with one warning naming those layers and their classes, because an `Adder2d` would
      silently compute something else. Map the class to convert it, or exclude it to silence this.
    - shared modules (one convolution under several names): one adder layer under all the names.
    - padding_mode other than "zeros", or a lazy convolution not run yet: ValueError.
    - a block that can fold its convolutions and norms into one kernel (a method in FUSING_METHODS, as timm's
      `reparameterize_model` calls) and now holds an adder layer: that method raises a RuntimeError instead of
      building a block that would read adder templates as kernels.

    Where each convolution's output goes decides the rest (analyse=True, the default; see
    `triton_adder.models.consumers`). An adder layer's output ``bias - sum|x - w|`` is never positive with a zero
    bias, so an adder layer only learns when a normalisation recentres its output:

    - followed by a normalisation (BatchNorm, GroupNorm, LayerNorm, also after a reshape or permute as in
      ConvNeXt, timm's norm-act modules included): converted, as in the paper's networks.
    - fully connected, i.e. its input is 1x1 spatially (squeeze-excitation, classifier heads), and no
      normalisation after it: kept, as the paper keeps fully connected layers.
    - its output reaches an activation, a gate (sigmoid, multiply) or an addition first: kept, with one warning
      listing these layers (a ReLU after it would output 0 and pass no gradient); with insert_norm=True
      converted to ``Adder2dWithNorm(adder, nn.BatchNorm2d(out_channels))`` instead: a Sequential (names gain
      ".0" / ".1") that also answers as its adder layer, so model code reading the convolution's ``.weight`` or
      ``.out_channels`` still finds them.
    - otherwise (into a linear layer or the model's output): converted.

    The analysis runs `model` once on example_input (a tensor or tuple of arguments; eval mode, no gradients;
    shapes are real) when given, else it traces `model` with torch.fx (no input; 1x1 inputs are inferred from
    global pooling). If fx cannot trace the model (control flow on shapes, as in timm's VGG head) and no
    example_input is given, the model is run on a guessed input, with one warning saying so; if no guess runs
    either, every convolution is converted as with analyse=False, with one warning saying why. The guessed input
    is a random batch of 2 images with its first convolution's in_channels, H x W from timm's
    `pretrained_cfg["input_size"]` when it has one, else the first of 224 x 224, 32 x 32 and 28 x 28 that the
    model runs on. analyse=False: convert every convolution
    keep_first / keep_last / exclude / the class rules allow (the behaviour before this analysis).
    report=True: return (model, [LayerDecision(name, decision, reason, weight_std), ...]) in `named_modules()`
    order.

    Returns the converted model (and the report when asked). Its adder parameters are new tensors: build the
    optimizer after converting. Raises ValueError for a convolution with padding_mode other than "zeros" (AdderNet
    defines only zero padding; keep it with `exclude`) or an uninitialised lazy convolution.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if weight_std != "auto" and (
        isinstance(weight_std, bool)
        or not isinstance(weight_std, (int, float))
        or not math.isfinite(weight_std)
        or weight_std <= 0
    ):
        raise ValueError(f'weight_std must be "auto" or a positive finite number, got {weight_std!r}')
    if copy_weights and weight_std not in ("auto", 1.0):
        raise ValueError("weight_std scales the new adder weights; copy_weights=True copies the convolution's instead")
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be an iterable of module names, not a string ({exclude!r})")
    exclude = set(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    # remove_duplicate=False: a convolution registered under two names (shared weights) becomes
    # one adder layer registered under both names, so the sharing survives.
    mapping = dict(mapping or {})
    for cls, factory in mapping.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Conv2d)) or not callable(factory):
            raise TypeError(f"mapping must map nn.Conv2d subclasses to callables, got {cls!r}: {factory!r}")
    convs = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Conv2d)]
    conv_names = [name for name, _ in convs]
    unknown = sorted(exclude.difference(conv_names))
    if unknown:
        raise ValueError(f"exclude names modules that are not nn.Conv2d in the model: {unknown}")
    kept_by = {id(module): "excluded" for name, module in convs if name in exclude}
    if convs and keep_last:
        kept_by.setdefault(id(convs[-1][1]), "keep_last")
    if convs and keep_first:
        kept_by.setdefault(id(convs[0][1]), "keep_first")
    verdicts = _analyse(model, example_input) if analyse and convs else None
    inputs = _input_statistics(model, example_input) if weight_std == "auto" and not copy_weights and convs else {}
    replacements: dict[int, nn.Module] = {}
    decisions: list[LayerDecision] = []
    unconvertible: dict[str, list[str]] = {}
    unnormalised: list[str] = []
    for name, conv in convs:
        if id(conv) in kept_by:
            decisions.append(LayerDecision(name, "kept", kept_by[id(conv)]))
            continue
        std = None if copy_weights else 1.0 if weight_std == "auto" else float(weight_std)
        if id(conv) in inputs:
            std = auto_weight_std(*inputs[id(conv)])
        factory = _factory(type(conv), mapping, copy_weights, grad_mode, std or 1.0)
        if factory is None:
            cls = type(conv)
            unconvertible.setdefault(f"{cls.__module__}.{cls.__qualname__}", []).append(name)
            decisions.append(LayerDecision(name, "kept", "its class has its own forward or _conv_forward"))
            continue
        if verdicts is None:
            verdict, reason = "free", "consumer analysis " + ("off (analyse=False)" if not analyse else "skipped")
        else:
            verdict, reason = verdicts.get(id(conv), ("free", "not called in the analysed forward pass"))
        if verdict == "fully_connected" or (verdict == "unnormalised" and not insert_norm):
            decisions.append(LayerDecision(name, "kept", reason))
            if verdict == "unnormalised":
                unnormalised.append(f"{name} ({reason.removeprefix('output reaches ').split(' without')[0]})")
            continue
        with_norm = verdict == "unnormalised"
        std = std if type(conv) not in mapping else None  # a mapped factory draws its own weights
        decisions.append(LayerDecision(name, "converted_with_norm" if with_norm else "converted", reason, std))
        if id(conv) not in replacements:
            adder = factory(name, conv)
            if with_norm:
                norm = nn.BatchNorm2d(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
                adder = Adder2dWithNorm(adder, norm.train(conv.training))
            replacements[id(conv)] = adder
        if name == "":  # the model itself is a convolution
            return (replacements[id(conv)], decisions) if report else replacements[id(conv)]
        parent_name, _, child_name = name.rpartition(".")
        model.get_submodule(parent_name).add_module(child_name, replacements[id(conv)])
    _refuse_fusion_(model)
    if unconvertible:
        listed = "; ".join(f"{cls}: {', '.join(names)}" for cls, names in unconvertible.items())
        warnings.warn(
            f"convert kept {sum(map(len, unconvertible.values()))} convolution(s) whose class has its own forward "
            f"or _conv_forward, which an Adder2d would not reproduce ({listed}); "
            "pass mapping={cls: factory} to convert them or exclude=[...] to keep them without this warning",
            UserWarning,
            stacklevel=2,
        )
    if unnormalised:
        warnings.warn(
            f"convert kept {len(unnormalised)} convolution(s) whose output reaches an activation, a gate or an "
            "addition without a normalisation, where an adder layer (output bias - sum|x - w|, never positive "
            f"with a zero bias) would get no gradient or close the gate: {', '.join(unnormalised)}; "
            "pass insert_norm=True to convert them with a BatchNorm2d after each, or exclude=[...] to keep them "
            "without this warning",
            UserWarning,
            stacklevel=2,
        )
    return (model, decisions) if report else model


FUSING_METHODS = ("fuse", "reparameterize", "switch_to_deploy", "convert_to_deploy")
"""Methods by which timm's re-parameterisable blocks (MobileOne, FastViT, RepVGG, LeViT's ConvNorm, ...) fold their
convolutions and norms into one convolution kernel; `timm.utils.reparameterize_model` calls them."""


class RefusedFusion:
    """Stands in for a block's fusing method once `convert` has put adder layers under the block: the method would
    read the adder templates as convolution kernels and build a model that computes something else, silently."""

    def __init__(self, block: str, method: str, adders: list[str]):
        self.block, self.method, self.adders = block, method, adders

    def __call__(self, *args, **kwargs):
        listed = ", ".join(self.adders[:3]) + (f" and {len(self.adders) - 3} more" if len(self.adders) > 3 else "")
        raise RuntimeError(
            f"{self.block}.{self.method}() folds convolution kernels and norms into one convolution, but convert "
            f"replaced convolutions under it by adder layers ({listed}); an adder template is not a kernel, so the "
            "fused block would compute something else. Train and run the converted model unfused"
        )


def _refuse_fusion_(model: nn.Module) -> None:
    """Shadow FUSING_METHODS on every module that holds an adder layer (the model included) by a RefusedFusion."""
    adders_under: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Adder2d):
            parts = name.split(".") if name else []
            for depth in range(len(parts)):  # every ancestor, the model ("") included
                adders_under.setdefault(".".join(parts[:depth]), []).append(name)
    for ancestor, adders in adders_under.items():
        module = model.get_submodule(ancestor)
        for method in FUSING_METHODS:
            if callable(getattr(type(module), method, None)):
                object.__setattr__(module, method, RefusedFusion(type(module).__name__, method, adders))


def _analyse(model: nn.Module, example_input) -> dict | None:
    """`consumers.decide` on the model's graph, or None (with one warning) when it can be neither traced nor run."""
    if example_input is not None:
        return consumers.decide(consumers.run_graph(model, example_input))
    try:
        return consumers.decide(consumers.fx_graph(model))
    except Exception as error:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, assertions, ...)
        untraceable = f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}"
    try:
        verdicts, guess = _run_on_a_guess(model, lambda guess: consumers.decide(consumers.run_graph(model, guess)))
    except _NoGuessRuns as error:
        warnings.warn(
            f"convert skipped the consumer analysis (which convolutions feed a normalisation, an activation or a "
            f"gate): {untraceable}, and running it on random inputs failed ({error}); every convolution is "
            "converted as with analyse=False; pass example_input=... to analyse it by running it",
            UserWarning,
            stacklevel=3,
        )
        return None
    warnings.warn(
        f"convert analysed {type(model).__name__} by running it on a random {tuple(guess.shape)} input because "
        f"{untraceable}; pass example_input=... (your input size) to analyse it on your inputs instead",
        UserWarning,
        stacklevel=3,
    )
    return verdicts


class _NoGuessRuns(Exception):
    """The model ran on none of the guessed inputs; the message lists each input's shape and error."""


def _guessed_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Random batches of 2 images (always the same) for a model to run without example_input: channels from its
    first convolution, H x W from timm's `pretrained_cfg`, else each of GUESSED_IMAGE_SIZES."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    configured = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    sizes = [tuple(configured[-2:])] if configured else list(GUESSED_IMAGE_SIZES)
    return [
        torch.randn(2, first.in_channels, *size, generator=torch.Generator().manual_seed(0)).to(
            device=first.weight.device, dtype=first.weight.dtype
        )
        for size in sizes
    ]


def _run_on_a_guess(model: nn.Module, run):
    """(run(guess), guess) for the first guessed input on which `run` succeeds, else _NoGuessRuns."""
    errors = []
    for guess in _guessed_inputs(model):
        try:
            return run(guess), guess
        except Exception as error:  # noqa: BLE001 - whatever the model raises on an input it does not take
            errors.append(f"{tuple(guess.shape)}: {type(error).__name__}: {error}")
    raise _NoGuessRuns("; ".join(errors))


def auto_weight_std(std: float, minimum: float) -> float:
    """weight_std="auto" for an input of standard deviation `std` and smallest value `minimum`: 1.0 (the published
    N(0, 1)) for an input that is never negative, else AUTO_WEIGHT_STD_RATIO * std (see `convert`)."""
    return 1.0 if minimum >= 0 else AUTO_WEIGHT_STD_RATIO * std


def _input_statistics(model: nn.Module, example_input) -> dict[int, tuple[float, float]]:
    """{id(conv): (standard deviation, smallest value) of its input} from one training-mode pass of `model` (batch
    statistics, as training sees them) on example_input or the first guessed input it runs on, under no_grad; the
    model's buffers (running statistics), modes and the random state are restored. Convolutions the pass does not
    reach, or whose input is constant or not finite, are left out; if no pass succeeds, all are, with one warning."""
    statistics: dict[int, tuple[float, float]] = {}

    def record(conv, args):
        if id(conv) not in statistics:  # a shared convolution: its first call
            x = args[0].detach().double()
            std, minimum = x.std().item(), x.min().item()
            if math.isfinite(std) and math.isfinite(minimum) and std > 0:
                statistics[id(conv)] = std, minimum

    def run(inputs):
        statistics.clear()
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        devices = [t.device.index or 0 for t in args if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
        with torch.no_grad(), torch.random.fork_rng(devices=sorted(set(devices))):  # dropout, stochastic depth
            model.train()(*args)

    convs = {id(m): m for m in model.modules() if isinstance(m, nn.Conv2d)}.values()
    handles = [conv.register_forward_pre_hook(record) for conv in convs]
    buffers = [(b, b.clone()) for b in model.buffers()]
    modes = {m: m.training for m in model.modules()}
    try:
        if example_input is not None:
            try:
                run(example_input)
            except Exception as error:  # noqa: BLE001 - whatever the model raises on this input
                raise _NoGuessRuns(f"example_input: {type(error).__name__}: {error}") from error
        else:
            _run_on_a_guess(model, run)
    except _NoGuessRuns as error:
        warnings.warn(
            f'convert(weight_std="auto") could not run {type(model).__name__} in training mode to measure its '
            f"convolutions' inputs ({error}); every adder layer gets the published N(0, 1) weights; pass "
            "example_input=... (a training batch of your inputs) or a number as weight_std",
            UserWarning,
            stacklevel=3,
        )
        statistics.clear()
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for m, mode in modes.items():
            m.training = mode
    return statistics


def _factory(cls: type, mapping: dict, copy_weights: bool, grad_mode: str, weight_std: float = 1.0):
    """How to convert a convolution of class `cls`: a callable (name, conv) -> module, or None to keep it."""
    if cls in mapping:
        return lambda name, conv: mapping[cls](conv)
    # nn.Conv2d.forward is a call to self._conv_forward: a subclass overriding only that (weight
    # standardisation done there) computes something other than a plain convolution too.
    if cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward:
        return lambda name, conv: _adder_like(name, conv, copy_weights, grad_mode, Adder2d, weight_std)
    if (cls.__module__, cls.__name__) == TIMM_CONV2D_SAME:
        return lambda name, conv: _adder_like(name, conv, copy_weights, grad_mode, Adder2dSame, weight_std)
    return None


def _adder_like(
    name: str, conv: nn.Conv2d, copy_weights: bool, grad_mode: str, adder_class=Adder2d, weight_std: float = 1.0
) -> Adder2d:
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"convolution {name!r} is lazy and not initialised yet: run one forward pass first")
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"convolution {name!r} has padding_mode={conv.padding_mode!r}; adder layers support only 'zeros' "
            f"(pass exclude=[{name!r}] to keep it)"
        )
    adder = adder_class(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        grad_mode=grad_mode,
    )
    if copy_weights:
        adder.weight.data.copy_(conv.weight.data)
        if conv.bias is not None:
            adder.bias.data.copy_(conv.bias.data)
    elif weight_std != 1.0:
        adder.weight.data.mul_(weight_std)  # N(0, 1) (Adder2d's own initialisation) times weight_std
    adder.train(conv.training)
    return adder
