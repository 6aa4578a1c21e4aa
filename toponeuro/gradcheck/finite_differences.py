"""Central finite differences with a step per entry, shrunk until every evaluation stays on the
point's smooth piece; the errors of a gradient against them. Shared by every check."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .diagnosis import _EPS
from .pipeline import _uses_correlation


#: the default finite-difference step, relative to the scale of each entry
#: (see _entry_scales)
_REL_STEP = 1e-6
#: the smallest scale of an entry, relative to max|x| (see _entry_scales)
_FLOOR_INVARIANT = 1e-12
_FLOOR = 1e-2
#: the step is shrunk tenfold at most this many times when a finite-difference
#: evaluation lands on another smooth piece (see _choose_step_and_differentiate)
_MAX_SHRINK = 3
#: the absolute floor of the tolerance rule, in float64 epsilons of |R| over the smallest step
#: (see _abs_floor): with two samples, where R is constant, central differences
#: measured up to 0.75 of them (n = 2..5, 8 seeds); 8 leaves room and stays far below
#: any error the relative tolerance exists to catch
_FD_ROUNDING_ULPS = 8.0


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
    if _uses_correlation(formula, dissimilarity):
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


def _abs_floor(value: float, h: torch.Tensor) -> float:
    """The absolute floor of the tolerance rule: the gradient error central differences cannot resolve.

    Each evaluation of ``R`` (``value`` at the point) is exact to a few
    float64 epsilons of ``|R|``, so the quotient ``(R(x + h e_k) - R(x - h e_k)) / 2h``
    carries about ``eps * |R| / h`` of rounding; at the smallest step ``h``
    taken, that bounds every entry's. An error below ``_FD_ROUNDING_ULPS``
    times that is noise, whatever its size relative to the gradient: a
    gradient that is 0 up to rounding (1e-16 against 0, e.g. with two
    samples, where every ``rho`` is +-1 and ``R`` is constant) has a relative
    error of 1. With the default steps (``1e-6`` of each entry's scale) the
    floor is about ``2e-9 * |R| / scale``, far below what the relative
    tolerance allows a gradient of the natural size ``|R| / scale``: it
    passes only what rounding explains. ``R = 0`` gives no floor.
    """
    return _FD_ROUNDING_ULPS * _EPS * abs(value) / float(h.min())


def _errors(g_auto: torch.Tensor, g_fd: torch.Tensor) -> tuple[float, float]:
    abs_err = float((g_auto - g_fd).abs().max())
    size = max(float(g_fd.abs().max()), float(g_auto.abs().max()))
    if size == 0.0:
        return abs_err, 0.0 if abs_err == 0.0 else math.inf
    return abs_err, abs_err / size
