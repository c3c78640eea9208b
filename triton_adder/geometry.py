"""The resolved geometry of one adder (or convolution) layer call.

Every backend (reference, CPU path, Triton kernels) receives the same `Conv2dGeometry`, already
validated and with symbolic padding ("same", "valid") resolved, so argument handling lives in
exactly one place (`functional.py`).
"""

from __future__ import annotations

from typing import NamedTuple


class Conv2dGeometry(NamedTuple):
    """Resolved layer geometry.

    padding is the (top, left) zero padding. Bottom/right padding is implied by `out_size`:
    any input position a tap reads outside ``[0, H) x [0, W)`` is a zero (so it contributes
    ``-|w|`` to the adder sum). This also covers the asymmetric padding of ``padding="same"``
    with an even kernel, exactly as ``torch.nn.functional.conv2d`` does it.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out_size: tuple[int, int]

    def padded_extent(self, kernel_size: tuple[int, int]) -> tuple[int, int]:
        """(Hpad, Wpad): the rows/cols of the zero-padded input that the taps can read."""
        return tuple(
            (o - 1) * s + (k - 1) * d + 1
            for o, s, k, d in zip(self.out_size, self.stride, kernel_size, self.dilation)
        )
