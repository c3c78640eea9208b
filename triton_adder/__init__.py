"""triton-adder: fast, autotuned AdderNet layers (arXiv 1912.13200) for PyTorch.

Public API:
- `Adder2d`: drop-in replacement for `torch.nn.Conv2d` (negative L1 distance instead of MACs).
- `adder2d`: the functional form, with `torch.nn.functional.conv2d`'s arguments.
- `convert`: replace a model's `nn.Conv2d` layers by `Adder2d` (first and last kept by default).
- `adaptive_lr_`: the paper's per-layer adaptive learning-rate scaling (eq. 7-8), applied to
  gradients after backward (and after gradient synchronisation), like `clip_grad_norm_`.
- `models`: the paper's networks (`models.build("resnet20", adder=True)`).
- `precompile`: compile a model's CPU-path reductions ahead of its first step, in parallel
  worker processes (`backends.cpu.precompile`).
- `quantize`: a copy of a model for int8 inference on the CPU, its adder layers summing absolute
  differences of int8 operands with the SAD instruction (`quant`, DESIGN.md section 7).
"""

from triton_adder import models
from triton_adder.backends.cpu.precompile import precompile
from triton_adder.functional import adder2d
from triton_adder.models.convert import convert
from triton_adder.nn import Adder2d
from triton_adder.optim import adaptive_lr_
from triton_adder.quant import quantize

__all__ = ["Adder2d", "adder2d", "adaptive_lr_", "convert", "models", "precompile", "quantize"]
__version__ = "0.1.0"
