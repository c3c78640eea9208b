"""`quantize` and `QuantizedAdder2d`: int8 AdderNet inference on the CPU (DESIGN.md section 7).

Scheme, per adder layer: ONE scale s shared by input and weight (|x - w| needs both in the same
units), ``x_q = clamp(round(x * (1/s)), -127, 127)`` and the same for w (round half to even, 1/s
rounded to float64). Rule "input_max": ``s = max |x| over the calibration batches / 127``, from the
input alone. A weight beyond the input's range, ``|w| > 127 s``, is clamped to ``c = +-127 s``
(w_q = +-127), and what the clamp removed is folded into the bias: for every ``|x| <= 127 s`` (padded
taps, x = 0, included), ``|x - w| = |x - c| + (|w| - |c|)`` exactly, the second term independent of x.
So ``y = b' - s * sum |x_q - w_q|`` with ``b' = bias - sum_taps (|w| - 127 s)_+`` per output channel
(float64) and the sum exact in int32. A padded tap reads x_q = 0 exactly.
"""

from __future__ import annotations

import collections
import copy
import math
import threading

import torch
from torch import fx, nn

from triton_adder.functional import resolve_geometry
from triton_adder.geometry import Conv2dGeometry
from triton_adder.nn import Adder2d, Adder2dSame, same_padding
from triton_adder.quant import native

RULES = ("input_max",)
"""Calibration rules `quantize` accepts."""
QMAX = 127
"""Quantized values lie in [-QMAX, QMAX]: symmetric, so |x_q - w_q| <= 254 fits a byte."""
INT32_SUM_LIMIT = 2**31 - 1


def scale_for(input_max: float) -> float:
    """The "input_max" rule: input_max / 127, as a Python float (float64).

    An input that is all zeros gets 1/127 (as if the max were 1): any positive scale quantizes it
    exactly, and the weights' clamping to +-1 is folded into the bias exactly for it.
    """
    peak = float(input_max)
    if not math.isfinite(peak):
        raise ValueError(f"cannot quantize: max |x| is not finite ({peak})")
    return (peak if peak > 0 else 1.0) / QMAX


def clamped_amount(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Per output channel, sum over its taps of (|w| - 127 s)_+ in float64: what clamping the weight to
    +-127 s removes, a constant for every input within +-127 s (module docstring)."""
    return (weight.detach().double().abs() - QMAX * scale).clamp_min_(0).flatten(1).sum(1)


def quantize_tensor(t: torch.Tensor, scale: float) -> torch.Tensor:
    """clamp(round(t * (1/scale)), -127, 127) in float64 (NaN -> +127, as the C kernel): the values the
    kernel stores minus 128."""
    v = t.detach().double() * (1.0 / scale)
    v = torch.nan_to_num(v, nan=QMAX, posinf=QMAX, neginf=-QMAX)
    return torch.round(v).clamp_(-QMAX, QMAX)


_scratch_buffers = threading.local()


def _scratch(slot: int, nbytes: int) -> torch.Tensor:
    """A uint8 buffer of nbytes, reused across calls in this thread (slot 0: quantized input, 1: im2col
    matrix): a fresh allocation each call would cost page faults comparable to a small layer's work.
    The layer's output never aliases it."""
    buffers = getattr(_scratch_buffers, "buffers", None)
    if buffers is None:
        buffers = _scratch_buffers.buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
    if buffers[slot].numel() < nbytes:
        buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return buffers[slot][:nbytes]


class QuantizedAdder2d(nn.Module):
    """An `Adder2d` (or `Adder2dSame`) in int8, for inference on the CPU.

    ``y = b' - s * sum |x_q - w_q|`` (module docstring), returned in the input's dtype
    (float16, bfloat16, float32 or float64; computed in float64 and rounded once) and memory format
    (NCHW or channels_last). Build it with `from_float` or `triton_adder.quantize`. On a CUDA input
    (the module moved with ``.cuda()``) the Triton int8 kernel (`kernels/forward_int8.py`) computes
    the same integer sums and rescales them in float32 instead of float64; never run on a GPU yet.

    Buffers: `weight_q` (int8, the layer's weight shape: the weight clamped to +-127 s, quantized),
    `scale` (float64, 0-d), `bias` (float64 (Cout,): the layer's bias minus the clamped amount
    `clamped_amount`, i.e. b'; None when the layer has no bias and no weight was clamped). Any
    positive `scale` gives the exact fold: `quantize` picks it by the "input_max" rule, `from_float`
    from a given input_max. For inputs within +-127 s the output differs from the float layer's by
    rounding alone: per tap at most s/2 for the input and |c - s w_q| <= s/2 for the weight (0 for a
    clamped one), so at most K s per output (DESIGN.md section 7).
    The packed weight the kernel reads (8-channel groups, `_pack`) is made once here and again
    whenever a state dict is loaded.

    Inference only: in training mode, or when a gradient would flow through it (grad enabled and
    an input that requires grad), it raises a RuntimeError; there is no backward.

    `blocking`: None runs the blocking `python -m triton_adder.tune` cached for this CPU, layer shape
    and thread count (`quant.tuned.blocking_for`), else `native.DEFAULT_BLOCKING` of the variant in
    use; a `native.Blocking` overrides both (the tuner sets it, benchmarks compare).
    """

    def __init__(self, layer: Adder2d, scale: float):
        super().__init__()
        if not isinstance(layer, Adder2d):
            raise TypeError(f"layer must be a triton_adder.nn.Adder2d, got {type(layer).__name__}")
        if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive, finite float, got {scale!r}")
        self.in_channels, self.out_channels, self.groups = layer.in_channels, layer.out_channels, layer.groups
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.padding = layer.padding
        self.weight_dtype = layer.weight.dtype  # `weight`'s dtype: model code may cast its input to it
        self.tf_same = isinstance(layer, Adder2dSame)  # padding from each input's size (timm's Conv2dSame)
        self.blocking: native.Blocking | None = None
        cout, cg, kh, kw = layer.weight.shape
        if (2 * QMAX) * cg * kh * kw > INT32_SUM_LIMIT:
            raise ValueError(
                f"layer reduces over {cg * kh * kw} elements per output; int32 sums hold at most "
                f"{INT32_SUM_LIMIT // (2 * QMAX)}"
            )
        if layer.weight.numel() and not bool(torch.isfinite(layer.weight.detach()).all()):
            raise ValueError("cannot quantize: the layer's weight holds non-finite values")
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))
        self.register_buffer("weight_q", quantize_tensor(layer.weight, scale).to(torch.int8))
        clamped = clamped_amount(layer.weight, scale)
        if layer.bias is None and not bool(clamped.any()):
            bias = None
        else:
            bias = (
                torch.zeros(cout, dtype=torch.float64) if layer.bias is None else layer.bias.detach().double()
            ) - clamped
        self.register_buffer("bias", bias)
        self.register_buffer("output_scale", None)  # per channel, once a BatchNorm is folded in (`fold_batchnorm_`)
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self._pack()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._pack())
        self.eval()

    @classmethod
    def from_float(cls, layer: Adder2d, input_max: float) -> QuantizedAdder2d:
        """Quantize `layer` for inputs whose largest magnitude is `input_max`: s = input_max / 127 ("input_max"
        rule, `scale_for`), weights beyond +-127 s clamped and folded into the bias."""
        if not isinstance(input_max, (int, float)) or isinstance(input_max, bool) or not input_max >= 0:
            raise ValueError(f"input_max must be a non-negative number, got {input_max!r}")
        if not isinstance(layer, Adder2d):
            raise TypeError(f"layer must be a triton_adder.nn.Adder2d, got {type(layer).__name__}")
        return cls(layer, scale_for(input_max))

    def fold_batchnorm_(self, norm: nn.BatchNorm2d) -> QuantizedAdder2d:
        """Fold an eval-mode BatchNorm2d that takes this layer's output into the rescale, in place.

        The norm is ``a * y + c`` per channel, with ``a = gamma / sqrt(running_var + eps)`` and
        ``c = beta - a * running_mean``, so ``a * (b' - s * sum) + c = (a b' + c) - (a s) * sum``: the
        bias becomes ``a b' + c`` and the rescale ``a s`` per channel (`output_scale`, float64), at no
        cost in the epilogue, and the norm's own pass over the output goes away. Exact up to float64
        rounding; the error bound of the class docstring is multiplied by |a|. Returns self.
        """
        if not isinstance(norm, nn.BatchNorm2d) or norm.num_features != self.out_channels:
            raise ValueError(f"norm must be a BatchNorm2d over {self.out_channels} channels, got {norm!r}")
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("norm has no running statistics (track_running_stats=False): nothing fixed to fold")
        factor = (norm.running_var.detach().double() + norm.eps).rsqrt()
        if norm.weight is not None:
            factor = factor * norm.weight.detach().double()
        shift = -factor * norm.running_mean.detach().double()
        if norm.bias is not None:
            shift = shift + norm.bias.detach().double()
        bias = shift if self.bias is None else factor * self.bias + shift
        scale = self.output_scale if self.output_scale is not None else torch.full_like(factor, self.scale_value)
        if not (bool(torch.isfinite(bias).all()) and bool(torch.isfinite(factor * scale).all())):
            raise ValueError("cannot fold the BatchNorm: its statistics give a non-finite scale or shift")
        self.bias, self.output_scale = bias, factor * scale
        self._pack()
        return self

    def _pack(self) -> None:
        """weight_q -> [groups, tg_pad/8, kpad/8, 8 channels, 8 bytes] uint8 (+128): the kernel's 8-channel
        weight groups, K in (tap row, tap column, channel) order and in 8-byte steps; filler is 128. Also the
        epilogue's float64 per-channel rescale (`output_scale`, else s for every channel)."""
        cout, cg, kh, kw = self.weight_q.shape
        g, tg, k = self.groups, cout // self.groups, cg * kh * kw
        tg_pad = -(-tg // native.CHANNEL_GROUP) * native.CHANNEL_GROUP
        kpad = -(-k // native.K_MULTIPLE) * native.K_MULTIPLE
        rows = torch.full((g, tg_pad, kpad), 128, dtype=torch.uint8)
        rows[:, :tg, :k] = (self.weight_q.to(torch.int16) + 128).to(torch.uint8).permute(0, 2, 3, 1).reshape(g, tg, k)
        groups = rows.reshape(g, tg_pad // 8, 8, kpad // 8, 8).permute(0, 1, 3, 2, 4)
        self.weight_packed = groups.contiguous()
        self.padded_sizes = (tg_pad, kpad)
        if self.output_scale is not None:
            self.epilogue_scale = self.output_scale.double().contiguous()
        else:
            self.epilogue_scale = torch.full((cout,), self.scale_value, dtype=torch.float64)

    @property
    def scale_value(self) -> float:
        return float(self.scale)

    # The rest of nn.Conv2d's public attributes, for model code that reads them off the layer it replaced.
    padding_mode, transposed, output_padding = "zeros", False, (0, 0)

    @property
    def weight(self) -> torch.Tensor:
        """The weights the kernel compares with, dequantized (``weight_q * scale``) in the float layer's dtype: a
        new tensor each call, for model code that reads a layer's ``.weight`` (its dtype, shape or device)."""
        return (self.weight_q.double() * self.scale).to(self.weight_dtype)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"scale={self.scale_value:.6g}"
        )
        if self.output_scale is not None:
            text += ", batchnorm folded"
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.tf_same:
            text += ", padding=tf-same"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text

    # ----------------------------------------------------------------------------------------

    def _check_input(self, input) -> None:
        if self.training:
            raise RuntimeError(
                "QuantizedAdder2d is inference-only and has no training mode: call .eval() on the "
                "model (triton_adder.quantize returns it in eval mode); to train, use the float model"
            )
        if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4):
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"input must be a 3-d (C, H, W) or 4-d (N, C, H, W) tensor, got {shape}")
        if torch.is_grad_enabled() and input.requires_grad:
            raise RuntimeError(
                "QuantizedAdder2d has no backward (int8 inference only): call it under torch.no_grad() "
                "or torch.inference_mode(), or on an input that does not require grad; to train, "
                "use the float model"
            )
        if input.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"QuantizedAdder2d runs on the CPU only (C kernel) or on CUDA (Triton kernel), got an input on "
                f"{input.device}"
            )
        if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"input dtype must be float16, bfloat16, float32 or float64, got {input.dtype}")
        if input.shape[-3] != self.in_channels:
            raise ValueError(f"input has {input.shape[-3]} channels, the layer expects {self.in_channels}")

    def _geometry(self, size: tuple[int, int]) -> Conv2dGeometry:
        if not self.tf_same:
            return resolve_geometry(size, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
        pads = [same_padding(n, k, s, d) for n, k, s, d in zip(size, self.kernel_size, self.stride, self.dilation)]
        out = tuple(
            (n + before + after - d * (k - 1) - 1) // s + 1
            for n, (before, after), k, s, d in zip(size, pads, self.kernel_size, self.stride, self.dilation)
        )
        return Conv2dGeometry(self.stride, (pads[0][0], pads[1][0]), self.dilation, self.groups, out)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        out = self._run(x, integer=False)
        return out.squeeze(0) if unbatched else out

    def integer_sums(self, input: torch.Tensor) -> torch.Tensor:
        """sum |x_q - w_q| as int32 (N, Cout, Ho, Wo), through the path `forward` takes (tests compare it)."""
        self._check_input(input)
        return self._run(input if input.dim() == 4 else input.unsqueeze(0), integer=True)

    def _run(self, x: torch.Tensor, integer: bool) -> torch.Tensor:
        geom = self._geometry(tuple(x.shape[-2:]))
        if x.is_cuda:
            return self._triton(x, geom, integer)
        library = native.load()
        if library is None:
            return self._fallback(x, geom, integer)
        return self._native(library, x, geom, integer)

    def _triton(self, x: torch.Tensor, geom: Conv2dGeometry, integer: bool) -> torch.Tensor:
        """The Triton int8 kernel (kernels/forward_int8.py): the same sums, rescaled in float32 with the
        folded bias b'. CUDA inputs come here; tests call it on the CPU under TRITON_INTERPRET=1."""
        from triton_adder.kernels import forward_int8  # noqa: PLC0415

        if self.output_scale is None or integer:
            return forward_int8.forward(x, self.weight_q, self.bias, self.scale_value, geom, integer=integer)
        # A folded BatchNorm scales each channel: the kernel's int32 sums, rescaled here in float64.
        sums = forward_int8.forward(x, self.weight_q, None, self.scale_value, geom, integer=True)
        return self._rescale(sums, x)

    def _native(self, library: native.Library, x: torch.Tensor, geom: Conv2dGeometry, integer: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        (kh, kw), (ho, wo) = self.kernel_size, geom.out_size
        g, cout = self.groups, self.out_channels
        tg_pad, kpad = self.padded_sizes
        threads = torch.get_num_threads()
        if self.blocking is not None:
            blocking = self.blocking.check("QuantizedAdder2d.blocking")
        else:
            from triton_adder.quant import tuned  # noqa: PLC0415  (reads the tuning cache: only when needed)

            blocking = tuned.blocking_for(library, x.shape, self.weight_q.shape, geom, threads)
        threads = min(threads, blocking.threads or threads)
        dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        quantize = library.lib.ta_quantize_f64 if x.dtype == torch.float64 else library.lib.ta_quantize_f32
        xq = _scratch(0, n * h * w * c).view(n, h, w, c)
        quantize(x.data_ptr(), n, c, h, w, *x.stride(), 1.0 / self.scale_value, xq.data_ptr(), threads)
        m = n * ho * wo
        m_pad = -(-m // blocking.mr) * blocking.mr
        identity = (
            (kh, kw) == (1, 1)
            and geom.stride == (1, 1)
            and geom.padding == (0, 0)
            and g == 1
            and c == kpad
            and m_pad == m
            and (ho, wo) == (h, w)
        )
        if identity:  # a 1x1, stride-1 layer over a multiple of 64 channels reads the quantized input as is
            a = xq
        else:
            a = _scratch(1, g * m_pad * kpad).view(g, m_pad, kpad)
            library.lib.ta_im2col(
                xq.data_ptr(),
                n,
                h,
                w,
                c,
                g,
                kh,
                kw,
                *geom.stride,
                *geom.padding,
                *geom.dilation,
                ho,
                wo,
                m_pad,
                kpad,
                a.data_ptr(),
                threads,
            )
        channels_last = not integer and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if integer:
            out_dtype, kind = torch.int32, native.OUT_I32
        elif x.dtype == torch.float64:
            out_dtype, kind = torch.float64, native.OUT_F64
        else:
            out_dtype, kind = torch.float32, native.OUT_F32
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(n, cout, ho, wo, dtype=out_dtype, memory_format=memory_format)
        s_n, s_c, _, s_w = out.stride()
        bias = None if self.bias is None or integer else self.bias.detach().double().contiguous()
        status = library.lib.ta_sad_forward(
            a.data_ptr(),
            m,
            m_pad,
            self.weight_packed.data_ptr(),
            cout // g,
            tg_pad,
            g,
            kpad,
            ho * wo,
            out.data_ptr(),
            kind,
            s_n,
            s_c,
            s_w,
            None if bias is None else bias.data_ptr(),
            self.epilogue_scale.data_ptr(),
            blocking.mr,
            blocking.nr,
            blocking.mc,
            blocking.nc,
            blocking.kc,
            threads,
        )
        if status != 0:
            raise RuntimeError(f"the int8 SAD kernel refused its arguments (status {status}, blocking {blocking})")
        return out if integer or out.dtype == dtype else out.to(dtype)

    def _fallback(self, x: torch.Tensor, geom: Conv2dGeometry, integer: bool) -> torch.Tensor:
        """The same integer sums through the float adder path (no C compiler): exact, as every partial
        sum is an integer below 2**24 in float32 (or 2**53 in float64, taken for longer reductions)."""
        from triton_adder.functional import adder2d  # noqa: PLC0415

        cout, cg, kh, kw = self.weight_q.shape
        dtype = torch.float32 if 2 * QMAX * cg * kh * kw < 2**24 else torch.float64
        xq = quantize_tensor(x, self.scale_value).to(dtype)
        wq = self.weight_q.to(dtype)
        top, left = geom.padding
        hpad, wpad = geom.padded_extent(self.kernel_size)
        # Pad explicitly (zeros are quantized zeros), then one padding-0 call covers every padding form.
        xq = nn.functional.pad(xq, (left, max(0, wpad - left - xq.shape[3]), top, max(0, hpad - top - xq.shape[2])))
        with torch.no_grad():
            sums = -adder2d(xq, wq, None, geom.stride, 0, geom.dilation, self.groups)
        if integer:
            return sums.round().to(torch.int32)
        return self._rescale(sums, x)

    def _rescale(self, sums: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """bias - output scale * sums in float64, rounded once to x's dtype, in x's memory format (the C
        kernel's epilogue, for the paths that compute the sums elsewhere)."""
        scale = self.epilogue_scale.to(sums.device)[None, :, None, None]
        out = sums.double() * -scale
        if self.bias is not None:
            out += self.bias.double()[None, :, None, None]
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return out.to(x.dtype).contiguous(memory_format=memory_format)


def _adder_layers(model: nn.Module) -> list[tuple[str, Adder2d]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Adder2d)]


def _run_batch(model: nn.Module, batch, index: int) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, dict):
        model(**batch)
    else:
        raise TypeError(
            f"calibration batch {index} must be a tensor, a tuple/list of positional arguments or a dict "
            f"of keyword arguments for the model, got {type(batch).__name__}"
        )


class _Tracer(fx.Tracer):
    """fx's tracer, with the quantized layers (their forward calls ctypes) and every batch norm as leaves (a
    subclass such as timm's BatchNormAct2d checks its input's rank, which a trace cannot)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (QuantizedAdder2d, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(
            module, qualified_name
        )


def fold_batchnorms_(model: nn.Module) -> list[str]:
    """Fold into its `QuantizedAdder2d` every BatchNorm2d that is the sole consumer of that layer's output
    (`QuantizedAdder2d.fold_batchnorm_`), replacing the norm by nn.Identity, in place; returns the folded
    norms' names. Found with a torch.fx trace: the layer and the norm each called once, the norm on the
    layer's output alone, nothing else reading that output; a BatchNorm2d subclass (timm's BatchNormAct2d
    adds an activation) is left alone, and so is every norm of a model fx cannot trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001  (control flow on values, unsupported ops: an optimisation skipped)
        return []
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), QuantizedAdder2d):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,) or users[0].kwargs:
            continue
        name = users[0].target
        norm = model.get_submodule(name)
        if type(norm) is not nn.BatchNorm2d or norm.running_mean is None or calls[name] != 1 or calls[node.target] != 1:
            continue
        model.get_submodule(node.target).fold_batchnorm_(norm)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, nn.Identity())
        folded.append(name)
    return folded


def quantize(model: nn.Module, calibration, *, rule: str = "input_max", fold_batchnorm: bool = True) -> nn.Module:
    """A copy of `model` for int8 inference on the CPU: every `Adder2d` (and `Adder2dSame`) becomes a
    `QuantizedAdder2d`; everything else is untouched. `model` itself is not modified.

    Args:
        model: an `nn.Module` holding at least one `Adder2d` (else a ValueError: convert a CNN first
            with `triton_adder.convert`), or an `Adder2d` itself.
        calibration: an iterable of input batches (a list, a DataLoader): each a tensor (``model(x)``),
            a tuple/list (``model(*args)``) or a dict (``model(**kwargs)``). The copy runs them in
            eval mode under no_grad; forward pre-hooks record each adder layer's max |input|.
            A bare tensor is refused (iterating it would give single images): pass ``[x]``.
        rule: "input_max" (`RULES`, the only one): ``s = max |x| seen / 127`` per layer, from the
            input alone, so no calibrated input clips; weights beyond +-127 s are clamped and the
            clamped amount folded into the bias, exact for every input within +-127 s. An input
            beyond that at inference clips to +-127 s: each such term then errs by up to
            ``|x| - 127 s`` instead of ``s / 2`` (DESIGN.md section 7).
        fold_batchnorm: fold each BatchNorm2d that only normalises an adder layer's output into that
            layer's rescale and replace it by nn.Identity (`fold_batchnorms_`; the norm's statistics
            must be those the model runs with: the copy is in eval mode). False keeps every norm.

    Returns the copy in eval mode with every parameter's requires_grad off, so it runs without
    torch.no_grad(); a QuantizedAdder2d still raises in training mode or if its input requires grad.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "calibration must be an iterable of batches, e.g. [x] or a DataLoader; got a bare tensor "
            f"of shape {tuple(calibration.shape)} (iterating it would give its rows): wrap it in a list"
        )
    try:
        batches = iter(calibration)
    except TypeError:
        raise TypeError(
            f"calibration must be an iterable of input batches (a list or a DataLoader), "
            f"got {type(calibration).__name__}"
        ) from None
    if not _adder_layers(model):
        raise ValueError(
            f"model has no triton_adder Adder2d layer to quantize ({type(model).__name__}); "
            "convert a CNN first with triton_adder.convert"
        )
    copied = copy.deepcopy(model)
    copied.eval()
    layers = _adder_layers(copied)
    maxima: dict[str, float] = {}

    def recorder(name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.numel():
                peak = float(x.detach().abs().max())
                if not math.isfinite(peak):
                    raise ValueError(
                        f"calibration: the input of adder layer {name or '<model>'!r} holds non-finite "
                        f"values (max |x| = {peak})"
                    )
                maxima[name] = max(maxima.get(name, 0.0), peak)
            elif isinstance(x, torch.Tensor):
                maxima.setdefault(name, 0.0)

        return hook

    handles = [module.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, module in layers]
    count = 0
    try:
        with torch.no_grad():
            for count, batch in enumerate(batches, start=1):
                _run_batch(copied, batch, count - 1)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibration gave no batches: pass at least one input batch (e.g. [x])")
    missed = [name or "<model>" for name, _ in layers if name not in maxima]
    if missed:
        raise ValueError(
            f"calibration never ran adder layers {missed}: their input range is unknown; calibrate "
            "with inputs that reach every layer"
        )
    if isinstance(copied, Adder2d):
        return QuantizedAdder2d.from_float(copied, maxima[""])
    for name, module in layers:
        parent_name, _, attribute = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, attribute, QuantizedAdder2d.from_float(module, maxima[name]))
    if fold_batchnorm:
        fold_batchnorms_(copied)
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied
