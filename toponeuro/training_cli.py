"""``toponeuro train``: the main job.

Trains a paper network twice, without and with the regulariser, with the
paper's optimiser, and compares them side by side: test accuracy, mean
``|rho|`` between recorded neurons and T1 on a held-out batch, seconds per
epoch. Writes ``summary.json`` and ``persistence.png`` (histogram of deaths and
the 0-dimensional persistence diagram, before versus after) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import data, distributed, models, persistence
from ._validation import describe_os_error, format_bytes, prepare_output_folder
from .dissimilarity import DISSIMILARITIES, correlation
from .experiments.config import SAMPLER_KINDS, RegulariserSettings, _parse_sampler
from .experiments.preflight import check_regulariser_memory, recorded_neurons, regulariser_memory
from .nn import TopologicalRegulariser, check_bounded
from .training import TrainConfig, device_label, fit, resolve_device, seed_everything

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


def held_out_statistics(model: torch.nn.Module, X: torch.Tensor, backend: str, sampler=None) -> dict:
    """Mean |rho| between recorded neurons (those ``sampler`` keeps; all by default), T1 and the deaths,
    on one batch ``X``."""
    model.eval()  # dropout off: measure the network as it predicts
    with TopologicalRegulariser(model, formula="t1", backend=backend, sampler=sampler, sync="local") as reg, \
            torch.enable_grad():
        model(X)
        A = reg.activations().detach()
        C = correlation(A)
        n = C.shape[0]
        mean_abs_rho = float((C.abs().sum() - n) / (n * (n - 1)))
        deaths = reg.deaths().detach()
    t1 = float((1.0 - deaths).sum())
    return {"mean_abs_rho": mean_abs_rho, "t1": t1, "neurons": n, "deaths": deaths.cpu().tolist()}


def plot_persistence(before: list[float], after: list[float], labels: tuple[str, str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_d) = plt.subplots(1, 2, figsize=(10, 4))
    bins = torch.linspace(0, max(max(before), max(after), 1e-6), 41).tolist()
    ax_h.hist(before, bins=bins, alpha=0.6, label=labels[0])
    ax_h.hist(after, bins=bins, alpha=0.6, label=labels[1])
    ax_h.set_xlabel("death time  (1 - |rho| on the MST edge)")
    ax_h.set_ylabel("count")
    ax_h.set_title("Histogram of deaths")
    ax_h.legend()
    top = max(max(before), max(after)) * 1.05 + 1e-6
    ax_d.plot([0, top], [0, top], color="grey", lw=0.8)
    ax_d.scatter([0.0] * len(before), before, s=8, alpha=0.5, label=labels[0])
    ax_d.scatter([0.0] * len(after), after, s=8, alpha=0.5, marker="x", label=labels[1])
    ax_d.set_xlim(-0.05 * top, top)
    ax_d.set_ylim(0, top)
    ax_d.set_xlabel("birth")
    ax_d.set_ylabel("death")
    ax_d.set_title("0-dimensional persistence diagram")
    ax_d.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON to ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
        return _train_and_compare(args, written)
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


def _train_and_compare(args: argparse.Namespace, written: list[str]) -> int:
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
    in_shape = tuple(train[0].shape[1:])
    held_out = val[0][: args.batch_size].to(device)

    summary = {
        "dataset": args.dataset, "model": args.model, "formula": args.formula, "weight": args.weight,
        "backend": args.backend, "dissimilarity": args.dissimilarity, "sampler": sampler_label, "neurons": n,
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "limit": args.limit,
        "device": device_label(device), "world_size": distributed.world_size(),
        "torch_version": torch.__version__, "complete": False, "runs": {},
    }
    runs = summary["runs"]
    for method in ("none", args.formula):
        seed_everything(args.seed)
        model = models.build(args.model, in_shape=in_shape, num_classes=data.num_classes(args.dataset))
        weight = 0.0 if method == "none" else args.weight
        t0 = time.perf_counter()
        result = fit(model, train, val, test, method=method, weight=weight, config=config,
                     sampler=args.sampler.build_sampler(args.seed), backend=args.backend,
                     dissimilarity=args.dissimilarity, device=device, seed=args.seed,
                     progress=not args.no_progress, progress_desc=f"{args.model} {method}")
        stats = held_out_statistics(model, held_out, args.backend, args.sampler.build_sampler(args.seed)) \
            if writer else {}
        runs[method] = {
            "method": method, "weight": weight, **result.summary(), "wall_seconds": time.perf_counter() - t0,
            "held_out": stats, "history": result.history,
        }
        if writer:  # each run's results as it finishes: an interrupt in the next run keeps them
            write_json(out / "summary.json", summary)
            written.append(method)

    if not writer:
        return 0
    base, reg = runs["none"], runs[args.formula]
    label = f"{args.formula} (lambda={args.weight:g})"
    rows = [
        ("test accuracy", f"{base['test_accuracy']:.4f}", f"{reg['test_accuracy']:.4f}"),
        ("validation accuracy", f"{base['val_accuracy']:.4f}", f"{reg['val_accuracy']:.4f}"),
        ("mean |rho| (held-out batch)", f"{base['held_out']['mean_abs_rho']:.4f}", f"{reg['held_out']['mean_abs_rho']:.4f}"),
        ("T1 (held-out batch)", f"{base['held_out']['t1']:.3f}", f"{reg['held_out']['t1']:.3f}"),
        ("seconds per epoch", f"{base['seconds_per_epoch']:.2f}", f"{reg['seconds_per_epoch']:.2f}"),
        ("epochs (best)", f"{base['epochs']} ({base['best_epoch']})", f"{reg['epochs']} ({reg['best_epoch']})"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{args.model} on {args.dataset} ({len(train[1])} training images), device {device_label(device)}")
    print(f"{'':<{width}}  {'none':>14}  {label:>22}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>14}  {b:>22}")

    plot_persistence(base["held_out"]["deaths"], reg["held_out"]["deaths"], ("none", label), out / "persistence.png")
    summary["complete"] = True
    write_json(out / "summary.json", summary)
    print(f"\nwrote {out / 'summary.json'} and {out / 'persistence.png'}")
    return 0
