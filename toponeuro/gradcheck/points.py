"""Generated points to check at: seeded activations (optionally tied) and a tiny float64 ReLU MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


def random_activations(m: int = 12, n: int = 8, seed: int = 0, tie: bool = False) -> torch.Tensor:
    """Generic float64 activations: (m, n), standard normal, seeded.

    With probability 1 the MST is unique, no ``rho`` is 0 or +-1 and no
    neuron is constant. ``tie=True`` duplicates neuron 0 into neuron 1, which
    makes the MST non-unique (for every dissimilarity, ``d(0, l) = d(1, l)``
    and ``d(0, 1) = 0``).
    """
    if m < 2 or n < 2 or (tie and n < 3):
        raise ValueError(f"need m >= 2 samples and n >= 2 neurons (n >= 3 with tie), got m={m}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if tie:
        A[:, 1] = A[:, 0]
    return A


def tiny_mlp(n: int = 8, in_features: int = 4, n_out: int = 2, seed: int = 0, x: torch.Tensor | None = None
             ) -> nn.Sequential:
    """A float64 ReLU MLP with ``n`` recorded neurons: two hidden layers and ``n_out`` logits.

    The ``n - n_out`` hidden neurons are split between the two hidden layers
    (the first gets the extra one). Given a batch ``x: (m, in_features)``,
    each hidden bias is set to minus the mean of its unit's pre-activation on
    ``x``, so that every ReLU is active on part of the batch (no dead neuron,
    which would be a constant one) and, generically, no input sits at the kink.
    """
    hidden = n - n_out
    if hidden < 2:
        raise ValueError(f"the MLP needs n >= {n_out + 2} neurons ({n_out} logits, >= 1 per hidden layer), got {n}")
    h1, h2 = (hidden + 1) // 2, hidden // 2
    gen = torch.Generator().manual_seed(seed)

    def linear(fan_in: int, fan_out: int) -> nn.Linear:
        lin = nn.Linear(fan_in, fan_out).double()
        bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default uniform range, from our generator
        with torch.no_grad():
            lin.weight.copy_((2 * torch.rand(fan_out, fan_in, generator=gen, dtype=torch.float64) - 1) * bound)
            lin.bias.copy_((2 * torch.rand(fan_out, generator=gen, dtype=torch.float64) - 1) * bound)
        return lin

    model = nn.Sequential(linear(in_features, h1), nn.ReLU(), linear(h1, h2), nn.ReLU(), linear(h2, n_out))
    if x is not None:
        h = torch.as_tensor(x, dtype=torch.float64)
        with torch.no_grad():
            for module in model:
                if isinstance(module, nn.Linear) and module is not model[-1]:
                    module.bias.sub_((h @ module.weight.mT + module.bias).mean(0))
                h = module(h)
    return model
