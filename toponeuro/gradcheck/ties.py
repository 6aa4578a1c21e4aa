"""Checks at a tie (the MST not unique), where the regulariser has no derivative.

* :func:`check_subgradient`: T1 is convex in the dissimilarities, so the
  gathered gradient must satisfy the subgradient inequality;
* the frozen-tree piece ``theta -> T(d(theta)[E])`` of a model check (see
  :func:`toponeuro.gradcheck.check_model_gradient`).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import persistence, regularisers
from .._validation import check_dissimilarity
from ..persistence.tree import mst_margin
from .diagnosis import _EPS, _KINK_ULPS
from .finite_differences import _FLOOR, _abs_floor, _choose_step_and_differentiate, _errors
from .pipeline import _formula_on_deaths, _state_of
from .reports import FrozenTreeReport, SubgradientReport


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
        base_value, base_state = evaluate(theta0)
        g_fd, jumps, h = _choose_step_and_differentiate(evaluate, theta0, base_state, eps, True,
                                                        group_scale=tensor_scale, floor=_FLOOR)
    finally:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta0, params)
    abs_err, rel_err = _errors(g_auto, g_fd)
    return FrozenTreeReport(edges=[tuple(e) for e in edges.tolist()], max_abs_err=abs_err, max_rel_err=rel_err,
                            step=float(h.max()), min_step=float(h.min()), jumps=jumps, tolerance=tolerance,
                            abs_floor=_abs_floor(base_value, h))
