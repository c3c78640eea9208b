"""The one table of test tolerances, shared by every test that compares with the float64 reference.

An adder output is a sum of R = Cin/groups * kh * kw terms |x - w| (inputs ~N(0,1), so each
term is O(1)). Float32 accumulation error grows with R, so atol is per reduced term and is
multiplied by R (the FlagGems convention). Per dtype:
- float32: float32 inputs are exact in float64; error is accumulation only,
  ~R * 2^-24 * |term| worst case -> 1e-6 per term, rtol 1e-5.
- float16: the reference sees the same float16 values (exact in float64); kernels may form
  x - w in float16 (packed HADD2), one rounding of 2^-11 relative per term -> 1e-3 per term;
  the output is rounded to float16 (half-ulp 2^-11 ~ 4.9e-4) -> rtol 1e-3.
- bfloat16: same argument with 2^-8 -> 8e-3 per term, rtol 8e-3.
Gradients are sums over N*Ho*Wo (weight) or Cout*kh*kw (input) terms; pass that count as
`reduction_length`.
"""

import torch

ATOL_PER_TERM = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction_length: int):
    """Compare `actual` (any dtype) with a float64 `expected` under the table above."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        atol=ATOL_PER_TERM[dtype] * max(1, reduction_length),
        rtol=RTOL[dtype],
    )
