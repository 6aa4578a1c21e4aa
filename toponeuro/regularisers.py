"""Regulariser formulas: pure functions on tensors.

Topological (on the ``n - 1`` finite deaths of the 0-dimensional diagram):
:func:`t1`, :func:`t2`. Baselines: :func:`min_corr` and :func:`decov` (on
activations), :func:`l1` and :func:`l2` (on a model's weights). Dropout, the
remaining baseline of the paper, is a model variant (``models.build("mlp-dropout")``).

The total loss is ``task_loss + lam * R``.
"""

from __future__ import annotations

import torch

from ._validation import capturing, check_activations
from .dissimilarity import _autocast_off, _full_precision, _safe_sqrt, correlation

__all__ = ["t1", "t2", "min_corr", "decov", "l1", "l2", "FORMULAS_ON_DEATHS", "FORMULAS_ON_ACTIVATIONS"]


def _check_deaths(deaths: torch.Tensor) -> torch.Tensor:
    if not isinstance(deaths, torch.Tensor) or deaths.ndim != 1:
        raise ValueError("deaths must be a 1-d tensor of the n - 1 finite death times")
    if deaths.numel() < 1:
        raise ValueError("deaths is empty; persistence of at least 2 neurons gives at least one death")
    if capturing(deaths):
        return deaths  # inside a CUDA graph capture the check's host sync is not allowed: skipped
    if not torch.isfinite(deaths.detach()).all():
        raise ValueError("deaths contain NaN or inf; pass the finite deaths only")
    return deaths


def t1(deaths: torch.Tensor) -> torch.Tensor:
    """T1 = sum_i (1 - D_i).

    deaths : (n - 1,) finite deaths. With ``d = 1 - |rho|`` this is the sum of
    ``|rho|`` over the MST edges: minimising it pushes the most correlated
    pairs apart.
    """
    return _t1(_check_deaths(deaths))


def _t1(deaths: torch.Tensor) -> torch.Tensor:
    """T1 over the last axis of (..., n - 1) deaths, unchecked (the batched engine's stacks)."""
    return (1.0 - deaths).sum(-1)


def t2(deaths: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """T2 = alpha * std(D) - (1 - alpha) * mean(D), population std.

    deaths : (n - 1,) finite deaths. At ``std = 0`` (all deaths equal) the
    standard deviation is not differentiable; its gradient is taken as 0.
    """
    deaths = _check_deaths(deaths)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return _t2(deaths, alpha)


def _t2(deaths: torch.Tensor, alpha: float) -> torch.Tensor:
    """T2 over the last axis of (..., n - 1) deaths, unchecked (the batched engine's stacks)."""
    mean = deaths.mean(-1, keepdim=True)
    var = ((deaths - mean) ** 2).mean(-1)
    return alpha * _safe_sqrt(var) - (1.0 - alpha) * mean.squeeze(-1)


def min_corr(A: torch.Tensor) -> torch.Tensor:
    """MinCorr: mean of ``|rho_kl|`` over off-diagonal pairs with non-zero rho.

    A : (m, n) activations, batch first. Pairs that involve a constant neuron
    (``rho`` defined as 0) are left out of the mean; 0 if no pair is left.
    Float16 and bfloat16 activations are computed, and returned, in float32,
    and autocast is disabled inside (its 16-bit matrix product would cost the
    correlations their precision).
    """
    A = _full_precision(check_activations(A))
    with _autocast_off(A.device.type):  # autocast would recast the correlation's matmul to 16 bits
        return _min_corr(A)


def _min_corr(A: torch.Tensor) -> torch.Tensor:
    C = correlation(A, check=False).abs()
    offdiag = ~torch.eye(C.shape[0], dtype=torch.bool, device=C.device)
    used = offdiag & (C.detach() != 0)
    count = used.sum()
    if count == 0:
        return C.sum() * 0.0
    return torch.where(used, C, torch.zeros_like(C)).sum() / count


def decov(A: torch.Tensor) -> torch.Tensor:
    """DeCov (Cogswell et al., 2016): ``0.5 * (||C||_F^2 - ||diag C||^2)``.

    A : (m, n) activations, batch first; ``C = Ac^T Ac / m`` is the batch
    covariance of the centred activations ``Ac``. Float16 and bfloat16
    activations are computed, and returned, in float32: the sums of squared
    covariances overflow float16 for activations of a few tens; for the same
    reason autocast is disabled inside (it would recast the product to float16).
    """
    A = _full_precision(check_activations(A))
    with _autocast_off(A.device.type):  # autocast would recast the covariance's matmul to float16
        return _decov(A)


def _decov(A: torch.Tensor) -> torch.Tensor:
    Ac = A - A.mean(0, keepdim=True)
    C = Ac.mT @ Ac / A.shape[0]
    # the off-diagonal entries summed directly: ||C||^2 - ||diag C||^2 cancels away the value's
    # precision when one neuron's variance dwarfs the covariances
    off = C.masked_fill(torch.eye(C.shape[0], dtype=torch.bool, device=C.device), 0.0)
    return 0.5 * (off * off).sum()


def _trainable_weights(model: torch.nn.Module, include_bias: bool):
    params = [p for p in model.parameters() if p.requires_grad and (include_bias or p.ndim > 1)]
    if not params:
        raise ValueError("model has no trainable weights to regularise")
    return params


def l1(model: torch.nn.Module, include_bias: bool = False) -> torch.Tensor:
    """Sum of ``|w|`` over the model's trainable weights (matrices and kernels;
    biases too with ``include_bias=True``)."""
    return sum(p.abs().sum() for p in _trainable_weights(model, include_bias))


def l2(model: torch.nn.Module, include_bias: bool = False) -> torch.Tensor:
    """Sum of ``w^2`` over the model's trainable weights (no factor 1/2)."""
    return sum((p * p).sum() for p in _trainable_weights(model, include_bias))


FORMULAS_ON_DEATHS = {"t1": t1, "t2": t2}
FORMULAS_ON_ACTIVATIONS = {"min_corr": min_corr, "decov": decov}
