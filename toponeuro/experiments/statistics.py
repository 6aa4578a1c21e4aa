"""The statistics of a report: ranks, Friedman, Nemenyi, critical difference, effect sizes, the paper's claims.

:func:`paper_analysis` runs them the paper's way (six methods, one weight per
(network, method), blocks = networks); :func:`block_matrix` builds the
(network, seed) blocks of our analysis; :func:`claims` judges the paper's claims.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

from .selection import _method_order, select_weights_pooled

ALPHA = 0.05
#: the paper's claims: each method of the first tuple beats each of the second
CLAIM_1 = (("t1", "t2"), ("none", "l1", "l2", "min_corr"))
CLAIM_2 = (("t1", "t2"), ("min_corr",))
#: the methods the paper ranked (dropout is the network ``mlp-dropout`` with method ``none``)
PAPER_METHODS = ("none", "t1", "t2", "l1", "l2", "min_corr")


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
    return {"selected": selected, "matrix": matrix, **rank_tests(matrix)}


def rank_tests(matrix: pd.DataFrame) -> dict:
    """Friedman, average ranks, Nemenyi and the critical difference of a (blocks x methods) matrix.

    Returns ``friedman`` (:func:`friedman`'s dict), ``ranks`` (None without blocks), ``pvalues``
    (None when Friedman is undefined) and ``cd`` (NaN without blocks or with one method).
    """
    fr = friedman(matrix)
    ranks = average_ranks(matrix) if len(matrix) else None
    pvalues = nemenyi(matrix) if not math.isnan(fr["statistic"]) else None
    cd = critical_difference(fr["methods"], fr["blocks"]) if fr["blocks"] >= 1 and fr["methods"] >= 2 else math.nan
    return {"friedman": fr, "ranks": ranks, "pvalues": pvalues, "cd": cd}


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


def _claim_pairs() -> list[tuple[str, str]]:
    return list(dict.fromkeys((a, b) for winners, losers in (CLAIM_1, CLAIM_2) for a in winners for b in losers))
