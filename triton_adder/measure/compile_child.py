"""Child process of `sass.compile_stats_isolated`: one launch's `CompileStats`, as JSON on stdout.

    python -m triton_adder.measure.compile_child < request.json

The request (`sass.isolated_request`) names the op, the operands' sizes, strides and dtype, the
geometry, the config, the grad mode and the target. The compile runs here, not in the caller,
because a Triton compile cannot be interrupted inside its process: the caller kills this one
when it runs past its deadline, and its memory (up to 2 GB for a large unrolled tile) goes with it.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.measure import sass


def _meta(operand: dict) -> torch.Tensor:
    return torch.empty_strided(operand["shape"], operand["stride"], dtype=getattr(torch, operand["dtype"]),
                               device="meta")  # fmt: skip


def main() -> None:
    request = json.load(sys.stdin)
    geom = Conv2dGeometry(*(tuple(v) if isinstance(v, list) else v for v in request["geom"]))
    config = None if request["config"] is None else KernelConfig(**request["config"])
    stats = sass.compile_stats(request["op"], _meta(request["x"]), _meta(request["weight"]), geom, config,
                               grad_mode=request["grad_mode"], arch=request["arch"])  # fmt: skip
    json.dump(dataclasses.asdict(stats), sys.stdout)


if __name__ == "__main__":
    main()
