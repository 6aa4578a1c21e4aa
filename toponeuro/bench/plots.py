"""The results as a figure (:func:`plot_results`): time against n, and the regulariser's cost ratios."""

from __future__ import annotations

from pathlib import Path

from .cases import TARGET_REGULARISER_RATIO
from .._io import replace_atomically


_STEP_MARKERS = {"none": "X", "t1": "*", "t1-dense": "P"}


def plot_results(results: dict, path: Path) -> None:
    """Three panels: time against n (log-log, one line per series and device, min-max
    bars; the training steps as points at the number of neurons T1 sees in them), the
    regulariser's cost against the correlation's and against one matrix product ``Z^T Z``
    (log), against n; saved (atomically) to ``path`` as PNG."""
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, (ax_t, ax_r, ax_m) = plt.subplots(1, 3, figsize=(17, 4.8))
    lines = list(dict.fromkeys((c["device"], c["series"]) for c in cases if c["status"] == "ok"))
    styles = {"check": ":", "torch+check": "--", "t1": "-.", "t1-graph": "-.", "correlation": "-.",
              "matmul": "-."}
    for device, series in lines:
        pts = sorted((c["n"], c["median_s"], c["min_s"], c["max_s"]) for c in cases
                     if c["device"] == device and c["series"] == series and c["status"] == "ok")
        n, med, lo, hi = zip(*pts)
        ax_t.errorbar(n, [t * 1e3 for t in med],
                      yerr=[[1e3 * (a - b) for a, b in zip(med, lo)], [1e3 * (b - a) for a, b in zip(med, hi)]],
                      marker="o", ms=3, capsize=2, linestyle=styles.get(series, "-"), label=f"{series} ({device})")
    for step in (s for s in results.get("steps", []) if s["status"] == "ok"):
        # one point each, at the n T1 sees in the step (every ReLU output and the logits)
        ax_t.plot([step["neurons"]], [step["median_s"] * 1e3], marker=_STEP_MARKERS.get(step["series"], "*"),
                  linestyle="none", ms=9, label=f"mlp step, {step['series']} ({step['device']})")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("n (neurons)")
    ax_t.set_ylabel("median time (ms)")
    ax_t.set_title(f"per call: persistence of 1 - |rho| (solid), regulariser (dash-dot), mlp step (points); "
                   f"{results['config']['dtype']}, m = {results['config']['m']}", fontsize=9)
    ax_t.grid(True, which="both", alpha=0.3)
    if ax_t.get_legend_handles_labels()[0]:
        ax_t.legend(fontsize=8)
    reg = results["summary"]["regulariser"]
    for device, series in dict.fromkeys((r["device"], r.get("series", "t1")) for r in reg):
        pts = sorted((r["n"], r["ratio"]) for r in reg if r["device"] == device and r.get("series", "t1") == series)
        ax_r.plot(*zip(*pts), marker="o", label=f"{series} / correlation ({device})")
    ax_r.axhline(TARGET_REGULARISER_RATIO, color="grey", linestyle="--", label=f"target {TARGET_REGULARISER_RATIO:g}x")
    ax_r.axhline(1.0, color="black", linewidth=0.5)
    ax_r.set_xscale("log", base=2)
    ax_r.set_ylim(bottom=0)
    ax_r.set_xlabel("n (neurons)")
    ax_r.set_ylabel("forward+backward time ratio")
    ax_r.set_title("regulariser cost: forward+backward vs correlation alone")
    ax_r.grid(True, which="both", alpha=0.3)
    ax_r.legend(fontsize=8)
    matmul = [r for r in reg if r.get("t1_vs_matmul") is not None]
    for device, series in dict.fromkeys((r["device"], r.get("series", "t1")) for r in matmul):
        pts = sorted((r["n"], r["t1_vs_matmul"]) for r in matmul
                     if r["device"] == device and r.get("series", "t1") == series)
        ax_m.plot(*zip(*pts), marker="o", label=f"{series} / matmul ({device})")
    ax_m.set_xscale("log", base=2)
    ax_m.set_yscale("log")
    ax_m.set_xlabel("n (neurons)")
    ax_m.set_ylabel("time ratio")
    ax_m.set_title("regulariser cost: forward+backward vs one matmul Z^T Z")
    ax_m.grid(True, which="both", alpha=0.3)
    if matmul:
        ax_m.legend(fontsize=8)
    date = results["date"][:10]
    names = "; ".join(f"{k}: {v.get('name', '?')}" for k, v in results["devices"].items() if v["available"])
    fig.suptitle(f"toponeuro bench, {date}, torch {results['versions']['torch']}; {names}", fontsize=9)
    fig.tight_layout()
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
