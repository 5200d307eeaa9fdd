"""Where the GPU waits for the host during training steps (CUDA only), two ways:

- `SyncSites`: every host synchronization of the steady steps (a value read back, a blocking copy), counted by
  the Python code that asked for it. CUDA's sync debug mode (`torch.cuda.set_sync_debug_mode`) warns at
  each one; the warning's Python stack names the call site.
- `idle_host_code`: from a profile's timeline recorded with Python stacks, the Python code the host was in
  while the GPU had nothing queued.

`train_speed.py --sync-trace` and `--profile-host` use them.
"""

from __future__ import annotations

import collections
import traceback
import warnings

SYNC_WARNING = "called a synchronizing CUDA operation"
FRAMES = 3  # innermost Python frames that name a call site


def _short(filename: str) -> str:
    """A frame's file from its package down (`trl/trainer/sft_trainer.py`), or its name alone."""
    for marker in ("site-packages/", "/finetune/", "/benchmarks/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail if marker == "site-packages/" else marker.strip("/") + "/" + tail
    return filename.rsplit("/", 1)[-1]


class SyncSites:
    """Counts the host synchronizations from the end of step `first` to the end of step `last` by call site.
    Its `on_step` is called at the end of every optimizer step (train_speed's StepTimes does)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.steps = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._shown = None

    def on_step(self) -> None:
        import torch

        self.steps += 1
        if self.steps == self.first:
            self._shown = warnings.showwarning
            warnings.showwarning = self._record
            warnings.filterwarnings("always", message=SYNC_WARNING)
            torch.cuda.set_sync_debug_mode("warn")
        elif self.steps == self.last:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._shown

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return self._shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(("warnings.py", "host_waits.py"))]
        self.sites[" <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-FRAMES:]))] += 1

    def table(self) -> str:
        steps = max(self.last - self.first, 1)
        total = sum(self.sites.values())
        lines = [f"host synchronizations in steps {self.first + 1} to {self.last}: {total / steps:.1f} a step"]
        lines += [f"  {count / steps:6.2f} a step  {site}" for site, count in self.sites.most_common()]
        return "\n".join(lines) + "\n"


def idle_host_code(events: list[dict], gaps: list[tuple[float, float]], steps: int, rows: int = 25) -> str:
    """The Python code (innermost FRAMES functions) the profiled thread was in at the middle of each of the GPU's
    idle `gaps` (microseconds), summed over the gaps: milliseconds a step. Needs a timeline with Python stacks."""
    step_threads = {e["tid"] for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ProfilerStep")}
    calls = sorted(
        (e for e in events if e.get("cat") == "python_function" and e.get("tid") in step_threads),
        key=lambda e: (e["ts"], -e["dur"]),
    )
    if not calls:
        return ""
    spent: collections.Counter[str] = collections.Counter()
    open_calls: list[dict] = []  # the calls holding the current instant, outermost first (they nest on one thread)
    index = 0
    for begin, end in sorted(gaps, key=lambda g: (g[0] + g[1]) / 2):
        middle = (begin + end) / 2
        while index < len(calls) and calls[index]["ts"] <= middle:
            call = calls[index]
            while open_calls and open_calls[-1]["ts"] + open_calls[-1]["dur"] < call["ts"]:
                open_calls.pop()
            open_calls.append(call)
            index += 1
        while open_calls and open_calls[-1]["ts"] + open_calls[-1]["dur"] < middle:
            open_calls.pop()
        where = " <- ".join(call["name"] for call in reversed(open_calls[-FRAMES:])) or "(no Python call)"
        spent[where] += end - begin
    lines = ["Python code the host ran while the GPU was idle (ms a step; innermost call first):"]
    lines += [f"  {us / steps / 1000:7.2f} ms  {where}" for where, us in spent.most_common(rows)]
    return "\n".join(lines) + "\n"
