"""Comparison with the float64 reference under the library's one tolerance table
(`triton_adder.tolerance`, which explains every entry)."""

import torch

from triton_adder.tolerance import tolerances


def assert_matches_reference(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction_length: int, equal_nan: bool = False
):
    """Compare `actual` (any dtype) with a float64 `expected`; reduction_length is the terms summed per output.

    Infinities must match exactly; equal_nan: NaN where `expected` has NaN (and only there) passes.
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), equal_nan=equal_nan, **tolerances(dtype, reduction_length)
    )
