"""Every MST case's result against the exact deaths of the same matrix (the CPU ``torch`` backend).

The sorted deaths of every minimum spanning tree agree, ties included, so an
exact backend's must equal them bit for bit.
"""

from __future__ import annotations

import math

import torch

from .. import persistence


def _deaths_against_reference(output: torch.Tensor, D: torch.Tensor, reference: torch.Tensor) -> dict:
    """How an MST call's result compares with the exact deaths of the same matrix.

    output : (n - 1, 2) edges or (n - 1,) deaths, on any device. D : (n, n) the
    matrix on the CPU. reference : (n - 1,) its exact deaths, ascending. The
    sorted deaths of any minimum spanning tree are the same, ties included, so
    an exact backend's must equal the reference bit for bit.
    """
    out = output.detach().cpu()
    deaths = D[out[:, 0], out[:, 1]] if out.ndim == 2 else out.to(D.dtype)
    deaths = torch.sort(deaths).values
    if deaths.shape != reference.shape:
        return {"deaths_equal_reference": False, "max_abs_deaths_error": math.inf}
    return {"deaths_equal_reference": bool(torch.equal(deaths, reference)),
            "max_abs_deaths_error": float((deaths.double() - reference.double()).abs().max())}


def _exact_deaths(D0: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(D0 on the CPU, its exact deaths by the CPU "torch" backend), computed once into ``cache``."""
    if not cache:
        cache["D"] = D0.cpu()
        cache["deaths"] = persistence.deaths(cache["D"], backend="torch", check=False)
    return cache["D"], cache["deaths"]
