"""Is the regulariser differentiable at a point, and if not, why not (:func:`diagnose`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import dissimilarity as _dissimilarity
from .. import persistence
from .._validation import check_activations
from ..persistence.tree import mst_margin
from .pipeline import _ON_DEATHS, _check_formula, _name_of, _uses_correlation


_EPS = float(np.finfo(np.float64).eps)
#: a quantity within this many float64 epsilons (relative to its scale) of a
#: kink is *at* the kink: the pipeline computes it with a rounding error of a
#: few epsilons, so nothing smaller can be told apart from zero
_KINK_ULPS = 1000.0


@dataclass
class Diagnosis:
    """Is the regulariser differentiable at this point, and if not, why not.

    Attributes
    ----------
    formula, dissimilarity : str
    mst_margin : float or None
        See :func:`mst_margin`; ``None`` for ``min_corr``/``decov`` (no tree).
    min_abs_rho : float or None
        Smallest ``|rho|`` on a tree edge (T1/T2 with a correlation-based
        dissimilarity), or over all pairs (``min_corr``); ``None`` otherwise.
        ``|rho|`` has a kink at 0, which matters for ``abs_correlation`` and
        ``min_corr`` (``sqrt(1 - rho^2)`` and ``1 - rho`` are smooth there).
    rho_scope : str
        ``"tree edges"``, ``"all pairs"`` or ``""``.
    constant_neurons : list of int
        Columns constant on the batch: their correlation is undefined (set to
        0 by convention), which is not differentiable for correlation-based
        formulas. Harmless for ``euclidean`` and ``decov``.
    deaths_std : float or None
        T2 only: the population standard deviation of the deaths (its square
        root has a kink where all deaths are equal).
    unit_rho_tree_edges : list of (int, int)
        ``sqrt_one_minus_rho2`` only: tree edges with ``|rho| = 1``, where the
        derivative of ``sqrt(1 - rho^2)`` is infinite.
    zero_tree_edges : list of (int, int)
        ``euclidean`` only: tree edges of length 0 (duplicate neurons), where
        the norm has a kink.
    relu_margin : float or None
        Model checks: the smallest ``|input|`` of a ReLU-type module (kink at 0).
    reasons : list of str
        Why the point is not differentiable; empty when it is.
    """

    formula: str
    dissimilarity: str | None
    mst_margin: float | None = None
    min_abs_rho: float | None = None
    rho_scope: str = ""
    constant_neurons: list = field(default_factory=list)
    deaths_std: float | None = None
    unit_rho_tree_edges: list = field(default_factory=list)
    zero_tree_edges: list = field(default_factory=list)
    relu_margin: float | None = None
    reasons: list = field(default_factory=list)

    @property
    def differentiable(self) -> bool:
        return not self.reasons

    @property
    def tie(self) -> bool:
        """The MST is not unique (to float64 precision)."""
        return any(r.startswith("MST not unique") for r in self.reasons)

    def sentence(self) -> str:
        """A plain-language verdict on what to expect at this point."""
        if self.differentiable:
            parts = []
            if self.mst_margin is not None:
                parts.append(f"the MST is unique (margin {self.mst_margin:.3g})")
            if self.min_abs_rho is not None and self.rho_scope:
                parts.append(f"|rho| on the {self.rho_scope} is at least {self.min_abs_rho:.3g}")
            if self.relu_margin is not None:
                parts.append(f"every ReLU input is at least {self.relu_margin:.3g} away from 0")
            why = ("; ".join(parts) + ": ") if parts else ""
            return (f"Differentiable here ({why}every piece of the pipeline is smooth near this point), "
                    "so autograd and finite differences must agree.")
        text = ("Not differentiable here: " + "; ".join(self.reasons) +
                ". Finite differences straddle a kink, so disagreement with autograd is expected "
                "(autograd returns the derivative of one adjacent smooth piece, a valid choice, not an error).")
        if self.tie and self.formula == "t1":
            text += (" T1 is convex in the dissimilarities, so the gathered gradient must be a subgradient; "
                     "the subgradient check stands in for the finite-difference comparison.")
        return text


def _at_kink(value: float, scale: float = 1.0) -> bool:
    return value <= _KINK_ULPS * _EPS * max(1.0, scale)


def _constant_columns(A: torch.Tensor) -> list[int]:
    Ad = A.detach()
    return torch.nonzero(Ad.amax(0) == Ad.amin(0)).flatten().tolist()


def diagnose(A: torch.Tensor, formula: str = "t1", dissimilarity="abs_correlation", backend: str = "torch",
             alpha: float = 0.5, relu_margin: float | None = None) -> Diagnosis:
    """Diagnose the differentiability of the regulariser at activations ``A``.

    Parameters
    ----------
    A : (m, n) activations, batch first.
    formula : {"t1", "t2", "min_corr", "decov"}
    dissimilarity : name or callable (T1/T2 only).
    backend : str
        Gives the tree whose edges are checked (T1/T2 only).
    alpha : float
        T2's weight (unused by the diagnosis; T2's kink does not depend on it).
    relu_margin : float, optional
        From a model check: the smallest ``|input|`` of a ReLU-type module.

    Returns
    -------
    :class:`Diagnosis`
    """
    _check_formula(formula)
    A = check_activations(A).detach().double()
    on_deaths = formula in _ON_DEATHS
    name = _name_of(dissimilarity) if on_deaths else None
    diag = Diagnosis(formula=formula, dissimilarity=name, relu_margin=relu_margin)
    constant = _constant_columns(A)
    diag.constant_neurons = constant
    uses_correlation = _uses_correlation(formula, dissimilarity)
    C = _dissimilarity.correlation(A, check=False) if uses_correlation else None

    if on_deaths:
        D = _dissimilarity.get(dissimilarity)(A, check=False)
        edges = persistence.death_edges(D, backend=backend)
        i, j = edges[:, 0], edges[:, 1]
        scale = float(D.abs().max())
        diag.mst_margin = mst_margin(D, edges)
        if _at_kink(diag.mst_margin, scale):
            diag.reasons.append(f"MST not unique (margin {diag.mst_margin:.3g})")
        if C is not None:
            rho = C[i, j]
            diag.min_abs_rho = float(rho.abs().min())
            diag.rho_scope = "tree edges"
            if name == "abs_correlation" and _at_kink(diag.min_abs_rho):
                diag.reasons.append(f"|rho| = {diag.min_abs_rho:.3g} on a tree edge (|rho| has a kink at 0)")
            if name == "sqrt_one_minus_rho2":
                near_one = (1.0 - rho.abs()) <= _KINK_ULPS * _EPS
                diag.unit_rho_tree_edges = [tuple(e) for e in edges[near_one].tolist()]
                if diag.unit_rho_tree_edges:
                    diag.reasons.append(
                        f"|rho| = 1 on tree edge(s) {diag.unit_rho_tree_edges} "
                        "(sqrt(1 - rho^2) has an infinite derivative there)")
        if name == "euclidean":
            # distances come from the Gram identity |a|^2 + |b|^2 - 2 a.b, whose
            # rounding error is ~eps * |a|^2: a distance under ~sqrt(eps) * |a|
            # cannot be told from 0 (two identical columns give ~1e-8, not 0)
            w = D[i, j]
            resolution = math.sqrt(_KINK_ULPS * _EPS) * max(1.0, float(A.norm(dim=0).max()))
            zero = w <= resolution
            diag.zero_tree_edges = [tuple(e) for e in edges[zero].tolist()]
            if diag.zero_tree_edges:
                diag.reasons.append(f"zero-length tree edge(s) {diag.zero_tree_edges} (the norm has a kink at 0)")
        if formula == "t2":
            d = D[i, j]
            diag.deaths_std = float(d.std(unbiased=False))
            if _at_kink(diag.deaths_std, float(d.abs().max())):
                diag.reasons.append(f"all deaths equal (std {diag.deaths_std:.3g}; the std has a kink there)")
    elif formula == "min_corr":
        off = ~torch.eye(C.shape[0], dtype=torch.bool)
        diag.min_abs_rho = float(C[off].abs().min())
        diag.rho_scope = "all pairs"
        if _at_kink(diag.min_abs_rho):
            diag.reasons.append(
                f"|rho| = {diag.min_abs_rho:.3g} on a pair (|rho| has a kink at 0, and MinCorr leaves "
                "rho = 0 pairs out of its mean)")

    if constant and uses_correlation:
        diag.reasons.append(
            f"constant neuron(s) {constant} (correlation undefined, set to 0 by convention"
            + ("; a dead ReLU may well be locally constant in the weights, but this is not assumed"
               if relu_margin is not None else "") + ")")
    if relu_margin is not None and _at_kink(relu_margin):
        diag.reasons.append(f"a ReLU input is {relu_margin:.3g} (ReLU has a kink at 0)")
    return diag
