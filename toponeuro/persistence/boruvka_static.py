"""Boruvka's MST with every shape fixed by ``n``: no host sync, no data-dependent size.

The dynamic Boruvka (:mod:`.boruvka`) sizes each round by the number of
components left, which costs a host synchronisation per round. Here a round
works on its worst-case number of components instead: every component of a
round merges with at least one other, so round ``r`` has at most
``n // 2**r`` of them, and that bound is the size of its buffers. Slots
beyond the actual count are *padding*: their rows of ``R`` are ``inf``, they
pick nothing and root themselves. Pointer jumping runs ``ceil(log2(c))``
steps, enough for any chain. Once the bound is at most ``boruvka.DENSE_MAX``
components, one dense step finishes the tree (:func:`.boruvka._dense_finish`,
shared with the dynamic Boruvka).

With no sync and no data-dependent shape, the whole computation can be
captured once in a CUDA graph and replayed (:mod:`.cuda_graph`); on the CPU,
and under tests, it runs eagerly. Running it on the ``meta`` device checks
that property: an ``.item()``, a ``nonzero`` or a boolean mask would fail.

The rounds break ties as the dynamic Boruvka's do and pick the same edges;
both end with the same dense step, which the dynamic one reaches at its
actual count of components rather than at the bound. Where the MST is not
unique the two trees may therefore differ (the deaths never do).
"""

from __future__ import annotations

import math

import torch

from . import boruvka
from .boruvka import _PACKED_MAX_N, _close_own_component, _dense_finish, _first_match, _kept_edges, _pick_keys

__all__ = ["boruvka_edges_static", "static_bounds"]

_NO_PICK = 0x7FFFFFFF << 32  # a packed key above every finite weight's, with zero label fields


def static_bounds(n: int) -> list[int]:
    """The component bound of each Boruvka round before the dense step.

    ``[n, n // 2, n // 4, ...]`` while the bound is above ``boruvka.DENSE_MAX``
    (the dynamic Boruvka's hand-over point too); the dense step then takes the
    last bound (the first at or below it).
    """
    bounds = [n]
    while bounds[-1] > boruvka.DENSE_MAX:
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
            best.scatter_reduce_(0, comp, _pick_keys(verts, target, w), reduce="amin")
            rep = best & 0xFFFF
            # a finite pick: padding slots, and a tree already whole, pick nothing
            if X.dtype == torch.float32:
                active = best < (0x7F800000 << 32)  # the keys of inf weights and of padding are above
            else:  # float64 keys are ranks (inf has one): ask the weight
                active = (best < _NO_PICK) & (w[rep] < inf)
            tgt = torch.where(active, (best >> 16) & 0xFFFF, src)  # no pick: point at itself
        mutual = tgt[tgt] == src
        is_root = mutual & (src <= tgt)  # a mutual pair's smaller label; also every slot that picks nothing
        keep = ~mutual | is_root
        if active is None:
            others.append(tgt)
        else:
            keep &= active
            others.append(_first_match(X, rep, w[rep], comp, tgt)[0])
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
        _close_own_component(R, comp, inf)
    e, keep, _, _ = _dense_finish(X, R, comp, bounds[-1], inf)
    reps.append(e[:, 0])
    others.append(e[:, 1])
    keeps.append(keep)
    return _kept_edges(reps, others, keeps, n)
