"""The report's figures: the critical-difference diagram and test accuracy against the weight."""

from __future__ import annotations

import pandas as pd

from .selection import METHOD_LABELS, _method_order
from .statistics import ALPHA


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_critical_difference(ranks: pd.Series, pvalues: pd.DataFrame, cd: float, path, title: str) -> None:
    """Critical-difference diagram of average ``ranks`` (1 = best), bars from the Nemenyi ``pvalues``, to ``path``."""
    import scikit_posthocs as sp

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    labels = {m: METHOD_LABELS.get(m, m) for m in ranks.index}
    sp.critical_difference_diagram(ranks.rename(index=labels),
                                   pvalues.rename(index=labels, columns=labels), ax=ax, alpha=ALPHA)
    ax.set_title(f"{title}\naverage rank (1 = best); bars join methods not significantly different "
                 f"(Nemenyi, alpha={ALPHA}); CD = {cd:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_accuracy_vs_weight(runs: pd.DataFrame, path, title: str) -> None:
    """Test accuracy (mean ± std over seeds) against the weight, one panel per network."""
    plt = _pyplot()
    networks = list(dict.fromkeys(runs["network"]))
    fig, axes = plt.subplots(1, len(networks), figsize=(5.2 * len(networks), 4), squeeze=False)
    methods = _method_order(runs["method"].unique())
    for ax, net in zip(axes[0], networks):
        sub = runs[runs["network"] == net]
        for method in methods:
            m = sub[sub["method"] == method]
            if m.empty:
                continue
            g = m.groupby("weight")["test_accuracy"].agg(["mean", "std"]).sort_index()
            label = METHOD_LABELS.get(method, method)
            if method == "none" or (g.index == 0).all():
                ax.axhline(g["mean"].iloc[0] * 100, color="k", ls="--", lw=1, label=f"{label} (weight 0)")
                continue
            g = g[g.index > 0]
            ax.errorbar(g.index, g["mean"] * 100, yerr=g["std"].fillna(0) * 100, marker="o", ms=3,
                        capsize=2, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("regulariser weight (lambda)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(net)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
