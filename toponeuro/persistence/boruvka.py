"""Boruvka's minimum spanning tree in torch, for CUDA tensors (and CPU without numba).

Every round, each component picks its lightest outgoing edge; under a strict
total order on the candidate edges the picks form a forest, which is
contracted. Components at least halve each round, so there are at most
``log2(n)`` rounds (about six for random matrices of a few thousand
neurons). A round is about 30 small kernels and one host synchronisation (the
size of the next round, and whether the round's picks are consistent); nothing of size ``n x n`` leaves the device and no
loop runs once per vertex. On a GPU, below n of about 16k, the time goes to
launching those kernels rather than to reading memory, which is why a round
is kept short: one packed reduction finds each component's weight, target
and vertex at once; the endpoints inside the target components are found by
one masked search without a sync; pointer jumping runs a fixed three steps
(depth 8) and the sync also reports whether they reached every root.

Once at most :data:`DENSE_MAX` (128) components are left, the last rounds
(two to four, each with its sync) give way to one dense step without a sync
(:func:`_dense_finish`): the component pairs are ranked by their lightest
edge, and a pair is a tree edge iff its rank is the minimax rank over all
paths between the two, which a few (min, max) squarings of the (c, c) rank
matrix give. One sync then checks its input (:func:`_check_dense`). A matrix
of at most 128 neurons is the dense step alone.

Layout: ``R[b, i]`` is the lightest edge between component ``b`` and vertex
``i`` (rows are components, so contraction moves contiguous rows). The first
round reads ``D`` itself in blocks of at most ``n / 2`` columns (the
diagonal masked in each block), and the first contraction reads ``D`` again.
The large buffers are that column block, then ``R`` (at most ``n / 2`` rows)
beside the endpoint search's blocks of at most ``n / 4`` rows: together
within one copy of ``D`` (``_BLOCK_ENTRIES`` caps the blocks further).

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

import torch

__all__ = ["boruvka_edges"]

_BLOCK_ENTRIES = 1 << 26  # column and row blocks: at most 64M entries (256 MB in fp32)
_PACKED_MAX_N = 1 << 16  # labels and vertices packed in 16 bits of a key
_JUMPS = 3  # pointer-jumping steps before the round's sync checks for roots (reach 8)
DENSE_MAX = 128  # components left for the dense step: (c, c, c) int16 ranks, 4 MB at 128 (c * c < 2**15)
_SMALL_SEARCH = 1 << 22  # entries: an endpoint search this small runs in one block whatever n
# the correlation dissimilarities that the compiled kernels (numba_host's Prim, the Triton Boruvka)
# compute on the fly from a correlation matrix, by mode number
RHO_DISSIMILARITY_MODES = {"abs_correlation": 0, "one_minus_rho": 1, "sqrt_one_minus_rho2": 2}
_INCONSISTENT = ("boruvka_edges needs an exactly symmetric matrix of finite weights (the picks of a "
                 "round do not form a forest); validate D first (check_dissimilarity, or check=True)")


def _order_keys(w: torch.Tensor) -> torch.Tensor:
    """int64 keys, increasing with the (non-negative) weights ``w``, below 2**31."""
    if w.dtype == torch.float32:
        # non-negative floats order like their bit patterns; & drops -0.0's sign
        return w.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    # float64 bits need all 64: use ranks instead
    return torch.unique(w, return_inverse=True)[1]


def _pick_keys(verts: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each vertex's pick packed in one int64: ``weight key << 32 | target << 16 | vertex``.

    For n <= 65536 the fields do not overlap, so adding them is or-ing them, and
    one minimum orders by (weight, target label, vertex).
    """
    return torch.add(torch.add(verts, target, alpha=1 << 16), _order_keys(w), alpha=1 << 32)


def _true_first(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first ``k`` entries of a flat bool ``mask`` with the True ones in front
    (each group in index order): no host sync for the count."""
    return torch.argsort(mask.view(torch.uint8), descending=True, stable=True)[:k]


def _kept_edges(reps: list, others: list, keeps: list, n: int) -> torch.Tensor:
    """The (n - 1, 2) kept picks ``(rep, other)`` of every round: a valid matrix keeps exactly n - 1."""
    edges = torch.stack([torch.cat(reps), torch.cat(others)], dim=1)
    return edges[_true_first(torch.cat(keeps), n - 1)]


def _lightest_other_vertex(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each vertex, its lightest edge to another vertex: (weight, vertex), by column blocks."""
    n = X.shape[0]
    w = torch.empty(n, dtype=X.dtype, device=X.device)
    j = torch.empty(n, dtype=torch.long, device=X.device)
    block = max(1, min((n + 1) // 2, _BLOCK_ENTRIES // n))  # at most half of D at a time
    for s in range(0, n, block):
        e = min(n, s + block)
        sub = X[:, s:e].clone()
        sub.diagonal(-s).fill_(float("inf"))  # the entries (s + k, k): D's diagonal in this block
        w[s:e], j[s:e] = sub.min(dim=0)
        del sub  # before the next block's copy exists
    return w, j


def _close_own_component(R: torch.Tensor, comp: torch.Tensor, inf: torch.Tensor) -> torch.Tensor:
    """Set ``R[comp[i], i] = inf`` for every vertex ``i``: its own component is not outgoing.

    R : (c, n); comp : (n,). A ``scatter_reduce_`` (max with ``inf``) rather than
    ``index_put_``: under ``torch.use_deterministic_algorithms`` CUDA sends
    ``index_put_`` and ``scatter_`` down a sorting path (slower, and in older
    torch a host sync that breaks CUDA graph capture); ``amax`` and ``amin``
    are exact whatever the order and keep their plain kernels.
    """
    return R.scatter_reduce_(0, comp[None, :], inf.expand(1, R.shape[1]), "amax")


def _contract(src: torch.Tensor, labels: torch.Tensor, c_new: int) -> torch.Tensor:
    """(c, n) -> (c_new, n): row-wise minimum over the rows that share a new label."""
    # every new label has at least one row: no fill needed (include_self=False).
    # scatter_reduce_ rather than index_reduce_, which CUDA flags as
    # nondeterministic (a minimum is not); the expanded index is a view.
    out = torch.empty((c_new, src.shape[1]), dtype=src.dtype, device=src.device)
    return out.scatter_reduce_(0, labels[:, None].expand_as(src), src, "amin", include_self=False)


def _component_picks(w, b, comp, c, verts):
    """Each component's lightest outgoing edge.

    w, b : (n,) each vertex's lightest edge to another component (weight, label).
    comp : (n,) component labels, ``c`` of them.

    Returns ``(target, rep)``, both (c,): the component each one picks, under
    the order ``(weight, target label)``, and the smallest vertex of its own
    that reaches the pick at that weight.
    """
    n = verts.numel()
    # every component has a vertex, so no slot keeps its (unfilled) initial value
    best = torch.empty(c, dtype=torch.int64, device=w.device)
    if n <= _PACKED_MAX_N:
        # labels and vertices fit 16 bits: one reduction finds weight, target and vertex
        key = _pick_keys(verts, b, w)
        best.scatter_reduce_(0, comp, key, reduce="amin", include_self=False)
        return (best >> 16) & 0xFFFF, best & 0xFFFF
    key = torch.add(b, _order_keys(w), alpha=1 << 32)
    best.scatter_reduce_(0, comp, key, reduce="amin", include_self=False)
    rep = torch.empty(c, dtype=torch.long, device=w.device)
    rep.scatter_reduce_(0, comp, torch.where(key == best[comp], verts, n), reduce="amin", include_self=False)
    return best & 0xFFFFFFFF, rep


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
    inf = torch.full((), float("inf"), dtype=X.dtype, device=dev)
    if n <= DENSE_MAX:  # the dense step alone, on a copy whose diagonal is not an edge
        Xd = X.clone()
        Xd.diagonal().fill_(float("inf"))
        edges, _, C, found = _dense_finish(Xd, Xd, verts, n, inf)
        _check_dense(C, found)
        return edges
    w, target = _lightest_other_vertex(X)  # round one: every vertex is a component
    rep = verts
    comp = verts
    c = n
    R = None
    reps, others, keeps = [], [], []
    while True:
        src = verts[:c]
        if R is not None:
            target, rep = _component_picks(w, target, comp, c, verts)
        mutual = target[target] == src
        is_root = mutual & (src < target)  # a mutual pair's smaller label roots its tree
        # every pick is a tree edge; a mutual pair picked the same edge twice
        keeps.append(~mutual | is_root)
        reps.append(rep)
        if R is None:  # no endpoint search in round one; a NaN pick (min propagates it) is caught here
            found = torch.isfinite(w)
            others.append(target)
        else:
            other, found = _first_match(X, rep, w[rep], comp, target)
            others.append(other)
        parent = torch.where(is_root, src, target)
        for _ in range(_JUMPS):
            parent = parent[parent]
        # the round's one host sync: the next round's size, how many components
        # the jumps above brought to their root (pick chains are short), and
        # how many picks found their endpoint
        c_new, settled, n_found = torch.stack([is_root, is_root[parent], found]).sum(dim=1).tolist()
        if settled < c:
            for _ in range(max(1, math.ceil(math.log2(c)))):
                parent = parent[parent]
            settled = int(is_root[parent].sum())
        if settled < c or n_found < c:
            # with exact, finite weights the picks form a forest rooted at mutual
            # pairs and every pick has its endpoint; anything else is bad input
            raise ValueError(_INCONSISTENT)
        if c_new == 1:
            break
        labels = (torch.cumsum(is_root, 0) - 1)[parent]  # old component -> new component
        R = _contract(X if R is None else R, labels if R is not None else labels[comp], c_new)
        comp = labels[comp]
        c = c_new
        _close_own_component(R, comp, inf)
        if c <= DENSE_MAX:  # the last rounds in one step, with no sync but the check's
            e, keep, C, found = _dense_finish(X, R, comp, c, inf)
            _check_dense(C, found)
            reps.append(e[:, 0])
            others.append(e[:, 1])
            keeps.append(keep)
            break
        w, target = R.min(dim=0)
    # exactly n - 1 picks are kept: moved to the front, no sync for the count
    return _kept_edges(reps, others, keeps, n)


def _first_match(M: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, comp: torch.Tensor,
                 label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ``k``, the first column ``j`` with ``M[rows[k], j] == weight[k]`` and
    ``comp[j] == label[k]``, and whether there is one (always, for an exactly symmetric matrix).

    M : (r, n); rows, weight, label : (k,); comp : (n,). Reads the rows
    ``M[rows]`` in blocks of at most ``n / 4`` rows (and ``_BLOCK_ENTRIES``
    entries), with no host synchronisation: with ``R`` (``n / 2`` rows at
    most) beside it, within one copy of ``D``.
    """
    n = M.shape[1]
    block = max(1, min((n + 3) // 4, _BLOCK_ENTRIES // n))
    if rows.numel() * n <= _SMALL_SEARCH:
        block = max(1, rows.numel())  # a few MB: one block, fewer kernels
    first, found = [], []
    for s in range(0, max(rows.numel(), 1), block):  # one (empty) block when there are no rows
        hit = (M[rows[s:s + block]] == weight[s:s + block, None]) & (comp == label[s:s + block, None])
        first.append(hit.view(torch.uint8).argmax(dim=1))
        found.append(hit.any(dim=1))
        del hit  # before the next block's exists
    if len(first) == 1:
        return first[0], found[0]
    return torch.cat(first), torch.cat(found)


def _dense_finish(X: torch.Tensor, R: torch.Tensor, comp: torch.Tensor, c: int, inf: torch.Tensor):
    """The MST between the ``c`` (at most) components left, in one dense step without a sync.

    X : (n, n) the matrix; its diagonal is never read unless ``R is X``.
    R : (c, n) lightest edge between each component and each vertex (``inf``
        inside the component and in padding rows), or ``X`` itself with an
        ``inf`` diagonal when every vertex is a component.
    comp : (n,) component of each vertex.
    inf : () ``inf`` in X's dtype, on its device.

    Returns ``(edges, keep, C, found)``: (c - 1, 2) vertex pairs, which of them
    are tree edges, the (c, c) lightest edges between components, and whether
    each kept pair found its endpoints (always, for an exactly symmetric ``X``). Pair
    ``(a, b)`` gets the key ``(C[a, b], min, max)`` packed in an int64, then
    its rank among the keys; ranks are distinct, so ``(a, b)`` is in the
    (unique) MST of the components iff its rank equals the minimax rank over
    all paths from ``a`` to ``b``, which ``ceil(log2(c - 1))`` squarings in
    the (min, max) semiring give.
    Padding components (static Boruvka) have only ``inf`` edges, heavier than
    every finite one: they never shorten a path between real ones.
    """
    dev = X.device
    if R is X:
        C = X
    else:
        C = torch.full((c, c), float("inf"), dtype=X.dtype, device=dev)
        C.scatter_reduce_(1, comp[None, :].expand_as(R), R, "amin")
    ar = torch.arange(c, device=dev)
    pair = torch.add(torch.maximum(ar[:, None], ar[None, :]), torch.minimum(ar[:, None], ar[None, :]), alpha=1 << 16)
    K = torch.add(pair.view(-1), _order_keys(C.reshape(-1)), alpha=1 << 32)
    # the keys' ranks (below c * c <= 2**14) order the pairs alike in int16: a quarter of
    # the memory traffic of int64 keys in the (c, c, c) squarings
    # (an argsort of the argsort, not a scatter_ of arange: see _close_own_component)
    rank = torch.argsort(torch.argsort(K)).to(torch.int16)
    # (a, b) and (b, a) share a key, so they hold two adjacent ranks: keep the smaller for both
    rank = torch.minimum(rank.view(c, c), rank.view(c, c).mT)
    M = rank.clone()
    M.diagonal().fill_(-1)  # a path may stay put
    for _ in range(math.ceil(math.log2(max(c - 1, 1)))):
        # M[a, b] = min_j max(M[a, j], M[j, b]); M stays symmetric, so M[j, b] = M[b, j]
        # and the minimum runs over the last, contiguous axis
        M = torch.maximum(M[:, None, :], M[None, :, :]).amin(dim=2)
    tree = (rank == M) & (ar[:, None] < ar[None, :]) & (C < inf)
    first = _true_first(tree.view(-1), c - 1)  # at most c - 1 pairs are tree edges
    keep = tree.view(-1)[first]
    a, b = first // c, first % c
    if R is X:
        return torch.stack([a, b], dim=1), keep, C, torch.ones_like(keep)  # no search
    weight = C.reshape(-1)[first]
    # the first vertex v of b that a reaches at that weight, then the first u of a that reaches v
    v, found_v = _first_match(R, a, weight, comp, b)
    u, found_u = _first_match(X, v, weight, comp, a)
    return torch.stack([u, v], dim=1), keep, C, (found_u & found_v) | ~keep


def _check_dense(C: torch.Tensor, found: torch.Tensor) -> None:
    """A ValueError unless the (c, c) component weights are exactly symmetric and finite off
    the diagonal and every kept pair found its endpoints: what the dense step needs for its
    tree (one host sync)."""
    off = ~torch.eye(C.shape[0], dtype=torch.bool, device=C.device)
    if not bool(((C == C.mT) & (torch.isfinite(C) | ~off)).all() & found.all()):
        raise ValueError(_INCONSISTENT)
