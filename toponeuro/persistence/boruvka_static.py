"""Boruvka's MST with every shape fixed by ``n``: no host sync, no data-dependent size.

The dynamic Boruvka (:mod:`.boruvka`) sizes each round by the number of
components left, which costs a host synchronisation per round. Here a round
works on its worst-case number of components instead: every component of a
round merges with at least one other, so round ``r`` has at most
``n // 2**r`` of them, and that bound is the size of its buffers. Slots
beyond the actual count are *padding*: their rows of ``R`` are ``inf``, they
pick nothing and root themselves. Pointer jumping runs ``ceil(log2(c))``
steps, enough for any chain. Once the bound is at most :data:`DENSE_MAX`
components, one dense step finishes the tree (:func:`_dense_finish`).

With no sync and no data-dependent shape, the whole computation can be
captured once in a CUDA graph and replayed (:mod:`.cuda_graph`); on the CPU,
and under tests, it runs eagerly. Running it on the ``meta`` device checks
that property: an ``.item()``, a ``nonzero`` or a boolean mask would fail.

The tie-breaking is the dynamic Boruvka's, so the rounds pick the same
edges; the dense step picks, for each pair of components it joins, the
first lightest vertex pair. Where the MST is not unique the tree may differ
from the other kernels' (the deaths never do).
"""

from __future__ import annotations

import math

import torch

from .boruvka import _BLOCK_ENTRIES, _PACKED_MAX_N, _order_keys

__all__ = ["boruvka_edges_static", "static_bounds", "DENSE_MAX"]

DENSE_MAX = 128  # the dense step holds (c, c, c) int64 keys: 16 MB at c = 128
_SMALL_SEARCH = 1 << 22  # entries: a search this small runs in one block whatever n
_NO_PICK = 0x7FFFFFFF << 32  # a packed key above every finite weight's, with zero label fields


def static_bounds(n: int) -> list[int]:
    """The component bound of each Boruvka round before the dense step.

    ``[n, n // 2, n // 4, ...]`` while the bound is above :data:`DENSE_MAX`;
    the dense step then takes the last bound (the first at or below it).
    """
    bounds = [n]
    while bounds[-1] > DENSE_MAX:
        bounds.append(bounds[-1] // 2)
    return bounds


def boruvka_edges_static(X: torch.Tensor) -> torch.Tensor:
    """Exact MST of the complete graph weighted by ``X``, with shapes fixed by ``n``.

    Parameters
    ----------
    X : (n, n) float32 or float64 tensor, 2 <= n <= 65536
        Symmetric, non-negative and finite. **Overwritten**: its diagonal is
        set to ``inf`` (pass a copy). float64 orders its weights by rank
        (``torch.unique``), which syncs on CUDA: only float32 can be captured.

    Returns
    -------
    (n - 1, 2) LongTensor of vertex pairs on ``X``'s device (unordered, in no
    particular order). For a matrix that is not valid the edges are
    unspecified, but every index is in range and nothing hangs.
    """
    n = X.shape[0]
    if X.dim() != 2 or X.shape[1] != n or not 2 <= n <= _PACKED_MAX_N:
        raise ValueError(f"boruvka_edges_static needs a square matrix with 2 <= n <= {_PACKED_MAX_N}, "
                         f"got shape {tuple(X.shape)}")
    if X.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"boruvka_edges_static needs float32 or float64, got {X.dtype}; convert D first")
    dev = X.device
    verts = torch.arange(n, device=dev)
    inf = torch.full((), float("inf"), dtype=X.dtype, device=dev)
    X.diagonal().fill_(float("inf"))  # a vertex is not its own neighbour
    bounds = static_bounds(n)
    comp = verts
    R = X  # R[b, i]: lightest edge between component b and vertex i (round one: b = vertex)
    reps, others, keeps = [], [], []
    for r, c in enumerate(bounds[:-1]):
        src = verts[:c]
        w, target = R.min(dim=0)  # each vertex's lightest edge to another component (first label on ties)
        if r == 0:
            rep, tgt, active = verts, target, None  # every vertex is a component that picks
        else:
            best = torch.full((c,), _NO_PICK, dtype=torch.int64, device=dev)
            key = torch.add(torch.add(verts, target, alpha=1 << 16), _order_keys(w), alpha=1 << 32)
            best.scatter_reduce_(0, comp, key, reduce="amin")
            # a finite pick: padding slots, and a tree already whole, pick nothing
            active = best < (0x7F800000 << 32)
            tgt = torch.where(active, (best >> 16) & 0xFFFF, src)  # no pick: point at itself
            rep = best & 0xFFFF
        mutual = tgt[tgt] == src
        is_root = mutual & (src <= tgt)  # a mutual pair's smaller label; also every slot that picks nothing
        keep = ~mutual | is_root
        if active is None:
            others.append(tgt)
        else:
            keep &= active
            others.append(_first_match(X, rep, w[rep], comp, tgt))
        reps.append(rep)
        keeps.append(keep)
        parent = torch.where(is_root, src, tgt)
        for _ in range(math.ceil(math.log2(c))):  # enough for a chain through every slot
            parent = parent[parent]
        c_next = bounds[r + 1]
        # roots are numbered in slot order; padding comes after the real components, so a
        # number beyond the next bound is padding, folded into the last slot (its rows are inf).
        # (Below 0 only for bad input, a cycle without a root: clamped to stay in range.)
        labels = (torch.cumsum(is_root, 0)[parent] - 1).clamp_(0, c_next - 1)
        contracted = torch.full((c_next, n), float("inf"), dtype=X.dtype, device=dev)
        R = contracted.scatter_reduce_(0, labels[:, None].expand_as(R), R, "amin")
        comp = labels[comp]
        R.index_put_((comp, verts), inf)  # a vertex's own component is not outgoing
    e, keep = _dense_finish(X, R, comp, bounds[-1], inf)
    reps.append(e[:, 0])
    others.append(e[:, 1])
    keeps.append(keep)
    edges = torch.stack([torch.cat(reps), torch.cat(others)], dim=1)
    # a valid matrix keeps exactly n - 1 picks: move them to the front, no sync for the count
    kept = torch.argsort(torch.cat(keeps).view(torch.uint8), descending=True, stable=True)[: n - 1]
    return edges[kept]


def _dense_finish(X: torch.Tensor, R: torch.Tensor, comp: torch.Tensor, c: int, inf: torch.Tensor):
    """The MST between the ``c`` (at most) components left, in one dense step.

    X : (n, n) the matrix, diagonal ``inf``.
    R : (c, n) lightest edge between each component and each vertex (``inf``
        inside the component and in padding rows); ``R is X`` when no round ran.
    comp : (n,) component of each vertex.
    inf : () ``inf`` in X's dtype, on its device.

    Returns ``(edges, keep)``: (c - 1, 2) vertex pairs and which of them are
    tree edges. Component pair ``(a, b)`` gets the key ``(C[a, b], min, max)``
    packed in an int64, with ``C`` the lightest edge between them; the keys
    are distinct, so ``(a, b)`` is in the (unique) MST of the components iff
    its key equals the minimax key over all paths from ``a`` to ``b``. The
    minimax keys come from ``ceil(log2(c - 1))`` squarings in the
    (min, max) semiring. Padding components have only ``inf`` edges, heavier
    than every finite one: they never shorten a path between real ones.
    """
    dev = X.device
    if R is X:
        C = X
    else:
        C = torch.full((c, c), float("inf"), dtype=X.dtype, device=dev)
        C.scatter_reduce_(1, comp[None, :].expand_as(R), R, "amin")
    ar = torch.arange(c, device=dev)
    pair = torch.add(torch.maximum(ar[:, None], ar[None, :]), torch.minimum(ar[:, None], ar[None, :]), alpha=1 << 16)
    K = torch.add(pair, _order_keys(C.reshape(-1)).view(c, c), alpha=1 << 32)
    M = K.clone()
    M.diagonal().zero_()  # a path may stay put
    for _ in range(math.ceil(math.log2(max(c - 1, 1)))):
        M = torch.maximum(M[:, :, None], M[None, :, :]).amin(dim=1)
    tree = (K == M) & (ar[:, None] < ar[None, :]) & (C < inf)
    # at most c - 1 pairs are tree edges: move them to the front, no sync for the count
    first = torch.argsort(tree.view(-1).view(torch.uint8), descending=True, stable=True)[: c - 1]
    keep = tree.view(-1)[first]
    a, b = first // c, first % c
    weight = C.reshape(-1)[first]
    if R is X:
        return torch.stack([a, b], dim=1), keep
    # the first vertex v of b that a reaches at that weight, then the first u of a that reaches v
    v = _first_match(R, a, weight, comp, b)
    return torch.stack([_first_match(X, v, weight, comp, a), v], dim=1), keep


def _first_match(M: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, comp: torch.Tensor,
                 label: torch.Tensor) -> torch.Tensor:
    """For each ``k``, the first column ``j`` with ``M[rows[k], j] == weight[k]`` and
    ``comp[j] == label[k]`` (0 if there is none, which a valid matrix never has).

    M : (r, n); rows, weight, label : (k,); comp : (n,). Reads the rows
    ``M[rows]`` in blocks of at most ``n / 4`` rows (and ``_BLOCK_ENTRIES``
    entries), so the search stays within a quarter of ``D`` besides.
    """
    n = M.shape[1]
    block = max(1, min((n + 3) // 4, _BLOCK_ENTRIES // n))
    if rows.numel() * n <= _SMALL_SEARCH:
        block = max(1, rows.numel())  # a few MB: one block, fewer kernels
    found = []
    for s in range(0, max(rows.numel(), 1), block):  # one (empty) block when there are no rows
        hit = (M[rows[s:s + block]] == weight[s:s + block, None]) & (comp == label[s:s + block, None])
        found.append(hit.view(torch.uint8).argmax(dim=1))
        del hit  # before the next block's exists
    return found[0] if len(found) == 1 else torch.cat(found)
