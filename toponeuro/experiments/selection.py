"""The runs a report analyses: ``runs.csv`` loaded, checked and pruned, and the weight each method keeps.

Loading (:func:`load_runs`, numbers parsed), one software stack per folder
(:func:`check_pooling`, :func:`mixed_device_blocks`), the weights dropped
before selection (:func:`unconverged`, :func:`drop_weights`), methods that
change nothing (:func:`inert_methods`), and the weight chosen by validation
accuracy, per seed (:func:`select_weights`) or for all seeds
(:func:`select_weights_pooled`, the paper's rule).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .config import GRID_METHODS
from .runs_csv import read_rows, row_key
from .shards import rows_files

#: how the report names the methods (tables, figures, reasons)
METHOD_LABELS = {"none": "none", "t1": "T1", "t2": "T2", "l1": "L1", "l2": "L2", "min_corr": "MinCorr",
                 "decov": "DeCov"}
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
    (``runs.csv`` first) is kept. Rows written before a column existed read with
    :data:`~toponeuro.experiments.runs_csv.LEGACY_DEFAULTS` (``read_rows`` fills them in).
    """
    rows, seen = [], set()
    for path in rows_files(directory):
        for row in read_rows(path):
            if row_key(row) not in seen:
                seen.add(row_key(row))
                rows.append(row)
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


def _fmt_weight(w: float) -> str:
    return f"{w:g}"


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
