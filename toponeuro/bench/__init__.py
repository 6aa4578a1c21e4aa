"""``toponeuro bench``: time the persistence backends and the regulariser.

For every device and every ``n`` the benchmark builds one matrix
``D = 1 - |rho|`` from seeded random activations ``A: (m, n)`` and times, on
that same matrix:

* ``mst``: each persistence backend alone (``death_edges(D, check=False)``;
  ``deaths`` for ripser.py, which gives values only). The external backends
  (giotto-ph, ripser.py) run on the host, so they are timed on ``cpu`` only;
  on CPU the torch backend's Boruvka path (what CUDA tensors and CPUs
  without numba use) is timed too, as ``torch-boruvka``;
* ``check``: the input validation ``check_dissimilarity(D)`` and
  ``mst+check``: the public default call ``death_edges(D)``, which runs it;
* ``regulariser``: T1 forward and backward from the activations
  (correlation, MST, gather, backward), as :class:`TopologicalRegulariser`
  computes it, against ``correlation``: the forward and backward of
  ``abs_correlation(A)`` alone (with a dense upstream gradient). The two are
  timed in alternation, so that their ratio sees the same machine load.

Every ``mst`` result is checked, outside the timed calls, against the exact
deaths of the same matrix (the CPU ``torch`` backend): ``deaths_equal_reference``
(bit for bit, as the sorted deaths of every minimum spanning tree agree) and
``max_abs_deaths_error`` per case, and a line of the printed table.

Each case runs once to warm up, then ``--repeats`` times; the median, min and
max are recorded (CUDA timings are bracketed by ``torch.cuda.synchronize``).
A case whose time, extrapolated from the smaller ``n`` of the same series, would
exceed ``--max-seconds-per-case`` is skipped and recorded as skipped. Peak
memory beyond the inputs is recorded per case: ``torch.cuda.max_memory_allocated``
on CUDA, the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) on Linux CPUs.

Outputs, in ``--out`` (default ``data/bench/cpu``, or ``data/bench/<gpu name>``
when CUDA is benchmarked): ``results.json`` (host, devices, versions, date,
commit and ``dirty``, every timing) and ``timings.png`` (time against n,
log-log; regulariser cost ratio against n). A table is printed. The folder is
created, and checked to be writable, before anything is timed; a request that
cannot be met (an unknown backend name, a requested device that is not
available, an ``--out`` that is a file) exits with status 2 before timing and
writes nothing. ``results.json`` is rewritten atomically (a temporary file in
the same folder, then ``os.replace``) after every finished case, with
``"complete": false`` until the last one, so a Ctrl-C, a SIGTERM (what
``timeout`` sends) or even a SIGKILL keeps the cases measured so far; an
interrupted run also records ``"interrupted"`` (the signal) and exits 130
(SIGINT) or 143 (SIGTERM). The plot (about a second) is drawn at the end, or
on an interruption. ``"dirty"`` says whether the repository had uncommitted
changes to tracked files (untracked files are ignored), None when unknown::

    python -m toponeuro bench                       # the full default run
    python -m toponeuro bench --quick               # n = 256 1024 2048, 3 repeats
    python -m toponeuro bench --n 1024 4096 --backends torch giotto-ph --devices cpu
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, persistence, regularisers
from .._validation import check_dissimilarity, prepare_output_folder
from ..dissimilarity import abs_correlation
from ..persistence import torch_mst
from ..provenance import git_commit, git_dirty

__all__ = [
    "DEFAULT_N",
    "QUICK_N",
    "benchmark_matrix",
    "time_call",
    "time_calls",
    "extrapolate_seconds",
    "run_benchmark",
    "write_results",
    "format_table",
    "plot_results",
    "configure_parser",
    "run",
]

DEFAULT_N = [256, 1024, 2048, 4096, 8192]
QUICK_N = [256, 1024, 2048]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BORUVKA = "torch-boruvka"  # the torch backend's CUDA algorithm, timed on CPU
HOST_ONLY_BACKENDS = {"giotto-ph", "ripser"}  # they copy the matrix to the host
REFERENCE_BACKEND = "giotto-ph"
TARGET_REGULARISER_RATIO = 3.0
# torch dispatches per call are recorded for these (not for torch+check, whose MST may run
# in a worker thread that a dispatch mode does not see)
OP_COUNTED_SERIES = {"torch", BORUVKA, "torch-graph"}
# T1 series -> the backend its MST runs on; torch-graph's only on CUDA (on the CPU it is a test path)
REGULARISER_SERIES = {"t1": "torch", "t1-graph": "torch-graph"}


# ---------------------------------------------------------------- inputs


def benchmark_matrix(n: int, m: int, seed: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu"):
    """The benchmark's input at size ``n``.

    Returns ``(A, D)`` on ``device``: ``A: (m, n)`` standard normal activations,
    drawn on the CPU from a generator seeded by ``(seed, n)`` (the same on
    every machine), and ``D = abs_correlation(A): (n, n)`` computed on ``device``.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    A = torch.randn(m, n, generator=gen, dtype=dtype).to(device)
    return A, abs_correlation(A).contiguous()


# ---------------------------------------------------------------- timing


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


# ---------------------------------------------------------------- cases


@dataclass
class _Case:
    """One or more calls timed together (interleaved), each recorded as its own line."""

    members: list[tuple[str, str, str]]  # (kind, series, call in words) per timed call
    make: Callable[[], list[Callable[[], object]]]  # builds the calls (and inputs) when their turn comes


def _single(kind: str, series: str, call: str, make: Callable[[], Callable[[], object]]) -> _Case:
    return _Case([(kind, series, call)], lambda: [make()])


def _t1_forward_backward(A0: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    A = A0.detach().requires_grad_()
    D = abs_correlation(A)
    deaths = persistence.deaths(D, backend=backend, check=False)
    regularisers.t1(deaths).backward()
    return A.grad


def _correlation_forward_backward(A0: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    A = A0.detach().requires_grad_()
    D = abs_correlation(A)
    D.backward(upstream)
    return A.grad


def _boruvka(D: torch.Tensor) -> torch.Tensor:
    return persistence.canonical_order(D, torch_mst.boruvka_edges(D))


def _cases_for(device: torch.device, backends: list[str], inputs: dict) -> list[_Case]:
    """The cases at one n on one device; ``inputs["A"], inputs["D"]`` are read when a case is made."""
    cases = []

    def mst(name):
        D = inputs["D"]
        if persistence.BACKENDS[name].gives_edges:
            return lambda: persistence.death_edges(D, backend=name, check=False)
        return lambda: persistence.deaths(D, backend=name, check=False)

    for name in backends:
        if name in HOST_ONLY_BACKENDS and device.type != "cpu":
            continue
        call = "death_edges" if persistence.BACKENDS[name].gives_edges else "deaths"
        cases.append(_single("mst", name, f"{call}(D, {name!r}, check=False)", lambda name=name: mst(name)))
        if name == "torch" and device.type == "cpu" and torch_mst.HAVE_NUMBA:
            cases.append(_single("mst", BORUVKA, "canonical_order(D, boruvka_edges(D))",
                                 lambda: lambda D=inputs["D"]: _boruvka(D)))
    cases.append(_single("check", "check", "check_dissimilarity(D)",
                         lambda: lambda D=inputs["D"]: check_dissimilarity(D)))
    if "torch" in backends:
        cases.append(_single("mst+check", "torch+check", "death_edges(D, 'torch')",
                             lambda: lambda D=inputs["D"]: persistence.death_edges(D, backend="torch")))
    t1_series = [(series, b) for series, b in REGULARISER_SERIES.items()
                 if b in backends and (b == "torch" or device.type == "cuda")]
    if t1_series:
        def regulariser_calls():
            A, upstream = inputs["A"], torch.ones_like(inputs["D"])  # a dense upstream gradient
            return [lambda b=b: _t1_forward_backward(A, b) for _, b in t1_series] + [
                lambda: _correlation_forward_backward(A, upstream)]

        # timed in alternation, so that their ratio sees the same load
        cases.append(_Case([("regulariser", series, f"T1 forward+backward from A (correlation, MST by {b!r}, gather)")
                            for series, b in t1_series]
                           + [("correlation", "correlation", "abs_correlation(A) forward+backward")],
                           regulariser_calls))
    return cases


def _deaths_against_reference(output: torch.Tensor, D: torch.Tensor, reference: torch.Tensor) -> dict:
    """How an MST call's result compares with the exact deaths of the same matrix.

    output : (n - 1, 2) edges or (n - 1,) deaths, on any device. D : (n, n) the
    matrix on the CPU. reference : (n - 1,) its exact deaths, ascending. The
    sorted deaths of any minimum spanning tree are the same, ties included, so
    an exact backend's must equal the reference bit for bit.
    """
    out = output.detach().cpu()
    deaths = D[out[:, 0], out[:, 1]] if out.ndim == 2 else out.to(D.dtype)
    deaths = torch.sort(deaths).values
    if deaths.shape != reference.shape:
        return {"deaths_equal_reference": False, "max_abs_deaths_error": math.inf}
    return {"deaths_equal_reference": bool(torch.equal(deaths, reference)),
            "max_abs_deaths_error": float((deaths.double() - reference.double()).abs().max())}


def _exact_deaths(D0: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(D0 on the CPU, its exact deaths by the CPU "torch" backend), computed once into ``cache``."""
    if not cache:
        cache["D"] = D0.cpu()
        cache["deaths"] = persistence.deaths(cache["D"], backend="torch", check=False)
    return cache["D"], cache["deaths"]


def _backends_of(case: _Case) -> list[str]:
    return [REGULARISER_SERIES.get(series, series) for _, series, _ in case.members]


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


# ---------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _memory_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "total_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }
    return {"name": _cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def _environment() -> dict:
    return {
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": _memory_total(),
            "torch_threads": torch.get_num_threads(),
        },
        "commit": git_commit(),
        "dirty": git_dirty(),
        "versions": {
            "toponeuro": __version__,
            "torch": torch.__version__,
            "numpy": _version("numpy"),
            "numba": _version("numba"),
            "giotto-ph": _version("giotto-ph"),
            "ripser": _version("ripser"),
            "triton": _version("triton"),
        },
    }


def default_out_dir(devices: list[str]) -> Path:
    """``data/bench/cpu``, or ``data/bench/<gpu name>`` when a CUDA device is benchmarked.

    ``devices`` are the devices that will run (all available); a CUDA device
    that is not there is passed over.
    """
    for d in devices:
        if d.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(d).index
            if index is not None and index >= torch.cuda.device_count():
                continue
            name = torch.cuda.get_device_name(torch.device(d))
            return Path("data/bench") / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path("data/bench/cpu")


# ---------------------------------------------------------------- the run


def _default_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _check_options(ns, m, repeats, dtype, max_seconds_per_case, threads) -> None:
    """ValueError, naming the option, for a value the benchmark cannot run with."""
    if not ns or any(int(n) < 2 for n in ns):
        raise ValueError(f"--n needs sizes >= 2 (persistence needs 2 neurons), got {ns}")
    if m < 2:
        raise ValueError(f"--m must be >= 2 samples (correlations need 2), got {m}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not max_seconds_per_case > 0:
        raise ValueError(f"--max-seconds-per-case must be > 0, got {max_seconds_per_case}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


def _check_backend_names(backends: list[str]) -> None:
    """ValueError for a name that is not a registered backend (a typo would otherwise drop it)."""
    unknown = [name for name in backends if name not in persistence.BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(map(repr, unknown))} in --backends; "
                         f"known: {', '.join(persistence.BACKENDS)}")


def _check_devices(devices: list[str]) -> list[tuple[str, torch.device | None, str | None]]:
    """(name, device or None, why unavailable) for each requested device."""
    out = []
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"unknown device {name!r} ({err}); use e.g. cpu, cuda or cuda:1") from err
        if device.type == "cuda":
            if not torch.cuda.is_available():
                out.append((name, None, "torch.cuda.is_available() is False"))
                continue
            if device.index is not None and device.index >= torch.cuda.device_count():
                out.append((name, None, f"only {torch.cuda.device_count()} CUDA device(s)"))
                continue
        elif device.type != "cpu":
            raise ValueError(f"device {name!r} is not supported by the benchmark; use cpu or cuda[:k]")
        out.append((name, device, None))
    return out


def _check_backends(backends: list[str]) -> tuple[list[str], dict]:
    """The usable backends, and a report {name: {available, gives_edges, error?}} for all.

    An unknown name is a ValueError; a known backend that is not installed or
    fails to import is reported as unavailable.
    """
    report: dict[str, dict] = {}
    usable = []
    installed = persistence.available_backends()
    _check_backend_names(backends)
    for name in backends:
        b = persistence.BACKENDS[name]
        if name not in installed:
            report[name] = {"available": False, "gives_edges": b.gives_edges,
                            "error": f"not importable (needs {', '.join(b.requires)})"}
            continue
        try:
            b.load()
        except Exception as err:  # a plug-in that imports its requirements but not itself
            report[name] = {"available": False, "gives_edges": b.gives_edges,
                            "error": f"{type(err).__name__}: {err}"}
            continue
        report[name] = {"available": True, "gives_edges": b.gives_edges}
        usable.append(name)
    return usable, report


def run_benchmark(
    ns: list[int],
    m: int = 256,
    repeats: int = 5,
    backends: list[str] | None = None,
    devices: list[str] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    max_seconds_per_case: float = 30.0,
    progress: bool = True,
    threads: int | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Run the benchmark; returns the results as a JSON-ready dict (see the module doc).

    ``threads`` sets ``torch.set_num_threads`` for the run (restored after);
    None keeps torch's default. giotto-ph uses its own 2 threads either way.
    ``on_case(results)``, if given, is called after every finished (or
    skipped, or failed) case with the results so far: ``"complete"`` is False
    and ``"summary"`` covers the cases so far; it becomes True only in the
    returned dict. Raises ValueError before timing for a bad option, an
    unknown backend name, or when none of ``devices`` is available (a CUDA
    device missing beside an available one is reported in the results).
    """
    _check_options(ns, m, repeats, dtype, max_seconds_per_case, threads)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_benchmark(ns, m, repeats, backends, devices, dtype, seed, max_seconds_per_case, progress,
                              on_case)
    finally:
        torch.set_num_threads(previous_threads)


def _run_benchmark(ns, m, repeats, backends, devices, dtype, seed, max_seconds_per_case, progress,
                   on_case) -> dict:
    ns = sorted({int(n) for n in ns})
    if backends is None:
        backends = persistence.available_backends()
    if devices is None:
        devices = _default_devices()
    device_list = _check_devices(devices)
    if all(device is None for _, device, _ in device_list):
        raise ValueError("none of the requested devices is available ("
                         + "; ".join(f"{name}: {why}" for name, _, why in device_list)
                         + "); use --devices cpu, or leave --devices out")
    usable, backend_report = _check_backends(backends)
    torch_dtype = DTYPES[dtype]

    def case_done() -> None:
        results["summary"] = _summarise(results["cases"])
        results["load_average_end"] = _load_average()
        if on_case is not None:
            on_case(results)

    results: dict = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "toponeuro bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "config": {
            "n": ns, "m": m, "repeats": repeats, "dtype": dtype, "seed": seed,
            "max_seconds_per_case": max_seconds_per_case, "backends": backends, "devices": devices,
            "dissimilarity": "abs_correlation (1 - |rho|) of standard normal activations",
            "giotto_threads": min(os.cpu_count() or 1, 2),
            "torch_threads": torch.get_num_threads(),
            "gpu_spin_up_s": SPIN_UP_S,
        },
        **_environment(),
        "load_average_start": _load_average(),
        "devices": {},
        "backends": backend_report,
        "complete": False,
        "cases": [],
    }
    for name, device, why in device_list:
        results["devices"][name] = {"available": False, "error": why} if device is None else {
            "available": True, **_device_info(device)}

    live = [(name, device) for name, device, why in device_list if device is not None]
    # the matrix is built on the first device (the CPU when it is benchmarked) and copied to the others
    results["config"]["matrix_built_on"] = live[0][0]
    total = len(ns) * sum(len(_cases_for(device, usable, {})) for _, device in live)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="case", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        _time_cases(results, ns, m, seed, torch_dtype, live, usable, repeats, max_seconds_per_case, bar,
                    case_done)
    finally:
        if bar is not None:
            bar.close()
    results["load_average_end"] = _load_average()
    results["summary"] = _summarise(results["cases"])
    results["complete"] = True
    return results


def _time_cases(results, ns, m, seed, torch_dtype, live, usable, repeats, max_seconds_per_case, bar,
                case_done) -> None:
    """Time every case at every n on every live device, appending the records to ``results["cases"]``."""
    total = bar.total if bar is not None else 0
    history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for n in ns:
        try:
            A0, D0 = benchmark_matrix(n, m, seed, torch_dtype, live[0][1])
        except Exception as err:  # e.g. out of memory: report it and go on with the other sizes
            results["cases"].append({"kind": "matrix", "series": "matrix", "call": "benchmark_matrix",
                                     "device": live[0][0], "n": n, "status": "error",
                                     "error": f"{type(err).__name__}: {err}"})
            case_done()
            if bar is not None:
                bar.update(total // len(ns))
            continue
        exact: dict = {}  # the CPU matrix and its exact deaths, made when an MST case first needs them
        for dev_name, device in live:
            inputs = {"A": A0.to(device), "D": D0.to(device)}
            itemsize = inputs["D"].element_size()
            spin_up(device)
            for case in _cases_for(device, usable, inputs):
                if bar is not None:
                    bar.set_description(f"{dev_name} n={n} {'+'.join(m[1] for m in case.members)}")
                load = _load_average()
                records = [{"kind": kind, "series": series, "call": call, "device": dev_name, "n": n,
                            "load_average": load} for kind, series, call in case.members]
                keys = [(dev_name, series) for _, series, _ in case.members]
                estimates = [extrapolate_seconds(history.get(key, []), n) for key in keys]
                estimate = None if None in estimates else sum(estimates)
                if estimate is not None and estimate > max_seconds_per_case:
                    for record, key, one in zip(records, keys, estimates):
                        record.update(status="skipped", estimated_s=one,
                                      reason=f"one call estimated at {estimate:.3g} s > "
                                             f"--max-seconds-per-case {max_seconds_per_case:g}")
                        history[key] = history.get(key, []) + [(n, one)]
                else:
                    warmup = estimate is None or estimate * (repeats + 1) <= max_seconds_per_case
                    try:
                        calls = case.make()
                        kept: dict = {}  # an MST call's last result, checked against the reference after timing
                        timed = ([lambda f=calls[0]: kept.__setitem__("output", f())]
                                 if [kind for kind, _, _ in case.members] == ["mst"] else calls)
                        measured = time_calls(timed, device, repeats, warmup, max_seconds_per_case)
                        ops = [count_torch_ops(call) if series in OP_COUNTED_SERIES else None
                               for call, (_, series, _) in zip(calls, case.members)]
                    except Exception as err:  # a backend failing at run time is reported, not fatal
                        for record in records:
                            record.update(status="error", error=f"{type(err).__name__}: {err}")
                    else:
                        for record, key, (times, peak), n_ops in zip(records, keys, measured, ops):
                            record.update(status="ok", warmup=warmup, repeats=len(times), **_summary(times),
                                          peak_extra_bytes=peak,
                                          peak_extra_nxn=None if peak is None else peak / (n * n * itemsize))
                            if n_ops is not None:
                                record["torch_ops"] = n_ops
                            if "output" in kept:
                                record.update(_deaths_against_reference(kept["output"], *_exact_deaths(D0, exact)))
                            history[key] = history.get(key, []) + [(n, record["median_s"])]
                        if device.type == "cuda" and "torch-graph" in _backends_of(case):
                            # the captured graph keeps its buffers between calls, outside the timed peaks
                            held = _graph_held_bytes(device)
                            for record in records:
                                record.update(graph_held_bytes=held, graph_held_nxn=held / (n * n * itemsize))
                results["cases"].extend(records)
                case_done()
                if bar is not None:
                    bar.update(1)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del A0, D0, exact


def _median(cases: list[dict], device: str, series: str, n: int) -> float | None:
    for c in cases:
        if c["device"] == device and c["series"] == series and c["n"] == n and c["status"] == "ok":
            return c["median_s"]
    return None


def _summarise(cases: list[dict]) -> dict:
    """Ratios to giotto-ph (same run, same n) and the regulariser's cost ratio."""
    ratios, reg = [], []
    keys = sorted({(c["device"], c["series"], c["n"]) for c in cases if c["kind"] in ("mst", "mst+check")})
    for device, series, n in keys:
        ref = _median(cases, "cpu", REFERENCE_BACKEND, n)
        t = _median(cases, device, series, n)
        if ref is not None and t is not None and series != REFERENCE_BACKEND:
            ratios.append({"device": device, "series": series, "n": n, "speedup_vs_giotto_ph": ref / t})
    for device, series, n in sorted({(c["device"], c["series"], c["n"]) for c in cases if c["kind"] == "regulariser"},
                                    key=lambda k: (k[0], k[1] != "t1", k[1], k[2])):
        t1 = _median(cases, device, series, n)
        corr = _median(cases, device, "correlation", n)
        if t1 is not None and corr is not None:
            reg.append({"device": device, "series": series, "n": n, "t1_forward_backward_s": t1,
                        "correlation_forward_backward_s": corr, "ratio": t1 / corr,
                        "target_ratio": TARGET_REGULARISER_RATIO})
    return {"speedup_vs_giotto_ph": ratios, "regulariser": reg}


# ---------------------------------------------------------------- reporting


def _fmt_ms(t: float | None) -> str:
    if t is None:
        return "-"
    ms = t * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(results: dict) -> str:
    """The results as plain-text tables: median ms per series, speed-ups, regulariser ratio."""
    cases = results["cases"]
    lines = []
    for device in results["devices"]:
        dev_cases = [c for c in cases if c["device"] == device]
        if not dev_cases:
            continue
        series = list(dict.fromkeys(c["series"] for c in dev_cases if c["kind"] in ("mst", "check", "mst+check")))
        ns = sorted({c["n"] for c in dev_cases})
        info = results["devices"][device]
        lines.append(f"{device} ({info.get('name', '?')}): median ms over repeats, "
                     f"{results['config']['dtype']}, m = {results['config']['m']}")
        head = ["n"] + series
        has_ref = any(c["series"] == REFERENCE_BACKEND and c["status"] == "ok" for c in cases)
        fast = [s for s in ("torch", "torch-graph", "torch+check") if s in series]
        if has_ref:
            head += [f"{s} x giotto" for s in fast]
        rows = []
        for n in ns:
            row = [str(n)]
            for s in series:
                rec = next((c for c in dev_cases if c["series"] == s and c["n"] == n), None)
                row.append("-" if rec is None else _fmt_ms(rec.get("median_s")) if rec["status"] == "ok"
                           else rec["status"])
            if has_ref:
                ref = _median(cases, "cpu", REFERENCE_BACKEND, n)
                for s in fast:
                    t = _median(cases, device, s, n)
                    row.append("-" if ref is None or t is None else f"{ref / t:.0f}x")
            rows.append(row)
        lines += _grid(head, rows)
        held = [c for c in dev_cases if "graph_held_nxn" in c and c["kind"] == "mst"]
        if held:
            lines.append(f"{device}: memory the torch-graph backend's captured graph holds between calls, x D: "
                         + ", ".join(f"n={c['n']}: {c['graph_held_nxn']:.2f}" for c in held))
        counted = [c for c in dev_cases if "torch_ops" in c]
        if counted:
            lines.append(f"{device}: torch operators per call, views excluded (on a GPU, kernel launches): "
                         + ", ".join(f"{c['series']} n={c['n']}: {c['torch_ops']}" for c in counted))
        reg = [r for r in results["summary"]["regulariser"] if r["device"] == device]
        if reg:
            lines.append(f"{device}: regulariser cost, T1 forward+backward from A vs abs_correlation "
                         f"forward+backward (target <= {TARGET_REGULARISER_RATIO:g}x)")
            lines += _grid(["series", "n", "T1 ms", "correlation ms", "ratio"],
                           [[r.get("series", "t1"), str(r["n"]), _fmt_ms(r["t1_forward_backward_s"]),
                             _fmt_ms(r["correlation_forward_backward_s"]), f"{r['ratio']:.2f}"] for r in reg])
        lines.append("")
    lines.append(f"load average (1, 5, 15 min): {results.get('load_average_start')} at the start, "
                 f"{results.get('load_average_end')} at the end, on {results['host']['cpu_count']} CPUs")
    unavailable = {k: v["error"] for k, v in results["backends"].items() if not v["available"]}
    unavailable.update({k: v["error"] for k, v in results["devices"].items() if not v["available"]})
    for name, why in unavailable.items():
        lines.append(f"not benchmarked: {name}: {why}")
    for c in cases:
        if c["status"] == "error":
            lines.append(f"error: {c['device']} n={c['n']} {c['series']}: {c['error']}")
    checked = [c for c in cases if "deaths_equal_reference" in c]
    if checked:
        inexact = [c for c in checked if not c["deaths_equal_reference"]]
        lines.append(f"deaths against the exact ones (CPU 'torch' backend, same matrix): {len(checked) - len(inexact)} "
                     f"of {len(checked)} MST cases equal bit for bit"
                     + "".join(f"; {c['device']} {c['series']} n={c['n']}: max |error| "
                               f"{c['max_abs_deaths_error']:.3g}" for c in inexact))
    return "\n".join(lines)


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it onto ``path``:
    a reader (or a kill at any moment) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_results(results: dict, path: Path) -> None:
    """``results`` as indented JSON to ``path``, atomically (see :func:`_replace_atomically`)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")

    _replace_atomically(path, write)


def plot_results(results: dict, path: Path) -> None:
    """Two panels: time against n (log-log, one line per series and device, min-max
    bars) and the regulariser's cost ratio against n, saved (atomically) to ``path`` as PNG."""
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8))
    lines = list(dict.fromkeys((c["device"], c["series"]) for c in cases
                               if c["kind"] in ("mst", "check", "mst+check") and c["status"] == "ok"))
    styles = {"check": ":", "torch+check": "--"}
    for device, series in lines:
        pts = sorted((c["n"], c["median_s"], c["min_s"], c["max_s"]) for c in cases
                     if c["device"] == device and c["series"] == series and c["status"] == "ok")
        n, med, lo, hi = zip(*pts)
        ax_t.errorbar(n, [t * 1e3 for t in med],
                      yerr=[[1e3 * (a - b) for a, b in zip(med, lo)], [1e3 * (b - a) for a, b in zip(med, hi)]],
                      marker="o", ms=3, capsize=2, linestyle=styles.get(series, "-"), label=f"{series} ({device})")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("n (neurons)")
    ax_t.set_ylabel("median time (ms)")
    ax_t.set_title(f"0-dim persistence of 1 - |rho|, {results['config']['dtype']}, m = {results['config']['m']}")
    ax_t.grid(True, which="both", alpha=0.3)
    if lines:
        ax_t.legend(fontsize=8)
    reg = results["summary"]["regulariser"]
    for device, series in dict.fromkeys((r["device"], r.get("series", "t1")) for r in reg):
        pts = sorted((r["n"], r["ratio"]) for r in reg if r["device"] == device and r.get("series", "t1") == series)
        ax_r.plot(*zip(*pts), marker="o", label=f"{series} / correlation ({device})")
    ax_r.axhline(TARGET_REGULARISER_RATIO, color="grey", linestyle="--", label=f"target {TARGET_REGULARISER_RATIO:g}x")
    ax_r.axhline(1.0, color="black", linewidth=0.5)
    ax_r.set_xscale("log", base=2)
    ax_r.set_ylim(bottom=0)
    ax_r.set_xlabel("n (neurons)")
    ax_r.set_ylabel("forward+backward time ratio")
    ax_r.set_title("regulariser cost: T1 vs correlation alone")
    ax_r.grid(True, which="both", alpha=0.3)
    ax_r.legend(fontsize=8)
    date = results["date"][:10]
    names = "; ".join(f"{k}: {v.get('name', '?')}" for k, v in results["devices"].items() if v["available"])
    fig.suptitle(f"toponeuro bench, {date}, torch {results['versions']['torch']}; {names}", fontsize=9)
    fig.tight_layout()
    try:
        _replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Time every available persistence backend on every device over a list of n, on the same "
        "matrix 1 - |rho| of seeded random activations per n, and the regulariser's forward+backward "
        "cost against the correlation's; write results.json and timings.png and print a table."
    )
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help=f"matrix sizes (default {' '.join(map(str, DEFAULT_N))}; --quick: "
                             f"{' '.join(map(str, QUICK_N))})")
    parser.add_argument("--m", type=int, default=256, help="samples per activation matrix (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; --quick: 3)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help=f"persistence backends (default: all installed, from {list(persistence.BACKENDS)})")
    parser.add_argument("--devices", nargs="+", default=None, help="devices (default: cpu, and cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="matrix dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the activations (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default data/bench/cpu, or data/bench/<gpu name> with CUDA)")
    parser.add_argument("--max-seconds-per-case", type=float, default=None,
                        help="skip a case whose extrapolated time per call exceeds this, and stop its repeats "
                             "when they would (default 30; --quick: 10)")
    parser.add_argument("--quick", action="store_true", help="a short run: small n, 3 repeats, 10 s per case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the run (default: torch's default); on a machine "
                             "shared with other jobs, 1 avoids stalls at OpenMP barriers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextlib.contextmanager
def _sigterm_raises_keyboard_interrupt():
    """Within the block, SIGTERM (what ``timeout`` and ``kill`` send) raises KeyboardInterrupt in the
    main thread, as Ctrl-C does, so that the run's ``except KeyboardInterrupt`` saves what it has.
    The previous handler is restored afterwards. Yields a list that receives the signal's number."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run(args: argparse.Namespace) -> int:
    ns = args.n if args.n is not None else (QUICK_N if args.quick else DEFAULT_N)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    budget = args.max_seconds_per_case
    if budget is None:
        budget = 10.0 if args.quick else 30.0
    devices = args.devices if args.devices is not None else _default_devices()
    backends = args.backends if args.backends is not None else persistence.available_backends()
    # everything that can be refused is refused here, before any folder is made or anything timed
    try:
        _check_options(ns, args.m, repeats, args.dtype, budget, args.threads)
        _check_backend_names(backends)
        missing = [(name, why) for name, device, why in _check_devices(devices) if device is None]
        if missing:
            raise ValueError("requested device(s) not available: "
                             + "; ".join(f"{name}: {why}" for name, why in missing)
                             + "; drop them from --devices (without --devices: cpu, and cuda when available)")
        out = prepare_output_folder(args.out if args.out is not None else default_out_dir(devices))
    except ValueError as err:
        print(f"toponeuro bench: error: {err}", file=sys.stderr)
        return 2
    json_path, png_path = out / "results.json", out / "timings.png"
    latest: dict = {}

    def save(results: dict) -> None:  # after every case: what is measured so far survives a kill
        latest["results"] = results
        write_results(results, json_path)

    with _sigterm_raises_keyboard_interrupt() as received:
        try:
            results = run_benchmark(ns, m=args.m, repeats=repeats, backends=backends, devices=devices,
                                    dtype=args.dtype, seed=args.seed, max_seconds_per_case=budget,
                                    progress=not args.no_progress, threads=args.threads, on_case=save)
        except KeyboardInterrupt:
            results = None
        except ValueError as err:
            print(f"toponeuro bench: error: {err}", file=sys.stderr)
            return 2
    if results is None:  # interrupted: keep the finished cases, marked incomplete
        signame = "SIGTERM" if received else "SIGINT"
        code = 128 + (signal.SIGTERM if received else signal.SIGINT)
        partial = latest.get("results")
        if partial is None:
            print(f"toponeuro bench: interrupted ({signame}) before the first case finished; "
                  f"nothing written to {out}", file=sys.stderr)
            return code
        partial.update(complete=False, interrupted=signame)
        write_results(partial, json_path)
        print(format_table(partial))
        try:
            plot_results(partial, png_path)
            plotted = f" and {png_path}"
        except Exception as err:  # the timings are safe in the JSON; a plot failure must not hide that
            plotted = f" (no plot: {type(err).__name__}: {err})"
        print(f"toponeuro bench: interrupted ({signame}); {len(partial['cases'])} finished case records "
              f"saved in {json_path}{plotted}, with \"complete\": false", file=sys.stderr)
        return code
    write_results(results, json_path)
    plot_results(results, png_path)
    print(format_table(results))
    print(f"wrote {json_path} and {png_path}")
    return 0
