"""``toponeuro bench``: the argument parser and ``run(args)`` (see :mod:`toponeuro.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import persistence
from .cases import CASE_KINDS, DEFAULT_N, DTYPES, QUICK_N
from .recording import prepare_run, record_benchmark
from .results import default_out_dir
from .runner import _default_devices
from .table import format_table


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Time every available persistence backend on every device over a list of n, on the same "
        "matrix 1 - |rho| of seeded random activations per n, and the regulariser's forward+backward "
        "cost against the correlation's and one matrix product's; write results.json and timings.png and print a table."
    )
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help=f"matrix sizes (default {' '.join(map(str, DEFAULT_N))}; --quick: "
                             f"{' '.join(map(str, QUICK_N))})")
    parser.add_argument("--m", type=int, default=256, help="samples per activation matrix (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; --quick: 3)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help=f"persistence backends (default: all installed, from {list(persistence.BACKENDS)})")
    parser.add_argument("--cases", nargs="+", default=None, metavar="KIND",
                        help=f"what to time, from {', '.join(CASE_KINDS)} (default: all): mst, each backend "
                             "alone; check, the input check alone and with the torch backend; regulariser, T1 "
                             "through TopologicalRegulariser beside the correlation and one matmul Z^T Z; step, "
                             "one SGD step of the mlp at batch 256 without and with T1 (once per device, not per n)")
    parser.add_argument("--devices", nargs="+", default=None, help="devices (default: cpu, and cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="matrix dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the activations (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/bench/cpu, or runs/bench/<gpu name> with CUDA: a "
                             "scratch folder; the committed results under data/bench are refreshed with --out)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a --out whose results.json is complete or tracked by git (refused "
                             "otherwise)")
    parser.add_argument("--max-seconds-per-case", type=float, default=None,
                        help="skip a case whose extrapolated time per call exceeds this, and stop its repeats "
                             "when they would (default 30; --quick: 10)")
    parser.add_argument("--quick", action="store_true", help="a short run: small n, 3 repeats, 10 s per case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the run (default: torch's default); on a machine "
                             "shared with other jobs, 1 avoids stalls at OpenMP barriers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark into ``--out``; bad options exit 2 with a one-line error, before anything is timed."""
    ns = args.n if args.n is not None else (QUICK_N if args.quick else DEFAULT_N)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    budget = args.max_seconds_per_case
    if budget is None:
        budget = 10.0 if args.quick else 30.0
    devices = args.devices if args.devices is not None else _default_devices()
    backends = args.backends if args.backends is not None else persistence.available_backends()
    try:
        out = prepare_run(ns, args.m, repeats, args.dtype, budget, args.threads, backends, devices,
                          args.out if args.out is not None else default_out_dir(devices), force=args.force,
                          cases=args.cases)
        rec = record_benchmark(out, ns=ns, m=args.m, repeats=repeats, backends=backends, devices=devices,
                               dtype=args.dtype, seed=args.seed, max_seconds_per_case=budget,
                               progress=not args.no_progress, threads=args.threads, cases=args.cases)
    except ValueError as err:
        print(f"toponeuro bench: error: {err}", file=sys.stderr)
        return 2
    if rec.results is not None:
        print(format_table(rec.results))
    if rec.interrupted is None:
        print(f"wrote {rec.json_path} and {rec.png_path}")
    elif rec.results is None:
        print(f"toponeuro bench: interrupted ({rec.interrupted}) before the first case finished; "
              f"nothing written to {out}", file=sys.stderr)
    else:
        plotted = f" and {rec.png_path}" if rec.plot_error is None else f" (no plot: {rec.plot_error})"
        print(f"toponeuro bench: interrupted ({rec.interrupted}); {len(rec.results['cases'])} finished case "
              f"records saved in {rec.json_path}{plotted}, with \"complete\": false", file=sys.stderr)
    return rec.exit_status
