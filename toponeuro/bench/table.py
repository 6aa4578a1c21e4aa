"""The results as plain-text tables (:func:`format_table`)."""

from __future__ import annotations

from .cases import REFERENCE_BACKEND, TARGET_REGULARISER_RATIO
from .results import _median
from .step import STEP_BATCH, STEP_MODEL


def _fmt_ms(t: float | None) -> str:
    if t is None:
        return "-"
    ms = t * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(results: dict) -> str:
    """The results as plain-text tables: median ms per series, speed-ups, regulariser ratio."""
    cases = results["cases"]
    lines = []
    for device in results["devices"]:
        dev_cases = [c for c in cases if c["device"] == device]
        steps = [r for r in results["summary"].get("step", []) if r["device"] == device]
        if not dev_cases:
            lines += [_step_line(r) for r in steps] + ([""] if steps else [])
            continue
        series = list(dict.fromkeys(c["series"] for c in dev_cases if c["kind"] in ("mst", "check", "mst+check")))
        ns = sorted({c["n"] for c in dev_cases})
        info = results["devices"][device]
        lines.append(f"{device} ({info.get('name', '?')}): median ms over repeats, "
                     f"{results['config']['dtype']}, m = {results['config']['m']}")
        head = ["n"] + series
        has_ref = any(c["series"] == REFERENCE_BACKEND and c["status"] == "ok" for c in cases)
        fast = [s for s in ("torch", "torch-graph", "torch+check") if s in series]
        if has_ref:
            head += [f"{s} x giotto" for s in fast]
        rows = []
        for n in ns:
            row = [str(n)]
            for s in series:
                rec = next((c for c in dev_cases if c["series"] == s and c["n"] == n), None)
                row.append("-" if rec is None else _fmt_ms(rec.get("median_s")) if rec["status"] == "ok"
                           else rec["status"])
            if has_ref:
                ref = _median(cases, "cpu", REFERENCE_BACKEND, n)
                for s in fast:
                    t = _median(cases, device, s, n)
                    row.append("-" if ref is None or t is None else f"{ref / t:.0f}x")
            rows.append(row)
        if series:  # none with --cases regulariser
            lines += _grid(head, rows)
        held = [c for c in dev_cases if "graph_held_nxn" in c and c["kind"] == "mst"]
        if held:
            lines.append(f"{device}: memory the torch-graph backend's captured graph holds between calls, x D: "
                         + ", ".join(f"n={c['n']}: {c['graph_held_nxn']:.2f}" for c in held))
        counted = [c for c in dev_cases if "torch_ops" in c]
        if counted:
            lines.append(f"{device}: torch operators per call, views excluded (on a GPU, kernel launches): "
                         + ", ".join(f"{c['series']} n={c['n']}: {c['torch_ops']}" for c in counted))
        reg = [r for r in results["summary"]["regulariser"] if r["device"] == device]
        if reg:
            lines.append(f"{device}: regulariser cost, forward+backward from A (TopologicalRegulariser: T1, "
                         f"and the baselines MinCorr and DeCov) vs abs_correlation forward+backward (ratio, "
                         f"target for T1 <= {TARGET_REGULARISER_RATIO:g}x) and vs one matmul Z^T Z of the same "
                         f"activations (/matmul)")
            lines += _grid(["series", "n", "fwd+bwd ms", "correlation ms", "ratio", "matmul ms", "/matmul"],
                           [[r.get("series", "t1"), str(r["n"]), _fmt_ms(r["t1_forward_backward_s"]),
                             _fmt_ms(r["correlation_forward_backward_s"]), f"{r['ratio']:.2f}",
                             _fmt_ms(r.get("matmul_s")),
                             "-" if r.get("t1_vs_matmul") is None else f"{r['t1_vs_matmul']:.1f}"] for r in reg])
        lines += [_step_line(r) for r in steps]
        lines.append("")
    lines.append(f"load average (1, 5, 15 min): {results.get('load_average_start')} at the start, "
                 f"{results.get('load_average_end')} at the end, on {results['host']['cpu_count']} CPUs")
    unavailable = {k: v["error"] for k, v in results["backends"].items() if not v["available"]}
    unavailable.update({k: v["error"] for k, v in results["devices"].items() if not v["available"]})
    for name, why in unavailable.items():
        lines.append(f"not benchmarked: {name}: {why}")
    for c in cases + results.get("steps", []):
        if c["status"] == "error":
            where = f"{STEP_MODEL} step" if c["kind"] == "step" else f"n={c['n']}"
            lines.append(f"error: {c['device']} {where} {c['series']}: {c['error']}")
    checked = [c for c in cases if "deaths_equal_reference" in c]
    if checked:
        inexact = [c for c in checked if not c["deaths_equal_reference"]]
        lines.append(f"deaths against the exact ones (CPU 'torch' backend, same matrix): {len(checked) - len(inexact)} "
                     f"of {len(checked)} MST cases equal bit for bit"
                     + "".join(f"; {c['device']} {c['series']} n={c['n']}: max |error| "
                               f"{c['max_abs_deaths_error']:.3g}" for c in inexact))
    return "\n".join(lines)


def _step_line(r: dict) -> str:
    """One device's training step: the medians and their ratios to the step without a regulariser."""
    ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    return (f"{r['device']}: {STEP_MODEL} step: {_fmt_ms(r['without_s'])} ms without, {_fmt_ms(r['t1_s'])} ms "
            f"with T1, ratio {ratio(r['ratio'])} (target <= {r['target_ratio']:g}x); T1 dense "
            f"{_fmt_ms(r['t1_dense_s'])} ms, ratio {ratio(r['dense_ratio'])} (one SGD step, batch {STEP_BATCH})")


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
