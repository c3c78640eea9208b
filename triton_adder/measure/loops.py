"""`measure`: every measurement of one model's adder layers and of the whole model, as rows.

Per unique adder layer of a model (same input shape and layer arguments = one row set,
`layer_count` says how often the model uses it):

- adder forward with the tuned and the default launch config (Triton kernels), or the CPU path;
  adder input and weight gradients (paper eq. 6 and eq. 5);
- conv2d forward in float32 with TF32 off (the same FP32 units), TF32, float16, bfloat16 (tensor
  cores), and conv2d's input/weight gradients in float32;
- the published unfold-and-broadcast adder and torch.cdist(p=1) on the unfolded input
  (`baselines`), when their working set fits the memory budget (else a "skipped" row with
  `required_memory_bytes`);
- peak memory of each (CUDA allocator high-water mark; not measurable on the CPU: NaN there);
- on the CPU, the int8 group (`int8`): the int8 adder (tuned and default blocking) against float32
  conv2d, PyTorch's int8 quantized conv2d and the float32 adder, timed interleaved;

and per model: forward and training-step time, AdderNet against its CNN twin, and the int8 group
for the whole model. A measurement that cannot run (missing kernel or C compiler, out of memory,
unsupported dtype) is a row with status "skipped" or "error" and a reason; `measure` never raises
for one.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from triton_adder import models
from triton_adder.backends import triton_interpreter_enabled, use_backend
from triton_adder.backends.cpu.precompile import precompile
from triton_adder.contract import KERNEL_DTYPES
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.models.census import DEFAULT_GPU_BATCH, MODEL_INPUT_SIZE, census, unique_adder_layers

from . import int8 as int8_rows
from .baselines import (
    CONV_PRECISIONS,
    cdist_adder,
    cdist_bytes,
    conv_padding,
    unfold_broadcast_adder,
    unfold_broadcast_bytes,
)
from .derived import COLUMNS, derive
from .machine import device_ceiling, machine_metadata
from .precision import tf32_mode
from .timing import Recorder, memory_budget

# Batch on the CPU when the caller gives none: training-mode BatchNorm needs more than one value.
DEFAULT_CPU_BATCH = 2
ADDER_DTYPE_NAMES = tuple(str(dtype).removeprefix("torch.") for dtype in KERNEL_DTYPES)


def default_batch_size(model_name: str, device: torch.device) -> int:
    """The batch of a named model's benchmark: `DEFAULT_GPU_BATCH` (the tuner's) on CUDA, else 2."""
    return DEFAULT_GPU_BATCH[model_name] if device.type == "cuda" else DEFAULT_CPU_BATCH


def tuned_config(op: str, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry):
    """(choice or None, reason): what the tuner cached for `op` on this shape, paper grad_mode.

    A KernelConfig for "forward" and "grad_input"; for "grad_weight" a `lookup.GradWeightChoice`
    (method, kernel config, split), since the search picks the method too.
    """
    try:
        from triton_adder.autotune import lookup as configs  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001
        return None, f"tuned-config lookup unavailable ({type(error).__name__}: {error})"
    if op == "grad_weight":
        found = configs.grad_weight_choice(x, weight, geom, "paper")
    else:
        found = configs.lookup(op, x, weight, geom, "paper")
    if found is None:
        return None, "no tuned config cached for this shape on this device (run python -m triton_adder.tune)"
    return found, ""


def _triton_launchers(x, w, g, geom: Conv2dGeometry) -> tuple[dict, str]:
    """({family: (default call, its config text, tuned call maker)}, why empty).

    The default call is the kernel with its heuristic config, and for the weight gradient the
    library's default method (`backends.triton.default_grad_weight_method`) with the kernel's
    defaults; the tuned call maker takes what `tuned_config` found (for the weight gradient the
    method, config and split the search picked, which is what the layer runs).
    """
    try:
        from triton_adder.backends import triton as triton_backend  # noqa: PLC0415  (needs Triton)
        from triton_adder.kernels import forward as forward_kernel  # noqa: PLC0415
        from triton_adder.kernels import grad_input as grad_input_kernel  # noqa: PLC0415
        from triton_adder.kernels import grad_weight as grad_weight_kernel  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001  (no Triton here: the rows say so, the run goes on)
        return {}, f"Triton kernels unavailable ({type(error).__name__}: {error})"

    device_type = x.device.type
    gradient_args = (g, x, w, geom, "paper")
    try:
        defaults = {
            "forward": forward_kernel.default_config(x, w, geom),
            "grad_input": grad_input_kernel.default_grad_input_config(x.shape, w.shape, geom, device_type),
            "grad_weight": grad_weight_kernel.default_grad_weight_config(x.shape, w.shape, geom, device_type),
        }
    except Exception as error:  # noqa: BLE001  (a shape the heuristics refuse: rows, not a crash)
        return {}, f"no default launch config ({type(error).__name__}: {error})"
    kernels = {
        "forward": functools.partial(forward_kernel.forward, x, w, None, geom),
        "grad_input": functools.partial(grad_input_kernel.grad_input, *gradient_args),
    }
    rows = {
        family: (functools.partial(launch, config=defaults[family]), str(defaults[family].as_dict()),
                 lambda config, launch=launch: functools.partial(launch, config=config))
        for family, launch in kernels.items()
    }  # fmt: skip
    method = triton_backend.default_grad_weight_method(x.device, "paper")
    weight_grad = functools.partial(triton_backend.grad_weight, *gradient_args)
    rows["grad_weight"] = (
        functools.partial(weight_grad, method=method, config=defaults["grad_weight"]),
        f"method={method}" if method != "triton" else str(defaults["grad_weight"].as_dict()),
        lambda choice: functools.partial(weight_grad, method=choice.method, config=choice.config,
                                         split_k=choice.split_k),
    )  # fmt: skip
    return rows, ""


def _adder_rows(rec: Recorder, common: dict, backend: str, dtype_name: str, x: torch.Tensor, w: torch.Tensor,
                g: torch.Tensor, geom: Conv2dGeometry) -> None:
    """Adder forward (tuned and default config) and, in float32, input/weight gradients (eq. 6, eq. 5)."""
    families = ("forward", "grad_input", "grad_weight") if dtype_name == "float32" else ("forward",)

    def add(family, variant, fn=None, reason="", config=""):
        row = dict(common, family=family, op=f"adder_{family}", variant=variant, role="adder", baseline_key="",
                   backend=backend, dtype=dtype_name, config=config)
        return rec.time(fn, **row) if fn is not None else rec.skip(reason, **row)

    if backend == "cpu":
        try:
            from triton_adder.backends import cpu as cpu_path  # noqa: PLC0415
        except Exception as error:  # noqa: BLE001
            for family in families:
                add(family, "cpu_path", reason=f"CPU path unavailable ({type(error).__name__}: {error})")
            return
        add("forward", "cpu_path", lambda: cpu_path.forward(x, w, None, geom))
        for family in families[1:]:
            launcher = getattr(cpu_path, family)
            add(family, "cpu_path", lambda launcher=launcher: launcher(g, x, w, geom, "paper"))
        return

    launchers, why = _triton_launchers(x, w, g, geom)
    for family in families:
        if family not in launchers:
            add(family, "default", reason=why)
            add(family, "tuned", reason=why)
            continue
        default, default_text, tuned_call = launchers[family]
        add(family, "default", default, config=default_text)
        try:
            tuned, why_not = tuned_config(family, x, w, geom)
        except Exception as error:  # noqa: BLE001
            tuned, why_not = None, f"tuned-config lookup failed: {type(error).__name__}: {error}"
        if tuned is None:
            add(family, "tuned", reason=why_not)
        else:
            add(family, "tuned", tuned_call(tuned), config=str(tuned.as_dict()))


def _layer_columns(shape: LayerShape, count: int, model_name: str) -> dict:
    """The columns every row of one unique adder layer shares."""
    return dict(scope="layer", model=model_name, layer_count=count, elements=shape.elements, **shape.columns())


def _layer_rows(rec: Recorder, shape: LayerShape, count: int, model_name: str, backend: str,
                adder_dtypes: Sequence[str], budget: int, baselines: bool) -> None:
    device = rec.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(shape.batch, shape.cin, shape.h, shape.w, generator=generator).to(device)
    w32 = torch.randn(shape.cout, shape.cin // shape.geom.groups, shape.kh, shape.kw, generator=generator).to(device)
    grad32 = torch.randn(shape.batch, shape.cout, *shape.geom.out_size, generator=generator).to(device)
    common = _layer_columns(shape, count, model_name)
    geom = shape.geom

    for dtype_name in adder_dtypes:
        dtype = getattr(torch, dtype_name)
        _adder_rows(rec, common, backend, dtype_name, x32.to(dtype), w32.to(dtype), grad32.to(dtype), geom)
    if not baselines:
        return

    def baseline(family, op, variant, key, dtype, fn=None, reason="", required=math.nan):
        row = dict(common, family=family, op=op, variant=variant, role="baseline", baseline_key=key,
                   backend="torch", dtype=dtype, config="", required_memory_bytes=required)
        return rec.time(fn, **row) if fn is not None else rec.skip(reason, **row)

    # conv2d in each precision a user would pick.
    padding = conv_padding(shape)
    conv_args = dict(stride=geom.stride, padding=padding, dilation=geom.dilation, groups=geom.groups)
    for precision in CONV_PRECISIONS:
        key = f"conv2d_{precision}"
        dtype = torch.float32 if precision in ("fp32", "tf32") else getattr(torch, precision)
        dtype_name = str(dtype).removeprefix("torch.")
        if padding is None:
            baseline("forward", "conv2d", precision, key, dtype_name, reason="asymmetric padding: no conv2d twin")
            continue
        if precision == "tf32" and device.type != "cuda":
            baseline("forward", "conv2d", precision, key, dtype_name, reason="TF32 is a CUDA tensor-core mode")
            continue
        x, w = x32.to(dtype), w32.to(dtype)

        def conv(x=x, w=w, tf32=precision == "tf32"):
            with tf32_mode(tf32):
                return F.conv2d(x, w, None, **conv_args)

        baseline("forward", "conv2d", precision, key, dtype_name, conv)
    if padding is not None:
        def conv_grad_input():
            with tf32_mode(False):
                return torch.nn.grad.conv2d_input(x32.shape, w32, grad32, **conv_args)

        def conv_grad_weight():
            with tf32_mode(False):
                return torch.nn.grad.conv2d_weight(x32, w32.shape, grad32, **conv_args)

        baseline("grad_input", "conv2d_grad_input", "fp32", "conv2d_fp32", "float32", conv_grad_input)
        baseline("grad_weight", "conv2d_grad_weight", "fp32", "conv2d_fp32", "float32", conv_grad_weight)

    # The published unfold-and-broadcast adder and cdist(p=1): only where they fit.
    for op, fn, bytes_needed in (("unfold_broadcast", unfold_broadcast_adder, unfold_broadcast_bytes),
                                 ("cdist_l1", cdist_adder, cdist_bytes)):
        required = bytes_needed(shape, 4)
        if geom.groups != 1:
            baseline("forward", op, "fp32", op, "float32", reason="groups > 1: the published approach has none",
                     required=required)
        elif padding is None:
            baseline("forward", op, "fp32", op, "float32", reason="asymmetric padding: unfold pads symmetrically",
                     required=required)
        elif required > budget:
            baseline("forward", op, "fp32", op, "float32", required=required,
                     reason=f"needs {required / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB memory budget")
        else:
            with tf32_mode(False):
                baseline("forward", op, "fp32", op, "float32", lambda fn=fn: fn(x32, w32, geom), required=required)


def _model_rows(rec: Recorder, model_name: str, adder_model: nn.Module, cnn_model: nn.Module,
                input_shape: tuple[int, ...], backend: str, train: bool) -> None:
    device = rec.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(*input_shape, generator=generator).to(device)
    with torch.no_grad():  # from the CNN twin: a batch-1 adder forward would compile every layer again
        num_classes = cnn_model.to(device).eval()(images[:1]).shape[1]
    for variant, model in (("adder", adder_model), ("cnn", cnn_model)):
        calls = census(model, input_shape)
        adder_elements = sum(c.elements for c in calls if c.kind == "adder")
        macs = sum(c.elements for c in calls if c.kind == "multiply")
        common = dict(scope="model", model=model_name, layer="whole model", layer_count=1, batch=input_shape[0],
                      cin=input_shape[1], h=input_shape[2], w=input_shape[3], variant=variant,
                      role="adder" if variant == "adder" else "baseline", baseline_key="" if variant == "adder" else
                      "cnn", backend=backend if variant == "adder" else "torch", dtype="float32", config="",
                      elements=adder_elements + macs, additions=2 * adder_elements + macs, multiplications=macs)
        model = model.to(device).eval()
        labels = torch.randint(0, num_classes, (input_shape[0],), generator=generator).to(device)

        def forward(model=model):
            with torch.no_grad(), use_backend(backend), tf32_mode(False):
                return model(images)

        rec.time(forward, family="model_forward", op="model_forward", **common)
        if not train:
            continue
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step(model=model, optimizer=optimizer, labels=labels):
            with use_backend(backend), tf32_mode(False):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
            return loss

        model.train()
        rec.time(train_step, family="model_train_step", op="model_train_step", **common)
        model.eval()


def measure(
    model: str | tuple[str, nn.Module, nn.Module, Sequence[int]] = "resnet50",
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    quick: bool = False,
    backend: str | None = None,
    adder_dtypes: Sequence[str] = ("float32",),
    layers: bool = True,
    baselines: bool = True,
    whole_model: bool = True,
    train: bool = True,
    max_layers: int | None = None,
    repeats: int | None = None,
    memory_budget_bytes: int | None = None,
    int8: bool | None = None,
    command_line: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Measure adder layers and the whole model against their baselines; one row per measurement.

    model: a name from `triton_adder.models.MODELS` (built as AdderNet and as CNN twin, input
    (batch, C, S, S) with S from MODEL_INPUT_SIZE), or (name, adder_model, cnn_model, input_shape)
    for any pair of models (input_shape carries its own batch; batch_size is then unused).
    batch_size: the input's N for a named model; default `models.census.DEFAULT_GPU_BATCH[model]`
    on a GPU, 2 on the CPU. device: default "cuda" when available, else "cpu". quick: fewer
    repeats (smoke runs, tests). backend: "triton" (kernels; default on CUDA or with
    TRITON_INTERPRET=1) or "cpu" (the CPU path).
    adder_dtypes: dtypes of the adder forward ("float32", "float16", "bfloat16"); gradients float32.
    layers / baselines / whole_model / train: which groups of rows to measure.
    max_layers: only the first N unique adder layers. repeats: timed repeats (minimum on CUDA).
    memory_budget_bytes: the most a baseline may need (default: 80% of free GPU memory, 25% of RAM).
    int8: the int8 rows (`measure.int8`) per layer (with `layers`) and for the whole model (with
    `whole_model`); default on with backend "cpu", and only there (the kernel is a CPU kernel).
    progress: a tqdm bar on stderr, one step per unique layer and one for the whole model.

    Returns the DataFrame of `derive`, with `frame.attrs["metadata"]` from `machine_metadata`.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend is None:
        backend = "triton" if device.type == "cuda" or triton_interpreter_enabled() else "cpu"
    if backend not in ("triton", "cpu"):
        raise ValueError(f"backend must be 'triton', 'cpu' or None, got {backend!r}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs device='cpu', got device={str(device)!r}")
    int8 = backend == "cpu" if int8 is None else int8
    if int8 and backend != "cpu":
        raise ValueError(f"int8=True needs backend='cpu' (the int8 kernel runs on the CPU), got {backend!r}")
    for dtype_name in adder_dtypes:
        if dtype_name not in ADDER_DTYPE_NAMES:
            raise ValueError(f"adder_dtypes entries must be in {ADDER_DTYPE_NAMES}, got {dtype_name!r}")
    if isinstance(model, str):
        if model not in models.MODELS:
            raise ValueError(f"model must be one of {sorted(models.MODELS)} or a (name, adder, cnn, shape) tuple, "
                             f"got {model!r}")
        batch_size = default_batch_size(model, device) if batch_size is None else batch_size
        size = MODEL_INPUT_SIZE[model]
        model_name, adder_model, cnn_model = model, models.build(model, adder=True), models.build(model, adder=False)
        input_shape = (batch_size, models.MODELS[model][2], size, size)
    else:
        model_name, adder_model, cnn_model, input_shape = model
        input_shape = tuple(input_shape)
    torch.manual_seed(0)
    rec = Recorder(device, quick, repeats)
    budget = memory_budget(device, memory_budget_bytes)
    shapes = unique_adder_layers(census(adder_model, input_shape))[:max_layers] if layers else []
    if backend == "cpu" and (shapes or whole_model):
        # compile the model's CPU reductions on every core at once, not one by one as rows need them
        precompile(adder_model, torch.zeros(input_shape))  # only its shape matters; leaves the RNG alone
    library, why_not = int8_rows.load_kernel() if int8 else (None, "")
    with tqdm(total=len(shapes) + bool(whole_model), desc=f"benchmark {model_name}", unit="step", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for shape, count in shapes:
            bar.set_postfix_str(shape.name)
            _layer_rows(rec, shape, count, model_name, backend, adder_dtypes, budget, baselines)
            if int8:
                int8_rows.layer_rows(rec, shape, _layer_columns(shape, count, model_name), library, why_not)
            bar.update()
        if whole_model:
            bar.set_postfix_str("whole model")
            _model_rows(rec, model_name, adder_model, cnn_model, input_shape, backend, train)
            if int8:
                int8_rows.model_rows(rec, model_name, adder_model, cnn_model, input_shape, library, why_not)
            bar.update()
    frame = pd.DataFrame(rec.rows)
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan
    frame = frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]
    metadata = machine_metadata(device, command_line)
    ceiling = device_ceiling(device)
    metadata.update({"model": model_name, "input shape": str(tuple(input_shape)), "adder backend": backend,
                     "quick": quick, "memory budget (GiB)": round(budget / 2**30, 2)})
    if int8:
        metadata.update(int8_rows.metadata(library, why_not))
    return derive(frame, metadata, ceiling)
