"""Where each convolution's output goes, so `convert` can tell which convolutions an adder layer may replace.

An adder layer outputs ``bias - sum|x - w|``, never positive with the usual zero bias. A normalisation after it
(the paper's networks put BatchNorm after every adder layer) recentres that; an activation, gate or residual
addition straight after it does not: ReLU outputs 0 everywhere and passes no gradient, a sigmoid gate closes.

The model becomes a small dataflow graph of `Node`s, built one of two ways:

- `fx_graph`: a `torch.fx` symbolic trace (no input needed). Convolutions, adder layers and normalisations are
  leaves; whether a convolution's input is 1x1 spatially is inferred structurally (global pooling, then 1x1-safe
  layers), since fx has no shapes.
- `run_graph`: one forward pass on an example input (eval mode, no grad), with forward hooks on leaf modules and a
  `TorchFunctionMode` recording the torch functions and tensor methods called between them (F.relu, x * gate,
  permute, cat, ...), which module hooks alone do not see. Shapes are the real ones.

`decide` then follows each convolution's output through shape-only operations (reshape, permute, pooling, cat,
dropout, ...) to what it reaches first.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from triton_adder.nn import Adder2d

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
"""Normalisation modules; timm's BatchNormAct2d / GroupNormAct / LayerNormAct subclass these, so they count."""
NORM_FUNCTIONS = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm"}
ACTIVATIONS = {
    "relu", "relu6", "silu", "gelu", "elu", "selu", "celu", "leaky_relu", "prelu", "rrelu", "hardswish", "mish",
    "softplus", "tanh", "hardtanh", "sigmoid", "hardsigmoid", "softmax", "log_softmax", "threshold", "clamp", "clip",
}  # fmt: skip
ADDITIONS = {"add", "iadd", "radd", "sub", "isub", "rsub"}
PRODUCTS = {"mul", "imul", "rmul", "div", "truediv", "rtruediv", "idiv"}
SHAPE_ONLY = {
    "view", "reshape", "permute", "flatten", "unflatten", "contiguous", "transpose", "chunk", "split", "squeeze",
    "unsqueeze", "getitem", "cat", "concat", "stack", "pad", "dropout", "dropout2d", "max_pool2d", "avg_pool2d",
    "max_pool2d_with_indices", "adaptive_avg_pool2d", "adaptive_max_pool2d", "interpolate", "to", "float", "half",
    "bfloat16", "clone", "mean", "amax", "narrow", "roll", "flip", "channel_shuffle", "pixel_shuffle", "movedim",
}  # fmt: skip
SHAPE_ONLY_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.Upsample, nn.PixelShuffle,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.padding._ConstantPadNd,
)  # fmt: skip


@dataclasses.dataclass
class Node:
    kind: str  # "conv", "norm", "activation", "addition", "product", "shape" (shape-only) or "other"
    label: str  # what it is, for reasons: "BatchNorm2d", "relu", "mul", ...
    inputs: list[int]
    module: nn.Module | None = None  # the convolution, for "conv" nodes
    one: bool = False  # for "conv" nodes: its input is 1x1 spatially


def _kind_of_module(module: nn.Module) -> tuple[str, str]:
    label = type(module).__name__
    if isinstance(module, (nn.Conv2d, Adder2d)):
        return "conv", label
    if isinstance(module, NORMS):
        return "norm", label
    if type(module).__module__ == "torch.nn.modules.activation":
        return "activation", label
    if isinstance(module, SHAPE_ONLY_MODULES):
        return "shape", label
    return "other", label


def _kind_of_function(name: str) -> tuple[str, str]:
    name = name.strip("_")  # operators (__mul__, __iadd__) and in-place variants (add_, relu_) alike
    for kind, names in (("norm", NORM_FUNCTIONS), ("activation", ACTIVATIONS), ("addition", ADDITIONS),
                        ("product", PRODUCTS), ("shape", SHAPE_ONLY)):  # fmt: skip
        if name in names:
            return kind, name
    return "other", name


def _is_leaf(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, Adder2d, *NORMS))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Convolution subclasses (timm's Conv2dSame, StdConv2d) and norm-act modules stay whole.
        return _is_leaf(m) or super().is_leaf_module(m, qualname)


def _global_pool(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether an fx node pools its input down to 1x1 (adaptive pooling to 1, or a keepdim mean over H and W)."""
    size = None
    if isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        size = module.output_size
    elif node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "adaptive_avg_pool2d", "adaptive_max_pool2d"):  # fmt: skip
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    elif node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in (
        "mean", "amax"):  # fmt: skip
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return keepdim is True and isinstance(dims, (tuple, list)) and {d % 4 for d in dims} == {2, 3}
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _conv_keeps_one(conv: nn.Module) -> bool:
    """Whether a convolution maps a 1x1 input to a 1x1 output."""
    geometry = zip(conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return not isinstance(conv.padding, str) and all(2 * p - d * (k - 1) < s for k, s, p, d in geometry)


def fx_graph(model: nn.Module) -> list[Node]:
    """The dataflow graph from a torch.fx symbolic trace; raises whatever tracing raises."""
    graph = _Tracer().trace(model)
    nodes: list[Node] = []
    index: dict[fx.Node, int] = {}
    out_one: list[bool] = []  # per node: its output is 1x1 spatially
    for node in graph.nodes:
        inputs = [index[n] for n in tree_flatten((node.args, node.kwargs))[0] if isinstance(n, fx.Node) and n in index]
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            kind, label = _kind_of_module(module)
        elif node.op in ("call_function", "call_method"):
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            kind, label = _kind_of_function(name)
        else:  # placeholder, get_attr, output
            kind, label = "other", "the model's output" if node.op == "output" else node.op
        one_in = bool(inputs) and all(out_one[i] for i in inputs)
        if kind == "conv":
            nodes.append(Node(kind, label, inputs, module, one_in))
            out_one.append(one_in and _conv_keeps_one(module))
        else:
            nodes.append(Node(kind, label, inputs))
            out_one.append(_global_pool(node, module) or (one_in and kind != "other"))
        index[node] = len(nodes) - 1
    return nodes


def run_graph(model: nn.Module, example_input) -> list[Node]:
    """The dataflow graph from running `model` once on `example_input` (a tensor or a tuple of arguments)."""
    nodes: list[Node] = []
    producer: dict[int, int] = {}  # id(tensor) -> node that last produced it
    alive: list[torch.Tensor] = []  # keeps every recorded tensor alive so no id is reused
    depth = [0]  # > 0 inside a leaf module, whose inner calls are not recorded

    def record(kind, label, args, out, module=None, one=False):
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        nodes.append(Node(kind, label, [producer[id(t)] for t in tensors if id(t) in producer], module, one))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                producer[id(t)] = len(nodes) - 1
                alive.append(t)

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if depth[0] == 0 and any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
                name = getattr(func, "__name__", str(func))
                record(*_kind_of_function(name), (args, kwargs), out)
            return out

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, out):
        depth[0] -= 1
        if depth[0] == 0:
            kind, label = _kind_of_module(module)
            one = kind == "conv" and tuple(args[0].shape[-2:]) == (1, 1)
            record(kind, label, args, out, module if kind == "conv" else None, one)

    leaves = [m for m in model.modules() if _is_leaf(m) or _kind_of_module(m)[0] in ("activation", "shape")]
    handles = [h for m in set(leaves) for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    training = {m: m.training for m in model.modules()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()  # eval: BatchNorm running statistics are not updated by this pass
        with torch.no_grad(), Recorder():
            for i, tensor in enumerate(args):  # the inputs are sources
                if isinstance(tensor, torch.Tensor):
                    record("other", f"input {i}", (), tensor)
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in training.items():
            m.training = mode
    return nodes


def decide(nodes: list[Node]) -> dict[int, tuple[str, str]]:
    """{id(conv module): (verdict, reason)} with verdict "norm", "fully_connected", "unnormalised" or "free".

    In this order: "norm": a use reaches a normalisation and none an activation, gate or addition first (fully
    connected or not: the paper's LeNet-5-BN has adder layers on a 1x1 map, each followed by BatchNorm);
    "fully_connected": its input is 1x1 spatially (squeeze-excitation, classifier heads); "unnormalised": a use
    reaches an activation, a gate (sigmoid, multiply) or an addition first; "free": its output goes on only to
    linear layers, other convolutions or the model's output. A module called several times combines its calls.
    """
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for j in set(node.inputs):
            consumers.setdefault(j, []).append(i)
    found: dict[int, dict] = {}
    for i, node in enumerate(nodes):
        if node.kind != "conv":
            continue
        entry = found.setdefault(id(node.module), {"one": True, "reached": []})
        entry["one"] &= node.one
        stack, seen = list(consumers.get(i, [])), set()
        while stack:
            j = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            if nodes[j].kind == "shape":
                stack.extend(consumers.get(j, []))
            else:
                entry["reached"].append(nodes[j])
        if not consumers.get(i):
            entry["reached"].append(Node("other", "the model's output", []))
    verdicts = {}
    for key, entry in found.items():
        reached = entry["reached"]
        bad = sorted({n.label for n in reached if n.kind in ("activation", "addition", "product")})
        norms = sorted({n.label for n in reached if n.kind == "norm"})
        if norms and not bad:
            verdicts[key] = ("norm", f"followed by {', '.join(norms)}")
        elif entry["one"]:
            verdicts[key] = ("fully_connected", "fully connected (its input is 1x1 spatially)")
        elif bad:
            verdicts[key] = ("unnormalised", f"output reaches {', '.join(bad)} without a normalisation")
        else:
            others = sorted({n.label for n in reached})
            verdicts[key] = ("free", f"output goes to {', '.join(others)}")
    return verdicts
