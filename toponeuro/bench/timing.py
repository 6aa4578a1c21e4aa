"""Timing calls (interleaved rounds, warm-up, budget), their peak memory, the torch operators they
dispatch, and the extrapolation that skips cases too slow to run."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_proc_status() -> dict[str, int] | None:
    try:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out if len(out) == 2 else None
    except OSError:
        return None


class _PeakMemory:
    """Peak memory allocated beyond what was live at ``start()``, in bytes (or None)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:  # Linux: "5" resets the resident-set high-water mark to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base = None
            return
        status = _read_proc_status()
        self.base = None if status is None else status["VmRSS"]

    def stop(self) -> int | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        status = _read_proc_status()
        return None if status is None else max(0, status["VmHWM"] - self.base)


SPIN_UP_S = 0.25  # seconds of GPU work before each size's cases on a GPU


def spin_up(device: torch.device, seconds: float = SPIN_UP_S) -> None:
    """Keep a GPU busy for ``seconds`` (matrix products) before its cases are timed.

    While the CPU cases of the previous size run, the GPU idles and its clocks
    drop; they rise again only under load, so the first case timed afterwards
    would pay for the ramp. Does nothing on other devices.
    """
    if device.type != "cuda":
        return
    x = torch.randn(2048, 2048, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)  # bounded: no overflow however long it runs
        torch.cuda.synchronize(device)


def time_calls(
    fns: list[Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: bool = True,
    budget_s: float = math.inf,
) -> list[tuple[list[float], int | None]]:
    """Wall-clock seconds of each ``fn()`` over ``repeats`` interleaved rounds, and its peak extra memory.

    Each round calls every function once, in order, so that functions
    compared with each other see the same load. One untimed warm-up round
    first if ``warmup``. Stops early (after at least one round) when the next
    round would overrun ``budget_s`` seconds in all. Returns one
    ``(times, peak_bytes)`` per function; ``peak_bytes`` (the largest over its
    calls) is None where it cannot be measured.
    """
    started = time.perf_counter()
    if warmup:
        for fn in fns:
            _sync(device)
            fn()
            _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    peaks: list[int | None] = [None for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            memory = _PeakMemory(device)
            memory.start()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            peak = memory.stop()
            if peak is not None:
                peaks[k] = peak if peaks[k] is None else max(peaks[k], peak)
        elapsed = time.perf_counter() - started
        if elapsed + sum(t[-1] for t in times) > budget_s:
            break
    return list(zip(times, peaks))


def count_torch_ops(fn: Callable[[], object]) -> int:
    """The number of torch operators one call of ``fn`` dispatches, views excluded.

    On a GPU each is (at least) one kernel launch and its host-side dispatch,
    so for the small-n Boruvka, which is bound by launches rather than by
    memory, this count explains the time on any machine. Kernels that run
    outside torch (numba, giotto-ph) are not seen.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views (and scalar wrapping) launch no kernel
                self.ops += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Counter() as counter:
        fn()
    return counter.ops


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: bool = True,
    budget_s: float = math.inf,
) -> tuple[list[float], int | None]:
    """:func:`time_calls` for one function: ``(times, peak_bytes)``."""
    return time_calls([fn], device, repeats, warmup, budget_s)[0]


def extrapolate_seconds(history: list[tuple[int, float]], n: int) -> float | None:
    """Seconds one call would take at ``n``, from ``(n, seconds)`` at smaller sizes.

    A power law through the last two points, its exponent clamped to [2, 3]
    (every backend here is at least quadratic: it reads the n x n matrix);
    exponent 2 from a single point; None without history.
    """
    if not history:
        return None
    n2, t2 = history[-1]
    exponent = 2.0
    if len(history) >= 2:
        n1, t1 = history[-2]
        if n2 > n1 and t1 > 0 and t2 > 0:
            exponent = min(3.0, max(2.0, math.log(t2 / t1) / math.log(n2 / n1)))
    return t2 * (n / n2) ** exponent


def _graph_held_bytes(device: torch.device) -> int:
    """Device memory the torch-graph backend's captured graphs hold (then dropped): the
    reserved memory that clearing them gives back."""
    from ..persistence import cuda_graph

    _sync(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    cuda_graph.clear()
    torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved(device))


def _summary(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }
