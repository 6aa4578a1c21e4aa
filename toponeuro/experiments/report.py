"""Turn an experiment's ``runs.csv`` into ``report.md``, with statistics and figures.

This module writes the report (:func:`write_report`); the steps it runs live
beside it, each a function so each can be checked:
:mod:`~toponeuro.experiments.selection` (the runs, and the weight each method
keeps), :mod:`~toponeuro.experiments.statistics` (ranks and tests),
:mod:`~toponeuro.experiments.figures` (the plots) and
:mod:`~toponeuro.experiments.report_sections` (the text of each section).
Every name below stays importable from here.

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

from .config import GRID_METHODS  # noqa: F401  (re-exported: tests read report.GRID_METHODS)
from .config import ReportSettings, load_config, parse_config
from .figures import plot_accuracy_vs_weight, plot_critical_difference
from .report_sections import (_blocks_note, _claims_lines, _cut_section, _device_note, _md_table, _paper_section,
                              _pct, _pooling_lines, _protocol_section, _selection_note, _support_section)
from .runner import DEFAULT_OUT
from .runs_csv import LEGACY_DEFAULTS
from .selection import (CHANCE_MULTIPLE, INERT_THRESHOLD, METHOD_LABELS, MixedRowsError, _fmt_weight, _method_order,
                        check_pooling, drop_weights, inert_methods, load_runs, mixed_device_blocks, select_weights,
                        select_weights_pooled, unconverged)
from .shards import rows_files
from .statistics import (ALPHA, CLAIM_1, CLAIM_2, PAPER_METHODS, _claim_pairs, accuracy_table, average_ranks,
                         block_matrix, claims, critical_difference, friedman, nemenyi, paired_differences,
                         paper_analysis, rank_tests)

# Defined in selection, statistics and figures, and re-exported here: tests, the CLI, the book and
# ``toponeuro.experiments`` import them from ``toponeuro.experiments.report`` (so do ``GRID_METHODS``
# from config and ``LEGACY_DEFAULTS`` from runs_csv).
__all__ = [
    "ALPHA",
    "PAPER_METHODS",
    "CLAIM_1",
    "CLAIM_2",
    "METHOD_LABELS",
    "INERT_THRESHOLD",
    "CHANCE_MULTIPLE",
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
    "plot_critical_difference",
    "plot_accuracy_vs_weight",
    "resolve_experiment",
    "write_report",
]


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


def write_report(name_or_dir, out_root=DEFAULT_OUT, allow_mixed: bool = False) -> Path:
    """Write ``report.md`` (and its figures and ``selected.csv``) into the experiment folder; return its path.

    Raises :class:`MixedRowsError` (a ValueError) when the rows come from
    several commits or devices, unless ``allow_mixed`` (see :func:`check_pooling`).
    """
    from .. import data

    directory = resolve_experiment(name_or_dir, out_root)
    runs = load_runs(directory)  # old rows come with the legacy columns filled in
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
    tests = rank_tests(matrix)
    fr, ranks, pvalues, cd = tests["friedman"], tests["ranks"], tests["pvalues"], tests["cd"]
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
