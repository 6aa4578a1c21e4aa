"""Autograd against central finite differences w.r.t. the activations (:func:`check_activations_gradient`)."""

from __future__ import annotations

import time

import torch

from .. import dissimilarity as _dissimilarity
from .._validation import check_activations
from .diagnosis import diagnose
from .finite_differences import _abs_floor, _choose_step_and_differentiate, _errors, _floor_fraction
from .pipeline import _ON_DEATHS, _check_backend, _check_formula, _name_of, _state_of, regulariser_value
from .reports import GradcheckReport
from .ties import check_subgradient


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
    value = regulariser_value(Ag, formula, dissimilarity, backend, alpha)
    (g_auto,) = torch.autograd.grad(value, Ag)
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
        abs_floor=_abs_floor(float(value.detach()), h),
    )
