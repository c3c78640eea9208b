"""int8 AdderNet inference on the CPU (issue 27, DESIGN.md section 7).

- `quantize(model, calibration)`: a copy of the model whose adder layers compute in int8.
- `QuantizedAdder2d`: one such layer (`module.py`).
- `native`: the C kernel (`sad.c`, VPSADBW on AVX-512BW or AVX2, else portable C), compiled at
  first use with the system C compiler and cached on disk.
"""

from triton_adder.quant.module import RULES, QuantizedAdder2d, quantize

__all__ = ["RULES", "QuantizedAdder2d", "quantize"]
