"""Boruvka's minimum spanning tree in torch, for CUDA tensors (and CPU without numba).

Every round, each component picks its lightest outgoing edge; under a strict
total order on the candidate edges the picks form a forest, which is
contracted. Components at least halve each round, so there are at most
``log2(n)`` rounds, each a handful of whole-matrix kernels and two or three
host synchronisations (sizes of the next round); nothing of size ``n x n``
leaves the device and no loop runs once per vertex.

Layout: ``R[b, i]`` is the lightest edge between component ``b`` and vertex
``i`` (rows are components, so contraction moves contiguous rows). The first
round reads ``D`` itself in column blocks (the diagonal masked in each
block), and the first contraction reads ``D`` again: the only large buffer
is ``R``, of ``n / 2 x n`` entries at most.

Tie-breaking: vertex ``i`` takes the lightest edge into another component
with the smallest component label (``min`` returns the first index);
component ``a`` takes, over its vertices, the smallest ``(weight, target
label)``. For a fixed ``a``, ordering targets ``b`` by label is the order of
the pairs ``(min(a, b), max(a, b))``, so every component ranks the component
pairs by one strict total order ``(weight, min label, max label)``: the picks
contain no cycle but the mutual ones (``a -> b`` and ``b -> a``), kept once.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["boruvka_edges"]

_BLOCK_ENTRIES = 1 << 26  # round-one column blocks: 64M entries (256 MB in fp32)


def _order_keys(w: torch.Tensor) -> torch.Tensor:
    """int64 keys, increasing with the (non-negative) weights ``w``, below 2**31."""
    if w.dtype == torch.float32:
        # non-negative floats order like their bit patterns; & drops -0.0's sign
        return w.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    # float64 bits need all 64: use ranks instead
    return torch.unique(w, return_inverse=True)[1]


def _lightest_other_vertex(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each vertex, its lightest edge to another vertex: (weight, vertex), by column blocks."""
    n = X.shape[0]
    w = torch.empty(n, dtype=X.dtype, device=X.device)
    j = torch.empty(n, dtype=torch.long, device=X.device)
    block = max(1, min(n, _BLOCK_ENTRIES // n))
    for s in range(0, n, block):
        e = min(n, s + block)
        sub = X[:, s:e].clone()
        k = torch.arange(e - s, device=X.device)
        sub[k + s, k] = float("inf")
        w[s:e], j[s:e] = sub.min(dim=0)
    return w, j


def _contract(src: torch.Tensor, labels: torch.Tensor, c_new: int) -> torch.Tensor:
    """(c, n) -> (c_new, n): row-wise minimum over the rows that share a new label."""
    out = torch.full((c_new, src.shape[1]), float("inf"), dtype=src.dtype, device=src.device)
    with warnings.catch_warnings():  # "index_reduce() is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return out.index_reduce_(0, labels, src, "amin", include_self=True)


def boruvka_edges(D: torch.Tensor) -> torch.Tensor:
    """Exact MST of the complete graph weighted by ``D``, on ``D``'s device.

    D : (n, n) symmetric, non-negative. Returns (n - 1, 2) LongTensor of vertex
    pairs (unordered, in no particular order) on ``D``'s device.
    """
    n = D.shape[0]
    dev = D.device
    X = D.detach()
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    if n < 2:
        return torch.empty((0, 2), dtype=torch.long, device=dev)
    verts = torch.arange(n, device=dev)
    w, b = _lightest_other_vertex(X)  # round one: every vertex is a component
    comp = verts
    c = n
    R = None
    picked = []
    while True:
        src = torch.arange(c, device=dev)
        key = (_order_keys(w) << 32) | b
        if R is None:
            best, rep = key, verts
        else:
            best = torch.full((c,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
            best.scatter_reduce_(0, comp, key, reduce="amin")
            rep = torch.full((c,), n, dtype=torch.long, device=dev)
            rep.scatter_reduce_(0, comp, torch.where(key == best[comp], verts, n), reduce="amin")
        target = best & 0xFFFFFFFF
        mutual = target[target] == src
        keep = ~(mutual & (src > target))
        kept = keep.nonzero().squeeze(1)  # sync: the number of new edges
        a_rep, a_target = rep[kept], target[kept]
        if R is None:
            other = a_target  # components are vertices
        else:
            other = _endpoint_in(X, comp, c, a_rep, a_target, w[a_rep])
        picked.append(torch.stack([a_rep, other], dim=1))
        # merge: point each component at its target; a mutual pair's smaller label is its root
        parent = torch.where(mutual & (src < target), src, target)
        for _ in range(max(1, math.ceil(math.log2(c)))):
            parent = parent[parent]
        is_root = parent == src
        new_label = torch.cumsum(is_root, 0) - 1
        c_new = c - kept.numel()
        if c_new == 1:
            break
        labels = new_label[parent]  # old component -> new component
        R = _contract(X if R is None else R, labels if R is not None else labels[comp], c_new)
        comp = labels[comp]
        c = c_new
        R[comp, verts] = float("inf")  # a vertex's own component is not outgoing
        w, b = R.min(dim=0)
    return torch.cat(picked)


def _endpoint_in(X, comp, c, rep, target, weight):
    """For each pick, the first vertex ``j`` of component ``target`` with ``X[rep, j] == weight``.

    Searches only the vertices of the target components (sorted by component),
    not whole rows.
    """
    dev = X.device
    order = torch.argsort(comp, stable=True)
    counts = torch.bincount(comp, minlength=c)
    starts = torch.cumsum(counts, 0) - counts
    lens = counts[target]
    total = int(lens.sum())  # sync: the number of candidates
    seg = torch.repeat_interleave(torch.arange(rep.numel(), device=dev), lens, output_size=total)
    pos = torch.arange(total, device=dev) - (torch.cumsum(lens, 0) - lens)[seg]
    cand = order[starts[target][seg] + pos]
    hit = X[rep[seg], cand] == weight[seg]
    n = X.shape[0]
    out = torch.full((rep.numel(),), n, dtype=torch.long, device=dev)
    return out.scatter_reduce_(0, seg, torch.where(hit, cand, n), reduce="amin")
