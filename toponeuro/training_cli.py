"""``toponeuro train``: the argument parser and ``run(args)`` (see :mod:`toponeuro.comparison`).

The main job: trains a paper network twice, without and with the regulariser,
with the paper's optimiser, and compares them side by side: test accuracy,
mean ``|rho|`` between recorded neurons and T1 on a held-out batch, seconds per
epoch. Writes ``summary.json`` and ``persistence.png`` (histogram of deaths and
the 0-dimensional persistence diagram, before versus after) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from . import data, distributed, models, persistence
from ._validation import describe_os_error, format_bytes, prepare_output_folder
# held_out_statistics, plot_persistence and write_json lived here: they stay importable from here
from .comparison import (comparison_table, held_out_statistics, plot_persistence, train_and_compare,
                         write_comparison, write_json)
from .dissimilarity import DISSIMILARITIES
from .experiments.config import SAMPLER_KINDS, RegulariserSettings, _parse_sampler
from .experiments.preflight import check_regulariser_memory, recorded_neurons, regulariser_memory
from .nn import check_bounded
from .training import TrainConfig, resolve_device

__all__ = ["FORMULAS", "configure_parser", "sampler_option", "run",
           # re-exported from toponeuro.comparison, where they moved
           "held_out_statistics", "plot_persistence", "write_json"]

FORMULAS = ("t1", "t2", "min_corr", "decov", "l1", "l2")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=data.DATASETS)
    p.add_argument("--model", default="mlp", choices=models.MODELS)
    p.add_argument("--formula", default="t1", choices=FORMULAS, help="the regulariser of the second run")
    p.add_argument("--backend", default="torch", help="persistence backend (default: torch)")
    p.add_argument("--dissimilarity", default="abs_correlation", choices=sorted(DISSIMILARITIES))
    p.add_argument("--weight", type=float, default=1e-4,
                   help="lambda, the regulariser's weight (default 1e-4; with about 1000 neurons, 1e-3 "
                        "and more can collapse the MLP to a constant prediction within a few epochs)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (early stopping may end sooner)")
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--sampler", default=RegulariserSettings(), type=sampler_option, metavar="KIND[:P]",
                   help=f"neurons the regulariser and the held-out statistics see: {', '.join(SAMPLER_KINDS)}; "
                        "importance and random keep a fraction P of every hidden layer, e.g. importance:0.01 "
                        "(default all; the cnn has 18954 neurons on MNIST)")
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-memory-check", action="store_true",
                   help="train even when the regulariser's estimated memory exceeds what the device has free")


def sampler_option(text: str) -> RegulariserSettings:
    """``--sampler KIND[:P]`` (``all``, ``importance:0.01``, ``random:0.1``) as regulariser settings."""
    kind, colon, p = text.partition(":")
    value = {"kind": kind}
    if colon:
        try:
            value["p"] = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"P in {text!r} must be a number in (0, 1], e.g. importance:0.01")
    try:
        return RegulariserSettings(sampler=_parse_sampler(value, "--sampler"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("--sampler.kind", "KIND").replace("--sampler.p", "P")) \
            from None


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    # the CPU allocator raises a plain RuntimeError
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


def run(args: argparse.Namespace) -> int:
    """Train, compare, write; bad options and unusable paths exit 2 with a one-line error.

    Each run's results are written to ``summary.json`` as it finishes; an
    interrupt (exit 130) or running out of memory (exit 1) keeps them and
    says so in one line.
    """
    written: list[str] = []  # methods whose results are in summary.json
    try:
        return _check_and_compare(args, written)
    except ValueError as err:
        print(f"toponeuro train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"toponeuro train: error: {describe_os_error(err)}", file=sys.stderr)
        return 2 if not written else 1
    except KeyboardInterrupt:
        print(f"toponeuro train: interrupted; {_kept(args, written)}", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as err:
        if not _out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"toponeuro train: error: out of memory ({first[:200]}); try --sampler importance:0.01 or a "
              f"smaller --batch-size; {_kept(args, written)}", file=sys.stderr)
        return 1


def _kept(args, written: list[str]) -> str:
    if not written:
        return "no run had finished, nothing written"
    return f"the finished run{'s' if len(written) > 1 else ''} ({', '.join(written)}) kept in " \
           f"{Path(args.out) / 'summary.json'}"


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The options' TrainConfig; a bad value is reported by its option's name."""
    options = {"lr": "--lr", "batch_size": "--batch-size", "max_epochs": "--epochs", "patience": "--patience"}
    try:
        return TrainConfig(**{field: getattr(args, option[2:].replace("-", "_"))
                              for field, option in options.items()})
    except ValueError as err:
        message = str(err)
        for field, option in options.items():
            message = message.replace(f"TrainConfig.{field}", option)
        raise ValueError(message) from None


def _check_and_compare(args: argparse.Namespace, written: list[str]) -> int:
    """Check every option before any training, then :func:`~toponeuro.comparison.train_and_compare`,
    the table, and :func:`~toponeuro.comparison.write_comparison`; ``written`` gets each saved run."""
    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    config = _train_config(args)
    if args.limit is not None and args.limit < args.batch_size:
        raise ValueError(f"--limit {args.limit} is smaller than --batch-size {args.batch_size}")
    if not math.isfinite(args.weight) or args.weight < 0:
        raise ValueError("--weight must be a finite number >= 0")
    # an unknown backend, or one without death edges (the held-out T1 needs them), before any training
    if not persistence.get_backend(args.backend).gives_edges:
        raise ValueError(f"--backend {args.backend!r} gives death values only, not death edges; the regulariser "
                         f"and the held-out T1 need edges: use one of {persistence.edge_backends()}")
    # T1/T2 on an unbounded dissimilarity: refused before the baseline run, not after it
    check_bounded(args.formula, args.dissimilarity)
    device = resolve_device(args.device)
    # under torchrun every rank trains its slice of each batch (DDP); rank 0 reports
    device = distributed.setup(device)
    writer = distributed.rank() == 0
    out = Path(args.out)
    if writer:
        prepare_output_folder(args.out)  # a file, or not writable: an error now, not after training
    sampler_label = args.sampler.sampler_label()
    n = recorded_neurons(args.model, args.dataset, args.sampler.build_sampler(args.seed))
    if not args.no_memory_check:
        # the regulariser of the second run and the held-out T1 of both hold n x n matrices
        check_regulariser_memory(n, device, key="--sampler", override="--no-memory-check")
    if writer and sampler_label == "all" and n > 4096:
        print(f"toponeuro train: note: the regulariser sees all {n} neurons of {args.model} (about "
              f"{format_bytes(regulariser_memory(n))}, slow on a CPU); --sampler importance:0.01 keeps a "
              "hundredth of every hidden layer", file=sys.stderr)

    train = data.load(args.dataset, "train")
    if args.limit is not None:
        train = (train[0][: args.limit], train[1][: args.limit])
    if len(train[1]) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train[1])} training images of "
                         f"{args.dataset}: lower --batch-size")
    val, test = data.load(args.dataset, "val"), data.load(args.dataset, "test")
    summary = train_and_compare(args.model, args.dataset, train, val, test, formula=args.formula,
                                weight=args.weight, config=config, settings=args.sampler, backend=args.backend,
                                dissimilarity=args.dissimilarity, device=device, seed=args.seed, neurons=n,
                                limit=args.limit, out=out if writer else None, on_saved=written.append,
                                progress=not args.no_progress)
    if not writer:
        return 0
    print(comparison_table(summary, len(train[1])))
    summary_path, figure_path = write_comparison(summary, out)
    print(f"\nwrote {summary_path} and {figure_path}")
    return 0
