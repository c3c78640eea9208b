"""The one table of expected numerical error of an adder computation against float64 truth.

An adder output is a sum of R = Cin/groups * kh * kw terms |x - w| (inputs ~N(0,1), so each
term is O(1)). Float32 accumulation error grows with R, so atol is per reduced term and is
multiplied by R (the FlagGems convention). Per dtype:
- float32: float32 inputs are exact in float64; error is accumulation only,
  ~R * 2^-24 * |term| worst case -> 1e-6 per term, rtol 1e-5.
- float16: the reference sees the same float16 values (exact in float64); kernels may form
  x - w in float16 (packed HADD2), one rounding of 2^-11 relative per term -> 1e-3 per term;
  the output is rounded to float16 (half-ulp 2^-11 ~ 4.9e-4) -> rtol 1e-3.
- bfloat16: same argument with 2^-8 -> 8e-3 per term, rtol 8e-3.
Gradients are sums over N*Ho*Wo (weight) or Cout*kh*kw (input) terms; that count is their R.
Tests use this table against the float64 reference; the tuner uses it (widened) to compare a
candidate config's output with the default config's.
"""

import torch

ATOL_PER_TERM = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}


def tolerances(dtype: torch.dtype, reduction_length: int, widen: float = 1.0) -> dict:
    """{"atol", "rtol"} for a result of `dtype` reduced over `reduction_length` terms, times `widen`."""
    return {"atol": widen * ATOL_PER_TERM[dtype] * max(1, reduction_length), "rtol": widen * RTOL[dtype]}
