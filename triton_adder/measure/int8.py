"""The int8 rows of `measure` (issue 27) and the contenders `benchmarks/int8_*.py` time.

Per unique adder layer and for the whole model, one interleaved group (`Recorder.time_interleaved`,
family `INT8_FAMILY`) of float32-in, float32-out calls on the same input:

- int8 adder, tuned: `QuantizedAdder2d` with blocking None (the tuned blocking where the tuning
  cache has one for this CPU, shape and thread count, else the default);
- int8 adder, default: the same with `native.DEFAULT_BLOCKING` of the kernel variant set explicitly;
- conv2d fp32: F.conv2d (whole model: the CNN twin);
- qconv int8: PyTorch's quantized Conv2d, x86 engine, quantizing the input and dequantizing the
  output per call (whole model: the CNN through FX post-training static quantization);
- adder fp32: our float32 adder on the CPU path (whole model: the float AdderNet).

Their ratios (`derived.derive`: int8_over_*) come from the medians of one interleaved run: the
project's 2-core box is shared, and medians timed one after the other can be off by 2x. Without
the C compiler (the int8 kernel would run its float fallback) or without the x86 quantized engine
the affected rows are skipped with the reason; nothing raises.
"""

from __future__ import annotations

import contextlib
import copy
import shlex
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from triton_adder.backends import cpu as cpu_path
from triton_adder.backends import use_backend
from triton_adder.geometry import LayerShape
from triton_adder.nn import Adder2d
from triton_adder.quant import QuantizedAdder2d, native, quantize, tuned

from .baselines import conv_padding
from .derived import INT8_FAMILY
from .timing import Recorder

ENGINE = "x86"
"""PyTorch's quantized engine for the int8 convolution (oneDNN/FBGEMM on x86 CPUs)."""

# torch's deprecation notices (quantized tensors, torch.ao.quantization, TorchScript inside FX conversion),
# repeated for every layer otherwise; they say nothing about the measurement.
TORCH_NOTICES = (
    r".*quantized tensor creation functions",
    r".*torch\.ao\.quantization is deprecated",
    r".*`torch\.jit\.script_method` is deprecated",
)

# Each contender's row fields; its baseline_key names the int8_over_<key> ratio column (`derived`).
CONTENDERS = {
    "int8 adder": dict(op="int8_adder", variant="tuned", role="adder", baseline_key="", backend="cpu", dtype="int8"),
    "int8 default": dict(
        op="int8_adder", variant="default", role="adder", baseline_key="", backend="cpu", dtype="int8"
    ),
    "conv2d fp32": dict(
        op="conv2d", variant="fp32", role="baseline", baseline_key="conv2d_fp32", backend="torch", dtype="float32"
    ),
    "qconv int8": dict(
        op="quantized_conv2d", variant=ENGINE, role="baseline", baseline_key="qconv_int8", backend="torch", dtype="int8"
    ),
    "adder fp32": dict(
        op="adder_forward",
        variant="cpu_path",
        role="baseline",
        baseline_key="adder_fp32",
        backend="cpu",
        dtype="float32",
    ),
}


def engine_missing() -> str:
    """'' where PyTorch has the x86 quantized engine, else why the quantized convolution cannot run."""
    engines = torch.backends.quantized.supported_engines
    return "" if ENGINE in engines else f"PyTorch has no {ENGINE} quantized engine here (it has {', '.join(engines)})"


@contextlib.contextmanager
def quantized_engine():
    """The x86 engine inside the block (where there is one), the caller's engine again after it; torch's
    deprecation notices (`TORCH_NOTICES`) silenced inside."""
    previous = torch.backends.quantized.engine
    if not engine_missing():
        torch.backends.quantized.engine = ENGINE
    try:
        with warnings.catch_warnings():
            for message in TORCH_NOTICES:
                warnings.filterwarnings("ignore", message=message)
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")  # observer arguments
            yield
    finally:
        torch.backends.quantized.engine = previous


def load_kernel() -> tuple[native.Library | None, str]:
    """(the int8 SAD kernel, "") or (None, why it is unavailable), never raising.

    `native.load` warns once per process when the C compiler fails; the warning's text, caught
    here, becomes the rows' reason (timing the float fallback as "int8" would mislead).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            library = native.load()
        except (ValueError, RuntimeError) as error:  # a bad $TRITON_ADDER_INT8_ISA
            return None, f"int8 kernel unavailable: {error}"
    if library is not None:
        return library, ""
    if caught:
        detail = str(caught[-1].message)
    else:  # warned already, before this call
        detail = f"C compiler {shlex.join(native.compiler_command())!r} failed earlier in this process"
    return None, f"int8 SAD kernel not built (QuantizedAdder2d would run its float fallback): {detail}"


def with_default_blocking(module: nn.Module, library: native.Library) -> nn.Module:
    """A copy of `module` whose QuantizedAdder2d layers run the variant's default blocking, never a tuned one."""
    module = copy.deepcopy(module)
    for layer in module.modules():
        if isinstance(layer, QuantizedAdder2d):
            layer.blocking = native.DEFAULT_BLOCKING[library.isa]
    return module


def layer_contenders(
    shape: LayerShape, library: native.Library | None, *, float_adder: bool = True, qconv_kernel: bool = False
) -> tuple[dict[str, Callable], dict[str, str]]:
    """({name: zero-argument call}, {name: why it cannot run}) for one adder layer, all on one float32
    input and weight; build and call them inside `quantized_engine()` and torch.no_grad().

    Names as in `CONTENDERS` ("int8 default" only with a `library`: without it the layer runs its
    float fallback, which has no blocking); qconv_kernel adds "qconv kernel", the quantized
    convolution alone on an input quantized once.
    """
    generator = torch.Generator().manual_seed(0)
    geom = shape.geom
    x = torch.randn(shape.x_shape, generator=generator)
    weight = torch.randn(shape.weight_shape, generator=generator) * 0.5
    layer = Adder2d(
        shape.cin,
        shape.cout,
        (shape.kh, shape.kw),
        stride=geom.stride,
        padding=geom.padding,
        dilation=geom.dilation,
        groups=geom.groups,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantized = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    calls: dict[str, Callable] = {"int8 adder": lambda: quantized(x)}
    missing: dict[str, str] = {}
    if library is not None:
        default = with_default_blocking(quantized, library)
        calls["int8 default"] = lambda: default(x)
    padding = conv_padding(shape)
    if padding is None:
        missing["conv2d fp32"] = missing["qconv int8"] = "asymmetric padding: no conv2d twin"
    else:
        conv_args = (geom.stride, padding, geom.dilation, geom.groups)
        calls["conv2d fp32"] = lambda: F.conv2d(x, weight, None, *conv_args)
        if engine_missing():
            missing["qconv int8"] = engine_missing()
        else:  # per-tensor scales from the same data; an output range of the order of the products
            x_scale, w_scale = float(x.abs().max()) / 127, float(weight.abs().max()) / 127
            qconv = torch.ao.nn.quantized.Conv2d(shape.cin, shape.cout, (shape.kh, shape.kw), *conv_args, bias=False)
            qconv.set_weight_bias(torch.quantize_per_tensor(weight, w_scale, 0, torch.qint8), None)
            qconv.scale, qconv.zero_point = float(x_scale * 64), 128
            calls["qconv int8"] = lambda: qconv(torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)).dequantize()
            if qconv_kernel:
                qx = torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)
                calls["qconv kernel"] = lambda: qconv(qx)
    if float_adder:
        calls["adder fp32"] = lambda: cpu_path.forward(x, weight, None, geom)
    return calls, missing


def quantized_cnn(cnn: nn.Module, calibration: list[torch.Tensor]) -> tuple[nn.Module | None, str]:
    """The CNN through FX graph mode post-training static quantization (x86 qconfig, calibrated on
    `calibration`, under `quantized_engine()`): (model, "") or (None, why it failed)."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping  # noqa: PLC0415
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: PLC0415

        prepared = prepare_fx(copy.deepcopy(cnn).eval(), get_default_qconfig_mapping(ENGINE), (calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared).eval(), ""
    except Exception as error:  # noqa: BLE001  (reported, and the contender dropped)
        return None, f"FX post-training quantization failed: {type(error).__name__}: {error}"


def _time_group(
    rec: Recorder, common: dict, calls: dict[str, Callable], missing: dict[str, str], configs: dict[str, str]
) -> None:
    entries = []
    for name, fields in CONTENDERS.items():
        row = dict(common, family=INT8_FAMILY, config=configs.get(name, ""), **fields)
        if name not in calls:
            row["reason"] = missing.get(name, "not measured")
        entries.append((calls.get(name), row))
    with torch.no_grad(), quantized_engine():
        rec.time_interleaved(entries)


def _blocking_configs(library: native.Library, shape: LayerShape | None = None) -> dict[str, str]:
    """The config column: the blocking the "tuned" row runs (blocking None: what a user's layer runs, the tuned
    one where the cache has it for this CPU, shape and thread count) and the variant's default."""
    default = native.DEFAULT_BLOCKING[library.isa]
    if shape is None:
        runs = "per layer: its tuned blocking where cached, else the default"
    else:
        blocking = tuned.blocking_for(library, shape.x_shape, shape.weight_shape, shape.geom, torch.get_num_threads())
        runs = str(blocking) + (" (the default: none tuned for this shape)" if blocking == default else "")
    return {"int8 adder": runs, "int8 default": f"{library.isa} default {default}"}


def layer_rows(rec: Recorder, shape: LayerShape, common: dict, library: native.Library | None, why_not: str) -> None:
    """The int8 group of one adder layer (`common`: measure's layer columns); all skipped without the kernel."""
    if library is None:
        _time_group(rec, common, {}, dict.fromkeys(CONTENDERS, why_not), {})
        return
    with quantized_engine():
        calls, missing = layer_contenders(shape, library)
    _time_group(rec, common, calls, missing, _blocking_configs(library, shape))


def model_rows(
    rec: Recorder,
    model_name: str,
    adder_model: nn.Module,
    cnn_model: nn.Module,
    input_shape: tuple[int, ...],
    library: native.Library | None,
    why_not: str,
) -> None:
    """The int8 group of the whole model: `triton_adder.quantize`d AdderNet (calibrated on the measured
    input) against the CNN twin, its FX-quantized copy and the float AdderNet, eval mode, batch of
    input_shape."""
    common = dict(
        scope="model",
        model=model_name,
        layer="whole model",
        layer_count=1,
        batch=input_shape[0],
        cin=input_shape[1],
        h=input_shape[2],
        w=input_shape[3],
    )
    if library is None:
        _time_group(rec, common, {}, dict.fromkeys(CONTENDERS, why_not), {})
        return
    images = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    adder_model, cnn_model = adder_model.eval(), cnn_model.eval()
    missing: dict[str, str] = {}
    try:
        with use_backend("cpu"):
            int8_model = quantize(adder_model, [images])
        default_model = with_default_blocking(int8_model, library)
        calls = {"int8 adder": lambda: int8_model(images), "int8 default": lambda: default_model(images)}
    except Exception as error:  # noqa: BLE001  (no int8 model: nothing to compare, every row says why)
        _time_group(rec, common, {}, dict.fromkeys(CONTENDERS, f"triton_adder.quantize failed: {error}"), {})
        return
    calls["conv2d fp32"] = lambda: cnn_model(images)
    missing["qconv int8"] = engine_missing()
    if not missing["qconv int8"]:
        with quantized_engine():
            qcnn, missing["qconv int8"] = quantized_cnn(cnn_model, [images])
        if qcnn is not None:
            calls["qconv int8"] = lambda: qcnn(images)

    def float_adder():
        with use_backend("cpu"):
            return adder_model(images)

    calls["adder fp32"] = float_adder
    _time_group(rec, common, calls, missing, _blocking_configs(library))


def metadata(library: native.Library | None, why_not: str) -> dict:
    """What the int8 rows ran on, for the report's method/machine block (the CPU model is in "device")."""
    return {
        "int8 kernel": f"{library.isa} ({library.path.name})" if library is not None else why_not,
        "int8 quantized engine": engine_missing() or f"{ENGINE} (torch.backends.quantized)",
        "int8 threads": torch.get_num_threads(),
        "int8 timing": (
            "interleaved: per layer and for the whole model, one call of each contender per repetition, "
            "order shuffled; ratios are ratios of medians from the same repetitions"
        ),
    }
