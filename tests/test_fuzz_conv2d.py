"""Differential fuzzing of `adder2d` against `torch.nn.functional.conv2d` (hypothesis).

For generated arguments (batch, channels, groups, sizes, kernel, stride, padding as ints, pairs or
"same"/"valid", dilation, no bias or a contiguous, sliced or expanded one, dtype, NCHW,
channels_last or a strided view of the input):
- what conv2d rejects, adder2d rejects with a ValueError or TypeError (never an internal error);
- what conv2d accepts, adder2d accepts, with conv2d's output shape, dtype and memory format, and
  values equal to an independent float64 reference (`unfold_reference`, written here from
  F.unfold, not the library's `reference.py`) within the library's tolerance for the dtype and
  the number of terms summed; the exact-mode gradients equal autograd's of that reference.
Three paths: the CPU path eager and compiled, and the Triton kernels through the interpreter.
Examples per path are bounded so the file runs in about a minute on 2 cores; the compiled path
compiles once per new shape, so it gets the fewest.
"""

import pytest
import torch
import torch.nn.functional as F

import triton_adder
from tests.tolerance import assert_matches_reference
from triton_adder import backends
from triton_adder.backends import cpu

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

PATHS = {"cpu_eager": 40, "cpu_compiled": 5, "triton_interpreter": 15}  # examples per path


def unfold_reference(x, weight, bias, stride, padding, dilation, groups):
    """float64 -sum |X - W| (+ bias) through F.unfold, with conv2d's argument conventions."""
    x, weight = x.double(), weight.double()
    n, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    if padding == "valid":
        padding = (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, (kh, kw))]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = (0, 0)
    columns = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # N, Cin*kh*kw, L
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    columns = columns.view(n, groups, 1, cg * kh * kw, ho * wo)
    filters = weight.view(groups, cout // groups, cg * kh * kw, 1)
    y = -(columns - filters[None]).abs().sum(dim=3).reshape(n, cout, ho, wo)
    return y if bias is None else y + bias.double().view(1, -1, 1, 1)


def pair(value):
    return value if isinstance(value, str) else (value, value) if isinstance(value, int) else tuple(value)


@st.composite
def conv_arguments(draw):
    """Mostly arguments conv2d accepts (sizes at least the dilated kernel after padding, stride 1 with
    "same"), one in five drawn freely, so both sides of the accept/reject line are exercised."""
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    int_or_pair = lambda low, high: st.one_of(st.integers(low, high), st.tuples(st.integers(low, high),  # noqa: E731
                                                                                  st.integers(low, high)))
    dilation = draw(int_or_pair(1, 3))
    padding = draw(st.one_of(int_or_pair(0, 3), st.sampled_from(["same", "valid"])))
    free = draw(st.integers(0, 4)) == 0
    stride = draw(int_or_pair(1, 3)) if free or padding != "same" else 1
    size = []
    for axis in range(2):
        pad = 0 if isinstance(padding, str) else pair(padding)[axis]
        smallest = 1 if free else max(1, pair(dilation)[axis] * (kernel[axis] - 1) + 1 - 2 * pad)
        size.append(draw(st.integers(smallest, smallest + 5)))
    return dict(
        n=draw(st.integers(1, 2)), cin=cin, cout=cout, groups=groups, kernel=kernel, size=tuple(size),
        stride=stride, padding=padding, dilation=dilation,
        bias=draw(st.sampled_from([None, "contiguous", "strided", "expanded"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def operands(a):
    generator = torch.Generator().manual_seed(a["seed"])
    n, (h, w) = a["n"], a["size"]
    shape = (n, a["cin"], h, w) if a["layout"] != "strided" else (n, a["cin"], h, 2 * w)
    x = torch.randn(shape, generator=generator, dtype=a["dtype"])
    if a["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif a["layout"] == "strided":
        x = x[..., ::2]  # a view with a width stride of 2
    weight = torch.randn(a["cout"], a["cin"] // a["groups"], *a["kernel"], generator=generator, dtype=a["dtype"])
    bias = {
        None: lambda: None,
        "contiguous": lambda: torch.randn(a["cout"], generator=generator, dtype=a["dtype"]),
        "strided": lambda: torch.randn(2 * a["cout"], generator=generator, dtype=a["dtype"])[::2],  # a slice
        "expanded": lambda: torch.randn(1, generator=generator, dtype=a["dtype"]).expand(a["cout"]),  # stride 0
    }[a["bias"]]()
    return x, weight, bias


def check_against_conv2d(a):
    x, weight, bias = operands(a)
    conv_args = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
    try:
        expected_like = F.conv2d(x, weight, bias, **conv_args)
    except RuntimeError:
        with pytest.raises((ValueError, TypeError)):
            triton_adder.adder2d(x, weight, bias, **conv_args)
        return
    x.requires_grad_(True)
    weight.requires_grad_(True)
    y = triton_adder.adder2d(x, weight, bias, grad_mode="exact", **conv_args)
    assert y.shape == expected_like.shape and y.dtype == expected_like.dtype
    for memory_format in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=memory_format) == expected_like.is_contiguous(
            memory_format=memory_format
        ), f"memory format differs from conv2d's ({memory_format})"
    if y.numel() == 0:
        return
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    stride, dilation = pair(a["stride"]), pair(a["dilation"])
    expected = unfold_reference(x64, w64, bias, stride, pair(a["padding"]), dilation, a["groups"])
    terms = weight.shape[1] * weight.shape[2] * weight.shape[3]
    assert_matches_reference(y.detach(), expected.detach(), a["dtype"], terms)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(a["seed"] + 1), dtype=a["dtype"])
    grad_x, grad_w = torch.autograd.grad(y, (x, weight), grad_out)
    expected_x, expected_w = torch.autograd.grad(expected, (x64, w64), grad_out.double())
    assert_matches_reference(grad_x, expected_x, a["dtype"], a["cout"] // a["groups"] * a["kernel"][0] * a["kernel"][1])
    assert_matches_reference(grad_w, expected_w, a["dtype"], y.shape[0] * y.shape[2] * y.shape[3])


@pytest.mark.parametrize("path", list(PATHS))
def test_adder2d_agrees_with_conv2d_and_a_float64_reference(path, monkeypatch):
    if path == "triton_interpreter":
        if torch.cuda.is_available() or not backends.triton_interpreter_enabled():
            pytest.skip("the Triton path runs here through the interpreter (tests/conftest.py turns it on)")
        context = backends.use_backend("triton")
    else:
        monkeypatch.setenv(cpu.COMPILE_ENV, "1" if path == "cpu_compiled" else "0")
        context = backends.use_backend("cpu")

    @hypothesis.settings(max_examples=PATHS[path], deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    @hypothesis.given(conv_arguments())
    def run(arguments):
        check_against_conv2d(arguments)

    with context:
        run()
