"""Boruvka's MST on CUDA float32 matrices in four Triton kernels per round.

The torch Boruvka (:mod:`.boruvka`) spends about 45 kernels a round on
(components, n) buffers (a copied column block, a scatter that contracts
rows, a masked search for each pick's endpoint), and on a GPU the time goes
to launching them. Here a round is four kernels and one host sync:

1. ``lightest``: every vertex ``i`` whose lightest outgoing edge is not known
   reads row ``i`` of ``D`` where it lies, with the component labels: the
   lightest ``D[i, j]`` with ``comp[j] != comp[i]``, ties to the smallest
   ``j``, stored as one int64 key ``bits(w) << 32 | lo << 16 | hi`` (``lo <
   hi`` its endpoints). This pass is the only one over ``D``.
2. ``minima``: each component's lightest outgoing edge, an atomic minimum of
   its vertices' keys.
3. ``link``: each component links to the one across its edge; two that
   picked the same edge root at the smaller label, which keeps the edge once.
4. ``relabel``: each vertex follows the links from its label to the root.

The sync reads three counts of the round (roots left, components without a
finite edge or caught in a cycle of links, edges kept): bad input raises a
ValueError, never hangs or returns a wrong tree.

Order. For a fixed row ``i``, ordering columns ``j`` by ``(min(i, j), max(i,
j))`` is ordering them by ``j``, so the row minimum and the key minimum both
follow one strict total order on the edges, ``(D[i, j], i, j)`` with ``i <
j``, which ignores the labels. Boruvka under a strict total order picks edges
of the unique MST for that order: exactly the edges of the compiled Prim
(:func:`.torch_mst.prim_edges`), which uses the same order, and the sorted
keys list them in canonical order.

Laziness. Since the order ignores labels, a vertex whose edge still leaves
its (grown) component keeps it: ``lightest`` reads only the rows whose edge
became internal, and its programs for the other rows return at once. The
first two rounds read every row; later ones a fraction.

A stack. A stack (B, n, n) runs in the same kernels, with a second grid axis
over the members (each program offsets its pointers to its member's matrix
and state): a round is still four launches and one sync, which reads every
member's counts. A member whose tree is complete is marked inactive, and its
programs do nothing in the later rounds.

Nothing of size (n, n) is allocated, nothing but the counts goes to the host,
and n is at most 65536 (16-bit endpoints in the keys). Triton compiles the
kernels on their first call in a process (seconds); its interpreter
(``TRITON_INTERPRET=1``) runs them on CPU tensors, which is how they are
tested without a GPU.
"""

import contextlib
import functools
import math
import os

import torch

from .boruvka import _INCONSISTENT, _PACKED_MAX_N, RHO_DISSIMILARITY_MODES

try:  # triton ships with the CUDA builds of torch; without it CUDA takes the torch Boruvka
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised where triton is missing
    triton = tl = None

__all__ = ["HAVE_TRITON", "triton_boruvka_edges", "runs_on"]

HAVE_TRITON = triton is not None

ROWS = 4  # rows per program (they share each load of the column labels)
COLS = 512  # columns per step of a program's loop
WARPS = 4
_VERTICES = 1024  # vertices per program of the per-vertex kernels
_NO_EDGE = (1 << 63) - 1  # the key of a vertex with no outgoing edge: above every real one
_MAX_MEMBERS = 65535  # members of a stack: CUDA's limit on the grid's second axis


if HAVE_TRITON:  # the kernels' annotations name triton (its interpreter wants them spelled tl.constexpr)
    def _lightest_edges_source(D, comp, keys, active, n, member_stride, stride,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, OF_RHO: tl.constexpr):
        """keys[i] = the lightest edge from vertex i out of its component, for every i whose key is
        not one any more (none yet, or an edge now inside its component).

        Member ``b = program_id(1)`` of the stack: D : (B, n, n) float32, members
        ``member_stride`` and rows ``stride`` apart; comp : (B, n) int32 labels; keys : (B, n)
        int64; active : (B,) int32, 0 for a member whose tree is complete (nothing to do).
        OF_RHO: -1 when D holds the weights; 0, 1, 2 when it holds correlations rho and the weight
        is d(clamp(rho, -1, 1)) with d ``1 - |rho|``, ``1 - rho`` or ``sqrt(1 - rho^2)`` (0 where
        ``1 - rho^2 <= 0``), computed as torch computes it on the dense matrix (launched without
        fused multiply-adds, and a correctly rounded square root), so the weights are bitwise
        those of the dense dissimilarity.
        """
        member = tl.program_id(1)
        D += member.to(tl.int64) * member_stride
        comp += member * n
        keys += member * n
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_range = rows < n * tl.load(active + member)  # active is 0 or 1: nothing in range when done
        key = tl.load(keys + rows, mask=in_range, other=0x7FFFFFFFFFFFFFFF)
        lo = tl.minimum((key >> 16) & 0xFFFF, n - 1)  # a key without an edge decodes in range
        hi = tl.minimum(key & 0xFFFF, n - 1)
        inside = tl.load(comp + lo, mask=in_range, other=0) == tl.load(comp + hi, mask=in_range, other=0)
        todo = in_range & ((key == 0x7FFFFFFFFFFFFFFF) | inside)
        if tl.max(todo.to(tl.int32), axis=0) > 0:
            own = tl.load(comp + rows, mask=in_range, other=-1)
            row_start = D + rows.to(tl.int64)[:, None] * stride
            best_w = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
            best_j = tl.full([BLOCK_R, BLOCK_C], 0x7FFFFFFF, tl.int32)
            for s in range(0, n, BLOCK_C):
                cols = s + tl.arange(0, BLOCK_C)
                label = tl.load(comp + cols, mask=cols < n, other=-1)
                out = todo[:, None] & (cols < n)[None, :] & (own[:, None] != label[None, :])
                x = tl.load(row_start + cols[None, :], mask=out, other=float("inf"))
                if OF_RHO >= 0:  # the dissimilarity of the correlation, on the fly
                    r = tl.minimum(tl.maximum(x, -1.0), 1.0)
                    if OF_RHO == 0:
                        x = 1.0 - tl.abs(r)
                    elif OF_RHO == 1:
                        x = 1.0 - r
                    else:
                        y = 1.0 - r * r
                        x = tl.where(y > 0.0, tl.sqrt_rn(tl.maximum(y, 0.0)), 0.0)
                    x = tl.where(out, x, float("inf"))  # the masked lanes stay out of the minimum
                # strict: each lane keeps its first (smallest) column among equal weights;
                # -0.0 == 0.0 here, as in the keys, whose sign bit is dropped
                better = x < best_w
                best_w = tl.where(better, x, best_w)
                best_j = tl.where(better, cols[None, :], best_j)
            w = tl.min(best_w, axis=1)
            j = tl.min(tl.where(best_w == w[:, None], best_j, 0x7FFFFFFF), axis=1)
            found = j < n  # a finite weight: NaN and inf never win (the link step refuses their absence)
            lo = tl.minimum(rows, j).to(tl.int64)
            hi = tl.maximum(rows, j).to(tl.int64)
            bits = (w.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
            tl.store(keys + rows, tl.where(found, (bits << 32) | (lo << 16) | hi, 0x7FFFFFFFFFFFFFFF), mask=todo)

    def _component_minima_source(comp, keys, best, active, n, BLOCK: tl.constexpr):
        """best[comp[i]] = min(best[comp[i]], keys[i]): each component's lightest outgoing edge
        (member ``program_id(1)``; comp, keys, best : (B, n))."""
        member = tl.program_id(1)
        comp += member * n
        keys += member * n
        best += member * n
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = v < n * tl.load(active + member)
        tl.atomic_min(best + tl.load(comp + v, mask=m, other=0), tl.load(keys + v, mask=m, other=0), mask=m)

    def _link_source(comp, best, parent, picked, counts, active, n, BLOCK: tl.constexpr):
        """Every component (label r, a vertex with comp[r] == r) links to the one across its pick;
        a pair that picked the same edge roots at its smaller label, which keeps the edge once.

        Member ``program_id(1)``: comp, best, parent : (B, n); picked : (B, n) int64, the kept
        picks' keys at their labels; counts : (B, 3) int32, adds the roots, the components without
        a finite pick, and the kept picks.
        """
        member = tl.program_id(1)
        comp += member * n
        best += member * n
        parent += member * n
        picked += member * n
        counts += member * 3
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = r < n * tl.load(active + member)
        is_label = in_range & (tl.load(comp + r, mask=in_range, other=-1) == r)
        b = tl.load(best + r, mask=is_label, other=0x7FFFFFFFFFFFFFFF)
        finite = b < 0x7F80000000000000
        lo = tl.minimum((b >> 16) & 0xFFFF, n - 1).to(tl.int32)
        hi = tl.minimum(b & 0xFFFF, n - 1).to(tl.int32)
        lo_label = tl.load(comp + lo, mask=is_label, other=0)
        other = tl.where(lo_label == r, tl.load(comp + hi, mask=is_label, other=0), lo_label)
        mutual = tl.load(best + other, mask=is_label, other=0x7FFFFFFFFFFFFFFF) == b
        smaller = r < other
        is_root = (mutual & smaller) | (finite == 0)  # without a finite pick: its own root (refused below)
        keep = is_label & finite & ((mutual == 0) | smaller)
        tl.store(picked + r, b, mask=keep)
        tl.store(parent + r, tl.where(is_root, r, other), mask=is_label)
        tl.atomic_add(counts, tl.sum((is_label & is_root).to(tl.int32), axis=0))
        tl.atomic_add(counts + 1, tl.sum((is_label & (finite == 0)).to(tl.int32), axis=0))
        tl.atomic_add(counts + 2, tl.sum(keep.to(tl.int32), axis=0))

    def _relabel_source(comp, parent, best, counts, active, n, BLOCK: tl.constexpr):
        """comp[i] = the root its label's links lead to; best[i] = no edge (for the next round).

        Member ``program_id(1)``: comp, parent, best : (B, n); counts : (B, 3) int32; its second
        entry adds the vertices whose links did not reach a root in n steps (a cycle: the picks
        were not a forest).
        """
        member = tl.program_id(1)
        comp += member * n
        parent += member * n
        best += member * n
        counts += member * 3
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = v < n * tl.load(active + member)
        x = tl.load(comp + v, mask=m, other=0)
        p = tl.load(parent + x, mask=m, other=0)
        # the loop carries scalars only (its condition holds no reduction), and steps is a
        # tensor from the start: a literal 0 would change type in the loop
        steps = n * 0
        moving = tl.max((p != x).to(tl.int32), axis=0) > 0
        while moving & (steps < n):
            x = p
            p = tl.load(parent + x, mask=m, other=0)
            steps += 1
            moving = tl.max((p != x).to(tl.int32), axis=0) > 0
        tl.store(comp + v, x, mask=m)
        tl.store(best + v, tl.full([BLOCK], 0x7FFFFFFFFFFFFFFF, tl.int64), mask=m)
        tl.atomic_add(counts + 1, tl.sum((m & (p != x)).to(tl.int32), axis=0))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple:
    # triton.jit reads TRITON_INTERPRET when it wraps, and Triton's own library functions when
    # triton is imported: the interpreter (CPU tensors, how the tests without a GPU run the
    # kernels) needs it set before that import (tests/conftest.py sets it); one set per mode
    return tuple(triton.jit(f) for f in (_lightest_edges_source, _component_minima_source, _link_source,
                                         _relabel_source))


def runs_on(X: torch.Tensor) -> bool:
    """Whether :func:`triton_boruvka_edges` takes ``X``: a CUDA float32 (n, n) or stack
    (B, n, n), 2 <= n <= 65536, B <= 65535, with Triton installed (or its interpreter on, for CPU
    tensors)."""
    return (HAVE_TRITON and X.dtype == torch.float32 and X.dim() in (2, 3) and X.shape[-1] == X.shape[-2]
            and 2 <= X.shape[-1] <= _PACKED_MAX_N and (X.dim() == 2 or X.shape[0] <= _MAX_MEMBERS)
            and (X.is_cuda or (X.device.type == "cpu" and _interpreting())))


def triton_boruvka_edges(D: torch.Tensor, rows: int = ROWS, cols: int = COLS,
                         warps: int = WARPS, of_rho: str | None = None) -> torch.Tensor:
    """Exact MST of the complete graph weighted by ``D``, on ``D``'s device.

    Parameters
    ----------
    D : (n, n) float32 CUDA tensor, 2 <= n <= 65536, or a stack (B, n, n) of them
        Symmetric, non-negative, finite (see :func:`runs_on`).
    rows, cols, warps : the row kernel's tile (rows per program, columns per
        step) and warps per program.
    of_rho : str, optional
        A key of :data:`.boruvka.RHO_DISSIMILARITY_MODES`: ``D`` then holds correlations (exactly
        symmetric, any diagonal) and the weights are that dissimilarity of them,
        computed on the fly as the dense matrix would hold them (the tree of
        ``abs_correlation`` from the correlation matrix, without forming
        ``1 - |C|``).

    Returns
    -------
    (n - 1, 2) LongTensor of vertex pairs ``(i, j)``, ``i < j``, on ``D``'s
    device, ascending by ``(D[i, j], i, j)``: the MST under that order, the
    same edges as :func:`.torch_mst.prim_edges`. For a stack, (B, n - 1, 2),
    member ``b`` the same as ``triton_boruvka_edges(D[b])``.

    Raises
    ------
    ValueError
        When a component has no finite outgoing edge or the picks of a round
        are not a forest: ``D`` (the member named, in a stack) was not
        symmetric, finite and non-negative.
    """
    if of_rho is not None and of_rho not in RHO_DISSIMILARITY_MODES:
        raise ValueError(f"of_rho must be one of {sorted(RHO_DISSIMILARITY_MODES)} or None, got {of_rho!r}")
    if not runs_on(D):
        raise ValueError(f"triton_boruvka_edges needs a CUDA float32 (n, n) or (B, n, n) tensor with 2 <= n <= "
                         f"{_PACKED_MAX_N} and Triton installed, got {D.dtype} of shape {tuple(D.shape)} "
                         f"on {D.device}; use boruvka.boruvka_edges otherwise")
    X = D.detach()
    if X.stride(-1) != 1:
        X = X.contiguous()  # the kernel reads rows: the one working copy
    stack = X.dim() == 3
    if not stack:
        X = X[None]
    B, n = X.shape[0], X.shape[-1]
    dev = X.device
    if B == 0:
        return torch.empty((0, n - 1, 2), dtype=torch.long, device=dev)
    lightest, minima, link, relabel = _kernels(_interpreting())
    mode = -1 if of_rho is None else RHO_DISSIMILARITY_MODES[of_rho]
    # labels: the vertex that names the component, per member
    comp = torch.arange(n, dtype=torch.int32, device=dev).repeat(B, 1)
    keys = torch.full((B, n), _NO_EDGE, dtype=torch.int64, device=dev)
    best = torch.full((B, n), _NO_EDGE, dtype=torch.int64, device=dev)
    parent = torch.empty((B, n), dtype=torch.int32, device=dev)
    active = torch.ones(B, dtype=torch.int32, device=dev)
    # components at least halve each round: at most ceil(log2 n) rounds for a valid matrix
    rounds = max(1, math.ceil(math.log2(n)))
    picked = torch.full((rounds, B, n), _NO_EDGE, dtype=torch.int64, device=dev)
    counts = torch.zeros((rounds, B, 3), dtype=torch.int32, device=dev)
    by_rows, by_vertices = (triton.cdiv(n, rows), B), (triton.cdiv(n, _VERTICES), B)
    kept = [0] * B
    done = [False] * B

    def refuse(b: int):
        raise ValueError(_INCONSISTENT if not stack else f"member {b} of the stack: {_INCONSISTENT}")

    # Triton launches on the current CUDA device, which need not be D's (a second GPU)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for t in range(rounds):
            lightest[by_rows](X, comp, keys, active, n, X.stride(0), X.stride(1), BLOCK_R=rows, BLOCK_C=cols,
                              OF_RHO=mode, num_warps=warps, enable_fp_fusion=False)
            minima[by_vertices](comp, keys, best, active, n, BLOCK=_VERTICES)
            link[by_vertices](comp, best, parent, picked[t], counts[t], active, n, BLOCK=_VERTICES)
            relabel[by_vertices](comp, parent, best, counts[t], active, n, BLOCK=_VERTICES)
            finished = 0
            for b, (roots, refused, k) in enumerate(counts[t].tolist()):  # the round's one host sync
                if done[b]:
                    continue
                kept[b] += k
                if refused:
                    refuse(b)
                done[b] = roots == 1
                finished += done[b]
            if all(done):
                break
            if finished:  # members finished this round idle from the next (one matrix never gets here)
                active.copy_(torch.tensor(done, device=dev).logical_not())
    for b in range(B):
        if not done[b] or kept[b] != n - 1:
            refuse(b)
    # the keys order the edges by (weight, i, j): each member's n - 1 kept ones come first
    k = picked[:t + 1].transpose(0, 1).reshape(B, -1).sort(dim=-1).values[:, :n - 1]
    edges = torch.stack([(k >> 16) & 0xFFFF, k & 0xFFFF], dim=-1)
    return edges if stack else edges[0]
