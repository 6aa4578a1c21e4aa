"""Turn an experiment's ``runs.csv`` into ``report.md``, with statistics and figures.

The paper's analysis, step by step (each step a function, so each can be checked):

0. :func:`check_pooling`: one results folder is one software stack; rows
   from several commits or devices are refused unless ``allow_mixed``.
   :func:`drop_weights`: the weights the config's ``[report]`` section drops
   (runs that did not converge, weights above a cap), with the reason.

The paper's analysis (:func:`paper_analysis`): its six methods (none, T1,
T2, L1, L2, MinCorr; dropout is the network ``mlp-dropout``), one weight per
(network, method) chosen by the mean validation accuracy over seeds
(:func:`select_weights_pooled`), blocks = networks, each cell the mean test
accuracy over seeds; Friedman, Nemenyi, critical difference. Beside the
ranks, :func:`paired_differences` gives effect sizes: per network, the
difference of test accuracy between two methods paired by seed, with a
t-interval.

Our analysis, with DeCov and seeds:

1. :func:`select_weights`: for every (dataset, network, method, seed), the
   weight with the highest validation accuracy (ties: the smaller weight);
   its test accuracy is the result of that method there. This is per seed,
   a choice of ours; the paper picks one weight per (network, method)
   (:func:`select_weights_pooled`), and the report gives the difference.
2. :func:`accuracy_table`: test accuracy, mean and sample standard deviation
   over seeds, per network x method.
3. :func:`block_matrix`: blocks = (network, seed) in which every method has
   a result, one column per method; :func:`average_ranks` (1 = best);
   :func:`friedman` (``scipy.stats.friedmanchisquare``); :func:`nemenyi`
   (``scikit_posthocs.posthoc_nemenyi_friedman``); :func:`critical_difference`.
   Blocks of the same network share a data set, so they are not the
   independent data sets of Demšar (2006): the critical difference is
   optimistic, and the report says so. :func:`mixed_device_blocks` lists the
   blocks whose methods were trained on more than one device.
4. :func:`claims`: the paper's claims, judged from those numbers (both analyses).
   :func:`inert_methods`: methods that change no test accuracy by more
   than a threshold at any weight.
5. :func:`write_report`: ``report.md``, ``critical_difference.png``,
   ``accuracy_vs_weight.png`` and ``selected.csv`` in the experiment folder.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from .config import GRID_METHODS, ReportSettings, load_config, parse_config
from .runner import DEFAULT_OUT
from .runs_csv import LEGACY_DEFAULTS, read_rows, row_key
from .shards import rows_files

__all__ = [
    "ALPHA",
    "PAPER_METHODS",
    "MixedRowsError",
    "check_pooling",
    "unconverged",
    "drop_weights",
    "paper_analysis",
    "paired_differences",
    "inert_methods",
    "load_runs",
    "select_weights",
    "select_weights_pooled",
    "mixed_device_blocks",
    "accuracy_table",
    "block_matrix",
    "average_ranks",
    "friedman",
    "nemenyi",
    "critical_difference",
    "claims",
    "resolve_experiment",
    "write_report",
]

ALPHA = 0.05
#: the paper's claims: each method of the first tuple beats each of the second
CLAIM_1 = (("t1", "t2"), ("none", "l1", "l2", "min_corr"))
CLAIM_2 = (("t1", "t2"), ("min_corr",))
METHOD_LABELS = {"none": "none", "t1": "T1", "t2": "T2", "l1": "L1", "l2": "L2", "min_corr": "MinCorr",
                 "decov": "DeCov"}
#: the methods the paper ranked (dropout is the network ``mlp-dropout`` with method ``none``)
PAPER_METHODS = ("none", "t1", "t2", "l1", "l2", "min_corr")
#: a method is inert on a network when no weight moves its mean test accuracy further than this from none's
INERT_THRESHOLD = 0.001
#: a run "did not converge" when its validation accuracy stays below this multiple of chance (1 / classes)
CHANCE_MULTIPLE = 2.0

_NUMERIC = ("weight", "seed", "val_accuracy", "test_accuracy", "val_loss", "test_loss", "best_epoch", "epochs",
            "seconds", "seconds_per_epoch", "train_size", "val_size", "test_size", "max_epochs", "patience",
            "batch_size", "lr", "momentum", "lr_decay", "lr_decay_steps", "alpha")


def _parse_numbers(df: pd.DataFrame, source) -> pd.DataFrame:
    """The :data:`_NUMERIC` columns of ``df`` (strings as read) parsed as numbers.

    A cell that is not a number (``nan`` is one: a diverged run) would become
    NaN and drop its run, hence a seed, from the report without a word: a
    ValueError names its run and column instead.
    """
    for col in _NUMERIC:
        if col not in df:
            continue
        parsed = pd.to_numeric(df[col], errors="coerce")
        bad = parsed.isna() & (df[col].astype(str).str.strip().str.lower() != "nan")
        if bad.any():
            i = bad.idxmax()
            run = df["run_id"][i] if "run_id" in df else f"row {i + 1}"
            raise ValueError(f"{source}: run {run}, column {col}: {df[col][i]!r} is not a number; correct the "
                             "cell in its rows file, or delete the row to train that run again")
        df[col] = parsed
    return df


def load_runs(directory) -> pd.DataFrame:
    """The finished runs of an experiment folder as a DataFrame (numbers parsed).

    Merges ``runs.csv`` and the shards' ``runs.shard-I-of-N.csv``; of two rows of one run the first
    (``runs.csv`` first) is kept. Rows written before the ``engine`` column read as ``single``.
    """
    rows, seen = [], set()
    for path in rows_files(directory):
        for row in read_rows(path):
            if row_key(row) not in seen:
                seen.add(row_key(row))
                rows.append({"engine": "single", **row})
    if not rows:
        raise ValueError(f"no finished runs in {Path(directory) / 'runs.csv'} (nor in shard files "
                         "runs.shard-I-of-N.csv); run the experiment first")
    df = pd.DataFrame(rows)
    df = _parse_numbers(df, Path(directory))
    for col in ("stopped_early", "diverged", "nesterov"):
        if col in df:
            df[col] = df[col].astype(str).str.lower() == "true"
    df["seed"] = df["seed"].astype(int)
    return df


def _method_order(methods) -> list[str]:
    known = [m for m in GRID_METHODS if m in set(methods)]
    return known + sorted(set(methods) - set(known))


def _best_by_validation(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``, the row of ``table`` with the highest ``val_accuracy`` (ties: the smaller ``weight``)."""
    ordered = table.sort_values(keys + ["val_accuracy", "weight"], ascending=[True] * len(keys) + [False, True],
                                kind="mergesort")
    return ordered.groupby(keys, sort=True).head(1)


def select_weights(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, network, method, seed): the weight with the best validation accuracy.

    Ties in validation accuracy go to the smaller weight. Returns the selected
    rows of ``runs`` (all columns), sorted by dataset, network, method, seed.
    """
    need = {"dataset", "network", "method", "seed", "weight", "val_accuracy", "test_accuracy"}
    missing = need - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks the columns {sorted(missing)}")
    keys = ["dataset", "network", "method", "seed"]
    selected = _best_by_validation(runs[runs["val_accuracy"].notna()], keys)
    return selected.sort_values(keys).reset_index(drop=True)


def select_weights_pooled(runs: pd.DataFrame) -> pd.DataFrame:
    """One weight per (dataset, network, method): the best mean validation accuracy over seeds.

    The paper's rule ("for each regulariser and each network, the weight is
    chosen by validation accuracy") with one weight for all seeds;
    ties go to the smaller weight. Returns the rows of ``runs`` of that weight
    (one per seed that ran it), sorted by dataset, network, method, seed.
    """
    keys = ["dataset", "network", "method"]
    valid = runs[runs["val_accuracy"].notna()]
    means = valid.groupby(keys + ["weight"], as_index=False)["val_accuracy"].mean()
    chosen = _best_by_validation(means, keys)[keys + ["weight"]]
    out = valid.merge(chosen, on=keys + ["weight"], how="inner")
    return out.sort_values(keys + ["seed"]).reset_index(drop=True)


def mixed_device_blocks(runs: pd.DataFrame, selected: pd.DataFrame | None = None) -> list[dict]:
    """Blocks (network, seed) whose runs were trained on more than one device.

    Returns one dict per such block, in network then seed order: ``network``,
    ``seed``, ``runs`` ({device: number of runs}), ``selected`` ({device:
    methods whose selected run came from it}; empty without ``selected``) and
    ``split`` (methods whose weights in this block span devices, so the
    selection itself compared devices). Empty when ``runs`` has no ``device``
    column or every block is on one device.
    """
    if "device" not in runs.columns:
        return []
    out = []
    for (network, seed), block in runs.groupby(["network", "seed"], sort=False):
        counts = block["device"].value_counts()
        if len(counts) < 2:
            continue
        chosen: dict = {}
        if selected is not None and "device" in selected.columns:
            sel = selected[(selected["network"] == network) & (selected["seed"] == seed)]
            for method in _method_order(sel["method"].unique()):
                for device in sel.loc[sel["method"] == method, "device"]:
                    chosen.setdefault(device, []).append(method)
        split = [m for m in _method_order(block["method"].unique())
                 if block.loc[block["method"] == m, "device"].nunique() > 1]
        out.append({"network": network, "seed": int(seed), "runs": {d: int(c) for d, c in counts.items()},
                    "selected": chosen, "split": split})
    order = {net: i for i, net in enumerate(dict.fromkeys(runs["network"]))}
    return sorted(out, key=lambda b: (order[b["network"]], b["seed"]))


class MixedRowsError(ValueError):
    """A results folder holds rows from more than one commit or device (see :func:`check_pooling`)."""


def check_pooling(runs: pd.DataFrame, allow_mixed: bool = False) -> dict:
    """The commits and devices of ``runs``; refuse to pool several unless ``allow_mixed``.

    One results folder should be one software stack: the same seed gives
    other numbers with other code or kernels. Returns ``{"commits": {commit:
    rows}, "devices": {device: rows}, "mixed": bool}``.

    Raises
    ------
    MixedRowsError : (a ValueError) several commits or devices and not ``allow_mixed``.
    """
    commits = runs["commit"].fillna("unknown").astype(str).value_counts().to_dict()
    devices = runs["device"].fillna("unknown").astype(str).value_counts().to_dict()
    mixed = len(commits) > 1 or len(devices) > 1
    if mixed and not allow_mixed:
        parts = []
        if len(commits) > 1:
            parts.append("commits " + ", ".join(f"{c} ({n} rows)" for c, n in commits.items()))
        if len(devices) > 1:
            parts.append("devices " + ", ".join(f"{d} ({n} rows)" for d, n in devices.items()))
        raise MixedRowsError(
            "the rows of this folder come from " + " and ".join(parts) + "; one results folder should be one "
            "software stack (the same seed gives other numbers with other code or kernels). Run the missing "
            "runs on one stack into another --out folder, or pass --allow-mixed (allow_mixed=True) to pool "
            "them anyway: the report then says that it does")
    return {"commits": commits, "devices": devices, "mixed": mixed}


def unconverged(runs: pd.DataFrame, num_classes: int) -> pd.Series:
    """Boolean per run: it diverged, or its validation accuracy stayed below twice chance (``2 / classes``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    diverged = runs["diverged"].astype(bool) if "diverged" in runs else False
    val = runs["val_accuracy"]
    return diverged | val.isna() | (val < CHANCE_MULTIPLE / num_classes)


def drop_weights(runs: pd.DataFrame, settings, num_classes: int) -> tuple[pd.DataFrame, list[dict]]:
    """Drop the weights the ``[report]`` settings exclude, as the authors pruned their grid.

    settings : :class:`~toponeuro.experiments.config.ReportSettings` (``drop_unconverged``, ``max_weight``).

    A weight of a (network, method) is dropped, for every seed, when it lies
    above ``max_weight[method]``, or (with ``drop_unconverged``) when one of
    its runs did not converge (:func:`unconverged`). Method ``none`` is never
    dropped. Returns ``(kept runs, dropped)``, ``dropped`` one dict per
    (network, method, weight): ``network, method, weight, reason``.
    """
    caps = settings.max_weight_dict
    bad = unconverged(runs, num_classes) if settings.drop_unconverged else pd.Series(False, index=runs.index)
    dropped, drop_mask = [], pd.Series(False, index=runs.index)
    for (network, method, weight), group in runs.groupby(["network", "method", "weight"], sort=False):
        if method == "none":
            continue
        reasons = []
        if method in caps and weight > caps[method]:
            reasons.append(f"above the cap {_fmt_weight(caps[method])} for {METHOD_LABELS.get(method, method)}")
        n_bad = int(bad[group.index].sum())
        if n_bad:
            n_div = int(group["diverged"].astype(bool).sum()) if "diverged" in group else 0
            reasons.append(f"{n_bad} of {len(group)} runs did not converge ({n_div} diverged, "
                           f"{n_bad - n_div} ended near chance)")
        if reasons:
            dropped.append({"network": network, "method": method, "weight": float(weight),
                            "reason": "; ".join(reasons)})
            drop_mask[group.index] = True
    order = {net: i for i, net in enumerate(dict.fromkeys(runs["network"]))}
    dropped.sort(key=lambda d: (order[d["network"]], GRID_METHODS.index(d["method"])
                                if d["method"] in GRID_METHODS else 99, d["weight"]))
    return runs[~drop_mask], dropped


def paired_differences(selected: pd.DataFrame, pairs, level: float = 0.95,
                       value: str = "test_accuracy") -> pd.DataFrame:
    """Effect sizes: per network, ``a - b`` of ``value`` paired by seed, with a t-interval.

    selected : one row per (network, method, seed), e.g. :func:`select_weights_pooled`.
    pairs : iterable of (a, b) methods.

    Returns one row per (network, a, b) with both present: ``n`` (seeds with
    both), ``mean``, ``std`` (ddof 1), ``low``, ``high`` (the ``level``
    t-interval ``mean -+ t_{(1+level)/2, n-1} std / sqrt n``; NaN for n < 2).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    out = []
    for network in dict.fromkeys(selected["network"]):
        net = selected[selected["network"] == network]
        for a, b in pairs:
            left = net[net["method"] == a].set_index("seed")[value]
            right = net[net["method"] == b].set_index("seed")[value]
            d = (left - right).dropna().to_numpy(dtype=float)
            if len(d) == 0:
                continue
            mean = float(d.mean())
            std = float(d.std(ddof=1)) if len(d) > 1 else math.nan
            half = (float(scipy.stats.t.ppf((1 + level) / 2, len(d) - 1)) * std / math.sqrt(len(d))
                    if len(d) > 1 else math.nan)
            out.append({"network": network, "a": a, "b": b, "n": len(d), "mean": mean, "std": std,
                        "low": mean - half, "high": mean + half})
    return pd.DataFrame(out, columns=["network", "a", "b", "n", "mean", "std", "low", "high"])


def paper_analysis(runs: pd.DataFrame) -> dict:
    """The paper's statistics on ``runs``: six methods, one weight per (network, method), blocks = networks.

    The weight of each (dataset, network, method) is the one with the best mean
    validation accuracy over seeds (:func:`select_weights_pooled`); a block is a
    (dataset, network) and its cell the mean test accuracy over seeds of that
    weight. Returns ``selected`` (the pooled rows of the paper's methods),
    ``matrix`` (blocks x methods, complete blocks only), ``friedman``,
    ``ranks``, ``pvalues`` (Nemenyi; None when Friedman is undefined) and ``cd``.
    """
    paper_runs = runs[runs["method"].isin(PAPER_METHODS)]
    selected = select_weights_pooled(paper_runs)
    methods = [m for m in PAPER_METHODS if m in set(selected["method"])]
    wide = selected.pivot_table(index=["dataset", "network"], columns="method", values="test_accuracy",
                                aggfunc="mean")
    order = {net: i for i, net in enumerate(dict.fromkeys(runs["network"]))}
    if len(wide):
        wide = wide.sort_index(key=lambda idx: idx.map(order) if idx.name == "network" else idx)
    matrix = wide[methods].dropna(axis=0, how="any") if methods else pd.DataFrame()
    fr = friedman(matrix)
    ranks = average_ranks(matrix) if len(matrix) else None
    pvalues = nemenyi(matrix) if not math.isnan(fr["statistic"]) else None
    cd = critical_difference(fr["methods"], fr["blocks"]) if fr["blocks"] >= 1 and fr["methods"] >= 2 else math.nan
    return {"selected": selected, "matrix": matrix, "friedman": fr, "ranks": ranks, "pvalues": pvalues,
            "cd": cd}


def inert_methods(runs: pd.DataFrame, threshold: float = INERT_THRESHOLD) -> list[dict]:
    """(network, method) pairs where no weight moves the mean test accuracy more than ``threshold`` from none's.

    Means are over seeds, per weight; ``threshold`` is a fraction (0.001 =
    0.1 points). Returns one dict per inert pair: ``network, method,
    max_change`` (the largest absolute change over the weights) and ``weights``.
    """
    out = []
    for network in dict.fromkeys(runs["network"]):
        net = runs[runs["network"] == network]
        base = net.loc[net["method"] == "none", "test_accuracy"].mean()
        if math.isnan(base):
            continue
        for method in _method_order(net["method"].unique()):
            if method == "none":
                continue
            per_weight = net[net["method"] == method].groupby("weight")["test_accuracy"].mean()
            change = (per_weight - base).abs()
            if len(change) and float(change.max()) <= threshold:
                out.append({"network": network, "method": method, "max_change": float(change.max()),
                            "weights": [float(w) for w in per_weight.index]})
    return out


def accuracy_table(selected: pd.DataFrame, value: str = "test_accuracy") -> pd.DataFrame:
    """Mean, sample std (ddof 1; NaN for one seed) and count over seeds, per (network, method)."""
    g = selected.groupby(["network", "method"])[value]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})


def block_matrix(selected: pd.DataFrame, methods=None, value: str = "test_accuracy") -> pd.DataFrame:
    """Blocks (network, seed) x methods of ``value``; only blocks where every method has a result."""
    methods = _method_order(selected["method"].unique()) if methods is None else list(methods)
    wide = selected.pivot_table(index=["network", "seed"], columns="method", values=value, aggfunc="first")
    missing = [m for m in methods if m not in wide.columns]
    if missing:
        return pd.DataFrame(columns=methods)
    return wide[methods].dropna(axis=0, how="any")


def average_ranks(matrix: pd.DataFrame) -> pd.Series:
    """Average rank of each method over blocks; rank 1 = highest value, ties share the mean rank."""
    ranks = np.vstack([scipy.stats.rankdata(-row) for row in matrix.to_numpy(dtype=float)])
    return pd.Series(ranks.mean(0), index=matrix.columns, name="average rank")


def friedman(matrix: pd.DataFrame) -> dict:
    """Friedman test over the methods (columns) with blocks as rows (``scipy.stats.friedmanchisquare``).

    Returns ``{"statistic", "pvalue", "methods", "blocks"}``; statistic and p are NaN when
    there are fewer than 3 methods or 2 blocks.
    """
    k, n = matrix.shape[1], matrix.shape[0]
    out = {"statistic": math.nan, "pvalue": math.nan, "methods": k, "blocks": n, "all_tied": False}
    if k < 3 or n < 2:
        return out
    values = matrix.to_numpy(dtype=float)
    if (values == values[:, :1]).all():
        out["all_tied"] = True  # every block ties every method: the statistic is 0/0
        return out
    res = scipy.stats.friedmanchisquare(*[values[:, j] for j in range(k)])
    out.update(statistic=float(res.statistic), pvalue=float(res.pvalue))
    return out


def nemenyi(matrix: pd.DataFrame) -> pd.DataFrame:
    """Nemenyi post-hoc p-values (methods x methods) after Friedman (``scikit_posthocs``)."""
    import scikit_posthocs as sp

    p = sp.posthoc_nemenyi_friedman(matrix.reset_index(drop=True).astype(float))
    p.index = list(matrix.columns)
    p.columns = list(matrix.columns)
    return p


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical difference of average ranks: ``q_alpha sqrt(k (k + 1) / (6 n))``.

    ``q_alpha`` is the studentized range quantile (infinite degrees of freedom) over sqrt 2.
    """
    q = scipy.stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


def _pair(matrix, ranks, pvalues, fried_p, a, b) -> dict:
    diff = (matrix[a] - matrix[b]).to_numpy(dtype=float)
    p = float(pvalues.loc[a, b]) if pvalues is not None else math.nan
    ra, rb = float(ranks[a]), float(ranks[b])
    significant = (not math.isnan(p)) and p < ALPHA and (not math.isnan(fried_p)) and fried_p < ALPHA
    if ra < rb:
        verdict = "holds (significant)" if significant else "same direction, not significant"
    elif ra > rb:
        verdict = "reversed (significant)" if significant else "reversed, not significant"
    else:
        verdict = "no difference"
    return {"a": a, "b": b, "mean_diff": float(diff.mean()), "wins": int((diff > 0).sum()),
            "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()), "rank_a": ra, "rank_b": rb,
            "p": p, "verdict": verdict}


def claims(matrix: pd.DataFrame, ranks: pd.Series | None, pvalues: pd.DataFrame | None,
           friedman_p: float) -> list[dict]:
    """Judge the paper's claims from the block matrix.

    Returns one dict per claim: ``claim``, ``pairs`` (one dict per comparison
    "a beats b" with mean difference, wins/ties/losses over blocks, average
    ranks, Nemenyi p and a verdict) and ``conclusion``.
    """
    out = []
    for name, (winners, losers) in (
        ("T1 and T2 beat no regularisation, L1, L2 and MinCorr", CLAIM_1),
        ("MinCorr (decorrelating everything) does worse than T1 and T2", CLAIM_2),
    ):
        needed = set(winners) | set(losers)
        absent = sorted(needed - set(matrix.columns))
        if absent or ranks is None or matrix.shape[0] == 0:
            why = f"methods {absent} were not run" if absent else "no complete block of results"
            out.append({"claim": name, "pairs": [], "conclusion": f"cannot be tested here: {why}"})
            continue
        pairs = [_pair(matrix, ranks, pvalues, friedman_p, a, b) for a in winners for b in losers]
        verdicts = [p["verdict"] for p in pairs]
        n_sig = verdicts.count("holds (significant)")
        n_dir = verdicts.count("same direction, not significant")
        n_rev = sum(v.startswith("reversed") for v in verdicts)
        n_rev_sig = verdicts.count("reversed (significant)")
        if n_sig == len(pairs):
            conclusion = "holds on our data: every comparison is significant in the claimed direction"
        elif n_rev_sig:
            conclusion = (f"contradicted: {n_rev_sig} of {len(pairs)} comparisons are significantly reversed")
        elif n_rev:
            conclusion = (f"not supported: {n_rev} of {len(pairs)} comparisons reversed "
                          f"(none significantly); {n_sig} significant in the claimed direction")
        else:
            conclusion = (f"direction agrees in all {len(pairs)} comparisons, but only {n_sig} are significant "
                          f"({n_dir} not): not established at alpha = {ALPHA}")
        out.append({"claim": name, "pairs": pairs, "conclusion": conclusion})
    return out


# -- figures ------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_critical_difference(ranks: pd.Series, pvalues: pd.DataFrame, cd: float, path, title: str) -> None:
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


# -- the report ---------------------------------------------------------------------------------

def resolve_experiment(name_or_dir, out_root=DEFAULT_OUT) -> Path:
    """An experiment folder from a folder path or an experiment name under ``out_root``."""
    path = Path(name_or_dir)
    if rows_files(path):  # runs.csv or a shard's rows
        return path
    candidate = Path(out_root) / str(name_or_dir)
    if rows_files(candidate):
        return candidate
    raise ValueError(f"no runs.csv in {path} or {candidate}; name an experiment folder or an experiment "
                     f"name under {out_root} (run `toponeuro experiment run ...` first)")


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt_weight(w: float) -> str:
    return f"{w:g}"


def _values(series) -> str:
    vals = sorted(set(series.dropna().tolist()))
    return ", ".join(_fmt_weight(v) if isinstance(v, float) else str(v) for v in vals)


def _drop_rule(settings) -> str:
    caps = settings.max_weight_dict
    parts = [f"{METHOD_LABELS.get(m, m)} above {_fmt_weight(w)}" for m, w in caps.items()]
    if settings.drop_unconverged:
        parts.append("weights with a run that did not converge")
    return "; ".join(parts) if parts else "none"


def _protocol_section(runs: pd.DataFrame, config, paper) -> list[str]:
    """What differs from the paper's protocol (mnist-paper.toml), from the rows themselves."""
    lines = ["## Protocol, and what was cut relative to the paper", ""]
    lines.append("Compared with the shipped `mnist-paper.toml` (the paper's protocol, from its text and the "
                 "authors' code). Values are read from the rows of `runs.csv`, so they describe what was "
                 "actually run.")
    lines.append("")
    t = paper.training
    rows = []

    def add(what, ours, theirs, differs=None):
        differs = str(ours) != str(theirs) if differs is None else differs
        rows.append([what, str(ours), str(theirs), "**differs**" if differs else ""])

    add("dataset", _values(runs["dataset"]), paper.dataset)
    add("training images", _values(runs["train_size"].astype(int)), 48000)
    add("validation images", _values(runs["val_size"].astype(int)), 12000)
    add("test images", _values(runs["test_size"].astype(int)), 10000)
    add("networks", ", ".join(dict.fromkeys(runs["network"])), ", ".join(paper.networks))
    ours = _method_order(runs["method"].unique())
    add("methods", ", ".join(ours), ", ".join(PAPER_METHODS) + " (dropout: the network mlp-dropout); "
        "decov is **our addition**, not in the paper", differs=set(ours) - {"decov"} != set(PAPER_METHODS))
    weighted = runs[runs["method"] != "none"]
    add("weights", _values(weighted["weight"]) if len(weighted) else "-",
        ", ".join(_fmt_weight(w) for w in paper.weights))
    add("seeds", _values(runs["seed"]), ", ".join(map(str, paper.seeds)) + " (the paper does not state its seeds)")
    add("epoch cap", _values(runs["max_epochs"].astype(int)), t.max_epochs)
    add("patience", _values(runs["patience"].astype(int)), t.patience)
    add("batch size", _values(runs["batch_size"].astype(int)), t.batch_size)
    add("optimiser", ", ".join(sorted({f"SGD lr {r.lr:g}, momentum {r.momentum:g}, "
                                         f"{'Nesterov' if r.nesterov else 'no Nesterov'}"
                                         for r in runs.itertuples()})),
        f"SGD lr {t.lr:g}, momentum {t.momentum:g}, {'Nesterov' if t.nesterov else 'no Nesterov'}")
    add("schedule", ", ".join(sorted({f"x{r.lr_decay:g} every {int(r.lr_decay_steps)} steps"
                                      for r in runs.itertuples()})),
        f"x{t.lr_decay:g} every {t.lr_decay_steps} steps")
    add("neurons used", ", ".join(sorted({f"{r.network}: {r.sampler}" for r in runs.itertuples()})),
        "all (p = 1) on MNIST", differs=bool((runs["sampler"] != "all").any()))
    add("dissimilarity", _values(runs["dissimilarity"]), "abs_correlation (1 - abs(rho))",
        differs=bool((runs["dissimilarity"] != "abs_correlation").any()))
    add("T2 alpha", _values(runs["alpha"]), 0.5, differs=bool((runs["alpha"] != 0.5).any()))
    add("persistence backend", _values(runs["backend"]), "(same deaths with every backend)", differs=False)
    add("initialisation", _values(runs["init"]), f"{paper.init} (Glorot uniform, zero bias, one saved "
        "initialisation per seed shared by every method: the authors' code)",
        differs=bool((runs["init"] != paper.init).any()))
    bias = runs["include_bias"].astype(str).str.lower() == "true"
    paper_bias = paper.regulariser.include_bias
    add("L1/L2 over", ", ".join(sorted({"weights and biases" if b else "weights only" for b in bias})),
        ("weights and biases" if paper_bias else "weights only") + " (the authors' code)",
        differs=bool((bias != paper_bias).any()))
    add("pixel scale", _values(runs["pixel_scale"]), "1/255 (the text; the authors' code divides by 255^2, "
        "a bug)", differs=bool((runs["pixel_scale"] != "1/255").any()))
    drop = getattr(config, "report", None)
    add("weights dropped before selection", _drop_rule(drop) if drop is not None else "(no config)",
        _drop_rule(paper.report) + " (the authors dropped weights whose runs did not converge)",
        differs=drop is None or drop != paper.report)
    lines.append(_md_table(["", "this experiment", "paper protocol", ""], rows))
    lines.append("")
    if config is not None:
        expected = {r.key for r in config.runs()}
        have = {(r.dataset, r.network, r.method, float(r.weight), int(r.seed)) for r in runs.itertuples()}
        missing = sorted(expected - have)
        lines.append(f"- Completeness: {len(expected & have)} of the {len(expected)} runs of this experiment's "
                     f"config are finished." + (" Missing (first 15): " + ", ".join(
                         f"{n}/{m}/w={_fmt_weight(w)}/s={s}" for _, n, m, w, s in missing[:15]) if missing else ""))
    lines.append("")
    return lines


def _selection_note(runs: pd.DataFrame, selected: pd.DataFrame) -> list[str]:
    """Say that per-seed selection is our choice, how often seeds disagree, and what one weight would give."""
    weighted = selected[selected["method"] != "none"]
    pairs = weighted.groupby(["network", "method"])["weight"].nunique()
    pooled = select_weights_pooled(runs)
    ours = selected.groupby(["network", "method"])["test_accuracy"].mean()
    theirs = pooled.groupby(["network", "method"])["test_accuracy"].mean()
    diff = (ours - theirs).dropna().abs()
    text = ("> **A choice that differs from the paper's protocol.** The paper chooses one weight per "
            "(network, method) by validation accuracy (its analysis, above); here each seed picks its own weight. "
            "Each choice then rests on one seed's validation accuracy (noisier than the mean over seeds), the "
            "spread over seeds includes the spread of the choice, and the table is not the paper's "
            "\"one weight per network\" result.")
    if len(pairs):
        text += (f" Here {int((pairs > 1).sum())} of {len(pairs)} (network, method) pairs with a weight pick "
                 "different weights for different seeds.")
    if len(diff):
        text += (" Choosing one weight per (network, method) from the mean validation accuracy over seeds "
                 f"instead changes a mean test accuracy by at most {100 * diff.max():.2f} points "
                 f"(mean change {100 * diff.mean():.2f}).")
    return [text, ""]


def _blocks_note(matrix: pd.DataFrame, networks: list[str]) -> list[str]:
    """Say that (network, seed) blocks are a choice that departs from Demšar's independent data sets."""
    nets = len({net for net, _ in matrix.index}) if len(matrix) else len(networks)
    return [("> **A choice that differs from Demšar (2006).** His Friedman/Nemenyi setting ranks methods on "
             "independent data sets. Here a block is a (network, seed) pair: seeds of one network share the "
             "data set, the architecture and the split, so their blocks are correlated, not independent. "
             f"Counting them as independent ({len(matrix)} blocks from {nets} network(s)) inflates N, so the "
             "critical difference, which shrinks as 1/√N, is smaller than it should be and the Friedman and "
             "Nemenyi p-values are too small: **the critical difference is optimistic**, and a \"significant\" "
             "verdict below is weaker evidence than it looks."), ""]


def _device_note(runs: pd.DataFrame, selected: pd.DataFrame) -> list[str]:
    """Per block (network, seed), say when its methods were trained on more than one device."""
    if "device" not in runs.columns or runs["device"].nunique() < 2:
        return []
    mixed = mixed_device_blocks(runs, selected)
    if not mixed:
        return ["Devices: every block (network, seed) was trained on a single device.", ""]
    total = runs.groupby(["network", "seed"]).ngroups
    lines = [f"**Mixed devices.** In {len(mixed)} of {total} blocks the methods were trained on different "
             "devices; the same seed gives different numbers on different devices (different kernels), so "
             "within these blocks a difference between methods includes a difference between devices.", ""]
    rows = []
    for b in mixed:
        runs_cell = ", ".join(f"`{d}`: {c}" for d, c in b["runs"].items())
        sel_cell = "; ".join(f"`{d}`: " + ", ".join(METHOD_LABELS.get(m, m) for m in ms)
                             for d, ms in b["selected"].items()) or "-"
        split_cell = ", ".join(METHOD_LABELS.get(m, m) for m in b["split"]) or "none"
        rows.append([f"`{b['network']}`, seed {b['seed']}", runs_cell, sel_cell, split_cell])
    lines += [_md_table(["block", "runs per device", "selected result per device",
                         "methods whose weights span devices"], rows), ""]
    return lines


def _pooling_lines(pooling: dict) -> list[str]:
    """Say which commits and devices the rows come from, and that a mixed folder was pooled on request."""
    commits, devices = pooling["commits"], pooling["devices"]
    lines = ["- Device(s): " + "; ".join(f"`{d}` ({c} runs)" for d, c in devices.items())
             + (" — **CPU results**." if set(devices) == {"cpu"} else ""),
             "- Commits: " + ", ".join(f"`{c}` ({n} runs)" for c, n in commits.items())
             + (" (`unknown`: the rows were written by a copy of the code without git history and no "
                "commit was passed)" if "unknown" in commits else "")]
    if pooling["mixed"]:
        what = " and ".join(w for w, d in (("commits", commits), ("devices", devices)) if len(d) > 1)
        lines.append(f"- **Mixed software stack, pooled on request (`--allow-mixed`).** The rows come from "
                     f"several {what}. The same seed gives other numbers with other code or kernels, so a "
                     "difference between methods trained on different stacks includes the difference between "
                     "the stacks (see the mixed-device table below).")
    return lines


def _cut_section(runs: pd.DataFrame, kept: pd.DataFrame, dropped: list[dict], inert: list[dict],
                 paper) -> list[str]:
    """What was cut relative to the paper, what diverged, which weights were dropped, what is inert."""
    L = ["## What was cut, what diverged, what is inert", ""]
    cap = int(runs["max_epochs"].max())
    at_cap = runs[(runs["epochs"] >= runs["max_epochs"]) & ~runs["stopped_early"]]
    best_last = runs[runs["best_epoch"] >= runs["max_epochs"]]
    L.append(f"- **Epochs.** Cap {_values(runs['max_epochs'].astype(int))} against the paper's "
             f"{paper.training.max_epochs} with patience {paper.training.patience}: "
             f"{int(runs['stopped_early'].sum())} of {len(runs)} runs stopped early, {len(at_cap)} were stopped "
             f"by the cap, and {len(best_last)} had their best validation loss at the cap (still improving)."
             if cap < paper.training.max_epochs else
             f"- **Epochs.** Cap {cap}, as the paper: {int(runs['stopped_early'].sum())} of {len(runs)} runs "
             f"stopped early, {len(at_cap)} reached the cap.")
    steps = runs["epochs"] * np.ceil(runs["train_size"] / runs["batch_size"])
    fired = int((steps > runs["lr_decay_steps"]).sum())
    L.append(f"- **Learning-rate decay** (x{paper.training.lr_decay:g} every {paper.training.lr_decay_steps} "
             f"steps): it fired in {fired} of {len(runs)} runs"
             + (" — never, so every run trained at the initial rate." if fired == 0 else "."))
    weighted = runs[runs["method"] != "none"]
    missing = sorted(set(paper.weights) - set(weighted["weight"]))
    if missing:
        L.append(f"- **Weights.** {len(missing)} of the paper's {len(paper.weights)} weights were not run: "
                 + ", ".join(_fmt_weight(w) for w in missing) + ".")
    div = runs[runs["diverged"]]
    L.append(f"- **Diverged**: {len(div)} of {len(runs)} runs (loss NaN or inf; the best weights before that "
             "were restored)" + (": " + ", ".join(div["run_id"].head(20)) + (" ..." if len(div) > 20 else "")
                                 if len(div) else "") + ".")
    if dropped:
        L += [f"- **Dropped before selection** ({len(runs) - len(kept)} runs; the config's `[report]` rule): "
              f"{len(dropped)} (network, method, weight) cells.", "",
              _md_table(["network", "method", "weight", "why"],
                        [[f"`{d['network']}`", METHOD_LABELS.get(d["method"], d["method"]),
                          _fmt_weight(d["weight"]), d["reason"]] for d in dropped])]
    else:
        L.append("- **Dropped before selection**: no weight.")
    L.append("")
    if inert:
        L += [f"**Inert methods.** A method is inert on a network when, at every weight run, its mean test "
              f"accuracy over seeds is within {100 * INERT_THRESHOLD:.1f} points of no regularisation's: its "
              "selected weight cannot change the result, and comparisons with it measure noise, not an effect.",
              "", _md_table(["network", "inert method", "largest change over the weights (points)", "weights"],
                            [[f"`{d['network']}`", METHOD_LABELS.get(d["method"], d["method"]),
                              f"{100 * d['max_change']:.2f}", ", ".join(_fmt_weight(w) for w in d["weights"])]
                             for d in inert]), ""]
    else:
        L += [f"**Inert methods**: none (every method moves the mean test accuracy by more than "
              f"{100 * INERT_THRESHOLD:.1f} points from no regularisation's at some weight).", ""]
    return L


def _claims_lines(found: list[dict]) -> list[str]:
    L = []
    for c in found:
        L += [f"**Claim: {c['claim']}** — {c['conclusion']}.", ""]
        if c["pairs"]:
            L.append(_md_table(
                ["comparison", "mean difference (points)", "wins/ties/losses over blocks", "average ranks",
                 "Nemenyi p", "verdict"],
                [[f"{METHOD_LABELS[p['a']]} > {METHOD_LABELS[p['b']]}", f"{100 * p['mean_diff']:+.2f}",
                  f"{p['wins']}/{p['ties']}/{p['losses']}", f"{p['rank_a']:.2f} vs {p['rank_b']:.2f}",
                  "n/a" if math.isnan(p["p"]) else f"{p['p']:.3g}", p["verdict"]] for p in c["pairs"]]))
            L.append("")
    return L


def _claim_pairs() -> list[tuple[str, str]]:
    return list(dict.fromkeys((a, b) for winners, losers in (CLAIM_1, CLAIM_2) for a in winners for b in losers))


def _paper_section(analysis: dict, effects: pd.DataFrame, name: str, directory: Path) -> tuple[list[str], list]:
    """The paper's analysis: six methods, one weight per (network, method), blocks = networks; effect sizes."""
    sel, matrix, fr = analysis["selected"], analysis["matrix"], analysis["friedman"]
    ranks, pvalues, cd = analysis["ranks"], analysis["pvalues"], analysis["cd"]
    methods = list(matrix.columns)
    L = ["## The paper's analysis", "",
         "As the paper did it: its six methods (" + ", ".join(METHOD_LABELS[m] for m in PAPER_METHODS)
         + "; dropout is the network `mlp-dropout` with method none), **one weight per (network, method)**, "
         "the one with the best mean validation accuracy over seeds (ties: the smaller weight), and blocks = "
         "networks; each cell is the mean test accuracy over seeds of that weight.", ""]
    if sel.empty:
        return L + ["No run of the paper's methods.", ""], []
    rows = []
    for (dataset, network), values in matrix.iterrows():
        best = values.max()
        cells = []
        for m in methods:
            w = sel[(sel["network"] == network) & (sel["method"] == m)]["weight"]
            cell = f"{_pct(values[m])} (w={_fmt_weight(w.iloc[0]) if len(w) else '-'})"
            cells.append(f"**{cell}**" if values[m] == best else cell)
        rows.append([f"`{network}`"] + cells)
    L += [_md_table(["network"] + [METHOD_LABELS[m] for m in methods], rows), ""]
    found = []
    if ranks is not None:
        L += [_md_table(["method", "average rank over networks (1 = best)"],
                        [[METHOD_LABELS[m], f"{ranks[m]:.2f}"] for m in ranks.sort_values().index]), ""]
    if not math.isnan(fr["statistic"]):
        L += [f"**Friedman test** over {fr['blocks']} networks and {fr['methods']} methods: chi² = "
              f"{fr['statistic']:.4f}, p = {fr['pvalue']:.4g}; Nemenyi critical difference CD = {cd:.2f} "
              f"(the largest possible difference is {fr['methods'] - 1}).", ""]
        plot_critical_difference(ranks, pvalues, cd, directory / "critical_difference_paper.png",
                                 f"{name}: the paper's analysis, {fr['blocks']} blocks (networks)")
        L += ["![critical difference diagram, the paper's analysis](critical_difference_paper.png)", ""]
    else:
        L += [f"The Friedman test needs at least 3 methods and 2 complete blocks; here there are "
              f"{fr['methods']} methods and {fr['blocks']} block(s), so no test is run.", ""]
    if len(matrix):
        found = claims(matrix, ranks, pvalues, fr["pvalue"])
        L += ["The paper's claims judged this way (blocks = networks"
              + ("; with a single block these are directions, not tests" if fr["blocks"] < 2 else "")
              + "):", ""] + _claims_lines(found)
    L += ["### Effect sizes", "",
          "Rank tests say which method ranks better, not by how much. For each network, the difference of "
          "test accuracy (points) between two methods at their selected weights, **paired by seed**, with a "
          "95% t-interval over seeds (`mean ± t(0.975, n-1) · sd / √n`). An interval that excludes 0 is "
          "evidence of a difference on that network under this protocol; n is the number of seeds.", ""]
    if effects.empty:
        L += ["No pair of methods has results for the same seeds.", ""]
    else:
        L += [_md_table(["network", "difference", "n", "mean (points)", "95% interval (points)", "excludes 0"],
                        [[f"`{e.network}`", f"{METHOD_LABELS[e.a]} - {METHOD_LABELS[e.b]}", str(e.n),
                          f"{100 * e.mean:+.2f}",
                          "n/a" if math.isnan(e.low) else f"[{100 * e.low:+.2f}, {100 * e.high:+.2f}]",
                          "n/a" if math.isnan(e.low) else ("yes" if e.low > 0 or e.high < 0 else "no")]
                         for e in effects.itertuples()]), ""]
    return L, found


def _support_section(runs: pd.DataFrame, paper, dropped, inert, effects: pd.DataFrame, paper_claims,
                     our_claims, pooling) -> list[str]:
    """What the numbers do and do not support, generated from the same data as the sections below."""
    L = ["## What these numbers do and do not support", ""]
    reasons = []
    if runs["max_epochs"].max() < paper.training.max_epochs:
        reasons.append(f"epoch cap {int(runs['max_epochs'].max())} instead of {paper.training.max_epochs}")
    if (runs["train_size"] < 48000).any():
        reasons.append(f"{int(runs['train_size'].min())} training images instead of 48000")
    missing = set(paper.weights) - set(runs.loc[runs["method"] != "none", "weight"])
    if missing:
        reasons.append(f"{len(missing)} of the paper's {len(paper.weights)} weights not run")
    for what, ours, theirs in (("networks", set(runs["network"]), set(paper.networks)),
                               ("methods", set(runs["method"]), set(PAPER_METHODS))):
        if theirs - ours:
            reasons.append(f"{what} not run: " + ", ".join(sorted(theirs - ours)))
    best_last = int((runs["best_epoch"] >= runs["max_epochs"]).sum())
    if reasons:
        L.append(f"- The protocol is **cut** relative to the paper's: {'; '.join(reasons)} ({best_last} of "
                 f"{len(runs)} runs had their best epoch at the cap; see the protocol table and the next "
                 "section). Every verdict below is about this cut protocol; none tests the paper's claims under "
                 "its own protocol.")
    else:
        L.append("- The protocol matches the paper's epoch cap, data sizes, networks, methods and weight grid.")
    if inert:
        by_net: dict = {}
        for d in inert:
            by_net.setdefault(d["network"], []).append(METHOD_LABELS.get(d["method"], d["method"]))
        L.append("- **Inert here**: " + "; ".join(f"`{n}`: " + ", ".join(ms) for n, ms in by_net.items())
                 + f". At no weight do they move test accuracy by more than {100 * INERT_THRESHOLD:.1f} points, "
                 "so comparisons with them say nothing about the method; they say that at these weights and "
                 "this training length the regulariser did not act.")
    if not effects.empty:
        ci = effects[effects["low"].notna()]
        pos = ci[ci["low"] > 0]
        neg = ci[ci["high"] < 0]
        L.append(f"- **Effect sizes** (the paper's selection, paired by seed): of {len(ci)} network-level "
                 f"comparisons from the claims with an interval, {len(pos)} exclude 0 in favour of the first "
                 f"method and {len(neg)} in favour of the second"
                 + (": " + ", ".join(f"{METHOD_LABELS[e.a]} - {METHOD_LABELS[e.b]} on `{e.network}` "
                                     f"{100 * e.mean:+.2f}" for e in pd.concat([pos, neg]).itertuples())
                    if len(pos) + len(neg) else "") + ".")
    for label, found in (("the paper's analysis", paper_claims), ("our analysis", our_claims)):
        for c in found:
            L.append(f"- {c['claim']} — {label}: {c['conclusion']}.")
    if "decov" in set(runs["method"]):
        L.append("- DeCov is our addition: the paper made no claim about it, and it is left out of the paper's "
                 "analysis.")
    if dropped:
        L.append(f"- {len(dropped)} (network, method, weight) cells were dropped before selection (the table "
                 "in the next section says why).")
    if pooling["mixed"]:
        L.append("- The rows mix software stacks (commits or devices): differences within a block can include "
                 "the difference between stacks.")
    scales = set(runs["pixel_scale"])
    if scales == {"1/255^2"}:
        L.append("- Inputs were divided by 255 twice (the reference code's bug), as a variant.")
    L.append("")
    return L


def write_report(name_or_dir, out_root=DEFAULT_OUT, allow_mixed: bool = False) -> Path:
    """Write ``report.md`` (and its figures and ``selected.csv``) into the experiment folder; return its path.

    Raises :class:`MixedRowsError` (a ValueError) when the rows come from
    several commits or devices, unless ``allow_mixed`` (see :func:`check_pooling`).
    """
    from .. import data

    directory = resolve_experiment(name_or_dir, out_root)
    runs = load_runs(directory)
    for column, value in LEGACY_DEFAULTS.items():  # rows written before these columns existed
        if column not in runs:
            runs[column] = value
    pooling = check_pooling(runs, allow_mixed)
    config = None
    if (directory / "config.toml").is_file():
        config = parse_config((directory / "config.toml").read_text(encoding="utf-8"),
                              source=str(directory / "config.toml"))
    paper = load_config("mnist-paper")
    name = config.name if config is not None else directory.name
    settings = config.report if config is not None else ReportSettings()
    num_classes = data.num_classes(str(runs["dataset"].iloc[0])) if runs["dataset"].nunique() == 1 else 10
    kept, dropped = drop_weights(runs, settings, num_classes)
    inert = inert_methods(kept)

    analysis = paper_analysis(kept)
    effects = paired_differences(analysis["selected"], _claim_pairs())
    net_order = {net: i for i, net in enumerate(dict.fromkeys(runs["network"]))}
    effects = effects.sort_values("network", key=lambda col: col.map(net_order), kind="mergesort")

    selected = select_weights(kept)
    selected.to_csv(directory / "selected.csv", index=False)
    analysis["selected"].to_csv(directory / "selected_paper.csv", index=False)
    table = accuracy_table(selected)
    methods = _method_order(kept["method"].unique())
    networks = list(dict.fromkeys(kept["network"]))
    matrix = block_matrix(selected, methods)
    fr = friedman(matrix)
    ranks = average_ranks(matrix) if len(matrix) else None
    pvalues = nemenyi(matrix) if not math.isnan(fr["statistic"]) else None
    cd = critical_difference(fr["methods"], fr["blocks"]) if fr["blocks"] >= 1 and fr["methods"] >= 2 else math.nan
    our_claims = claims(matrix, ranks, pvalues, fr["pvalue"])
    paper_lines, paper_claims = _paper_section(analysis, effects, name, directory)

    L: list[str] = [f"# Experiment `{name}`", ""]
    if config is not None and config.description:
        L += [config.description, ""]
    L += [
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by "
        f"`toponeuro experiment report` from `runs.csv` ({len(runs)} finished runs).",
        "",
        *_pooling_lines(pooling),
        "- torch: " + ", ".join(f"`{v}`" for v in sorted(runs["torch_version"].unique())),
        f"- Training time: {runs['seconds'].sum() / 3600:.2f} h in total, "
        f"median {runs['seconds_per_epoch'].median():.2f} s per epoch.",
        "",
    ]
    L += _support_section(runs, paper, dropped, inert, effects, paper_claims, our_claims, pooling)
    L += _protocol_section(runs, config, paper)
    L += _cut_section(runs, kept, dropped, inert, paper)
    L += paper_lines

    L += ["## Our analysis: every method and seed (our additions)", "",
          "Beyond the paper: DeCov is included, the weight is chosen per seed, and the blocks of the rank tests "
          "are (network, seed) pairs. These are our choices, not the paper's.", ""]
    L += ["### Test accuracy (%), weight selected by validation accuracy per seed", "",
          "For every network, method **and seed** the weight with the highest validation accuracy is chosen "
          "(ties: the smaller weight); the cell is the mean ± sample standard deviation "
          "over seeds of the test accuracy of that choice (n = number of seeds). Bold: best mean in the row. "
          "The dropout baseline of the paper is the row `mlp-dropout`, method `none`.", ""]
    L += _selection_note(kept, selected)
    rows = []
    for net in networks:
        means = {m: table.loc[(net, m), "mean"] for m in methods if (net, m) in table.index}
        best = max(means.values()) if means else None
        cells = []
        for m in methods:
            if (net, m) not in table.index:
                cells.append("-")
                continue
            r = table.loc[(net, m)]
            cell = f"{_pct(r['mean'])} ± {_pct(r['std'])}" if r["n"] > 1 else f"{_pct(r['mean'])}"
            cell += f" (n={int(r['n'])})"
            cells.append(f"**{cell}**" if r["mean"] == best else cell)
        rows.append([f"`{net}`"] + cells)
    L += [_md_table(["network"] + [METHOD_LABELS.get(m, m) for m in methods], rows), ""]

    L += ["Selected weights (one per seed, in seed order):", ""]
    rows = []
    for net in networks:
        cells = []
        for m in methods:
            s = selected[(selected["network"] == net) & (selected["method"] == m)]
            cells.append(", ".join(_fmt_weight(w) for w in s["weight"]) if len(s) and m != "none" else
                         ("0" if len(s) else "-"))
        rows.append([f"`{net}`"] + cells)
    L += [_md_table(["network"] + [METHOD_LABELS.get(m, m) for m in methods], rows), ""]

    if "mlp-dropout" in networks and "mlp" in networks:
        d = selected[(selected["network"] == "mlp-dropout") & (selected["method"] == "none")]
        parts = [f"dropout (`mlp-dropout`, none): {_pct(d['test_accuracy'].mean())}" if len(d) else None]
        for m in ("none", "t1", "t2"):
            s = selected[(selected["network"] == "mlp") & (selected["method"] == m)]
            if len(s):
                parts.append(f"`mlp` {METHOD_LABELS[m]}: {_pct(s['test_accuracy'].mean())}")
        L += ["Dropout baseline against the regularisers on the same architecture (mean test accuracy, %): "
              + "; ".join(p for p in parts if p) + ".", ""]

    L += ["### Statistics over methods, blocks = (network, seed)", ""]
    n_blocks = fr["blocks"]
    L.append(f"Blocks are (network, seed) pairs in which every method has a result: {n_blocks} blocks, "
             f"{fr['methods']} methods ({', '.join(METHOD_LABELS.get(m, m) for m in methods)}).")
    L.append("")
    L += _blocks_note(matrix, networks)
    L += _device_note(kept, selected)
    if ranks is not None:
        L += [_md_table(["method", "average rank (1 = best)"],
                        [[METHOD_LABELS.get(m, m), f"{ranks[m]:.2f}"] for m in ranks.sort_values().index]), ""]
    if not math.isnan(fr["statistic"]):
        L.append(f"**Friedman test** (scipy.stats.friedmanchisquare): chi² = {fr['statistic']:.4f}, "
                 f"p = {fr['pvalue']:.4g} → "
                 + ("the methods differ (p < 0.05)." if fr["pvalue"] < ALPHA else
                    "equal performance is not rejected at 0.05."))
        L.append("")
        L.append(f"**Nemenyi post-hoc test** (scikit_posthocs.posthoc_nemenyi_friedman), p-values; "
                 f"critical difference of average ranks at alpha = {ALPHA}: CD = {cd:.2f} "
                 f"(the largest possible difference is {fr['methods'] - 1}).")
        L.append("")
        L.append(_md_table([""] + [METHOD_LABELS.get(m, m) for m in pvalues.columns],
                           [[METHOD_LABELS.get(a, a)] + [f"{pvalues.loc[a, b]:.3g}" for b in pvalues.columns]
                            for a in pvalues.index]))
        L.append("")
        plot_critical_difference(ranks, pvalues, cd, directory / "critical_difference.png",
                                 f"{name}: {n_blocks} blocks (network x seed)")
        L += ["![critical difference diagram](critical_difference.png)", ""]
    elif fr["all_tied"]:
        L += ["Every method has the same test accuracy in every block: the Friedman statistic is undefined "
              "(0/0) and no test is run.", ""]
    else:
        L += [f"The Friedman test needs at least 3 methods and 2 complete blocks; here there are "
              f"{fr['methods']} methods and {n_blocks} blocks, so no test is run.", ""]

    L += ["### The paper's claims, judged our way", ""]
    caveat = None
    if n_blocks < 2:
        caveat = ("Too few blocks for any test: the statements below are directions only, read from "
                  "average ranks where possible.")
    elif not math.isnan(cd) and cd >= fr["methods"] - 1:
        caveat = (f"With {n_blocks} blocks the critical difference ({cd:.2f}) is at least the largest possible "
                  f"rank difference ({fr['methods'] - 1}): no pair of methods can be significantly different. "
                  "Non-significant results here are not evidence of no difference.")
    elif n_blocks < 10:
        caveat = (f"Only {n_blocks} blocks: the Nemenyi test has little power (CD = {cd:.2f} ranks), so a "
                  "non-significant result is weak evidence either way.")
    if caveat:
        L += [f"> **Caveat.** {caveat}", ""]
    if any(runs["max_epochs"] < paper.training.max_epochs) or any(runs["train_size"] < 48000):
        L += ["> **Caveat.** This experiment is cut relative to the paper's protocol (see the protocol table): "
              "its verdicts are about that cut protocol, not the paper's.", ""]
    L += ["Each comparison \"A > B\" is judged by average ranks over the blocks (the basis of the Friedman "
          "and Nemenyi tests): *holds (significant)* needs A to rank better, the Friedman test to reject and "
          f"the Nemenyi p-value below {ALPHA}. The mean difference of test accuracy is shown alongside.", ""]
    L += _claims_lines(our_claims)

    plot_accuracy_vs_weight(runs, directory / "accuracy_vs_weight.png",
                            f"{name}: test accuracy against the weight (mean ± std over seeds)")
    L += ["## Test accuracy against the weight", "",
          "Every finished run, before selection and before any weight is dropped (mean ± std over seeds; "
          "dashed: no regulariser).", "",
          "![test accuracy against weight](accuracy_vs_weight.png)", ""]

    scales = set(runs["pixel_scale"])
    L += ["## Comparing with the paper's numbers", ""]
    if scales == {"1/255"}:
        L += ["The paper's reference code divides the pixels by 255 twice (inputs in [0, 1/255]); these runs "
              "scale them once, to [0, 1], as the paper's text describes. Absolute accuracies are therefore not "
              "directly comparable with the paper's tables; a variant with `pixel_scale = \"1/255^2\"` measures "
              "whether the bug matters.", ""]
    else:
        L += ["Pixel scales in these runs: " + ", ".join(f"`{v}`" for v in sorted(scales)) + ". `1/255^2` "
              "copies the reference code's double division (inputs in [0, 1/255]).", ""]
    L += ["## Files", "",
          "- `runs.csv`: one row per finished run; `curves/<run_id>.csv`: training curves per epoch"
          + ("; `init/`: the saved initial weights per (network, seed), shared by every method (not committed "
             "with the results: a rerun draws the same ones from the seed)." if (directory / "init").is_dir()
             else "."),
          "- `selected.csv`: the rows chosen per seed (our analysis); `selected_paper.csv`: the rows of the "
          "one weight per (network, method) (the paper's analysis).",
          "- `config.toml`: the config these runs came from. Re-run with "
          f"`toponeuro experiment run {directory / 'config.toml'}` (finished runs are skipped) and "
          f"`toponeuro experiment report {directory}" + (" --allow-mixed" if pooling["mixed"] else "") + "`.",
          ""]
    path = directory / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path
