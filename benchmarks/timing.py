"""Shared by the benchmarks: wall times of repeated calls, and the best of them."""

from __future__ import annotations

import time
from collections.abc import Callable


def wall_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The fastest of ``repeats`` calls of ``fn`` in milliseconds, after ``warmup`` untimed ones.

    The minimum, not the median: these kernels run for milliseconds on a machine whose other work
    only ever adds time.
    """
    return 1e3 * min(wall_times(fn, repeats, warmup))
