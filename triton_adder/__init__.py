"""triton-adder: fast, autotuned AdderNet layers (arXiv 1912.13200) for PyTorch.

Public API:
- `Adder2d`: drop-in replacement for `torch.nn.Conv2d` (negative L1 distance instead of MACs).
- `adder2d`: the functional form, with `torch.nn.functional.conv2d`'s arguments.
"""

from triton_adder.functional import adder2d
from triton_adder.nn import Adder2d

__all__ = ["Adder2d", "adder2d"]
__version__ = "0.1.0"
