"""Turn an experiment's ``runs.csv`` into ``report.md``, with statistics and figures.

The paper's analysis, step by step (each step a function, so each can be checked):

1. :func:`select_weights`: for every (dataset, network, method, seed), the
   weight with the highest validation accuracy (ties: the smaller weight);
   its test accuracy is the result of that method there. This is per seed,
   a choice of ours: a reading of SPEC §2 picks one weight per (network,
   method); :func:`select_weights_pooled` does that, and the report gives
   the difference.
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
4. :func:`claims`: the paper's claims, judged from those numbers.
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

from .config import GRID_METHODS, load_config, parse_config
from .runner import DEFAULT_OUT, read_rows

__all__ = [
    "ALPHA",
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
    """The finished runs of an experiment folder as a DataFrame (numbers parsed)."""
    rows = read_rows(Path(directory) / "runs.csv")
    if not rows:
        raise ValueError(f"no finished runs in {Path(directory) / 'runs.csv'}; run the experiment first")
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

    The reading of SPEC §2 ("for each regulariser and each network, the
    weight is chosen by validation accuracy") with one weight for all seeds;
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
    if (path / "runs.csv").is_file():
        return path
    candidate = Path(out_root) / str(name_or_dir)
    if (candidate / "runs.csv").is_file():
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


def _protocol_section(runs: pd.DataFrame, config, paper) -> list[str]:
    """What differs from the paper's protocol (mnist-paper.toml), from the rows themselves."""
    lines = ["## Protocol, and what was cut relative to the paper", ""]
    lines.append("Compared with the shipped `mnist-paper.toml` (SPEC §2). Values are read from the rows of "
                 "`runs.csv`, so they describe what was actually run.")
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
    add("methods", ", ".join(_method_order(runs["method"].unique())), ", ".join(paper.methods))
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
    lines.append(_md_table(["", "this experiment", "paper protocol", ""], rows))
    lines.append("")
    cap = runs[(runs["epochs"] >= runs["max_epochs"]) & ~runs["stopped_early"]]
    lines.append(f"- Early stopping: {int(runs['stopped_early'].sum())} of {len(runs)} runs stopped early "
                 f"(patience); {len(cap)} reached the epoch cap first"
                 + (" and are therefore under-trained relative to the paper's protocol." if len(cap) else "."))
    if runs["diverged"].any():
        div = runs[runs["diverged"]]
        lines.append(f"- {len(div)} runs diverged (loss became NaN/inf; the best weights before that were "
                     f"restored): " + ", ".join(div["run_id"].head(20)) + (" ..." if len(div) > 20 else ""))
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
    text = ("> **A choice that differs from the paper's protocol.** SPEC §2 reads as one weight per "
            "(network, method), chosen once by validation accuracy; here each seed picks its own weight. "
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


def write_report(name_or_dir, out_root=DEFAULT_OUT) -> Path:
    """Write ``report.md`` (and its figures and ``selected.csv``) into the experiment folder; return its path."""
    directory = resolve_experiment(name_or_dir, out_root)
    runs = load_runs(directory)
    config = None
    if (directory / "config.toml").is_file():
        config = parse_config((directory / "config.toml").read_text(encoding="utf-8"),
                              source=str(directory / "config.toml"))
    paper = load_config("mnist-paper")
    name = config.name if config is not None else directory.name

    selected = select_weights(runs)
    selected.to_csv(directory / "selected.csv", index=False)
    table = accuracy_table(selected)
    methods = _method_order(runs["method"].unique())
    networks = list(dict.fromkeys(runs["network"]))
    matrix = block_matrix(selected, methods)
    fr = friedman(matrix)
    ranks = average_ranks(matrix) if len(matrix) else None
    pvalues = nemenyi(matrix) if not math.isnan(fr["statistic"]) else None
    cd = critical_difference(fr["methods"], fr["blocks"]) if fr["blocks"] >= 1 and fr["methods"] >= 2 else math.nan

    L: list[str] = [f"# Experiment `{name}`", ""]
    if config is not None and config.description:
        L += [config.description, ""]
    devices = runs["device"].value_counts()
    L += [
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by "
        f"`toponeuro experiment report` from `runs.csv` ({len(runs)} finished runs).",
        "",
        "- Device(s): " + "; ".join(f"`{d}` ({c} runs)" for d, c in devices.items())
        + (" — **CPU results**." if set(devices.index) == {"cpu"} else ""),
        "- torch: " + ", ".join(f"`{v}`" for v in sorted(runs["torch_version"].unique()))
        + "; commits: " + ", ".join(f"`{v}`" for v in sorted(runs["commit"].unique())),
        f"- Training time: {runs['seconds'].sum() / 3600:.2f} h in total, "
        f"median {runs['seconds_per_epoch'].median():.2f} s per epoch.",
        "",
    ]
    L += _protocol_section(runs, config, paper)

    L += ["## Test accuracy (%), weight selected by validation accuracy", "",
          "For every network, method **and seed** the weight with the highest validation accuracy is chosen "
          "(ties: the smaller weight); the cell is the mean ± sample standard deviation "
          "over seeds of the test accuracy of that choice (n = number of seeds). Bold: best mean in the row. "
          "The dropout baseline of the paper is the row `mlp-dropout`, method `none`.", ""]
    L += _selection_note(runs, selected)
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

    L += ["## Statistics over methods", ""]
    n_blocks = fr["blocks"]
    L.append(f"Blocks are (network, seed) pairs in which every method has a result: {n_blocks} blocks, "
             f"{fr['methods']} methods ({', '.join(METHOD_LABELS.get(m, m) for m in methods)}).")
    L.append("")
    L += _blocks_note(matrix, networks)
    L += _device_note(runs, selected)
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

    plot_accuracy_vs_weight(runs, directory / "accuracy_vs_weight.png",
                            f"{name}: test accuracy against the weight (mean ± std over seeds)")
    L += ["## Test accuracy against the weight", "",
          "Every finished run, before selection (mean ± std over seeds; dashed: no regulariser).", "",
          "![test accuracy against weight](accuracy_vs_weight.png)", ""]

    L += ["## The paper's claims on our data", ""]
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
    for c in claims(matrix, ranks, pvalues, fr["pvalue"]):
        L += [f"**Claim: {c['claim']}** — {c['conclusion']}.", ""]
        if c["pairs"]:
            L.append(_md_table(
                ["comparison", "mean difference (points)", "wins/ties/losses over blocks", "average ranks",
                 "Nemenyi p", "verdict"],
                [[f"{METHOD_LABELS[p['a']]} > {METHOD_LABELS[p['b']]}", f"{100 * p['mean_diff']:+.2f}",
                  f"{p['wins']}/{p['ties']}/{p['losses']}", f"{p['rank_a']:.2f} vs {p['rank_b']:.2f}",
                  "n/a" if math.isnan(p["p"]) else f"{p['p']:.3g}", p["verdict"]] for p in c["pairs"]]))
            L.append("")

    L += ["## Comparing with the paper's numbers", "",
          "The paper's reference code divides the pixels by 255 twice (inputs in [0, 1/255]); we scale them "
          "once, to [0, 1] (`toponeuro.data`), as the paper's text describes. Absolute accuracies are therefore "
          "not directly comparable with the paper's tables, and we do not know how the bug affected the paper's "
          "ranking of methods (inputs 255 times smaller change the scale of every activation). The claims above "
          "are tested on correctly scaled inputs, with every method trained on the same data and seeds.", ""]
    L += ["## Files", "",
          "- `runs.csv`: one row per finished run; `curves/<run_id>.csv`: training curves per epoch.",
          "- `selected.csv`: the rows chosen by the selection rule.",
          "- `config.toml`: the config these runs came from. Re-run with "
          f"`toponeuro experiment run {directory / 'config.toml'}` (finished runs are skipped) and "
          f"`toponeuro experiment report {directory}`.", ""]
    path = directory / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path
