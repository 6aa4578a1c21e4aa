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
from .dissimilarity import _autocast_off, _full_precision, _safe_sqrt, standardised_columns
from .persistence import numba_host
from .tree_deaths import symmetric_gram

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
    """MinCorr of (m, n) activations or of a stack (B, m, n) -> () or (B,), unchecked."""
    return _MeanAbsCorrelation.apply(standardised_columns(A))


class _MeanAbsCorrelation(torch.autograd.Function):
    """Mean ``|rho|`` over the used off-diagonal pairs, from standardised columns ``Z`` (..., m, n).

    The value of ``|correlation|`` masked and averaged, at two products in all: the forward's
    ``Z^T Z`` (its upper triangle, mirrored) and the backward's ``Z G``, where autograd would
    also build and differentiate five (n, n) intermediates. ``G`` (the sign of rho on the used
    pairs that the clamp to [-1, 1] lets through, 0 elsewhere) overwrites the product, kept from
    the forward: one (n, n) buffer per call.
    """

    @staticmethod
    def forward(ctx, Z):
        G = symmetric_gram(Z, None)  # the correlation matrix, exactly symmetric
        if numba_host.runs_dense_baseline(G):
            total, count = numba_host.mean_abs_sign_(G)
            total, count = total.to(Z.dtype), count.to(Z.device)
        else:
            G.diagonal(dim1=-2, dim2=-1).zero_()
            inside = G.abs() <= 1.0  # where the clamp passes the gradient, as torch.clamp's does
            G.clamp_(-1.0, 1.0)
            count = torch.count_nonzero(G, dim=(-2, -1))  # constant neurons, exactly uncorrelated pairs: out
            total = G.abs().sum((-2, -1))
            G.sign_().mul_(inside)
        denominator = count.clamp(min=1).to(Z.dtype)
        ctx.save_for_backward(Z, G, denominator)
        return total / denominator

    @staticmethod
    def backward(ctx, grad):
        Z, G, denominator = ctx.saved_tensors
        # value = sum |S| / count with S = Z^T Z and G symmetric: dZ = 2 Z G / count; G and the
        # count are locally constant, so this backward is itself differentiable (second order holds)
        return (Z @ G) * (2.0 * grad / denominator)[..., None, None]


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
    """DeCov of (m, n) activations or of a stack (B, m, n) -> () or (B,), unchecked."""
    return _HalfSquaredOffDiagonalCovariance.apply(A - A.mean(-2, keepdim=True))


class _HalfSquaredOffDiagonalCovariance(torch.autograd.Function):
    """``0.5 * sum_{k != l} C_kl^2`` with ``C = Ac^T Ac / m``, from centred activations ``Ac`` (..., m, n).

    Two products in all (the forward's ``Ac^T Ac``, its upper triangle mirrored, and the
    backward's ``Ac O``, ``O`` the off-diagonal part of ``C``, kept from the forward in the
    product's buffer), where autograd would differentiate the product, the mask and the
    square as three more (n, n) passes each way.
    """

    @staticmethod
    def forward(ctx, Ac):
        O = symmetric_gram(Ac, None)  # Ac^T Ac, exactly symmetric
        m = Ac.shape[-2]
        # the off-diagonal entries summed directly: ||C||^2 - ||diag C||^2 cancels away the value's
        # precision when one neuron's variance dwarfs the covariances
        if numba_host.runs_dense_baseline(O):
            squares = numba_host.off_diagonal_covariance_(O, m).to(Ac.dtype)
        else:
            O.div_(m)
            O.diagonal(dim1=-2, dim2=-1).zero_()
            squares = (O * O).sum((-2, -1))
        ctx.save_for_backward(Ac, O)
        return 0.5 * squares

    @staticmethod
    @torch.autograd.function.once_differentiable  # O depends on Ac: a second derivative would miss it
    def backward(ctx, grad):
        Ac, O = ctx.saved_tensors
        return (Ac @ O) * (2.0 * grad / Ac.shape[-2])[..., None, None]


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
