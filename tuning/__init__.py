"""Generic autotuner for launch configs: search space, search, benchmarker, persistent cache.

Knows nothing about what it tunes (it never imports triton_adder). Describe a problem as a
`Tunable` (knobs, constraints, problem key, a runner, a default), `search` it with a benchmarker,
and `TuningCache.store` the winner; at run time `TuningCache.lookup` finds it again.
Tuned configs for known GPUs ship as read-only JSON in ``tuning/configs/``; compile-time screening
verdicts (`verdicts`: valid for one Triton version, target and kernel source) in ``tuning/screens/``.
"""

from .benchmark import CudaEventBenchmarker, Measurement, WallClockBenchmarker, benchmarker_for, interleaved
from .cache import CacheHit, CacheLocationError, DeviceIdentity, TuningCache, bucket, device_identity
from .prune import PruneResult, ScreenOutOfTime, ScreenResult, prune, screen_configs, screen_time_left
from .search import Evaluation, ScreenFailed, TuningResult, search
from .space import (
    Config,
    Constraint,
    Knob,
    SearchSpace,
    Tunable,
    config_key,
    estimate_at_most,
    next_power_of_two,
    tile_within,
)
from .verdicts import (
    SHIPPED_SCREENS_DIR,
    ScreenIdentity,
    load_verdicts,
    verdict_entries,
    verdict_filename,
    write_verdicts,
)

__all__ = [
    "CacheHit",
    "CacheLocationError",
    "Config",
    "Constraint",
    "CudaEventBenchmarker",
    "DeviceIdentity",
    "Evaluation",
    "Knob",
    "Measurement",
    "PruneResult",
    "SHIPPED_SCREENS_DIR",
    "ScreenFailed",
    "ScreenIdentity",
    "ScreenOutOfTime",
    "ScreenResult",
    "SearchSpace",
    "Tunable",
    "TuningCache",
    "TuningResult",
    "WallClockBenchmarker",
    "benchmarker_for",
    "bucket",
    "config_key",
    "device_identity",
    "estimate_at_most",
    "interleaved",
    "load_verdicts",
    "next_power_of_two",
    "prune",
    "screen_configs",
    "screen_time_left",
    "search",
    "tile_within",
    "verdict_entries",
    "verdict_filename",
    "write_verdicts",
]
