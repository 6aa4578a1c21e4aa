"""``toponeuro bench``: the argument parser and ``run(args)`` (see :mod:`toponeuro.bench`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from .. import persistence
from .._validation import prepare_output_folder
from .cases import DEFAULT_N, DTYPES, QUICK_N
from .plots import plot_results
from .results import default_out_dir, write_results
from .runner import _check_backend_names, _check_devices, _check_options, _default_devices, run_benchmark
from .table import format_table


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
