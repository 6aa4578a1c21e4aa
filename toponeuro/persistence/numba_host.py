"""numba backend: the compiled Prim of the torch backend, run on the host for any device.

For CUDA matrices of a few thousand neurons, one copy to the host and an
O(n^2) compiled loop on one CPU core cost less than Boruvka's rounds of
kernel launches and synchronisations, and scale across processes that share
one GPU (many small runs at once). The copy makes it the wrong choice for
large ``n``; the ``"torch"`` backend never leaves the device.
"""

from __future__ import annotations

import torch

from .torch_mst import prim_edges


def death_edges(D: torch.Tensor) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1, 2) death edges, on D's device."""
    return prim_edges(D.detach().cpu()).to(D.device)
