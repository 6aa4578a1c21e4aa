"""A benchmark run recorded into a folder: checked before anything is timed, saved after every case,
kept when interrupted (Ctrl-C, SIGTERM), plotted at the end (:func:`record_benchmark`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from .._validation import prepare_output_folder
from .cases import check_case_kinds
from .plots import plot_results
from .results import check_output_folder, write_results
from .runner import _check_backend_names, _check_devices, _check_options, run_benchmark


def prepare_run(ns, m, repeats, dtype, max_seconds_per_case, threads, backends, devices, out,
                force: bool = False, cases: list[str] | None = None) -> Path:
    """Everything that can be refused, refused before a folder is made or anything timed.

    A ValueError naming the option for a bad value, an unknown backend or case kind, a
    requested device that is not available, an ``out`` that is a file or
    unwritable, or one that holds results a run would overwrite (see
    :func:`~toponeuro.bench.results.check_output_folder`; ``force`` allows it).
    Returns the folder, created.
    """
    _check_options(ns, m, repeats, dtype, max_seconds_per_case, threads)
    _check_backend_names(backends)
    check_case_kinds(cases)
    missing = [(name, why) for name, device, why in _check_devices(devices) if device is None]
    if missing:
        raise ValueError("requested device(s) not available: "
                         + "; ".join(f"{name}: {why}" for name, why in missing)
                         + "; drop them from --devices (without --devices: cpu, and cuda when available)")
    check_output_folder(out, force=force)
    return prepare_output_folder(out)


@dataclass
class Recording:
    """What :func:`record_benchmark` left in its folder.

    results : the results written (None: interrupted before the first case finished).
    json_path, png_path : where they are.
    interrupted : ``"SIGINT"``, ``"SIGTERM"`` or None (the run finished).
    plot_error : why the plot of an interrupted run could not be drawn, or None.
    """

    results: dict | None
    json_path: Path
    png_path: Path
    interrupted: str | None = None
    plot_error: str | None = None

    @property
    def exit_status(self) -> int:
        """0 for a finished run; 128 + the signal's number (130, 143) for an interrupted one."""
        if self.interrupted is None:
            return 0
        return 128 + int(signal.Signals[self.interrupted])


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


def record_benchmark(out: Path, **run_options) -> Recording:
    """:func:`~toponeuro.bench.run_benchmark` (``run_options``) into the folder ``out``.

    ``results.json`` is rewritten (atomically) after every case, so a kill
    keeps what was measured; an interruption by Ctrl-C or SIGTERM writes the
    finished cases marked ``"complete": false`` and ``"interrupted"``, and
    tries the plot. A finished run writes ``results.json`` and ``timings.png``.
    ValueError from the run propagates (nothing is then written).
    """
    out = Path(out)
    json_path, png_path = out / "results.json", out / "timings.png"
    latest: dict = {}

    def save(results: dict) -> None:  # after every case: what is measured so far survives a kill
        latest["results"] = results
        write_results(results, json_path)

    with _sigterm_raises_keyboard_interrupt() as received:
        try:
            results = run_benchmark(**run_options, on_case=save)
        except KeyboardInterrupt:
            results = None
    if results is not None:
        write_results(results, json_path)
        plot_results(results, png_path)
        return Recording(results, json_path, png_path)
    signame = "SIGTERM" if received else "SIGINT"
    partial = latest.get("results")
    if partial is None:
        return Recording(None, json_path, png_path, interrupted=signame)
    partial.update(complete=False, interrupted=signame)
    write_results(partial, json_path)
    plot_error = None
    try:
        plot_results(partial, png_path)
    except Exception as err:  # the timings are safe in the JSON; a plot failure must not hide that
        plot_error = f"{type(err).__name__}: {err}"
    return Recording(partial, json_path, png_path, interrupted=signame, plot_error=plot_error)
