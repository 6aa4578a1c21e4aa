"""The run: options checked, then every case timed at every size on every device (:func:`run_benchmark`)."""

from __future__ import annotations

import datetime
import os
import sys
from typing import Callable

import torch

from .. import persistence
from .cases import DTYPES, OP_COUNTED_SERIES, PER_N_KINDS, _backends_of, _cases_for, benchmark_matrix, check_case_kinds
from .environment import _device_info, _environment, _load_average
from .exactness import _deaths_against_reference, _exact_deaths
from .results import _summarise
from .step import STEP_BATCH, STEP_MODEL, STEP_NEURONS, STEP_WEIGHT, step_calls, step_members
from .timing import (SPIN_UP_S, _graph_held_bytes, _summary, count_torch_ops, extrapolate_seconds, spin_up,
                     time_calls)


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
    cases: list[str] | None = None,
) -> dict:
    """Run the benchmark; returns the results as a JSON-ready dict (see the module doc).

    ``cases``: the kinds of case to time, from :data:`~toponeuro.bench.cases.CASE_KINDS`
    (None: all).
    ``threads`` sets ``torch.set_num_threads`` for the run (restored after);
    None keeps torch's default. giotto-ph uses its own 2 threads either way.
    ``on_case(results)``, if given, is called after every finished (or
    skipped, or failed) case with the results so far: ``"complete"`` is False
    and ``"summary"`` covers the cases so far; it becomes True only in the
    returned dict. Raises ValueError before timing for a bad option, an
    unknown backend name or case kind, or when none of ``devices`` is available (a CUDA
    device missing beside an available one is reported in the results).
    """
    _check_options(ns, m, repeats, dtype, max_seconds_per_case, threads)
    kinds = check_case_kinds(cases)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_benchmark(ns, m, repeats, backends, devices, dtype, seed, max_seconds_per_case, progress,
                              on_case, kinds)
    finally:
        torch.set_num_threads(previous_threads)


def _run_benchmark(ns, m, repeats, backends, devices, dtype, seed, max_seconds_per_case, progress,
                   on_case, kinds) -> dict:
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
        results["summary"] = _summarise(results["cases"], results["steps"])
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
            "cases": kinds,
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
        "steps": [],  # the training-step case, once per device (it does not depend on n)
    }
    for name, device, why in device_list:
        results["devices"][name] = {"available": False, "error": why} if device is None else {
            "available": True, **_device_info(device)}

    live = [(name, device) for name, device, why in device_list if device is not None]
    # the matrix is built on the first device (the CPU when it is benchmarked) and copied to the others
    results["config"]["matrix_built_on"] = live[0][0]
    per_n = [k for k in kinds if k in PER_N_KINDS]
    total = len(ns) * sum(len(_cases_for(device, usable, {}, per_n)) for _, device in live) if per_n else 0
    total += len(live) if "step" in kinds else 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="case", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        if per_n:  # no matrices are built for the step alone
            _time_cases(results, ns, m, seed, torch_dtype, live, usable, per_n, repeats, max_seconds_per_case,
                        bar, case_done)
        if "step" in kinds:
            _time_steps(results, seed, live, repeats, max_seconds_per_case, bar, case_done)
    finally:
        if bar is not None:
            bar.close()
    results["load_average_end"] = _load_average()
    results["summary"] = _summarise(results["cases"], results["steps"])
    results["complete"] = True
    return results


def _time_cases(results, ns, m, seed, torch_dtype, live, usable, kinds, repeats, max_seconds_per_case, bar,
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
            for case in _cases_for(device, usable, inputs, kinds):
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


def _time_steps(results, seed, live, repeats, max_seconds_per_case, bar, case_done) -> None:
    """Time the training steps (see :mod:`toponeuro.bench.step`) in interleaved rounds on every live
    device, once (they do not depend on n), appending one record per series to ``results["steps"]``."""
    for dev_name, device in live:
        if bar is not None:
            bar.set_description(f"{dev_name} {STEP_MODEL} step")
        spin_up(device)
        load = _load_average()
        records = [{"kind": kind, "series": series, "call": call, "device": dev_name, "model": STEP_MODEL,
                    "batch": STEP_BATCH, "neurons": STEP_NEURONS, "weight": STEP_WEIGHT, "seed": seed,
                    "load_average": load}
                   for kind, series, call in step_members()]
        try:
            measured = time_calls(step_calls(seed, device), device, repeats, True, max_seconds_per_case)
        except Exception as err:  # reported, not fatal, as the other cases
            for record in records:
                record.update(status="error", error=f"{type(err).__name__}: {err}")
        else:
            for record, (times, peak) in zip(records, measured):
                record.update(status="ok", warmup=True, repeats=len(times), **_summary(times),
                              peak_extra_bytes=peak)
        results["steps"].extend(records)
        case_done()
        if bar is not None:
            bar.update(1)
