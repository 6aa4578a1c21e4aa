"""Input checks at the library boundary.

Every public function that takes activations or a dissimilarity matrix runs
its input through one of these, so that bad input fails early with a message
that names the problem and the fix, rather than surfacing later as a NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["check_activations", "check_dissimilarity"]

try:  # numba is optional: it makes the CPU scan of a matrix a single pass
    import numba
except Exception:  # pragma: no cover - exercised only where numba is missing
    numba = None

_TILE = 32


def _asymmetry_kernel(D):
    """max |D[i, j] - D[j, i]|, in tiles of the upper triangle paired with their
    mirror tiles (both fit the L1 cache, so the transposed read is cheap)."""
    n = D.shape[0]
    asym = 0.0
    for bi in range(0, n, _TILE):
        ei = min(bi + _TILE, n)
        for bj in range(bi, n, _TILE):
            ej = min(bj + _TILE, n)
            for i in range(bi, ei):
                for j in range(max(bj, i), ej):
                    asym = max(asym, abs(D[i, j] - D[j, i]))
    return asym


_asymmetry_compiled = numba.njit(cache=True, nogil=True)(_asymmetry_kernel) if numba is not None else None


def _max_asymmetry(D: torch.Tensor) -> torch.Tensor:
    """max |D - D.T| over the upper triangle, in row blocks: no n x n temporary."""
    n = D.shape[0]
    block = max(128, (1 << 26) // n)
    worst = D.new_zeros(())
    for i in range(0, n, block):
        j = min(i + block, n)
        worst = torch.maximum(worst, (D[i:j, i:] - D[i:, i:j].mT).abs().amax())
    return worst


def _matrix_summary(D: torch.Tensor) -> tuple[float, float, float, bool]:
    """(min, max, max |D - D.T|, all finite) of a square floating matrix, one host sync."""
    lo, hi = D.aminmax()  # NaN propagates; inf shows as an extreme
    if D.device.type == "cpu" and _asymmetry_compiled is not None and D.dtype in (torch.float32, torch.float64):
        asym = float(_asymmetry_compiled(D.contiguous().numpy()))
        lo, hi = lo.item(), hi.item()
    else:
        lo, hi, asym = torch.stack([lo, hi, _max_asymmetry(D)]).double().tolist()
    finite = all(math.isfinite(v) for v in (lo, hi, asym))
    return lo, hi, asym, finite


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
    lo, hi, asym, finite = _matrix_summary(D.detach())
    if not finite:
        _check_finite(D, name)  # locates the NaN or inf and raises
    if lo < 0:
        raise ValueError(
            f"{name} has a negative entry ({lo:.3g}); dissimilarities must be >= 0"
        )
    diag = D.detach().diagonal()
    if bool((diag != 0).any()):
        k = int((diag != 0).nonzero()[0])
        raise ValueError(
            f"{name} has a non-zero diagonal (D[{k}, {k}] = {diag[k].item():.3g}); every neuron is at "
            "dissimilarity 0 from itself: set the diagonal to 0 (D.fill_diagonal_(0))"
        )
    if symmetry_tol is None:
        symmetry_tol = 100 * torch.finfo(D.dtype).eps
    if asym > symmetry_tol * max(1.0, hi):
        raise ValueError(
            f"{name} is not symmetric (max |D - D.T| = {asym:.3g}); "
            "symmetrise it, e.g. D = (D + D.T) / 2"
        )
    return D
