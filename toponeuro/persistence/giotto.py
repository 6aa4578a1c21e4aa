"""giotto-ph backend: ``gph.ripser_parallel`` with H0 generators.

giotto-ph computes in float32: for a float64 matrix whose entries differ below
float32's resolution, its tree is minimal in float32 and may weigh a few
float64 ulps more than the exact MST (the deaths are still gathered from the
float64 matrix). Entries above float32's range are refused.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from gph import ripser_parallel

from .._validation import refuse_beyond_float32


def _root(parent: np.ndarray, v: int) -> int:
    while parent[v] != v:
        parent[v] = parent[parent[v]]
        v = parent[v]
    return v


def _complete_with_zero_edges(X: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Add the zero-weight edges giotto-ph leaves out.

    ripser reports no pair of zero persistence (born and dead at 0), so the
    merges of duplicated neurons are missing; Kruskal over the zero-weight
    pairs, in (i, j) order, completes the forest to a spanning tree. "Zero"
    as giotto-ph sees it: it computes in float32, where a float64 entry below
    about 7e-46 is 0 too.
    """
    n = X.shape[0]
    parent = np.arange(n)
    for i, j in edges:
        parent[_root(parent, i)] = _root(parent, j)
    extra = []
    for i, j in zip(*np.nonzero(np.triu(X.astype(np.float32) == 0, k=1))):
        ri, rj = _root(parent, i), _root(parent, j)
        if ri != rj:
            parent[ri] = rj
            extra.append((i, j))
            if len(edges) + len(extra) == n - 1:
                break
    return np.concatenate([edges, np.asarray(extra, dtype=np.int64).reshape(-1, 2)])


def death_edges(D: torch.Tensor, n_threads: int | None = None) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1, 2) death edges (on D's device)."""
    X = D.detach().cpu().numpy()
    refuse_beyond_float32(X, "giotto-ph")
    if n_threads is None:
        n_threads = min(os.cpu_count() or 1, 2)
    out = ripser_parallel(X, metric="precomputed", maxdim=0, return_generators=True, n_threads=n_threads)
    # gens[0]: finite H0 pairs as rows (vertex born, edge vertex, edge vertex)
    edges = np.asarray(out["gens"][0], dtype=np.int64).reshape(-1, 3)[:, 1:]
    if len(edges) < X.shape[0] - 1:
        edges = _complete_with_zero_edges(X, edges)
    return torch.from_numpy(edges).to(D.device)
