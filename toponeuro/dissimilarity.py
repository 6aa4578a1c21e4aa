"""Dissimilarity between neurons, from their activations.

Every function maps activations ``A: (m, n)`` (batch first) to a symmetric
``(n, n)`` matrix with zero diagonal, differentiably, on ``A``'s device and
in ``A``'s dtype. A stack ``A: (B, m, n)`` gives ``(B, n, n)``, member ``b``
equal to the call on ``A[b]`` (each member validated, an error naming it).

A neuron whose activation is constant on the batch (a dead ReLU) has no
defined correlation; we treat it as uncorrelated with every other neuron
(``rho = 0``), and it produces no NaN in the value or in the gradient.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from ._validation import check_activations

__all__ = [
    "correlation",
    "abs_correlation",
    "sqrt_one_minus_rho2",
    "one_minus_rho",
    "euclidean",
    "standardised_columns",
    "correlation_pairs",
    "abs_correlation_pairs",
    "sqrt_one_minus_rho2_pairs",
    "one_minus_rho_pairs",
    "euclidean_pairs",
    "get",
    "get_pairwise",
    "DISSIMILARITIES",
]


def _autocast_available(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    return check(device_type) if check is not None else device_type in ("cpu", "cuda")


def _autocast_off(*device_types: str) -> contextlib.ExitStack:
    """A context with autocast disabled on these device types (those that have autocast)."""
    stack = contextlib.ExitStack()
    for kind in dict.fromkeys(device_types):
        if _autocast_available(kind):
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def _full_precision(A: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (as recorded under autocast) -> float32; other tensors as they are."""
    return A.float() if A.is_floating_point() and A.dtype.itemsize < 4 else A


def _zero_diagonal(M: torch.Tensor) -> torch.Tensor:
    # The diagonal carries no information and no gradient.
    return torch.diagonal_scatter(M, torch.zeros_like(M.diagonal(dim1=-2, dim2=-1)), dim1=-2, dim2=-1)


def _members_on_cpu(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A stack (B, m, n) on CPU goes through ``fn`` one member at a time (checked once, as a stack).

    Each member's (n, n) intermediates then stay in cache through the elementwise passes, where the
    whole stack's would stream from memory in each (twice the time of a loop at B = 16, n = 1024);
    on a GPU the stack goes through ``fn`` whole, in fewer, larger kernels.
    """
    @functools.wraps(fn)
    def per_member(A, check: bool = True) -> torch.Tensor:
        if not (isinstance(A, torch.Tensor) and A.ndim == 3 and A.device.type == "cpu" and len(A)):
            return fn(A, check=check)
        if check:
            A = check_activations(A, stack=True)
        return torch.stack([fn(a, check=False) for a in A])

    return per_member


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (instead of inf -> NaN) at x <= 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


@_members_on_cpu
def correlation(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Pearson correlation between the columns of ``A``.

    Parameters
    ----------
    A : (m, n) tensor, or a stack (B, m, n)
        Activations, batch first.
    check : bool
        Validate ``A`` (shape, finiteness).

    Returns
    -------
    (n, n) tensor (for a stack, (B, n, n))
        Exactly symmetric, entries clamped to [-1, 1], unit diagonal.
        Rows and columns of constant neurons are 0 off the diagonal.
        Computed in ``A``'s dtype, with autocast disabled inside.
    """
    if check:
        A = check_activations(A, stack=True)
    # under torch.autocast the matmul would run in 16 bits: 1 - |rho| near 0 (the
    # deaths that matter) would keep 3 significant digits; A's own dtype is kept
    with _autocast_off(A.device.type):
        return _correlation(A)


def standardised_columns(A: torch.Tensor) -> torch.Tensor:
    """Columns centred and scaled to unit norm, so that ``Z[:, k] . Z[:, l] = rho_kl``.

    A : (..., m, n) activations, batch first (a stack of them too). Returns (..., m, n),
    differentiable. A constant column (a dead ReLU) comes out exactly zero, with a
    finite gradient: its correlations are 0. No checks.
    """
    return _standardise(A)[0]


def _standardise(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Z, norm, constant): Z as :func:`standardised_columns`; norm (..., 1, n), that of each
    centred column (1 for constant ones), so that ``Z = (A - mean) / norm``; constant (..., 1, n)."""
    Ad = A.detach()
    constant = Ad.amax(-2, keepdim=True) == Ad.amin(-2, keepdim=True)  # exact test: a dead ReLU is exactly constant
    # masked unconditionally: testing for a constant column first would cost a host sync per
    # call on a GPU (and rule out CUDA graph capture) to save one elementwise pass over A
    Ac = (A - A.mean(-2, keepdim=True)).masked_fill(constant, 0.0)
    # Scale each column by its largest |entry| first so that the sum of squares
    # neither underflows nor overflows (activations of 1e-25 or 1e20 in fp32).
    # Correlation is scale invariant, so a detached scale changes neither the
    # value nor the gradient.
    scale = Ac.detach().abs().amax(-2, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Ac = Ac / scale
    ss = (Ac * Ac).sum(-2, keepdim=True)
    # constant columns are exactly zero after masking; divide them by 1 so that
    # neither the value nor the gradient of the norm is 0/0.
    norm = torch.sqrt(torch.where(constant, torch.ones_like(ss), ss))
    return Ac / norm, (norm * scale).detach(), constant


def _correlation(A: torch.Tensor) -> torch.Tensor:
    Z = standardised_columns(A)
    # a stack: one product per member, as batched matmul may round differently (float64 on CPU
    # at some n does), and each member must equal its own call bit for bit
    C = Z.mT @ Z if Z.ndim == 2 or len(Z) == 0 else torch.stack([z.mT @ z for z in Z])
    C = 0.5 * (C + C.mT)  # matmul is not bitwise symmetric; the MST wants it exactly
    C = C.clamp(-1.0, 1.0)
    return torch.diagonal_scatter(C, torch.ones_like(C.diagonal(dim1=-2, dim2=-1)), dim1=-2, dim2=-1)


# The correlation-based dissimilarities as elementwise functions of (clamped) rho: the dense
# matrices and the pairwise forms apply the same operations, so equal rho give equal values.
def _abs_correlation_of(rho: torch.Tensor) -> torch.Tensor:
    return 1.0 - rho.abs()


def _sqrt_one_minus_rho2_of(rho: torch.Tensor) -> torch.Tensor:
    return _safe_sqrt(1.0 - rho * rho)


def _one_minus_rho_of(rho: torch.Tensor) -> torch.Tensor:
    return 1.0 - rho


@_members_on_cpu
def abs_correlation(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``d_kl = 1 - |rho_kl|``, the paper's (and our default) dissimilarity.

    A : (m, n) activations, batch first (or (B, m, n)). Returns (n, n) (or (B, n, n)), in [0, 1].
    """
    # The correlation's diagonal is exactly 1, so the diagonal here is exactly 0.
    return _abs_correlation_of(correlation(A, check=check))


@_members_on_cpu
def sqrt_one_minus_rho2(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``d_kl = sqrt(1 - rho_kl^2)``, in [0, 1].

    The derivative is infinite at ``|rho| = 1`` (duplicated neurons); there
    the gradient is taken as 0.
    """
    return _sqrt_one_minus_rho2_of(correlation(A, check=check))


@_members_on_cpu
def one_minus_rho(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``d_kl = 1 - rho_kl``, in [0, 2]: anti-correlated neurons are far apart."""
    return _one_minus_rho_of(correlation(A, check=check))


@_members_on_cpu
def euclidean(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Euclidean distance between activation columns, ``||A[:, k] - A[:, l]||``.

    Computed from the differences, not from the Gram matrix, so small
    distances keep their precision. The gradient at a zero distance (the
    diagonal, duplicated neurons) is 0.
    """
    if check:
        A = check_activations(A, stack=True)
    X = A.mT.contiguous()
    if X.dtype.itemsize < 4:  # float16/bfloat16: cdist has no CPU kernel for them
        X = X.float()
    D = torch.cdist(X, X, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return _zero_diagonal(0.5 * (D + D.mT)).to(A.dtype)


# -- pairwise forms: the value of given pairs only, O(m k) for k pairs -----------------------------
#
# ``pairwise(A, i, j)`` is ``dissimilarity(A)[i, j]`` for index tensors ``i, j`` of shape
# (..., k), without the (n, n) matrix. A dissimilarity takes the tree path of the regulariser
# (:func:`toponeuro.tree_deaths.tree_deaths`) when it has one: ``euclidean`` and yours are
# recomputed through it, with autograd, at the n - 1 tree edges; the correlation-based
# built-ins are recomputed there from the standardisation the matrix shared (with a hand-written
# backward), their pairwise forms serving callers who want given pairs. Each built-in carries its
# pairwise form as its ``pairwise`` attribute; to offer one for a dissimilarity of your own, set
# that attribute on your function (see :func:`get_pairwise`).


def _columns(X: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """X: (..., m, n), index: (..., k) -> (..., m, k), the columns ``X[..., :, index]``."""
    index = index.to(device=X.device, dtype=torch.long)
    return X.gather(-1, index.unsqueeze(-2).expand(*X.shape[:-1], index.shape[-1]))


def correlation_of_standardised_pairs(Z: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``rho`` of the pairs ``(i, j)`` from standardised columns, clamped to [-1, 1], 1 where ``i == j``.

    Z : (..., m, n) from :func:`standardised_columns`; i, j : (..., k). Returns (..., k):
    one dot product per pair.
    """
    rho = (_columns(Z, i) * _columns(Z, j)).sum(-2).clamp(-1.0, 1.0)
    return torch.where(i.to(Z.device) == j.to(Z.device), torch.ones_like(rho), rho)


def _checked_pairs(A, i, j, check: bool):
    if check:
        A = check_activations(A, stack=True)
    i, j = torch.as_tensor(i), torch.as_tensor(j)
    if i.shape != j.shape or i.shape[:-1] != A.shape[:-2]:
        raise ValueError(f"pair indices i, j must both have shape (..., k) with ... = {tuple(A.shape[:-2])}, "
                         f"got {tuple(i.shape)} and {tuple(j.shape)}")
    n = A.shape[-1]
    if i.numel() and (min(int(i.min()), int(j.min())) < 0 or max(int(i.max()), int(j.max())) >= n):
        raise ValueError(f"pair indices must lie in [0, {n}) (the neurons of A)")
    return A, i, j


def correlation_pairs(A: torch.Tensor, i, j, check: bool = True) -> torch.Tensor:
    """``correlation(A)[i, j]`` for the pairs ``(i, j)``, differentiably.

    A : (m, n) activations, batch first; i, j : (k,) neuron indices. Returns (k,).
    Computed in ``A``'s dtype, with autocast disabled inside.
    """
    A, i, j = _checked_pairs(A, i, j, check)
    with _autocast_off(A.device.type):
        return correlation_of_standardised_pairs(standardised_columns(A), i, j)


def abs_correlation_pairs(A: torch.Tensor, i, j, check: bool = True) -> torch.Tensor:
    """``abs_correlation(A)[i, j]`` for the pairs ``(i, j)``: (k,)."""
    return _abs_correlation_of(correlation_pairs(A, i, j, check=check))


def sqrt_one_minus_rho2_pairs(A: torch.Tensor, i, j, check: bool = True) -> torch.Tensor:
    """``sqrt_one_minus_rho2(A)[i, j]`` for the pairs ``(i, j)``: (k,)."""
    return _sqrt_one_minus_rho2_of(correlation_pairs(A, i, j, check=check))


def one_minus_rho_pairs(A: torch.Tensor, i, j, check: bool = True) -> torch.Tensor:
    """``one_minus_rho(A)[i, j]`` for the pairs ``(i, j)``: (k,)."""
    return _one_minus_rho_of(correlation_pairs(A, i, j, check=check))


def euclidean_pairs(A: torch.Tensor, i, j, check: bool = True) -> torch.Tensor:
    """``euclidean(A)[i, j]`` for the pairs ``(i, j)``: (k,), gradient 0 at distance 0."""
    A, i, j = _checked_pairs(A, i, j, check)
    X = A.float() if A.dtype.itemsize < 4 else A  # as euclidean(): 16-bit columns differenced in float32
    diff = _columns(X, i) - _columns(X, j)
    return _safe_sqrt((diff * diff).sum(-2)).to(A.dtype)


abs_correlation.pairwise = abs_correlation_pairs
sqrt_one_minus_rho2.pairwise = sqrt_one_minus_rho2_pairs
one_minus_rho.pairwise = one_minus_rho_pairs
euclidean.pairwise = euclidean_pairs

# the correlation-based built-ins as functions of rho (for the tree path, which shares one
# standardisation between its matrix and its pairs)
OF_CORRELATION: dict[Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] = {
    abs_correlation: _abs_correlation_of,
    sqrt_one_minus_rho2: _sqrt_one_minus_rho2_of,
    one_minus_rho: _one_minus_rho_of,
}


DISSIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {
    "abs_correlation": abs_correlation,
    "sqrt_one_minus_rho2": sqrt_one_minus_rho2,
    "one_minus_rho": one_minus_rho,
    "euclidean": euclidean,
}


def get(name_or_fn) -> Callable[..., torch.Tensor]:
    """Look a dissimilarity up by name (or pass a callable through)."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return DISSIMILARITIES[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown dissimilarity {name_or_fn!r}; choose one of {sorted(DISSIMILARITIES)}"
        ) from None


def get_pairwise(name_or_fn) -> Callable[..., torch.Tensor] | None:
    """The pairwise form of a dissimilarity (by name or function), or None if it has none.

    A pairwise form ``pairwise(A, i, j) -> (k,)`` gives ``dissimilarity(A)[i, j]``
    for index tensors ``i, j`` of shape (k,), differentiably with respect to ``A``
    (the built-ins' take a stack ``A: (B, m, n)`` with ``i, j: (B, k)`` too, and
    ``check=``). The built-ins carry theirs; a function of your own offers one by
    an attribute::

        def my_dissimilarity(A): ...          # (m, n) -> (n, n)
        def my_pairs(A, i, j): ...            # (m, n), (k,), (k,) -> (k,)
        my_dissimilarity.pairwise = my_pairs

    and then :class:`~toponeuro.TopologicalRegulariser` computes T1/T2 on the tree
    edges only (:func:`toponeuro.tree_deaths.tree_deaths`); without it, on the
    dense matrix.
    """
    return getattr(get(name_or_fn), "pairwise", None)
