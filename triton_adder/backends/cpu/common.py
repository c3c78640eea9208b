"""What the CPU backend's three passes share: budgets, the compiled-callable cache, chunking, layout.

Compilation. Each reduction is a plain torch function (`forward._forward_body`, ...) traced with
``make_fx`` (fake tensors, so nothing is materialised while tracing) and compiled with
``torch._inductor.compile`` once per (function, shapes, strides, dtype), or, with
TRITON_ADDER_CPU_COMPILE=symbolic, once per structural variant with symbolic sizes and strides,
reused under the guards the trace and inductor recorded (`SYMBOLIC`: faster first calls, slower
steps). This bypasses dynamo: there are no guards to re-check per call and no per-code-object
``recompile_limit`` (default 8) to run into with a model of many layer shapes, no global dynamo
setting is touched, and the compiled callables are plain functions that also run when the whole
model is under ``torch.compile(fullgraph=True)`` (the custom op is opaque there, so this code runs
eagerly inside the compiled graph). The first call of a new shape costs about 1-20 s of
compilation; later calls reuse the cached callable, and later processes the module inductor
generated for it (`code_index`, by default).

Memory. The compiled reductions are fused: their only allocations are the padded input copy,
padded grad_out copies and the outputs, all O(activation size); the [Cout, Cin*kh*kw, N*Ho*Wo]
broadcast of the published unfold implementation never exists. Where no compiler works
(compilation raises, e.g. no C++ compiler; a warning is issued once), with
``TRITON_ADDER_CPU_COMPILE=0``, while dynamo is tracing, or for tensors that are not on the CPU
(the portable path), the SAME functions run eagerly on chunks of output rows (and of channels,
for very wide layers), sized so each chunk's broadcast temporaries stay within the budget
``TRITON_ADDER_CPU_MEMORY_MB`` (megabytes, default `DEFAULT_MEMORY_BUDGET_MB`). The smallest
chunk is one output row of one image and one channel, so a budget below that size is exceeded by
that much.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable

import torch

from triton_adder import contract
from triton_adder.backends.cpu import code_index
from triton_adder.geometry import Conv2dGeometry

DEFAULT_MEMORY_BUDGET_MB = 256
"""Default budget (MB) for the broadcast temporaries of one eager chunk; env TRITON_ADDER_CPU_MEMORY_MB overrides."""

MEMORY_BUDGET_ENV = "TRITON_ADDER_CPU_MEMORY_MB"
COMPILE_ENV = "TRITON_ADDER_CPU_COMPILE"
"""0: skip compilation and always run the chunked eager path; 1 (default): compile per exact operand
sizes and strides; "symbolic": compile once per structural variant (`SYMBOLIC`)."""

SYMBOLIC = "symbolic"
"""The COMPILE_ENV value that compiles with symbolic sizes and strides: ResNet-50's first step at
batch 2 compiles 19 graphs instead of 56 (cold 60 s instead of 95 s on a 2-core box,
`results/benchmarks/cold_start.txt`), but later steps take 1.23-1.41x as long
(`results/benchmarks/cpu_symbolic_ab.txt`), and it keeps no `code_index`, so a warm process is
slower than the default's (17 s vs 5.5 s): only for a short run on a machine that has never run
the model."""

INDUCTOR_ALIGNMENT_BYTES = 16
"""`torch._inductor.utils.ALIGNMENT`: inductor assumes inputs aligned to this unless told otherwise."""

WEIGHT_BLOCK_BYTES = 512 * 1024
"""The compiled forward splits the output channels into blocks whose weights take about this many bytes."""

COMPILED_CACHE_SIZE = 512
"""How many compiled (function, shape) callables are kept (least recently used are dropped)."""

# Eager chunks hold a few full-size broadcast temporaries at once (difference, its abs/sign,
# the product); count 3 per broadcast element when sizing chunks.
TEMPORARIES_PER_ELEMENT = 3


def memory_budget_bytes() -> int:
    """The eager path's per-chunk temporary budget in bytes (env TRITON_ADDER_CPU_MEMORY_MB, else the default)."""
    raw = os.environ.get(MEMORY_BUDGET_ENV)
    if raw is None or raw == "":
        return DEFAULT_MEMORY_BUDGET_MB * 2**20
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"{MEMORY_BUDGET_ENV} must be a positive, finite number of megabytes, got {raw!r}") from None
    if not math.isfinite(megabytes) or megabytes <= 0:
        raise ValueError(f"{MEMORY_BUDGET_ENV} must be a positive, finite number of megabytes, got {raw!r}")
    return int(megabytes * 2**20)


def compile_mode() -> str:
    """"eager", "exact" or "symbolic", from $TRITON_ADDER_CPU_COMPILE (see COMPILE_ENV)."""
    raw = os.environ.get(COMPILE_ENV, "1")
    modes = {"0": "eager", "": "eager", "1": "exact", SYMBOLIC: "symbolic"}
    if raw not in modes:
        raise ValueError(f"{COMPILE_ENV} must be 0, 1 or {SYMBOLIC!r}, got {raw!r}")
    return modes[raw]


def compiler_enabled() -> bool:
    """False when TRITON_ADDER_CPU_COMPILE=0 or a compilation failed earlier in this process."""
    return compile_mode() != "eager" and _compiler_failure is None


# --------------------------------------------------------------------------------------------
# Compiled-callable cache and eager fallback.
# --------------------------------------------------------------------------------------------

_compiled = collections.OrderedDict()
"""Exact call signature -> compiled callable (LRU): after the first call of a shape, one dict probe."""
_families: dict[tuple, list[_Variant]] = {}
_compile_lock = threading.Lock()
_compiler_failure: str | None = None
compile_count = 0
"""How many callables this process has compiled (benchmarks and tests read it)."""
_recording = threading.local()
"""`.calls`, in the thread where `recording()` is on: the (fn, options, signature) of each compiled call,
which returns zeros; other threads keep computing for real."""


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One compilation and, in symbolic mode, the guards under which it serves a new signature.

    An exact-mode compilation is only reused for its own signature (`_compiled`), never looked up here.
    """

    compiled: Callable
    shape_env: object  # the ShapeEnv that evaluates `guards`; None in exact mode
    guards: str | None  # over the arguments (`ShapeEnv.produce_guards_expression`); None: none recorded


def _inductor_compile(fn, args, symbolic: bool) -> _Variant:
    """Trace `fn` on fake copies of `args` and compile the graph with inductor (no dynamo).

    symbolic False: for these exact sizes and strides. True: sizes 0 and 1 (and storage offset 0)
    are specialised; every other size and stride is its own symbol (no "duck sizing", which would
    tie sizes that happen to be equal, Cin == Cout say, and compile again for a layer where they
    differ), so one compilation serves every layer that differs only in sizes. The guards record
    what was specialised and what inductor assumed while compiling (`compiled_call` checks them
    before reusing the callable).
    """
    from torch._guards import detect_fake_mode  # noqa: PLC0415  (slow imports, only when needed)
    from torch._inductor import compile as inductor_compile  # noqa: PLC0415
    from torch.fx.experimental import _config as shapes_config  # noqa: PLC0415
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    if not symbolic:
        return _Variant(inductor_compile(make_fx(fn, tracing_mode="fake")(*args), list(args)), None, None)
    with shapes_config.patch(use_duck_shape=False):
        graph = make_fx(fn, tracing_mode="symbolic")(*args)
    fakes = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
    fake_mode = detect_fake_mode(fakes)
    with fake_mode:
        compiled = inductor_compile(graph, fakes)
    shape_env = fake_mode.shape_env
    return _Variant(compiled, shape_env, shape_env.produce_guards_expression(fakes, ignore_static=False))


def _aligned(a: torch.Tensor) -> bool:
    return a.storage_offset() * a.element_size() % INDUCTOR_ALIGNMENT_BYTES == 0


def _canonical(a: torch.Tensor) -> torch.Tensor:
    """a as the compiled code should see it: starting at its storage's beginning, stride 1 on size-1 dims.

    The tracer specialises sizes 0 and 1 and a storage offset of 0, and keeps the stride of a size-1
    dim as a symbol that guards can tie to other sizes. Views that start elsewhere (a channel block,
    a stride phase) are copied, which costs one pass over one operand (an activation or a weight
    block), small beside the reduction over it; a size-1 dim's stride, which addresses nothing, is
    set to 1. Without this, the same layer shape compiled again per block or memory format.
    """
    if a.storage_offset() != 0:
        a = a.clone()
    if 1 in a.shape:
        a = a.as_strided(a.shape, [1 if size == 1 else stride for size, stride in zip(a.shape, a.stride())])
    return a


def _signature(args) -> tuple:
    """Each argument's sizes, strides, dtype and alignment: the exact-reuse key of a compiled callable.

    Not the storage offset: inductor's graph inputs are buffers at the tensor's data pointer
    (`torch._inductor.graph` gives placeholders a `FixedLayout` of sizes and strides, offset 0), so
    one callable serves every channel block of a layer (keying on the offset compiled one callable
    per block: 683 for VGG's 512->4096 7x7 classifier). Only whether the data pointer is aligned is
    kept (`torch._inductor.utils.tensor_is_aligned`): a callable compiled for aligned inputs copies
    a misaligned one on every call, so misaligned blocks get their own callable instead.
    """
    return tuple((tuple(a.shape), a.stride(), a.dtype, _aligned(a)) for a in args)


def _family(args) -> tuple:
    """What no symbolic compilation generalises over: the arguments' ranks and dtypes."""
    return tuple((a.dim(), a.dtype) for a in args)


def _find_variant(family: tuple, args) -> _Variant | None:
    for variant in _families.get(family, ()):
        if variant.guards is None or variant.shape_env.evaluate_guards_expression(variant.guards, args):
            return variant
    return None


def _remember(key: tuple, compiled: Callable) -> None:
    _compiled[key] = compiled
    if len(_compiled) > COMPILED_CACHE_SIZE:
        _compiled.popitem(last=False)


@contextlib.contextmanager
def recording():
    """Within, in this thread: compiled calls compile and run nothing; each records (fn, options,
    signature) in the yielded list and returns zeros of its output's shape, strides and dtype (worked
    out on the meta device). `precompile` uses this for a dry step that costs the layout copies only."""
    if getattr(_recording, "calls", None) is not None:
        raise RuntimeError("common.recording() is already on in this thread (one dry step at a time)")
    _recording.calls = seen = []
    try:
        yield seen
    finally:
        _recording.calls = None


def _zeros_like_output(fn, options: dict, args) -> torch.Tensor:
    metas = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta") for a in args]
    out = fn(*metas, **options)
    return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=args[0].device).zero_()


def compiled_call(fn, options: dict, args):
    """Run fn(*args, **options) through a cached compiled callable; None if compiling is not possible.

    A new signature, by default, first tries the module an earlier process compiled for it
    (`code_index`). In "symbolic" mode (`compile_mode`) it first tries the compilations of the same
    function, options and family (`_family`) whose guards accept it, so layers that differ only in
    sizes share one compilation.
    """
    global _compiler_failure, compile_count
    symbolic = compile_mode() == "symbolic"
    if symbolic:
        args = tuple(_canonical(a) for a in args)
    head = (fn.__name__, tuple(sorted(options.items())), symbolic)
    signature = _signature(args)
    key = (*head, signature)
    recorded = getattr(_recording, "calls", None)
    if recorded is not None and not symbolic:
        recorded.append((fn, options, signature))
        return _zeros_like_output(fn, options, args)
    with _compile_lock:
        compiled = _compiled.get(key)
        if compiled is None and not symbolic:
            index_key = code_index.key(fn, options, signature)
            compiled = code_index.load(index_key)
            if compiled is not None:
                _remember(key, compiled)
        if compiled is None:
            family = (*head, _family(args))
            variant = _find_variant(family, args) if symbolic else None
            if variant is None:
                modules_before = code_index.loaded_modules()
                try:
                    with torch.no_grad():
                        variant = _inductor_compile(functools.partial(fn, **options), args, symbolic)
                except Exception as error:  # noqa: BLE001  (any compiler failure -> eager fallback)
                    _compiler_failure = f"{type(error).__name__}: {error}"
                    warnings.warn(
                        "triton_adder.backends.cpu: compiling the CPU adder kernels with torch inductor failed "
                        f"({_compiler_failure.splitlines()[0][:300]}); falling back to the chunked eager "
                        "implementation, which is correct and memory-bounded but ~10-100x slower.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    return None
                compile_count += 1
                if symbolic:
                    _families.setdefault(family, []).append(variant)
            compiled = variant.compiled
            module = None if symbolic else code_index.new_module(modules_before)
            if module is not None:  # run it as later processes will, and let them find it
                compiled = code_index.runner(module)
                code_index.store(index_key, module)
            _remember(key, compiled)
        else:
            _compiled.move_to_end(key)
    out = compiled(*args)
    return out[0] if isinstance(out, (list, tuple)) else out


def use_compiler(x: torch.Tensor) -> bool:
    """Compile for CPU tensors only: elsewhere (the portable path) the reductions run eagerly."""
    return x.device.type == "cpu" and compiler_enabled() and not torch.compiler.is_compiling()


def chunks(length: int, per_item_bytes: int, budget: int, minimum: int = 1):
    """Split range(length) into [start, stop) chunks of at most budget // per_item_bytes items."""
    step = max(minimum, min(length, budget // max(1, per_item_bytes)))
    for start in range(0, length, step):
        yield start, min(length, start + step)


def row_blocks(batch: int, rows: int, per_row_bytes: int, budget: int):
    """(n0, n1, r0, r1) blocks of (image, output row) with about `budget` bytes of temporaries each."""
    rows_per_block = max(1, budget // max(1, per_row_bytes))
    if rows_per_block >= rows:
        for n0, n1 in chunks(batch, rows * per_row_bytes, budget):
            yield n0, n1, 0, rows
    else:
        for n in range(batch):
            for r0 in range(0, rows, rows_per_block):
                yield n, n + 1, r0, min(rows, r0 + rows_per_block)


def weight_blocks(weight_bytes: int) -> int:
    """How many channel blocks to split a weight of this size into (measured: unsplit up to about
    2 blocks' worth, because splitting costs an output copy; 256ch 3x3 went from 5.2x to 3.2x conv2d)."""
    return 1 if weight_bytes <= 2 * WEIGHT_BLOCK_BYTES else -(-weight_bytes // WEIGHT_BLOCK_BYTES)


def channel_block(channels: int, blocks: int) -> int:
    """Channels per block when splitting `channels` into about `blocks` blocks: a multiple of 4, so
    that float32 blocks start on inductor's 16-byte alignment and all blocks of equal size share one
    compiled callable. A multiple of 4 that divides `channels` and is at most 1.5x the even split
    is taken when there is one (256 channels in 5 blocks: 4 of 64, not 4 of 52 and one of 48), so
    no shorter last block costs a second compilation; otherwise the last block is shorter (at most
    two callables per pass; symbolic compilation covers it too unless it is a single channel, a
    size the tracer specialises)."""
    even = -(-channels // blocks)
    block = min(channels, -(-even // 4) * 4)
    dividing = [size for size in range(block, int(1.5 * even) + 1, 4) if channels % size == 0]
    return dividing[0] if dividing else block


# --------------------------------------------------------------------------------------------
# Checks and layout.
# --------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str | None = None):
    if weight.device != x.device:
        raise ValueError(f"x and weight must be on one device, got x on {x.device} and weight on {weight.device}")
    if x.dtype not in contract.SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype must be one of {contract.SUPPORTED_DTYPES}, got {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-D, got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    if grad_mode is not None and grad_mode not in contract.GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {contract.GRAD_MODES}, got {grad_mode!r}")


def is_channels_last(x: torch.Tensor) -> bool:
    return contract.memory_format(x) == torch.channels_last


def padded_channels_last(x: torch.Tensor, kernel_size, geom: Conv2dGeometry, dtype: torch.dtype) -> torch.Tensor:
    """Zero-padded copy of x as a contiguous (N, Hpad, Wpad, Cin) buffer of `dtype`.

    Hpad/Wpad is exactly what the taps read (`geom.padded_extent`): input rows past it are
    dropped, missing rows (bottom/right padding) are zeros.
    """
    n, cin, h, w = x.shape
    hpad, wpad = geom.padded_extent(kernel_size)
    top, left = geom.padding
    xpad = x.new_zeros((n, hpad, wpad, cin), dtype=dtype)
    rows, cols = min(h, hpad - top), min(w, wpad - left)
    if rows > 0 and cols > 0:
        xpad[:, top : top + rows, left : left + cols] = x[:, :, :rows, :cols].permute(0, 2, 3, 1)
    return xpad


def taps_view(xpad: torch.Tensor, kernel_size, geom: Conv2dGeometry) -> torch.Tensor:
    """The strided view (N, Ho, Wo, kh, kw, G, Cg) of xpad: taps[n,p,q,i,j,g,k] = Xpad[n, p*s+i*d, q*s+j*d, g*Cg+k]."""
    n, _, _, cin = xpad.shape
    s_n, s_h, s_w, _ = xpad.stride()
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    cg = cin // geom.groups
    return xpad.as_strided(
        (n, ho, wo, *kernel_size, geom.groups, cg),
        (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, cg, 1),
        xpad.storage_offset(),
    )


def weight_taps_last(weight: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """weight (Cout, Cg, kh, kw) -> contiguous (G, Tg, kh, kw, Cg) of `dtype`."""
    cout, cg, kh, kw = weight.shape
    return weight.to(dtype).reshape(groups, cout // groups, cg, kh, kw).permute(0, 1, 3, 4, 2).contiguous()
