"""The resolved geometry of one adder (or convolution) layer call.

Every backend (reference, CPU path, Triton kernels) receives the same `Conv2dGeometry`, already
validated and with symbolic padding ("same", "valid") resolved, so argument handling lives in
exactly one place (`functional.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class LayerShape:
    """One adder (or convolution) call: input (batch, cin, h, w), weight (cout, cin/groups, kh, kw)."""

    batch: int
    cin: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    geom: Conv2dGeometry

    @classmethod
    def of(cls, x_shape, weight_shape, geom: Conv2dGeometry) -> LayerShape:
        """From an input shape (N, Cin, H, W) and weight shape (Cout, Cin/groups, kh, kw)."""
        n, cin, h, w = (int(v) for v in x_shape)
        cout, _, kh, kw = (int(v) for v in weight_shape)
        return cls(n, cin, h, w, cout, kh, kw, geom)

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cin, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin // self.geom.groups, self.kh, self.kw)

    @property
    def name(self) -> str:
        """Short, stable key, e.g. "64x56x56->64 3x3 s1 p1" (d/g only when not 1)."""
        (sh, sw), (ph, pw), (dh, dw) = self.geom.stride, self.geom.padding, self.geom.dilation
        text = f"{self.cin}x{self.h}x{self.w}->{self.cout} {self.kh}x{self.kw} s{sh if sh == sw else (sh, sw)}"
        text += f" p{ph if ph == pw else (ph, pw)}"
        if (dh, dw) != (1, 1):
            text += f" d{dh if dh == dw else (dh, dw)}"
        if self.geom.groups != 1:
            text += f" g{self.geom.groups}"
        return text

    @property
    def elements(self) -> int:
        """Reduced elements |x - w| (or multiply-accumulates): N * Cout * Ho * Wo * Cin/groups * kh * kw."""
        ho, wo = self.geom.out_size
        return self.batch * self.cout * ho * wo * (self.cin // self.geom.groups) * self.kh * self.kw

    def columns(self) -> dict:
        (ho, wo) = self.geom.out_size
        return dict(layer=self.name, batch=self.batch, cin=self.cin, h=self.h, w=self.w, cout=self.cout,
                    kh=self.kh, kw=self.kw, stride=str(self.geom.stride), padding=str(self.geom.padding),
                    dilation=str(self.geom.dilation), groups=self.geom.groups, ho=ho, wo=wo)
