"""Every combination checked at one generated point (:func:`run_checks`), and the results as a
table with notes, a summary line and an exit status."""

from __future__ import annotations

import torch

from .. import dissimilarity as _dissimilarity
from .. import persistence
from ..persistence import edge_backends
from .activations import check_activations_gradient
from .model import check_model_gradient
from .pipeline import _ON_DEATHS, FORMULAS, _check_backend, _check_formula
from .points import random_activations, tiny_mlp
from .reports import GradcheckReport


def _choice_list(value: str, valid: list[str], what: str) -> list[str]:
    if value == "all":
        return list(valid)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in valid]
    if bad or not chosen:
        raise ValueError(f"unknown {what} {bad or value!r}; choose from {valid} or 'all'")
    return chosen


def resolve_choices(formula: str = "all", dissimilarity: str = "all", backend: str = "all"
                    ) -> tuple[list[str], list[str], list[str]]:
    """``(formulas, dissimilarities, backends)`` from comma-separated names or ``"all"`` (the backends:
    those installed that give edges); a ValueError naming the choices for an unknown or unusable one."""
    formulas = _choice_list(formula, list(FORMULAS), "formula")
    dissimilarities = _choice_list(dissimilarity, list(_dissimilarity.DISSIMILARITIES), "dissimilarity")
    if backend == "all":
        return formulas, dissimilarities, edge_backends()
    backends = _choice_list(backend, list(persistence.BACKENDS), "backend")
    for b in backends:
        _check_backend(b)
    return formulas, dissimilarities, backends


def run_checks(formulas=FORMULAS, dissimilarities=None, backends=None, n: int = 8, m: int = 12, seed: int = 0,
               mlp: bool = False, tie: bool = False, tolerance: float = 1e-6, alpha: float = 0.5,
               eps: float | None = None, perturb_gradient: float = 0.0, progress: bool = False
               ) -> list[GradcheckReport]:
    """Run the check for every combination; min_corr/decov once each (they use no dissimilarity or backend).

    Returns one :class:`GradcheckReport` per combination. A ValueError, before any check, for
    ``tie`` with ``mlp``, ``tolerance <= 0`` or ``eps <= 0``.
    """
    if mlp and tie:
        raise ValueError("--tie applies to generated activations, not to --mlp")
    if not tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {tolerance}")
    if eps is not None and not eps > 0:
        raise ValueError(f"--eps must be > 0, got {eps}")
    dissimilarities = list(_dissimilarity.DISSIMILARITIES) if dissimilarities is None else list(dissimilarities)
    backends = edge_backends() if backends is None else list(backends)
    combos = []
    for formula in formulas:
        _check_formula(formula)
        if formula in _ON_DEATHS:
            combos += [(formula, d, b) for d in dissimilarities for b in backends]
        else:
            combos.append((formula, None, None))
    if mlp:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(m, 4, generator=gen, dtype=torch.float64)
        model = tiny_mlp(n=n, in_features=4, seed=seed, x=x)
    else:
        A = random_activations(m=m, n=n, seed=seed, tie=tie)
    iterator = combos
    if progress:
        from tqdm import tqdm

        iterator = tqdm(combos, desc="gradcheck", unit="check", leave=False)
    reports = []
    for formula, diss, backend in iterator:
        kwargs = dict(formula=formula, dissimilarity=diss or "abs_correlation", backend=backend or "torch",
                      alpha=alpha, eps=eps, tolerance=tolerance, perturb_gradient=perturb_gradient, seed=seed)
        if mlp:
            reports.append(check_model_gradient(model, x, **kwargs))
        else:
            reports.append(check_activations_gradient(A, **kwargs))
    return reports


_HEADER = ["formula", "dissimilarity", "backend", "max abs err", "max rel err", "step", "MST margin",
           "min |rho|", "differentiable", "verdict"]


def format_table(reports: list[GradcheckReport]) -> str:
    """One aligned row per report, with a header."""
    rows = [_HEADER] + [r.row() for r in reports]
    widths = [max(len(row[k]) for row in rows) for k in range(len(_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_text(reports: list[GradcheckReport], verbose: bool = False) -> str:
    """The table, then each report in full (``verbose``) or a note on each row not ``ok``."""
    lines = [format_table(reports)]
    if verbose:
        for r in reports:
            lines += ["", str(r)]
        return "\n".join(lines)
    notes = [r for r in reports if r.verdict != "ok"]
    if notes:
        lines += ["", "Notes (a kink makes disagreement expected; autograd then returns the derivative "
                      "of one adjacent smooth piece):"]
        lines += ["  " + r.note() for r in notes]
    return "\n".join(lines)


def exit_status(reports: list[GradcheckReport]) -> int:
    """The command's exit status: 1 if a check failed, else 3 if one was inconclusive, else 0."""
    if any(r.failed for r in reports):
        return 1
    if any(r.inconclusive for r in reports):
        return 3
    return 0


def summary_line(reports: list[GradcheckReport], seconds: float) -> str:
    """The command's last line: every verdict counted, and what the run established."""
    counts = {}
    for r in reports:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    order = ["ok", "subgradient ok", "subgradient ok + frozen tree ok", "frozen tree ok", "kink",
             "inconclusive", "FAIL", "subgradient FAIL"]
    order += [v for v in counts if v not in order]  # the rarer combinations at a tie, as met
    names = {"kink": "kink (not differentiable: not compared)"}
    tally = ", ".join(f"{counts[v]} {names.get(v, v)}" for v in order if v in counts)
    n = len(reports)
    failed = sum(r.failed for r in reports)
    inconclusive = sum(r.inconclusive for r in reports)
    if failed:
        return (f"FAILED: {failed} of {n} checks found a gradient that disagrees with finite differences at a "
                f"differentiable point, violates the subgradient inequality, or disagrees with finite "
                f"differences of the frozen-tree piece at a tie ({tally}; {seconds:.1f} s).")
    if inconclusive:
        return (f"INCONCLUSIVE: {inconclusive} of {n} checks verified nothing (differentiable, but the "
                f"finite-difference steps crossed a kink); no gradient was found wrong ({tally}; {seconds:.1f} s).")
    frozen = " (and with those of the frozen-tree piece at ties)" if any(r.frozen_tree for r in reports) else ""
    return (f"OK: {n} checks ({tally}); autograd agrees with finite differences wherever the point is "
            f"differentiable{frozen} ({seconds:.1f} s).")
