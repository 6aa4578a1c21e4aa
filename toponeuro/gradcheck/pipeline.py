"""The function under test: the regulariser ``R(A)`` through the library's public pieces.

Also the formulas gradcheck covers, the checks of its options, and the
combinatorial state of the pipeline at a point (equal states: same smooth piece).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import dissimilarity as _dissimilarity
from .. import persistence, regularisers
from ..persistence import edge_backends


#: the regulariser formulas that act on activations (``l1``/``l2`` are plain
#: polynomials of the weights and need no check here)
FORMULAS = ("t1", "t2", "min_corr", "decov")
_ON_DEATHS = ("t1", "t2")

#: dissimilarities computed from the Pearson correlation
CORRELATION_BASED = ("abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho")


def _name_of(dissimilarity) -> str:
    if isinstance(dissimilarity, str):
        return dissimilarity
    return getattr(dissimilarity, "__name__", repr(dissimilarity))


def _uses_correlation(formula: str, dissimilarity) -> bool:
    """Whether the regulariser reads Pearson correlations: MinCorr, or T1/T2 on a correlation-based dissimilarity."""
    return formula == "min_corr" or (formula in _ON_DEATHS and _name_of(dissimilarity) in CORRELATION_BASED)


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
    if _uses_correlation(formula, name):
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
