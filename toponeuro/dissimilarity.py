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
    "get",
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


def _correlation(A: torch.Tensor) -> torch.Tensor:
    Ad = A.detach()
    constant = Ad.amax(-2) == Ad.amin(-2)  # exact test: a dead ReLU is exactly constant
    # masked unconditionally: testing for a constant column first would cost a host sync per
    # call on a GPU (and rule out CUDA graph capture) to save one elementwise pass over A
    Ac = (A - A.mean(-2, keepdim=True)).masked_fill(constant[..., None, :], 0.0)
    # Scale each column by its largest |entry| first so that the sum of squares
    # neither underflows nor overflows (activations of 1e-25 or 1e20 in fp32).
    # Correlation is scale invariant, so a detached scale changes neither the
    # value nor the gradient.
    scale = Ac.detach().abs().amax(-2, keepdim=True)
    Ac = Ac / torch.where(scale > 0, scale, torch.ones_like(scale))
    ss = (Ac * Ac).sum(-2, keepdim=True)
    # constant columns are exactly zero after masking; divide them by 1 so that
    # neither the value nor the gradient of the norm is 0/0.
    norm = torch.sqrt(torch.where(constant[..., None, :], torch.ones_like(ss), ss))
    Z = Ac / norm
    # a stack: one product per member, as batched matmul may round differently (float64 on CPU
    # at some n does), and each member must equal its own call bit for bit
    C = Z.mT @ Z if Z.ndim == 2 or len(Z) == 0 else torch.stack([z.mT @ z for z in Z])
    C = 0.5 * (C + C.mT)  # matmul is not bitwise symmetric; the MST wants it exactly
    C = C.clamp(-1.0, 1.0)
    return torch.diagonal_scatter(C, torch.ones_like(C.diagonal(dim1=-2, dim2=-1)), dim1=-2, dim2=-1)


@_members_on_cpu
def abs_correlation(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``d_kl = 1 - |rho_kl|``, the paper's (and our default) dissimilarity.

    A : (m, n) activations, batch first (or (B, m, n)). Returns (n, n) (or (B, n, n)), in [0, 1].
    """
    # The correlation's diagonal is exactly 1, so the diagonal here is exactly 0.
    return 1.0 - correlation(A, check=check).abs()


@_members_on_cpu
def sqrt_one_minus_rho2(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``d_kl = sqrt(1 - rho_kl^2)``, in [0, 1].

    The derivative is infinite at ``|rho| = 1`` (duplicated neurons); there
    the gradient is taken as 0.
    """
    C = correlation(A, check=check)
    return _safe_sqrt(1.0 - C * C)


@_members_on_cpu
def one_minus_rho(A: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``d_kl = 1 - rho_kl``, in [0, 2]: anti-correlated neurons are far apart."""
    return 1.0 - correlation(A, check=check)


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
