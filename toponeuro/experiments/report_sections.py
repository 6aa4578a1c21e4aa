"""The sections of ``report.md`` that :func:`~toponeuro.experiments.report.write_report` assembles.

Protocol against the paper's, what was cut or dropped or is inert, the
paper's analysis with effect sizes, what the numbers support, and the notes
on selection, blocks, devices and pooling; each returns markdown lines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .figures import plot_critical_difference
from .selection import (INERT_THRESHOLD, METHOD_LABELS, _fmt_weight, _method_order, mixed_device_blocks,
                        select_weights_pooled)
from .statistics import PAPER_METHODS, claims


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


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
