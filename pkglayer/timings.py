"""Where a build's time went, without a profiler: the wall time of each step of the
pipeline, and the CPU time of the work its threads share (hashing, compressing, reading
files, writing blobs). `BuildResult.as_json()` carries it; the CLI prints one line.

Worker threads charge their CPU time to the build they work for (`working_for`); the
measuring itself is two `time.thread_time()` calls per block of work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing takes ~3 ms to load: annotations only
    from typing import Any

# In pipeline order (wall seconds, main thread).
STEPS = ("database", "scan", "hash", "ownership", "plan", "keys", "reuse", "write")
# CPU seconds summed over all threads.
WORK = ("hash", "compress", "read", "write")

_local = threading.local()


class Timings:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - started

    def add_cpu(self, name: str, seconds: float) -> None:
        with self._lock:
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "steps": {k: round(self.steps.get(k, 0.0), 3) for k in STEPS},
            "cpu": {k: round(self.cpu.get(k, 0.0), 3) for k in WORK},
        }


@contextmanager
def working_for(timings: Timings | None) -> Iterator[None]:
    """Charge what this thread does meanwhile (see `charge`) to `timings`."""
    before = getattr(_local, "timings", None)
    _local.timings = timings
    try:
        yield
    finally:
        _local.timings = before


@contextmanager
def charge(work: str) -> Iterator[None]:
    """The thread CPU time of the block, as `work` of the build this thread works for."""
    timings = getattr(_local, "timings", None)
    if timings is None:
        yield
        return
    started = time.thread_time()
    try:
        yield
    finally:
        timings.add_cpu(work, time.thread_time() - started)


def charged(work: str, seconds: float) -> None:
    """Add thread CPU time measured by the caller to `work` of the build this thread
    works for: for loops over many small files, where a `charge` block per read
    (a context manager and a lock, ~5 µs) would cost more than the reads themselves."""
    timings = getattr(_local, "timings", None)
    if timings is not None and seconds:
        timings.add_cpu(work, seconds)


def summary(timings: dict[str, Any], output_seconds: float | None = None) -> str:
    """One line: the steps that took time, then the threads' work."""
    steps = dict(timings["steps"])
    if output_seconds is not None:
        steps["output"] = output_seconds
    shown = ", ".join(f"{k} {v:.2f}" for k, v in steps.items() if v >= 0.005) or "nothing measurable"
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in timings["cpu"].items() if v >= 0.005)
    return f"time (s): {shown}" + (f"; CPU in threads (s): {cpu}" if cpu else "")
