"""One network trained without and with a regulariser, compared side by side (the library of ``toponeuro train``).

:func:`train_and_compare` trains the two runs from the same seed with
:func:`toponeuro.training.fit`, measures each on a held-out batch
(:func:`held_out_statistics`: mean ``|rho|`` between the recorded neurons, T1
and the deaths) and writes the summary to ``summary.json`` as each run
finishes (:func:`write_json`), so an interrupt keeps the finished run.
:func:`comparison_table` is the side-by-side table, and :func:`write_comparison`
writes the persistence figure (:func:`plot_persistence`: the histogram of the
deaths and the 0-dimensional persistence diagram, before versus after) and the
complete summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from . import data, distributed, models
from ._io import replace_atomically
from .dissimilarity import correlation
from .experiments.config import RegulariserSettings
from .nn import TopologicalRegulariser
from .training import TrainConfig, device_label, fit, seeded_build

__all__ = ["held_out_statistics", "plot_persistence", "write_json", "train_and_compare", "comparison_table",
           "write_comparison"]


def held_out_statistics(model: torch.nn.Module, X: torch.Tensor, backend: str, sampler=None) -> dict:
    """Mean ``|rho|`` between recorded neurons (those ``sampler`` keeps; all by default), T1 and the deaths,
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
    """Histogram of the deaths and the 0-dimensional persistence diagram of two runs, written to ``path``."""
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
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=2)

    replace_atomically(path, write)


def train_and_compare(network: str, dataset: str, train, val, test, *, formula: str, weight: float,
                      config: TrainConfig, settings: RegulariserSettings, backend: str, dissimilarity: str,
                      device: torch.device, seed: int, neurons: int, limit: int | None = None,
                      out: Path | None = None, on_saved: Callable[[str], None] | None = None,
                      progress: bool = True) -> dict:
    """Train ``network`` on ``dataset`` twice, method ``"none"`` then ``formula`` at ``weight``; the summary.

    Parameters
    ----------
    train, val, test : ``(X, y)`` splits; the first ``config.batch_size`` validation images are the
        held-out batch of :func:`held_out_statistics`.
    settings : the sampler of the regulariser and of the held-out statistics (built with ``seed``).
    neurons : the number of recorded neurons, recorded in the summary; ``limit``: likewise.
    out : a folder: ``summary.json`` is written there as each run finishes (``"complete": false``),
        and ``on_saved(method)`` is called after each write. Only the writer process (rank 0 under
        torchrun) measures and writes; the other ranks train and return.

    Returns
    -------
    summary : dict with the options, ``"runs"`` (per method: :meth:`toponeuro.training.FitResult.summary`,
        ``weight``, ``wall_seconds``, ``held_out``, ``history``) and ``"complete": False``
        (:func:`write_comparison` completes it).
    """
    writer = distributed.rank() == 0
    held_out = val[0][: config.batch_size].to(device)
    summary = {
        "dataset": dataset, "model": network, "formula": formula, "weight": weight,
        "backend": backend, "dissimilarity": dissimilarity, "sampler": settings.sampler_label(), "neurons": neurons,
        "epochs": config.max_epochs, "batch_size": config.batch_size, "seed": seed, "limit": limit,
        "device": device_label(device), "world_size": distributed.world_size(),
        "torch_version": torch.__version__, "complete": False, "runs": {},
    }
    runs = summary["runs"]
    for method in ("none", formula):
        model, _ = seeded_build(seed, lambda: models.build(network, in_shape=tuple(train[0].shape[1:]),
                                                          num_classes=data.num_classes(dataset)))
        run_weight = 0.0 if method == "none" else weight
        t0 = time.perf_counter()
        result = fit(model, train, val, test, method=method, weight=run_weight, config=config,
                     sampler=settings.build_sampler(seed), backend=backend, dissimilarity=dissimilarity,
                     device=device, seed=seed, progress=progress, progress_desc=f"{network} {method}")
        stats = held_out_statistics(model, held_out, backend, settings.build_sampler(seed)) if writer else {}
        runs[method] = {
            "method": method, "weight": run_weight, **result.summary(), "wall_seconds": time.perf_counter() - t0,
            "held_out": stats, "history": result.history,
        }
        if writer and out is not None:  # each run's results as it finishes: an interrupt in the next run keeps them
            write_json(Path(out) / "summary.json", summary)
            if on_saved is not None:
                on_saved(method)
    return summary


def _regularised_label(summary: dict) -> str:
    return f"{summary['formula']} (lambda={summary['weight']:g})"


def comparison_table(summary: dict, train_size: int) -> str:
    """The side-by-side table of :func:`train_and_compare`'s two runs; ``train_size``: training images."""
    base, reg = summary["runs"]["none"], summary["runs"][summary["formula"]]
    label = _regularised_label(summary)
    rows = [
        ("test accuracy", f"{base['test_accuracy']:.4f}", f"{reg['test_accuracy']:.4f}"),
        ("validation accuracy", f"{base['val_accuracy']:.4f}", f"{reg['val_accuracy']:.4f}"),
        ("mean |rho| (held-out batch)", f"{base['held_out']['mean_abs_rho']:.4f}", f"{reg['held_out']['mean_abs_rho']:.4f}"),
        ("T1 (held-out batch)", f"{base['held_out']['t1']:.3f}", f"{reg['held_out']['t1']:.3f}"),
        ("seconds per epoch", f"{base['seconds_per_epoch']:.2f}", f"{reg['seconds_per_epoch']:.2f}"),
        ("epochs (best)", f"{base['epochs']} ({base['best_epoch']})", f"{reg['epochs']} ({reg['best_epoch']})"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"\n{summary['model']} on {summary['dataset']} ({train_size} training images), device {summary['device']}",
             f"{'':<{width}}  {'none':>14}  {label:>22}"]
    lines += [f"{name:<{width}}  {a:>14}  {b:>22}" for name, a, b in rows]
    return "\n".join(lines)


def write_comparison(summary: dict, out: Path) -> tuple[Path, Path]:
    """Write ``persistence.png`` and the complete ``summary.json`` to ``out``; their paths."""
    out = Path(out)
    base, reg = summary["runs"]["none"], summary["runs"][summary["formula"]]
    figure = out / "persistence.png"
    plot_persistence(base["held_out"]["deaths"], reg["held_out"]["deaths"], ("none", _regularised_label(summary)),
                     figure)
    summary["complete"] = True
    write_json(out / "summary.json", summary)
    return out / "summary.json", figure
