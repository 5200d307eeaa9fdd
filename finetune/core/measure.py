"""What a stage costs: the seconds of its phases, and its peak memory measured from its start (the
process's resident set and, once CUDA is in use, the GPU memory that torch allocated).

Linux lets a process reset its resident-set high-water mark (writing 5 to /proc/self/clear_refs), so each
stage's peak is its own and not the run's so far. Elsewhere the host figure is left out (None) rather than
reported wrong. Processes a stage starts (data-parallel ranks, a converter) are not counted.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _resident_peak_bytes() -> int | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _reset_resident_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _cuda():
    """torch.cuda if this process has initialized it already (a stage that never touches CUDA pays nothing)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class PeakMemory:
    """Peaks from now on: created at a stage's start, `read()` at its end gives `peak_rss_bytes` and
    `peak_gpu_bytes` (None where not measured)."""

    def __init__(self) -> None:
        self._resettable = _reset_resident_peak()
        if (cuda := _cuda()) is not None:
            cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, Any]:
        cuda = _cuda()  # a stage may have initialized CUDA itself
        return {
            "peak_rss_bytes": _resident_peak_bytes() if self._resettable else None,
            "peak_gpu_bytes": int(cuda.max_memory_allocated()) if cuda is not None else None,
        }


class Laps:
    """Seconds of a stage's phases, in order: `lap(name)` closes the phase that ran since the last lap (or
    since the start). Results that come back to the host (a .cpu(), a list of ids) end a GPU phase's work."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now
