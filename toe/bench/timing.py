"""Timing loops of the benchmarks and their tables. Warm-up calls, then ``repeats`` timed calls, each closed by a
device synchronisation; the median and the min-max spread are reported. A hand-written loop rather than
``torch.utils.benchmark`` because the loop reference of the operator is slow enough that a fixed, small repeat count
matters more than auto-ranging."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import pandas as pd
import torch


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median, min and max seconds of ``fn`` over ``repeats`` timed calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def measure_interleaved(
    fns: List[Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> List[Dict[str, float]]:
    """Like :func:`measure` for several functions timed in turn (A B C A B C ...), so that a machine whose speed
    drifts during the run slows all of them alike and their ratios stay fair."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            bucket.append(time.perf_counter() - start)
    return [{"median": statistics.median(t), "min": min(t), "max": max(t)} for t in times]


def spread(t: Dict[str, float], scale: float = 1e3) -> str:
    return f"{t['median'] * scale:.3g} [{t['min'] * scale:.3g}-{t['max'] * scale:.3g}]"


def markdown(rows: List[Dict[str, Any]], columns: List[str], floatfmt: str = ".3g") -> str:
    return pd.DataFrame(rows)[columns].to_markdown(index=False, floatfmt=floatfmt)
