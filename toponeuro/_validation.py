"""Input checks at the library boundary.

Every public function that takes activations or a dissimilarity matrix runs
its input through one of these, so that bad input fails early with a message
that names the problem and the fix, rather than surfacing later as a NaN.
"""

from __future__ import annotations

import torch

__all__ = ["check_activations", "check_dissimilarity"]


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        t = torch.as_tensor(x)
    except Exception as err:  # pragma: no cover - message path
        raise ValueError(f"{name} must be a tensor or array-like, got {type(x).__name__}") from err
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    # One reduction instead of an n x n boolean buffer: a sum is finite iff
    # every entry is (inf - inf gives NaN); the slower elementwise check only
    # runs to locate the culprit when the sum says there is one.
    total = t.detach().sum(dtype=torch.float64)
    if not torch.isfinite(total):
        bad = (~torch.isfinite(t.detach())).nonzero()
        if bad.numel():
            where = tuple(bad[0].tolist())
            raise ValueError(
                f"{name} contains NaN or inf (first at index {where}); "
                "check the inputs and the model for overflow before computing the regulariser"
            )
        raise ValueError(
            f"{name} is too large to sum in float64; rescale it before computing the regulariser"
        )


def check_activations(A, name: str = "activations") -> torch.Tensor:
    """Validate an activation matrix.

    Parameters
    ----------
    A : (m, n) tensor
        Activations, batch first: ``m`` samples of ``n`` neurons.

    Returns
    -------
    torch.Tensor
        ``A`` itself (as a floating tensor), unchanged.
    """
    A = _as_tensor(A, name)
    if A.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-d (m samples, n neurons) matrix, batch first; got shape "
            f"{tuple(A.shape)}. Flatten the neuron dimensions with A.flatten(1)."
        )
    if not A.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {A.dtype}")
    m, n = A.shape
    if m < 2:
        raise ValueError(
            f"{name} has {m} sample(s); correlations need at least 2 samples (use a larger batch)"
        )
    if n < 2:
        raise ValueError(f"{name} has {n} neuron(s); persistence needs at least 2 neurons")
    _check_finite(A, name)
    return A


def check_dissimilarity(D, name: str = "dissimilarity matrix", symmetry_tol: float | None = None) -> torch.Tensor:
    """Validate a dissimilarity matrix: square, n >= 2, finite, symmetric, non-negative, zero diagonal.

    Parameters
    ----------
    D : (n, n) tensor
    symmetry_tol : float, optional
        Allowed ``max |D - D.T|`` relative to ``max(1, max |D|)``; by default
        100 machine epsilons of ``D``'s dtype.
    """
    D = _as_tensor(D, name)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"{name} must be square (n, n); got shape {tuple(D.shape)}")
    if not D.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {D.dtype}")
    n = D.shape[0]
    if n < 2:
        raise ValueError(f"{name} is {n} x {n}; persistence needs at least 2 points")
    _check_finite(D, name)
    Dd = D.detach()
    lo = Dd.min()
    if lo < 0:
        raise ValueError(
            f"{name} has a negative entry ({lo.item():.3g}); dissimilarities must be >= 0"
        )
    diag = Dd.diagonal()
    if bool((diag != 0).any()):
        k = int((diag != 0).nonzero()[0])
        raise ValueError(
            f"{name} has a non-zero diagonal (D[{k}, {k}] = {diag[k].item():.3g}); every neuron is at "
            "dissimilarity 0 from itself: set the diagonal to 0 (D.fill_diagonal_(0))"
        )
    if symmetry_tol is None:
        symmetry_tol = 100 * torch.finfo(D.dtype).eps
    scale = max(1.0, Dd.max().item())
    asym = (Dd - Dd.mT).abs().max().item()
    if asym > symmetry_tol * scale:
        raise ValueError(
            f"{name} is not symmetric (max |D - D.T| = {asym:.3g}); "
            "symmetrise it, e.g. D = (D + D.T) / 2"
        )
    return D
