"""Peak resident memory of a call: how the CPU backend's memory bound is measured (Linux)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _resident_megabytes(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise OSError(f"{key} not in /proc/self/status")


def peak_extra_rss_megabytes(fn: Callable[[], object]) -> float:
    """Peak resident memory (MB) while fn() runs, above the resident memory just before it (Linux only).

    Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark VmHWM to the current
    RSS; after fn() returns, VmHWM - RSS_before is the largest amount of memory fn() held at once,
    counting every allocation that touched pages (torch, numpy, the compiler), not only torch's.
    malloc_trim first hands freed heap pages back, so memory the allocator merely retained from
    earlier is not counted as "before" and then silently reused. Raises OSError where /proc is
    not writable.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _resident_megabytes("VmRSS:")
    fn()
    return _resident_megabytes("VmHWM:") - before
