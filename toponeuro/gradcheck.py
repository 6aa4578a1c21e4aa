"""Numerical gradient validation: autograd against central finite differences.

The regulariser ``R`` is differentiable only where the combinatorial part of
the pipeline is locally constant (SPEC §1.4): the minimum spanning tree must
be unique, the gathered ``|rho|`` away from its kink at 0, the neurons
non-constant, and so on. This module

* compares, in float64, the autograd gradient of ``R`` with central finite
  differences, with respect to the activations
  (:func:`check_activations_gradient`) or a model's parameters
  (:func:`check_model_gradient`);
* diagnoses the point (:func:`diagnose`): the MST margin (:func:`mst_margin`),
  the smallest ``|rho|`` on a tree edge, constant neurons, the spread of the
  deaths for T2, ``|rho| = 1`` tree edges for ``sqrt(1 - rho^2)``, and ReLU
  inputs at 0 for models, and says plainly whether disagreement is expected;
* at a tie (MST not unique) checks the subgradient inequality of T1, which is
  convex as a function of the dissimilarities (:func:`check_subgradient`);
  for a model, where the tie is the only kink, it also compares the parameter
  gradient with central differences of the frozen-tree piece
  ``theta -> T(d(theta)[E])``, ``E`` the tree the backend chose (T1 and T2;
  see :func:`check_model_gradient`).

The command ``toponeuro gradcheck`` runs every combination on generated
activations (or a tiny MLP) and prints one table row per combination::

    python -m toponeuro gradcheck                 # all formulas, dissimilarities, backends
    python -m toponeuro gradcheck --mlp           # w.r.t. the parameters of a tiny MLP
    python -m toponeuro gradcheck --tie           # a duplicated neuron: MST not unique

Its exit status: 0 when every check passed (``ok``, ``subgradient ok``,
``frozen tree ok``, or ``kink``: a point diagnosed not differentiable, where
there is no derivative to compare with); 1 when a check found a wrong
gradient (``FAIL``, ``subgradient FAIL``, ``frozen tree FAIL``); 3 when nothing failed but some check was
``inconclusive`` (differentiable, but every finite-difference step tried
crossed a kink, so nothing was verified: an unverified gradient is not a
pass, and a CI job must not read it as one); 2 for bad options.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import dissimilarity as _dissimilarity
from . import persistence, regularisers
from .persistence import edge_backends
from ._validation import check_activations, check_dissimilarity

__all__ = [
    "FORMULAS",
    "CORRELATION_BASED",
    "edge_backends",
    "tree_path_max",
    "mst_margin",
    "Diagnosis",
    "diagnose",
    "SubgradientReport",
    "check_subgradient",
    "FrozenTreeReport",
    "GradcheckReport",
    "regulariser_value",
    "check_activations_gradient",
    "check_model_gradient",
    "random_activations",
    "tiny_mlp",
    "run_checks",
    "format_table",
    "summary_line",
    "exit_status",
    "configure_parser",
    "run",
]

#: the regulariser formulas that act on activations (``l1``/``l2`` are plain
#: polynomials of the weights and need no check here)
FORMULAS = ("t1", "t2", "min_corr", "decov")
_ON_DEATHS = ("t1", "t2")

#: dissimilarities computed from the Pearson correlation
CORRELATION_BASED = ("abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho")

_EPS = float(np.finfo(np.float64).eps)
#: a quantity within this many float64 epsilons (relative to its scale) of a
#: kink is *at* the kink: the pipeline computes it with a rounding error of a
#: few epsilons, so nothing smaller can be told apart from zero
_KINK_ULPS = 1000.0
#: the default finite-difference step, relative to the scale of each entry
#: (see _entry_scales)
_REL_STEP = 1e-6
#: the smallest scale of an entry, relative to max|x| (see _entry_scales)
_FLOOR_INVARIANT = 1e-12
_FLOOR = 1e-2
#: the step is shrunk tenfold at most this many times when a finite-difference
#: evaluation lands on another smooth piece (see _choose_step_and_differentiate)
_MAX_SHRINK = 3


# ---------------------------------------------------------------------------
# the MST margin
# ---------------------------------------------------------------------------


def tree_path_max(D, edges) -> np.ndarray:
    """Heaviest edge on the tree path between every pair of vertices.

    Parameters
    ----------
    D : (n, n) tensor or array
        Symmetric dissimilarities.
    edges : (n - 1, 2) integer tensor or array
        A spanning tree of the complete graph on ``n`` vertices.

    Returns
    -------
    (n, n) float64 array ``M`` with ``M[u, v]`` the largest ``D`` on the tree
    path from ``u`` to ``v`` (0 on the diagonal).

    Notes
    -----
    Kruskal's order: adding the tree edges lightest first, the edge that joins
    the components of ``u`` and ``v`` is the heaviest on their path, so each
    merge fills the whole block ``M[C_u, C_v]`` at once: O(n^2) writes, n - 1
    vectorised steps, exact (no arithmetic on the weights).
    """
    D = np.asarray(D.detach().cpu().double() if isinstance(D, torch.Tensor) else D, dtype=np.float64)
    E = np.asarray(edges.cpu() if isinstance(edges, torch.Tensor) else edges, dtype=np.int64).reshape(-1, 2)
    n = D.shape[0]
    if len(E) != n - 1:
        raise ValueError(f"a spanning tree on {n} vertices has {n - 1} edges, got {len(E)}")
    w = D[E[:, 0], E[:, 1]]
    label = np.arange(n)
    members = {v: [v] for v in range(n)}
    M = np.zeros((n, n))
    for k in np.argsort(w, kind="stable"):
        a, b = label[E[k, 0]], label[E[k, 1]]
        if a == b:
            raise ValueError(f"edge {tuple(E[k])} closes a cycle: the edges are not a spanning tree")
        if len(members[a]) < len(members[b]):
            a, b = b, a
        Ia, Ib = members[a], members.pop(b)
        M[np.ix_(Ia, Ib)] = w[k]
        M[np.ix_(Ib, Ia)] = w[k]
        label[Ib] = a
        Ia.extend(Ib)
    return M


def mst_margin(D, edges) -> float:
    """How far the MST is from not being unique.

    The smallest, over the non-tree edges ``(u, v)``, of ``D[u, v]`` minus the
    heaviest tree edge on the tree path from ``u`` to ``v``. By the cycle
    property the tree is the unique MST iff this is > 0; it is 0 at a tie
    (and negative if ``edges`` is not a minimum spanning tree at all).
    ``inf`` when there is no non-tree edge (``n = 2``).

    D : (n, n) dissimilarities; edges : (n - 1, 2) tree edges.
    """
    Dn = np.asarray(D.detach().cpu().double() if isinstance(D, torch.Tensor) else D, dtype=np.float64)
    E = np.asarray(edges.cpu() if isinstance(edges, torch.Tensor) else edges, dtype=np.int64).reshape(-1, 2)
    n = Dn.shape[0]
    M = tree_path_max(Dn, E)
    non_tree = np.triu(np.ones((n, n), dtype=bool), k=1)
    non_tree[np.minimum(E[:, 0], E[:, 1]), np.maximum(E[:, 0], E[:, 1])] = False
    if not non_tree.any():
        return math.inf
    return float((Dn - M)[non_tree].min())


# ---------------------------------------------------------------------------
# the diagnosis
# ---------------------------------------------------------------------------


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


def _name_of(dissimilarity) -> str:
    if isinstance(dissimilarity, str):
        return dissimilarity
    return getattr(dissimilarity, "__name__", repr(dissimilarity))


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
    uses_correlation = formula == "min_corr" or (on_deaths and name in CORRELATION_BASED)
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


# ---------------------------------------------------------------------------
# the subgradient check of T1 at a tie
# ---------------------------------------------------------------------------


@dataclass
class SubgradientReport:
    """Result of :func:`check_subgradient`.

    ``min_slack`` is the smallest, over the trials, of
    ``T1(d + h) - T1(d) - <g, h>``, which must be >= 0 (up to ``tolerance``)
    when ``g`` is a subgradient; ``strict`` counts the trials where it was
    clearly positive, i.e. where the tie made a difference.
    """

    trials: int
    scale: float
    min_slack: float
    strict: int
    tolerance: float
    mst_margin: float

    @property
    def passed(self) -> bool:
        return self.min_slack >= -self.tolerance

    def __str__(self) -> str:
        verdict = "holds" if self.passed else "VIOLATED"
        return (f"subgradient inequality T1(d + h) >= T1(d) + <g, h> {verdict} in {self.trials} random "
                f"directions of size {self.scale:.2g} (min slack {self.min_slack:.3g}, tolerance "
                f"{self.tolerance:.2g}; strict in {self.strict}); MST margin {self.mst_margin:.3g}")


def _t1_of_matrix(D: torch.Tensor, backend: str) -> torch.Tensor:
    return regularisers.t1(persistence.deaths(D, backend=backend))


def check_subgradient(D, backend: str = "torch", trials: int = 200, scale: float = 1e-3, seed: int = 0,
                      perturb_gradient: float = 0.0) -> SubgradientReport:
    """Check that autograd's gradient of T1 w.r.t. ``d`` is a subgradient.

    ``T1(d) = (n - 1) - w(MST(d))`` and the MST weight is a minimum of linear
    functions of ``d`` (one per spanning tree), so T1 is convex in ``d``;
    at a tie the gradient ``g`` gathered through the chosen tree must satisfy
    ``T1(d + h) >= T1(d) + <g, h>`` for every symmetric ``h`` with zero
    diagonal (``d + h >= 0``). This draws ``trials`` such ``h`` with entries
    uniform in ``[-scale, scale] * max(d)`` and reports the worst slack.

    Parameters
    ----------
    D : (n, n) dissimilarity matrix (any point, typically a tie).
    backend : edge-giving persistence backend.
    trials, scale, seed : the random directions.
    perturb_gradient : float
        For testing the tool: added to every entry of the autograd gradient.

    Returns
    -------
    :class:`SubgradientReport`
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    d = check_dissimilarity(D).detach().double().cpu().clone().requires_grad_(True)
    value = _t1_of_matrix(d, backend)
    (g,) = torch.autograd.grad(value, d)
    g = g + perturb_gradient
    d = d.detach()
    n = d.shape[0]
    margin = mst_margin(d, persistence.death_edges(d, backend=backend))
    gen = torch.Generator().manual_seed(seed)
    size = scale * max(float(d.max()), _EPS)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    slacks = []
    for _ in range(trials):
        h = torch.zeros(n, n, dtype=torch.float64)
        h[upper] = (2 * torch.rand(int(upper.sum()), generator=gen, dtype=torch.float64) - 1) * size
        h = h + h.mT
        h = torch.maximum(h, -d)  # keep d + h >= 0 (symmetric, zero diagonal preserved)
        with torch.no_grad():
            slack = _t1_of_matrix(d + h, backend) - value.detach() - (g * h).sum()
        slacks.append(float(slack))
    slacks = np.asarray(slacks)
    # rounding: T1 sums n - 1 terms of size <= max(1, max d); <g, h> sums n^2 products
    tol = _KINK_ULPS * _EPS * n * max(1.0, float(d.max()))
    return SubgradientReport(trials=trials, scale=scale, min_slack=float(slacks.min()),
                             strict=int((slacks > tol).sum()), tolerance=tol, mst_margin=margin)


def _step_verdict(jumps: int, max_rel_err: float, tolerance: float) -> str:
    """A finite-difference comparison's verdict: ``inconclusive`` if any step left the smooth
    piece (a jump), else ``ok`` within ``tolerance``, else ``FAIL``."""
    if jumps:
        return "inconclusive"
    return "ok" if max_rel_err <= tolerance else "FAIL"


@dataclass
class FrozenTreeReport:
    """At a tie, autograd's parameter gradient against finite differences of the frozen-tree piece.

    The piece is ``theta -> T(d(theta)[edges])``: the formula on ``d``
    gathered at the tree the backend chose at the point (see
    :func:`check_model_gradient` for why this is the right comparison).

    Attributes
    ----------
    edges : list of (int, int)
        The frozen tree: the backend's death edges at the point, canonical order.
    max_abs_err, max_rel_err : float
        As in :class:`GradcheckReport`, against the piece's central differences.
    step, min_step : float
        The largest and smallest finite-difference steps taken.
    jumps : int
        Evaluations whose state (ReLU pattern, signs of rho on the frozen
        edges, constant neurons) differed from the point's; the tree is fixed,
        so a change of MST is not a jump.
    tolerance : float
    """

    edges: list
    max_abs_err: float
    max_rel_err: float
    step: float
    min_step: float
    jumps: int
    tolerance: float

    @property
    def verdict(self) -> str:
        """``ok``, ``FAIL``, or ``inconclusive`` (every step tried left the piece's smooth part)."""
        return _step_verdict(self.jumps, self.max_rel_err, self.tolerance)

    @property
    def passed(self) -> bool:
        return self.verdict == "ok"

    def headline(self) -> str:
        return {"ok": "parameters agree with the frozen tree",
                "FAIL": "parameters DISAGREE with the frozen tree",
                "inconclusive": "frozen-tree comparison inconclusive (nothing verified)"}[self.verdict]

    def __str__(self) -> str:
        return (f"{self.headline()}: autograd's parameter gradient against central differences of T(d[tree]) with the "
                f"tree fixed to the backend's {len(self.edges)} edges at the point: max abs err "
                f"{self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g} (tolerance {self.tolerance:.1g}), "
                f"steps {self.min_step:.3g} to {self.step:.3g}, {self.jumps} evaluation(s) off the piece")


# ---------------------------------------------------------------------------
# finite differences
# ---------------------------------------------------------------------------


@dataclass
class GradcheckReport:
    """Autograd against central finite differences at one point.

    Attributes
    ----------
    formula, dissimilarity, backend : str or None
        ``None`` where the formula does not use them.
    wrt : {"activations", "parameters"}
    size : int
        Number of entries differentiated.
    max_abs_err : float
        ``max |g_autograd - g_fd|``.
    max_rel_err : float
        ``max_abs_err / max(max |g_fd|, max |g_autograd|)``: the error relative
        to the size of the gradient (entrywise ratios blow up on entries that
        are 0 by structure).
    step : float
        The largest finite-difference step ``h_k`` taken (``(f(x + h_k e_k) -
        f(x - h_k e_k)) / 2 h_k``); each entry has its own, relative to its
        scale (see ``min_step``).
    jumps : int
        Finite-difference evaluations whose combinatorial state (tree, signs
        of the gathered rho, constant neurons, ReLU pattern) differed from the
        point's: 0 means the step stayed on one smooth piece.
    diagnosis : :class:`Diagnosis`
    tolerance : float
        The largest acceptable ``max_rel_err`` at a differentiable point.
    subgradient : :class:`SubgradientReport` or None
        T1 at a tie: the check that replaces the finite-difference comparison.
    seconds : float
    min_step : float or None
        The smallest step ``h_k`` taken (``None``: the same as ``step``).
    frozen_tree : :class:`FrozenTreeReport` or None
        Model checks of T1/T2 at a point where the tie is the only kink: the
        parameter gradient against finite differences of the frozen-tree piece.
    """

    formula: str
    dissimilarity: str | None
    backend: str | None
    wrt: str
    size: int
    max_abs_err: float
    max_rel_err: float
    step: float
    jumps: int
    diagnosis: Diagnosis
    tolerance: float
    subgradient: SubgradientReport | None = None
    seconds: float = 0.0
    min_step: float | None = None
    frozen_tree: FrozenTreeReport | None = None

    @property
    def verdict(self) -> str:
        """``ok``, ``FAIL``, ``kink`` (not differentiable: disagreement expected),
        ``subgradient ok``/``subgradient FAIL`` (T1 at a tie), or ``inconclusive``
        (differentiable, but so close to a kink that no finite-difference step
        stays on one smooth piece). A model check at a tie that is the only
        kink adds the frozen-tree comparison of the parameter gradient:
        ``subgradient ok + frozen tree ok`` (T1), ``frozen tree ok`` (T2), with
        ``FAIL`` or ``inconclusive`` in place of ``ok`` where that part was."""
        parts = []
        if self.subgradient is not None:
            parts.append("subgradient ok" if self.subgradient.passed else "subgradient FAIL")
        if self.frozen_tree is not None:
            parts.append(f"frozen tree {self.frozen_tree.verdict}")
        if parts:
            return " + ".join(parts)
        if not self.diagnosis.differentiable:
            return "kink"
        return _step_verdict(self.jumps, self.max_rel_err, self.tolerance)

    @property
    def failed(self) -> bool:
        """The tool found a wrong gradient (``FAIL`` or ``subgradient FAIL``)."""
        return "FAIL" in self.verdict

    @property
    def inconclusive(self) -> bool:
        """Nothing wrong found, but something left unverified: differentiable, yet every step tried left
        the point's smooth piece; or, at a tie, the frozen-tree comparison of the parameter gradient."""
        if self.failed:
            return False
        return self.verdict == "inconclusive" or (self.frozen_tree is not None
                                                  and self.frozen_tree.verdict == "inconclusive")

    @property
    def passed(self) -> bool:
        """The gradient was verified (``ok``, ``subgradient ok``) or the point is a kink (``kink``:
        no derivative to compare with; autograd returns that of an adjacent smooth piece).

        False where a wrong gradient was found (:attr:`failed`) *and* where the
        check was :attr:`inconclusive`: an unverified gradient is not a pass.
        """
        return not (self.failed or self.inconclusive)

    def row(self) -> list[str]:
        d = self.diagnosis
        return [
            self.formula,
            self.dissimilarity or "-",
            self.backend or "-",
            f"{self.max_abs_err:.2e}",
            f"{self.max_rel_err:.2e}",
            f"{self.step:.1e}",
            "-" if d.mst_margin is None else f"{d.mst_margin:.2e}",
            "-" if d.min_abs_rho is None else f"{d.min_abs_rho:.2e}",
            "yes" if d.differentiable else "no",
            self.verdict,
        ]

    def _steps_text(self) -> str:
        if self.min_step is None or self.min_step == self.step:
            return f"step {self.step:.3g}"
        return f"steps {self.min_step:.3g} to {self.step:.3g} (each entry's relative to its scale)"

    def label(self) -> str:
        return f"{self.formula} / {self.dissimilarity or '-'} / {self.backend or '-'}"

    def note(self) -> str:
        """One line on a row whose verdict is not ``ok``: why, and what was checked instead."""
        d = self.diagnosis
        if self.verdict == "inconclusive":
            margin = "" if d.mst_margin is None else f", MST margin {d.mst_margin:.2g}"
            return (f"{self.label()}: inconclusive, nothing verified: the point is differentiable{margin}, but "
                    f"{self.jumps} of {2 * self.size} finite-difference evaluations left its smooth piece with "
                    f"the last steps tried (up to {self.step:.2g}): a kink is closer than such steps resolve.")
        if d.differentiable:
            return f"{self.label()}: {self.verdict}: " + d.sentence()
        text = f"{self.label()}: {self.verdict}: " + "; ".join(d.reasons)
        if self.subgradient is not None:
            sub = self.subgradient
            text += (f"; subgradient inequality {'holds' if sub.passed else 'VIOLATED'} in {sub.trials} "
                     f"directions (min slack {sub.min_slack:.2g})")
        if self.frozen_tree is not None:
            ft = self.frozen_tree
            text += (f"; {ft.headline()} (max rel err {ft.max_rel_err:.2g}, "
                     f"{ft.jumps} evaluation(s) off the piece)")
        return text

    def __str__(self) -> str:
        lines = [
            f"gradcheck {self.formula} / {self.dissimilarity or '-'} / {self.backend or '-'} "
            f"w.r.t. {self.size} {self.wrt}: {self.verdict}",
            f"  max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g} "
            f"(tolerance {self.tolerance:.1g}), {self._steps_text()}, "
            f"{self.jumps} finite-difference evaluation(s) off the point's smooth piece",
            "  " + self.diagnosis.sentence(),
        ]
        if self.verdict == "inconclusive":
            lines.append("  Inconclusive: no step tried stayed on the point's smooth piece, so the comparison "
                         "above verifies nothing (neither agreement nor disagreement).")
        if self.diagnosis.constant_neurons and self.diagnosis.differentiable:
            lines.append(f"  constant neurons {self.diagnosis.constant_neurons} (harmless for this formula)")
        if self.diagnosis.deaths_std is not None:
            lines.append(f"  std of the deaths {self.diagnosis.deaths_std:.3g}")
        if self.subgradient is not None:
            lines.append("  " + str(self.subgradient))
        if self.frozen_tree is not None:
            lines.append("  " + str(self.frozen_tree))
        return "\n".join(lines)


def _check_formula(formula: str) -> None:
    if formula not in FORMULAS:
        raise ValueError(f"unknown formula {formula!r}; gradcheck covers {FORMULAS}")


def _check_backend(backend: str) -> None:
    if backend not in edge_backends():
        persistence.get_backend(backend)  # unknown or not installed: raises naming what is available
        raise ValueError(f"backend {backend!r} gives no death edges, hence no gradient; use one of {edge_backends()}")


def _formula_on_deaths(formula: str, deaths: torch.Tensor, alpha: float) -> torch.Tensor:
    """T1 or T2 of ``deaths`` ((n - 1,))."""
    return regularisers.t1(deaths) if formula == "t1" else regularisers.t2(deaths, alpha=alpha)


def regulariser_value(A: torch.Tensor, formula: str = "t1", dissimilarity="abs_correlation",
                      backend: str = "torch", alpha: float = 0.5) -> torch.Tensor:
    """The function under test: ``R(A)``, through the library's public pieces.

    A : (m, n) activations -> scalar. T1/T2: ``A -> dissimilarity -> deaths
    (toponeuro.persistence.deaths) -> formula``; min_corr/decov: directly on ``A``.
    """
    if formula in _ON_DEATHS:
        D = _dissimilarity.get(dissimilarity)(A)
        return _formula_on_deaths(formula, persistence.deaths(D, backend=backend), alpha)
    return regularisers.FORMULAS_ON_ACTIVATIONS[formula](A)


def _state_of(A: torch.Tensor, formula: str, dissimilarity, backend: str,
              frozen_edges: torch.Tensor | None = None) -> bytes:
    """The combinatorial state of the pipeline at ``A``: equal states, same smooth piece.

    It holds what decides the kinks of this formula: the tree (T1/T2), the
    signs of the gathered rho where ``|rho|`` is taken (``abs_correlation``,
    ``min_corr``), and which neurons are constant where correlations are taken.
    With ``frozen_edges`` ((n - 1, 2), T1/T2) the tree is held fixed (the
    frozen-tree piece, see :func:`check_model_gradient`): the state is that of
    the other kinks, with the signs of rho read on those edges.
    """
    A = A.detach()
    name = _name_of(dissimilarity)
    parts = []
    if formula == "min_corr" or (formula in _ON_DEATHS and name in CORRELATION_BASED):
        parts.append(bytes(np.packbits((A.amax(0) == A.amin(0)).numpy())))
    if formula in _ON_DEATHS:
        if frozen_edges is None:
            D = _dissimilarity.get(dissimilarity)(A, check=False)
            edges = persistence.death_edges(D, backend=backend, check=False)
            parts.append(edges.numpy().tobytes())
        else:
            edges = frozen_edges
        if name == "abs_correlation":
            C = _dissimilarity.correlation(A, check=False)
            parts.append(torch.sign(C[edges[:, 0], edges[:, 1]]).numpy().tobytes())
    elif formula == "min_corr":
        parts.append(torch.sign(_dissimilarity.correlation(A, check=False)).numpy().tobytes())
    return b"|".join(parts)


def _central_differences(evaluate: Callable[[torch.Tensor], tuple[float, bytes]], x0: torch.Tensor,
                         h: torch.Tensor, base_state: bytes | None):
    """Central differences of ``evaluate`` at the flat float64 vector ``x0``.

    ``evaluate(x) -> (value, state)``; ``h``: (N,) step per entry. Returns the
    (N,) gradient and how many of the 2N evaluations had a state other than
    ``base_state``.
    """
    g = torch.empty_like(x0)
    jumps = 0
    for k in range(x0.numel()):
        x = x0.clone()
        hk = float(h[k])
        x[k] = x0[k] + hk
        fp, sp = evaluate(x)
        x[k] = x0[k] - hk
        fm, sm = evaluate(x)
        # the step actually taken (x0 + h rounds): divide by it, not by 2h
        g[k] = (fp - fm) / (float(x0[k] + hk) - float(x0[k] - hk))
        if base_state is not None:
            jumps += (sp != base_state) + (sm != base_state)
    return g, jumps


def _entry_scales(x0: torch.Tensor, group_scale: torch.Tensor | None, floor: float) -> torch.Tensor:
    """The scale each entry's finite-difference step is relative to: (N,) from (N,) ``x0``.

    ``max(|x0_k|, group_scale_k, floor * max|x0|)``: the entry's own size,
    that of its group (its neuron's column of activations, or its parameter
    tensor), and a floor relative to the largest entry (see
    :func:`_floor_fraction`).
    """
    scale = x0.abs()
    if group_scale is not None:
        scale = torch.maximum(scale, group_scale.to(scale))
    return scale.clamp_min(floor * max(float(x0.abs().max()), 1e-12))


def _floor_fraction(formula: str, dissimilarity) -> float:
    """The floor of :func:`_entry_scales` for a check w.r.t. the activations.

    * The correlation-based formulas do not change when a neuron is rescaled:
      each neuron is its own scale, however small next to the others, and the
      floor (``1e-12``) only keeps the step off 0.
    * ``decov`` is a polynomial of degree 2 in each entry, so central
      differences have no truncation error and the largest step has the least
      rounding error. The floor is 1: one step, ``1e-6 * max|A|``, for every
      entry.
    * Otherwise (``euclidean``, a callable dissimilarity) an entry's effect on
      ``R`` is measured against the other neurons', and a step far below
      theirs is lost in the rounding of ``R``: the floor is ``1e-2``.
    """
    if formula == "min_corr" or (formula in _ON_DEATHS and _name_of(dissimilarity) in CORRELATION_BASED):
        return _FLOOR_INVARIANT
    if formula == "decov":
        return 1.0
    return _FLOOR


def _choose_step_and_differentiate(evaluate, x0: torch.Tensor, base_state: bytes, eps: float | None,
                                   differentiable: bool, group_scale: torch.Tensor | None = None,
                                   floor: float = 1.0):
    """Finite differences with a step that keeps every evaluation on the point's smooth piece.

    Why this step: central differences in float64 are most accurate near
    ``h ~ eps^(1/3) * scale ~ 1e-5 * scale``; we take ``1e-6 * scale``
    (truncation error ~ h^2 ~ 1e-12, rounding ~ eps * |R| / h ~ 1e-10,
    both far under the 1e-6 tolerance). The scale is each entry's own (see
    :func:`_entry_scales`): one global step ``1e-6 * max|x0|`` is far too
    large for a neuron 1000 times smaller than the largest, and its truncation
    error alone then exceeds the tolerance.
    But the comparison is meaningful only
    if ``x0 +- h_k e_k`` lies on the same smooth piece as ``x0``: the tree must
    not change, which needs the step's effect on ``d`` (about ``h`` times the
    Lipschitz constant of ``d``) to stay below half the MST margin, and
    likewise for the other kinks (the sign of the gathered rho, ReLU inputs).
    Rather than bound the Lipschitz constants a priori, we *verify*: every
    evaluation's combinatorial state is compared with the point's, and every
    step is divided by 10 (at most ``_MAX_SHRINK`` times, down to
    ``1e-9 * scale``) until no evaluation jumps. A point whose kinks are
    closer than that cannot be resolved by finite differences in float64
    and is reported "inconclusive". An explicit ``eps`` is used as given, for
    every entry.

    Returns the (N,) gradient, the number of jumps and the (N,) steps taken.
    """
    if eps is not None:
        h = torch.full_like(x0, float(eps))
    else:
        h = _REL_STEP * _entry_scales(x0, group_scale, floor)
    g, jumps = _central_differences(evaluate, x0, h, base_state)
    if eps is None and differentiable:
        for _ in range(_MAX_SHRINK):
            if jumps == 0:
                break
            h = h / 10.0
            g, jumps = _central_differences(evaluate, x0, h, base_state)
    return g, jumps, h


def _errors(g_auto: torch.Tensor, g_fd: torch.Tensor) -> tuple[float, float]:
    abs_err = float((g_auto - g_fd).abs().max())
    size = max(float(g_fd.abs().max()), float(g_auto.abs().max()))
    if size == 0.0:
        return abs_err, 0.0 if abs_err == 0.0 else math.inf
    return abs_err, abs_err / size


def check_activations_gradient(A, formula: str = "t1", dissimilarity="abs_correlation", backend: str = "torch",
                               alpha: float = 0.5, eps: float | None = None, tolerance: float = 1e-6,
                               perturb_gradient: float = 0.0, subgradient_trials: int = 200,
                               seed: int = 0) -> GradcheckReport:
    """Compare the autograd gradient of ``R(A)`` with central finite differences over every entry of ``A``.

    Parameters
    ----------
    A : (m, n) activations, batch first (any device; checked on a float64 CPU copy).
    formula : {"t1", "t2", "min_corr", "decov"}
    dissimilarity : str or callable
        T1/T2 only (ignored by ``min_corr``/``decov``, which use the
        correlation or covariance directly).
    backend : str
        An edge-giving persistence backend (T1/T2 only).
    alpha : float
        T2's weight on the standard deviation.
    eps : float, optional
        Finite-difference step for every entry. By default each entry has its
        own, ``1e-6 * max(|A_ik|, max_i |A_ik|, floor)`` (its size, that of its
        neuron, and a floor: ``1e-12 * max|A|`` for the correlation-based
        formulas, which do not change when a neuron is rescaled, ``max|A|``
        for decov, ``1e-2 * max|A|`` otherwise), all shrunk tenfold until no
        evaluation leaves the point's smooth piece (see ``_floor_fraction``).
    tolerance : float
        The largest acceptable relative error at a differentiable point.
    perturb_gradient : float
        For testing the tool: added to every entry of the autograd gradient.
    subgradient_trials, seed : int
        The subgradient check of T1 where the MST is not unique.

    Returns
    -------
    :class:`GradcheckReport`
    """
    start = time.perf_counter()
    _check_formula(formula)
    on_deaths = formula in _ON_DEATHS
    if on_deaths:
        _check_backend(backend)
        _dissimilarity.get(dissimilarity)  # unknown name: ValueError now
    A0 = check_activations(A).detach().to(device="cpu", dtype=torch.float64).clone()
    m, n = A0.shape

    Ag = A0.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(regulariser_value(Ag, formula, dissimilarity, backend, alpha), Ag)
    g_auto = g_auto.flatten() + perturb_gradient

    def evaluate(x):
        Ax = x.view(m, n)
        with torch.no_grad():
            value = float(regulariser_value(Ax, formula, dissimilarity, backend, alpha))
        return value, _state_of(Ax, formula, dissimilarity, backend)

    diag = diagnose(A0, formula, dissimilarity, backend, alpha)
    column_scale = A0.abs().amax(0).expand(m, n).flatten()  # each entry: the largest |entry| of its neuron
    g_fd, jumps, h = _choose_step_and_differentiate(
        evaluate, A0.flatten(), _state_of(A0, formula, dissimilarity, backend), eps, diag.differentiable,
        group_scale=column_scale, floor=_floor_fraction(formula, dissimilarity))
    abs_err, rel_err = _errors(g_auto, g_fd)

    sub = None
    if formula == "t1" and diag.tie:
        D = _dissimilarity.get(dissimilarity)(A0)
        sub = check_subgradient(D, backend=backend, trials=subgradient_trials, seed=seed,
                                perturb_gradient=perturb_gradient)
    return GradcheckReport(
        formula=formula, dissimilarity=_name_of(dissimilarity) if on_deaths else None,
        backend=backend if on_deaths else None, wrt="activations", size=A0.numel(),
        max_abs_err=abs_err, max_rel_err=rel_err, step=float(h.max()), min_step=float(h.min()), jumps=jumps,
        diagnosis=diag, tolerance=tolerance, subgradient=sub, seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------
# with respect to a model's parameters
# ---------------------------------------------------------------------------

#: modules with a kink at an input of 0 (ReLU6 has a second one at 6)
_KINKED = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6)


class _KinkRecorder:
    """Forward hooks on ReLU-type modules: how close their inputs are to a kink, and on which side."""

    def __init__(self, model: nn.Module):
        self.distances: list[torch.Tensor] = []
        self.sides: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, _KINKED)]

    def _hook(self, module, inputs, output):
        x = inputs[0].detach()
        dist, side = x.abs(), x > 0
        if isinstance(module, nn.ReLU6):
            dist = torch.minimum(dist, (x - 6.0).abs())
            side = side.to(torch.int8) + (x > 6.0).to(torch.int8)
        self.distances.append(dist)
        self.sides.append(side)

    def clear(self):
        self.distances, self.sides = [], []

    def margin(self) -> float | None:
        """Smallest distance of a recorded input to a kink; None without ReLU-type modules."""
        if not self.handles:
            return None
        return float(min(t.min() for t in self.distances)) if self.distances else math.inf

    def pattern(self) -> bytes:
        """Which side of its kink(s) every recorded input lies on."""
        return b"".join(t.to(torch.int8).numpy().tobytes() for t in self.sides)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def check_model_gradient(model: nn.Module, x: torch.Tensor, formula: str = "t1", dissimilarity="abs_correlation",
                         backend: str = "torch", alpha: float = 0.5, sampler=None, eps: float | None = None,
                         tolerance: float = 1e-6, perturb_gradient: float = 0.0, subgradient_trials: int = 200,
                         seed: int = 0) -> GradcheckReport:
    """Compare autograd and finite differences of ``R`` w.r.t. a model's parameters.

    ``R`` is :class:`toponeuro.TopologicalRegulariser` (hooks, sampler and
    all) on a float64 copy of ``model`` in eval mode (dropout off, so the
    function is deterministic); the model passed in is not modified.

    Parameters
    ----------
    model : nn.Module
    x : (m, ...) input batch.
    formula, dissimilarity, backend, alpha, sampler :
        As for :class:`toponeuro.TopologicalRegulariser`.
    eps, tolerance, perturb_gradient, subgradient_trials, seed :
        As for :func:`check_activations_gradient`; the default step of a
        parameter entry is ``1e-6 * max(|entry|, median |its tensor|,
        1e-2 * max |parameter|)``.

    Returns
    -------
    :class:`GradcheckReport` with ``wrt="parameters"``. The diagnosis is that
    of the recorded activations, plus the ReLU margin (the smallest ``|input|``
    of a ReLU-type module). Computed on the CPU in float64.

    Notes
    -----
    At a tie (the MST is not unique) ``R`` has no derivative, and finite
    differences of ``R`` straddle the kink; for T1 the subgradient inequality
    is then checked, but in ``d`` only: T1 is convex in ``d`` and not in the
    parameters, so that inequality says nothing about the parameter gradient
    used in training (a wrong chain rule downstream of ``d`` would pass it).
    The parameter gradient is checked against the *frozen-tree piece*
    ``theta -> T(d(theta)[E])``, where ``E`` is the tree the backend chose at
    the point (its death edges, in canonical order) and ``T`` the formula on
    the deaths gathered there, as the pipeline gathers them (T1 and T2 are
    symmetric in the deaths, so the order in which they are gathered does not
    change the value away from the point). Why this is the right comparison:
    autograd differentiates exactly what the forward pass computed, the
    gather at ``E``, so it returns the gradient of this piece, nothing else;
    and at a tie the piece is one of the C^1 pieces active at the point (``E``
    is an MST there, so the piece agrees with ``R`` at the point and ``R`` is
    the piece of the MST wherever ``E`` stays one). A correct gradient must
    therefore match the piece's central differences to the usual tolerance,
    and the per-entry steps and their shrinking are those of the main
    comparison; evaluations that change the ReLU pattern, the signs of rho
    on ``E`` or the constant neurons count as jumps (a change of MST does
    not: the tree is fixed). It is done where the tie is the only kink the
    diagnosis finds; with another one (a constant neuron, ``|rho| = 0`` on a
    tree edge, ...) the piece itself is not smooth, and nothing is compared.
    The result is the report's ``frozen_tree``: a disagreement is a ``FAIL``.
    """
    from .nn import TopologicalRegulariser

    start = time.perf_counter()
    _check_formula(formula)
    on_deaths = formula in _ON_DEATHS
    if on_deaths:
        _check_backend(backend)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to check")
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    kinks = _KinkRecorder(net)
    reg = TopologicalRegulariser(net, formula=formula, backend=backend, dissimilarity=dissimilarity,
                                 sampler=sampler, alpha=alpha)
    try:
        def forward():
            kinks.clear()
            with torch.enable_grad():  # the recorder records only with autograd on
                net(x)
                return reg()

        value = forward()
        g_auto = torch.cat([g.flatten() for g in torch.autograd.grad(value, params)]) + perturb_gradient
        A0 = reg.activations().detach()
        relu_margin = kinks.margin()
        diag = diagnose(A0, formula, dissimilarity, backend, alpha, relu_margin=relu_margin)

        def state():
            return _state_of(reg.activations(), formula, dissimilarity, backend) + b"#" + kinks.pattern()

        base_state = state()
        theta0 = torch.nn.utils.parameters_to_vector(params).detach().clone()

        def evaluate(theta):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta, params)
            v = float(forward().detach())
            return v, state()

        # each entry: the median |entry| of its tensor (a robust scale: one bias pushed to -100
        # must not set the step of the others in its tensor), with the entry's own size on top
        tensor_scale = torch.cat([p.detach().abs().flatten().median().expand(p.numel()) for p in params])
        try:
            g_fd, jumps, h = _choose_step_and_differentiate(evaluate, theta0, base_state, eps, diag.differentiable,
                                                            group_scale=tensor_scale, floor=_FLOOR)
        finally:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta0, params)
        abs_err, rel_err = _errors(g_auto, g_fd)
        sub = None
        if formula == "t1" and diag.tie:
            sub = check_subgradient(_dissimilarity.get(dissimilarity)(A0), backend=backend,
                                    trials=subgradient_trials, seed=seed, perturb_gradient=perturb_gradient)
        frozen = None
        if on_deaths and diag.tie and all(r.startswith("MST not unique") for r in diag.reasons):
            frozen = _frozen_tree_check(net, x, params, reg, kinks, theta0, g_auto, formula, dissimilarity,
                                        backend, alpha, eps, tensor_scale, tolerance)
    finally:
        reg.remove()
        kinks.remove()
    return GradcheckReport(
        formula=formula, dissimilarity=_name_of(dissimilarity) if on_deaths else None,
        backend=backend if on_deaths else None, wrt="parameters", size=theta0.numel(),
        max_abs_err=abs_err, max_rel_err=rel_err, step=float(h.max()), min_step=float(h.min()), jumps=jumps,
        diagnosis=diag, tolerance=tolerance, subgradient=sub, seconds=time.perf_counter() - start,
        frozen_tree=frozen,
    )


def _frozen_tree_check(net, x, params, reg, kinks, theta0, g_auto, formula, dissimilarity, backend, alpha,
                       eps, tensor_scale, tolerance) -> FrozenTreeReport:
    """Central differences of ``theta -> T(d(theta)[E])`` against ``g_auto`` (see :func:`check_model_gradient`).

    ``E``: the backend's death edges at ``theta0``, obtained as the pipeline
    obtains them (the same matrix, the same check), so that they are the
    edges autograd differentiated through. Restores the parameters to ``theta0``.
    """
    def forward_at(theta):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, params)
        kinks.clear()
        with torch.enable_grad():  # the recorders record only with autograd on
            net(x)

    forward_at(theta0)
    D0 = reg.dissimilarity_matrix().detach()
    edges = persistence.death_edges(D0, backend=backend, check=not reg._builtin_dissimilarity)
    i, j = edges[:, 0], edges[:, 1]

    def evaluate(theta):
        forward_at(theta)
        with torch.no_grad():
            D = reg.dissimilarity_matrix().detach()
            value = float(_formula_on_deaths(formula, D[i, j], alpha))
            A = reg.activations().detach()
        return value, _state_of(A, formula, dissimilarity, backend, frozen_edges=edges) + b"#" + kinks.pattern()

    try:
        base_state = evaluate(theta0)[1]
        g_fd, jumps, h = _choose_step_and_differentiate(evaluate, theta0, base_state, eps, True,
                                                        group_scale=tensor_scale, floor=_FLOOR)
    finally:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta0, params)
    abs_err, rel_err = _errors(g_auto, g_fd)
    return FrozenTreeReport(edges=[tuple(e) for e in edges.tolist()], max_abs_err=abs_err, max_rel_err=rel_err,
                            step=float(h.max()), min_step=float(h.min()), jumps=jumps, tolerance=tolerance)


# ---------------------------------------------------------------------------
# generated points
# ---------------------------------------------------------------------------


def random_activations(m: int = 12, n: int = 8, seed: int = 0, tie: bool = False) -> torch.Tensor:
    """Generic float64 activations: (m, n), standard normal, seeded.

    With probability 1 the MST is unique, no ``rho`` is 0 or +-1 and no
    neuron is constant. ``tie=True`` duplicates neuron 0 into neuron 1, which
    makes the MST non-unique (for every dissimilarity, ``d(0, l) = d(1, l)``
    and ``d(0, 1) = 0``).
    """
    if m < 2 or n < 2 or (tie and n < 3):
        raise ValueError(f"need m >= 2 samples and n >= 2 neurons (n >= 3 with tie), got m={m}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if tie:
        A[:, 1] = A[:, 0]
    return A


def tiny_mlp(n: int = 8, in_features: int = 4, n_out: int = 2, seed: int = 0, x: torch.Tensor | None = None
             ) -> nn.Sequential:
    """A float64 ReLU MLP with ``n`` recorded neurons: two hidden layers and ``n_out`` logits.

    The ``n - n_out`` hidden neurons are split between the two hidden layers
    (the first gets the extra one). Given a batch ``x: (m, in_features)``,
    each hidden bias is set to minus the mean of its unit's pre-activation on
    ``x``, so that every ReLU is active on part of the batch (no dead neuron,
    which would be a constant one) and, generically, no input sits at the kink.
    """
    hidden = n - n_out
    if hidden < 2:
        raise ValueError(f"the MLP needs n >= {n_out + 2} neurons ({n_out} logits, >= 1 per hidden layer), got {n}")
    h1, h2 = (hidden + 1) // 2, hidden // 2
    gen = torch.Generator().manual_seed(seed)

    def linear(fan_in: int, fan_out: int) -> nn.Linear:
        lin = nn.Linear(fan_in, fan_out).double()
        bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default uniform range, from our generator
        with torch.no_grad():
            lin.weight.copy_((2 * torch.rand(fan_out, fan_in, generator=gen, dtype=torch.float64) - 1) * bound)
            lin.bias.copy_((2 * torch.rand(fan_out, generator=gen, dtype=torch.float64) - 1) * bound)
        return lin

    model = nn.Sequential(linear(in_features, h1), nn.ReLU(), linear(h1, h2), nn.ReLU(), linear(h2, n_out))
    if x is not None:
        h = torch.as_tensor(x, dtype=torch.float64)
        with torch.no_grad():
            for module in model:
                if isinstance(module, nn.Linear) and module is not model[-1]:
                    module.bias.sub_((h @ module.weight.mT + module.bias).mean(0))
                h = module(h)
    return model


def run_checks(formulas=FORMULAS, dissimilarities=None, backends=None, n: int = 8, m: int = 12, seed: int = 0,
               mlp: bool = False, tie: bool = False, tolerance: float = 1e-6, alpha: float = 0.5,
               eps: float | None = None, perturb_gradient: float = 0.0, progress: bool = False
               ) -> list[GradcheckReport]:
    """Run the check for every combination; min_corr/decov once each (they use no dissimilarity or backend).

    Returns one :class:`GradcheckReport` per combination.
    """
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


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def _choice_list(value: str, valid: list[str], what: str) -> list[str]:
    if value == "all":
        return list(valid)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in valid]
    if bad or not chosen:
        raise ValueError(f"unknown {what} {bad or value!r}; choose from {valid} or 'all'")
    return chosen


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compare autograd gradients of the regularisers with central finite differences (float64), "
        "and diagnose whether the point is differentiable (MST margin, |rho| on the tree, constant "
        "neurons, spread of the deaths). Exit status: 0 if every check passed (ok, subgradient ok, or "
        "kink: a point diagnosed not differentiable, with no derivative to compare); 1 if they disagree "
        "at a point diagnosed differentiable, or if the gradient fails the subgradient inequality of T1 "
        "at a tie, or if a model's parameter gradient disagrees with the frozen-tree piece at a tie; "
        "3 if nothing failed but some check was inconclusive (differentiable, but every "
        "finite-difference step tried crossed a kink, so nothing was verified); 2 for bad options."
    )
    parser.add_argument("--formula", default="all", help=f"one of {list(FORMULAS)}, comma-separated, or 'all'")
    parser.add_argument("--dissimilarity", default="all",
                        help=f"one of {list(_dissimilarity.DISSIMILARITIES)}, comma-separated, or 'all' (T1/T2)")
    parser.add_argument("--backend", default="all",
                        help="edge-giving persistence backend(s), comma-separated, or 'all' (those installed)")
    parser.add_argument("--n", type=int, default=8, help="neurons (default 8)")
    parser.add_argument("--m", type=int, default=12, help="samples in the batch (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated point (default 0)")
    parser.add_argument("--alpha", type=float, default=0.5, help="T2's weight on the std (default 0.5)")
    parser.add_argument("--mlp", action="store_true",
                        help="differentiate w.r.t. the parameters of a tiny ReLU MLP (n recorded neurons: two "
                             "hidden layers and 2 logits) on a random batch of m inputs")
    parser.add_argument("--tie", action="store_true",
                        help="duplicate a neuron so that the MST is not unique (activations mode): shows the "
                             "diagnosis and the subgradient check of T1")
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="largest acceptable relative error at a differentiable point (default 1e-6)")
    parser.add_argument("--eps", type=float, default=None,
                        help="finite-difference step for every entry (default: each entry's own, 1e-6 times "
                             "the scale of the entry and of its neuron or parameter tensor, shrunk as needed)")
    parser.add_argument("--perturb-gradient", type=float, default=0.0, metavar="FLOAT",
                        help="for testing the tool: adds this to the autograd gradient (the check must then fail)")
    parser.add_argument("--verbose", action="store_true", help="print each report in full after the table")


def run(args: argparse.Namespace) -> int:
    try:
        formulas = _choice_list(args.formula, list(FORMULAS), "formula")
        dissimilarities = _choice_list(args.dissimilarity, list(_dissimilarity.DISSIMILARITIES), "dissimilarity")
        available = edge_backends()
        if args.backend == "all":
            backends = available
        else:
            backends = _choice_list(args.backend, list(persistence.BACKENDS), "backend")
            for b in backends:
                _check_backend(b)
        if args.mlp and args.tie:
            raise ValueError("--tie applies to generated activations, not to --mlp")
        if not args.tolerance > 0:
            raise ValueError(f"--tolerance must be > 0, got {args.tolerance}")
        if args.eps is not None and not args.eps > 0:
            raise ValueError(f"--eps must be > 0, got {args.eps}")
        start = time.perf_counter()
        reports = run_checks(formulas, dissimilarities, backends, n=args.n, m=args.m, seed=args.seed,
                             mlp=args.mlp, tie=args.tie, tolerance=args.tolerance, alpha=args.alpha,
                             eps=args.eps, perturb_gradient=args.perturb_gradient, progress=True)
    except ValueError as err:
        print(f"toponeuro gradcheck: error: {err}", file=sys.stderr)
        return 2
    wrt = "parameters of a tiny MLP" if args.mlp else "activations"
    print(f"gradcheck w.r.t. the {wrt}: n={args.n} neurons, m={args.m} samples, seed={args.seed}, float64, "
          f"tolerance {args.tolerance:g} (relative to max |gradient|)")
    print(format_table(reports))
    if args.verbose:
        for r in reports:
            print()
            print(r)
    else:
        notes = [r for r in reports if r.verdict != "ok"]
        if notes:
            print()
            print("Notes (a kink makes disagreement expected; autograd then returns the derivative "
                  "of one adjacent smooth piece):")
            for r in notes:
                print("  " + r.note())
    elapsed = time.perf_counter() - start
    print()
    print(summary_line(reports, elapsed))
    return exit_status(reports)
