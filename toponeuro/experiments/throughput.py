"""``toponeuro bench-engine``: run-epochs per second of the batched engine against the single one.

::

    toponeuro bench-engine CONFIG [--engine both|batched|single] [--epochs E] [--device cpu|cuda]
                               [--networks mlp ...] [--methods t1 ...] [--max-runs K]
                               [--single-runs K] [--out DIR] [--force]

Both engines train the same runs of the grid (the config's MLP runs, cut by
``--networks``/``--methods``/``--max-runs``) for exactly ``E`` epochs each
(patience set above ``E``: no early stop), on one device, in one process, one
after the other; the measure is run-epochs per second (runs x epochs / wall
seconds, evaluation passes included). ``--single-runs K`` times the single
engine on the first ``K`` of those runs only (a per-run-epoch rate needs no
more; the accuracies are compared on those runs). Writes ``results.json``
and ``throughput.png`` to ``--out`` (default ``runs/throughput/<name>-<device>``),
and refuses to overwrite a ``results.json`` there without ``--force``.

``--epochs-per-run E`` or ``--epochs-from DIR`` (the median ``epochs`` of the
rows of ``DIR/runs.csv``, runs trained to early stopping under the protocol)
adds an estimate of the config's whole grid at the measured rates:
``runs x E / (run-epochs per second)``, per engine, under ``grid_estimate``.
Only an estimate: early stopping varies with method and weight, and the
timed methods' rate stands for every method's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

__all__ = ["configure_parser", "run", "measure"]

DEFAULT_ROOT = Path("runs") / "throughput"


def _select(config, networks, methods, max_runs):
    from .. import ensemble

    runs = [r for r in config.runs() if ensemble.stackable(r.network)]
    if networks:
        runs = [r for r in runs if r.network in networks]
    if methods:
        runs = [r for r in runs if r.method in methods]
    if max_runs is not None:
        runs = runs[:max_runs]
    if not runs:
        raise ValueError("no run left to time: the batched engine stacks the MLPs (mlp, mlp-dropout, mlp-deep); "
                         "check --networks, --methods and the config's grid")
    return runs


def measure(config, *, epochs: int, device="cpu", engines=("single", "batched"), networks=None, methods=None,
            max_runs: int | None = None, single_runs: int | None = None, stack_size: int = 128,
            progress: bool = True) -> dict:
    """Time the engines on the same runs for ``epochs`` epochs each; a JSON-able dict of the figures."""
    from .. import ensemble, training
    from ..bench.environment import _load_average
    from ..bench.timing import _sync
    from ..provenance import git_commit
    from . import engine as engine_mod
    from . import runner

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    dev = training.resolve_device(device)
    train_config = dataclasses.replace(config.training, max_epochs=epochs, patience=epochs + 1)
    runs = _select(config, networks, methods, max_runs)
    train, val, test = runner._data(config, dev)
    out = {
        "config": config.name, "dataset": config.dataset, "device": training.device_label(dev),
        "torch_version": torch.__version__, "commit": git_commit(), "threads": torch.get_num_threads(),
        "cpus": runner._cpus(), "load_average_before": _load_average(),
        "epochs": epochs, "runs": len(runs), "run_ids": [r.run_id for r in runs],
        "train_size": len(train[1]), "batch_size": train_config.batch_size, "engines": {},
    }

    def build_for(spec):
        # as the runner builds it: the config's initialisation, seeded by the run's seed
        return lambda: runner.initial_weights(config, spec)

    # warm-up, untimed: one epoch of the first run on two batches, with each engine (imports, JIT
    # compilation, CUDA context and kernels are paid here, not by whichever engine is timed first)
    first = runs[0]
    reg = config.regulariser_for(first.network)
    cut = (train[0][:2 * train_config.batch_size], train[1][:2 * train_config.batch_size])
    warm = dataclasses.replace(train_config, max_epochs=1, patience=2)
    kwargs = dict(config=warm, backend=reg.backend, dissimilarity=reg.dissimilarity, alpha=reg.alpha,
                  include_bias=reg.include_bias, device=dev)
    training.fit(build_for(first)(), cut, val, method=first.method, weight=first.weight, progress=False, **kwargs)
    ensemble.fit_stack(build_for(first), [ensemble.Member(first.method, first.weight, first.seed)], cut,
                       val, progress=False, **kwargs)

    if "single" in engines:
        timed = runs if single_runs is None else runs[:single_runs]
        accuracies = {}
        _sync(dev)
        start = time.perf_counter()
        for spec in timed:
            reg = config.regulariser_for(spec.network)
            result = training.fit(build_for(spec)(), train, val, test, method=spec.method, weight=spec.weight,
                                  config=train_config, sampler=reg.build_sampler(spec.seed), backend=reg.backend,
                                  dissimilarity=reg.dissimilarity, alpha=reg.alpha, include_bias=reg.include_bias,
                                  device=dev, seed=spec.seed, progress=progress,
                                  progress_desc=f"single {spec.run_id}")
            accuracies[spec.run_id] = result.test_accuracy
        _sync(dev)
        seconds = time.perf_counter() - start
        out["engines"]["single"] = {"runs": len(timed), "seconds": seconds,
                                    "run_epochs_per_second": len(timed) * epochs / seconds,
                                    "test_accuracy": accuracies}
    if "batched" in engines:
        stacks, _ = engine_mod.stack_groups(runs, stack_size)
        accuracies = {}
        _sync(dev)
        start = time.perf_counter()
        for _, specs in stacks:
            reg = config.regulariser_for(specs[0].network)
            by_key = {s.key: s for s in specs}
            results = ensemble.fit_stack(build_for(specs[0]), engine_mod.stack_members(config, specs), train, val,
                                         test, config=train_config, backend=reg.backend,
                                         dissimilarity=reg.dissimilarity, alpha=reg.alpha,
                                         include_bias=reg.include_bias, device=dev, progress=progress,
                                         progress_desc=f"batched {specs[0].network} x{len(specs)}",
                                         build_member=lambda m: runner.initial_weights(config, by_key[tuple(m.key)]))
            accuracies.update({s.run_id: r.test_accuracy for s, r in zip(specs, results)})
        _sync(dev)
        seconds = time.perf_counter() - start
        out["engines"]["batched"] = {"runs": len(runs), "stacks": [len(s) for _, s in stacks], "seconds": seconds,
                                     "run_epochs_per_second": len(runs) * epochs / seconds,
                                     "test_accuracy": accuracies}
    if {"single", "batched"} <= set(out["engines"]):
        single, batched = out["engines"]["single"], out["engines"]["batched"]
        out["speedup"] = batched["run_epochs_per_second"] / single["run_epochs_per_second"]
        common = [r for r in single["test_accuracy"] if r in batched["test_accuracy"]]
        diffs = [abs(single["test_accuracy"][r] - batched["test_accuracy"][r]) for r in common]
        out["test_accuracy_mean_abs_difference"] = sum(diffs) / len(diffs) if diffs else math.nan
        out["test_accuracy_max_abs_difference"] = max(diffs) if diffs else math.nan
    out["load_average_after"] = _load_average()
    return out


def epochs_per_run_from(directory) -> tuple[float, str]:
    """The median ``epochs`` of the finished rows of ``directory/runs.csv``, and a line saying where it is from."""
    import statistics

    from .runs_csv import read_rows

    path = Path(directory) / "runs.csv"
    if not path.is_file():
        raise ValueError(f"--epochs-from: no {path} (a results folder of `toponeuro experiment run`)")
    epochs = [int(r["epochs"]) for r in read_rows(path) if str(r.get("epochs", "")).strip()]
    if not epochs:
        raise ValueError(f"--epochs-from: {path} has no finished run")
    return float(statistics.median(epochs)), f"median of {len(epochs)} runs in {path}"


def grid_estimate(results: dict, config, epochs_per_run: float, source: str) -> dict:
    """Seconds for every run of ``config``'s grid at ``epochs_per_run`` epochs each, at each engine's measured rate."""
    runs = len(config.runs())
    estimate = {"grid_runs": runs, "epochs_per_run": epochs_per_run, "epochs_source": source,
                "run_epochs": runs * epochs_per_run, "seconds": {}}
    for name, figures in results["engines"].items():
        estimate["seconds"][name] = runs * epochs_per_run / figures["run_epochs_per_second"]
    return estimate


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["engines"])
    rates = [results["engines"][n]["run_epochs_per_second"] for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(names, rates, color=["#888888", "#1f77b4"][:len(names)])
    for i, r in enumerate(rates):
        ax.text(i, r, f"{r:.3g}", ha="center", va="bottom")
    title = f"{results['config']}, {results['runs']} runs x {results['epochs']} epochs\n{results['device']}"
    if "speedup" in results:
        title += f": batched {results['speedup']:.2f}x"
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("run-epochs per second")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a TOML file, or the name of a shipped config")
    p.add_argument("--engine", choices=("both", "batched", "single"), default="both")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (no early stopping; default 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--networks", nargs="+", default=None, help="only these networks of the grid")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods of the grid")
    p.add_argument("--max-runs", type=int, default=None, metavar="K", help="the first K runs (grid order)")
    p.add_argument("--single-runs", type=int, default=None, metavar="K",
                   help="time the single engine on the first K of the runs only (default: all)")
    p.add_argument("--stack-size", type=int, default=128, metavar="K", help="runs per stack (default 128)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_ROOT}/<name>-<device>)")
    p.add_argument("--force", action="store_true", help="overwrite results.json there")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    estimate = p.add_mutually_exclusive_group()
    estimate.add_argument("--epochs-per-run", type=float, default=None, metavar="E",
                          help="estimate the config's whole grid at E epochs per run")
    estimate.add_argument("--epochs-from", default=None, metavar="DIR",
                          help="estimate the whole grid at the median epochs of the runs in DIR/runs.csv")


def run(args) -> int:
    from .. import training
    from .config import load_config

    try:
        config = load_config(args.config)
        dev = training.resolve_device(args.device)
        out = Path(args.out) if args.out else DEFAULT_ROOT / f"{config.name}-{dev.type}"
        if (out / "results.json").exists() and not args.force:
            raise ValueError(f"{out / 'results.json'} exists; pass --force to overwrite it, or another --out")
        for name in ("max_runs", "single_runs"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        epochs_per_run = getattr(args, "epochs_per_run", None)
        if epochs_per_run is not None:
            if not (epochs_per_run > 0 and math.isfinite(epochs_per_run)):
                raise ValueError(f"--epochs-per-run must be a positive number, got {epochs_per_run}")
            source = "--epochs-per-run"
        elif getattr(args, "epochs_from", None):
            epochs_per_run, source = epochs_per_run_from(args.epochs_from)
        engines = ("single", "batched") if args.engine == "both" else (args.engine,)
        results = measure(config, epochs=args.epochs, device=dev, engines=engines, networks=args.networks,
                          methods=args.methods, max_runs=args.max_runs, single_runs=args.single_runs,
                          stack_size=args.stack_size, progress=not args.no_progress)
        if epochs_per_run is not None:
            results["grid_estimate"] = grid_estimate(results, config, epochs_per_run, source)
    except ValueError as err:
        print(f"toponeuro bench-engine: error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    _plot(results, out / "throughput.png")
    for name, figures in results["engines"].items():
        print(f"{name:8s} {figures['runs']:4d} runs x {results['epochs']} epochs in {figures['seconds']:.1f} s: "
              f"{figures['run_epochs_per_second']:.3f} run-epochs/s")
    if "speedup" in results:
        print(f"batched / single: {results['speedup']:.2f}x; test accuracy mean |difference| "
              f"{results['test_accuracy_mean_abs_difference']:.4f}")
    if "grid_estimate" in results:
        g = results["grid_estimate"]
        per_engine = ", ".join(f"{name} {seconds / 3600:.2f} h" for name, seconds in g["seconds"].items())
        print(f"the whole grid of {results['config']}, {g['grid_runs']} runs x {g['epochs_per_run']:g} epochs "
              f"({g['epochs_source']}), at these rates: {per_engine} (an estimate)")
    print(f"wrote {out / 'results.json'} and {out / 'throughput.png'}")
    return 0
