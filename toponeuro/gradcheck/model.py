"""Autograd against central finite differences w.r.t. a model's parameters (:func:`check_model_gradient`)."""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch
from torch import nn

from .. import dissimilarity as _dissimilarity
from .diagnosis import diagnose
from .finite_differences import _FLOOR, _abs_floor, _choose_step_and_differentiate, _errors
from .pipeline import _ON_DEATHS, _check_backend, _check_formula, _name_of, _state_of
from .reports import GradcheckReport
from .ties import _frozen_tree_check, check_subgradient


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
    from ..nn import TopologicalRegulariser

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
    with warnings.catch_warnings():  # a gradient check may look at an unbounded formula: allowed, silently
        warnings.simplefilter("ignore", UserWarning)
        reg = TopologicalRegulariser(net, formula=formula, backend=backend, dissimilarity=dissimilarity,
                                     sampler=sampler, alpha=alpha, allow_unbounded=True)
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
        frozen_tree=frozen, abs_floor=_abs_floor(float(value.detach()), h),
    )
