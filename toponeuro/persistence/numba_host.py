"""numba backend: the compiled Prim of the torch backend, run on the host for any device.

For CUDA matrices of a few thousand neurons, one copy to the host and an
O(n^2) compiled loop on one CPU core cost less than Boruvka's rounds of
kernel launches and synchronisations, and scale across processes that share
one GPU (many small runs at once). The copy makes it the wrong choice for
large ``n``; the ``"torch"`` backend never leaves the device.

A stack of matrices (B, n, n) runs the same Prim on each member, the members
spread over numba's threads (:func:`prim_edges_stack`); the CPU path of the
torch backend uses it too.

The module also holds the other compiled host kernels that read or write an
(n, n) product in place: the tree path's (:func:`mirror_upper_`,
:func:`prim_edges_of_correlation`, :func:`pairs_gradient`, for
:mod:`toponeuro.tree_deaths`) and the dense baselines' one pass
(:func:`mean_abs_sign_`, :func:`off_diagonal_covariance_`, for
:mod:`toponeuro.regularisers`).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .boruvka import _PACKED_MAX_N, RHO_DISSIMILARITY_MODES  # the Prim on correlations: its modes
from .torch_mst import (HAVE_NUMBA, _packed_prim_start, _packed_prim_step, _prim_compiled, _prim_input,
                        _prim_packed_compiled, prim_edges)

if HAVE_NUMBA:
    import numba

    # one parallel loop over the members, each the single-matrix kernel on its (n, n) slice:
    # the same code as prim_edges, hence the same edges
    @numba.njit(parallel=True, cache=True, nogil=True)
    def _prim_packed_stack(X, out):
        for b in numba.prange(X.shape[0]):
            _prim_packed_compiled(X[b], out[b])

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _prim_stack(X, out):
        for b in numba.prange(X.shape[0]):
            _prim_compiled(X[b], out[b])

# numba's default (workqueue) threading layer aborts the process when two threads enter parallel
# code at once (a worker thread of ours and the caller, DataParallel): one parallel call at a time
_PARALLEL = threading.Lock()


def prim_edges_stack(D: torch.Tensor) -> torch.Tensor:
    """Exact MSTs of a stack by compiled Prim, members in parallel.

    D : (B, n, n) CPU tensor -> (B, n - 1, 2) LongTensor, member ``b`` equal to
    ``prim_edges(D[b])``. Runs on at most ``torch.get_num_threads()`` threads.
    """
    X, packed = _prim_input(D, "prim_edges_stack")
    B, n = X.shape[0], X.shape[-1]
    out = np.empty((B, n - 1, 2), dtype=np.int64)
    if B == 0:
        return torch.from_numpy(out)
    kernel = _prim_packed_stack if packed else _prim_stack
    threads = torch.get_num_threads()
    with _PARALLEL:
        # per calling thread in numba: the caller's torch thread budget holds for this call
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            kernel(X, out)
        finally:
            # under numba's OpenMP layer (libgomp, shared with torch) its first launch resets the
            # calling thread's OpenMP thread count, which torch.get_num_threads reads: put it back
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return torch.from_numpy(out)


def death_edges(D: torch.Tensor) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1, 2) death edges, on D's device."""
    return prim_edges(D.detach().cpu()).to(D.device)


def death_edges_stack(D: torch.Tensor) -> torch.Tensor:
    """(B, n, n) dissimilarities -> (B, n - 1, 2) death edges, on D's device."""
    return prim_edges_stack(D.detach().cpu()).to(D.device)


# -- kernels for the tree path (toponeuro.tree_deaths): the MST read from a correlation matrix ----
#
# The tree path computes the upper triangle of C = Z^T Z without autograd (row panels: about half
# the product) and needs the MST of d(C) for a correlation dissimilarity d. These kernels read C
# itself: the mirror into the lower triangle in place, tile by tile (no transposed pass over the
# whole matrix), and Prim computing each row's d on the fly, so that d(C) is never materialised.

_TILE = 64  # 64 x 64 float32 tiles: a tile and its mirror (32 KiB) stay in L1/L2 while swapped


def _mirror_upper_kernel(C):
    """In place: ``C[j, i] = C[i, j]`` for i < j (the lower triangle becomes the upper one's mirror).

    Tile by tile: each tile of the upper triangle is read by rows into a local
    transposed tile (row stride ``_TILE + 1``: a power-of-two stride, as in ``C``
    for n = 4096, would map a column to one cache set) and written into its
    mirror by rows, so ``C`` is only ever read and written along rows.
    """
    n = C.shape[0]
    T = np.empty((_TILE, _TILE + 1), dtype=C.dtype)  # T[jj, ii] = C[bi + ii, bj + jj]
    for bi in range(0, n, _TILE):
        ei = min(bi + _TILE, n)
        h = ei - bi
        for i in range(bi, ei):  # the diagonal tile
            for j in range(i + 1, ei):
                C[j, i] = C[i, j]
        for bj in range(ei, n, _TILE):
            w = min(bj + _TILE, n) - bj
            for ii in range(h):  # the upper tile's rows, transposed into T
                row = C[bi + ii, bj:bj + w]
                for jj in range(w):
                    T[jj, ii] = row[jj]
            for jj in range(w):  # into the mirror tile, by rows
                row = C[bj + jj, bi:ei]
                trow = T[jj]
                for ii in range(h):
                    row[ii] = trow[ii]


def _prim_rho_packed_kernel(C, mode, out):
    """Prim's MST of ``d(clamp(C, -1, 1))`` for a symmetric C-contiguous float32 ``C``, n <= 65536.

    ``mode`` picks d (:data:`RHO_DISSIMILARITY_MODES`): 0 ``1 - |rho|``, 1 ``1 - rho``,
    2 ``sqrt(1 - rho^2)`` (0 where ``1 - rho^2 <= 0``), each in float32 operations as
    torch computes it on the dense matrix, so the weights, and the tree, are those of
    :func:`toponeuro.persistence.torch_mst._prim_packed_kernel` on that matrix, ties
    included (order ``(d, i, j)``). Writes the (n - 1, 2) edges ``(i, j)``, ``i < j``,
    into ``out`` in the order they join the tree.

    Each step turns the new tree vertex's row of ``C`` into one row of d in a scratch
    row (L1/L2-resident), then runs the packed kernel's branch-free key pass over it.
    """
    n = C.shape[0]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    d = np.empty(n, dtype=np.float32)
    bits = d.view(np.int32)
    key, block = _packed_prim_start(n)
    u = 0
    for step in range(n - 1):
        row = C[u]
        # one loop per mode (the mode is hoisted by hand, so each loop vectorises)
        if mode == 0:
            for v in range(n):
                d[v] = one - abs(min(max(row[v], -one), one))
        elif mode == 1:
            for v in range(n):
                d[v] = one - min(max(row[v], -one), one)
        else:
            for v in range(n):
                r = min(max(row[v], -one), one)
                x = one - r * r
                d[v] = np.sqrt(x) if x > zero else zero
        u = _packed_prim_step(bits, u, key, block, out[step])


def _pairs_gradient_kernel(Z, at, partner, factor, G):
    """``G[:, c] = H_c - Z[:, c] (Z[:, c] . H_c)`` with ``H_c = sum over e with at[e] = c of
    factor[e] Z[:, partner[e]]``, into the zeroed ``G`` (m, n), row by row.

    Each row of Z and G (n entries) stays in L1 while every pair is scattered into it, so the
    scatter costs no transposed copy of Z (the torch formulation needs the (n, m) layout, where
    a neuron is a row, for its index_select / index_add_). Serial: numba's threads would spin
    against torch's in a training step.
    """
    m, n = Z.shape
    for k in range(m):
        z = Z[k]
        g = G[k]
        for e in range(at.shape[0]):
            g[at[e]] += factor[e] * z[partner[e]]
    dot = np.zeros(n, dtype=G.dtype)
    for k in range(m):
        for c in range(n):
            dot[c] += Z[k, c] * G[k, c]
    for k in range(m):
        for c in range(n):
            G[k, c] -= Z[k, c] * dot[c]


# -- the dense baselines' one pass over their (n, n) matrix (toponeuro.regularisers) ---------------

def _mean_abs_sign_kernel(C):
    """In place over an exactly symmetric ``C`` (Z^T Z): returns (sum of ``|clamp(c, -1, 1)|``,
    count) over the off-diagonal entries with ``clamp(c) != 0``, and leaves in ``C`` the
    gradient's pattern: ``sign(c)`` where the entry is counted and the clamp lets the
    gradient through (``|c| <= 1``), 0 elsewhere (the diagonal included).

    Row by row, branch-free, each row summed in ``C``'s dtype (compiled with reassociation, so
    that the row's loop vectorises), the rows' sums in float64; the diagonal is taken back
    out after its row.
    """
    n = C.shape[0]
    one = C.dtype.type(1.0)
    zero = C.dtype.type(0.0)
    total = 0.0
    count = 0
    for i in range(n):
        row = C[i]
        diagonal = min(max(row[i], -one), one)
        row_total = zero
        row_count = 0
        for j in range(n):
            c = row[j]
            a = abs(min(max(c, -one), one))
            row_total += a
            row_count += a != zero
            row[j] = ((c > zero) * one - (c < zero) * one) * (abs(c) <= one)
        total += row_total - abs(diagonal)
        count += row_count - (diagonal != zero)
        row[i] = zero
    return total, count


def _off_diagonal_covariance_kernel(C, m):
    """In place: ``C`` (Ac^T Ac) becomes ``C / m`` with a zero diagonal; returns the sum of its
    squares (each row summed in ``C``'s dtype, vectorised as above, the rows in float64)."""
    n = C.shape[0]
    zero = C.dtype.type(0.0)
    mm = C.dtype.type(m)
    total = 0.0
    for i in range(n):
        row = C[i]
        row[i] = zero
        row_total = zero
        for j in range(n):
            c = row[j] / mm
            row[j] = c
            row_total += c * c
        total += row_total
    return total

if HAVE_NUMBA:
    _mirror_upper_compiled = numba.njit(cache=True, nogil=True)(_mirror_upper_kernel)
    _prim_rho_packed_compiled = numba.njit(cache=True, nogil=True)(_prim_rho_packed_kernel)
    _pairs_gradient_compiled = numba.njit(cache=True, nogil=True)(_pairs_gradient_kernel)
    # reassociation (and the sign of zero ignored) so that the rows' sums vectorise; no assumption
    # about NaN or inf
    _REDUCE = {"reassoc", "nsz"}
    _mean_abs_sign_compiled = numba.njit(cache=True, nogil=True, fastmath=_REDUCE)(_mean_abs_sign_kernel)
    _off_diagonal_covariance_compiled = numba.njit(cache=True, nogil=True, fastmath=_REDUCE)(
        _off_diagonal_covariance_kernel)
else:  # pragma: no cover
    _mirror_upper_compiled = _prim_rho_packed_compiled = _pairs_gradient_compiled = None
    _mean_abs_sign_compiled = _off_diagonal_covariance_compiled = None


def runs_pairs_gradient(Z: torch.Tensor) -> bool:
    """Whether :func:`pairs_gradient` takes ``Z``: numba, a contiguous float32/float64 CPU tensor."""
    return (HAVE_NUMBA and Z.device.type == "cpu" and Z.dtype in (torch.float32, torch.float64)
            and Z.is_contiguous())


def pairs_gradient(Z: torch.Tensor, at: torch.Tensor, partner: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The gradient of ``sum_e g_e Z_i . Z_j`` through the normalisation of the columns of ``Z``.

    Z : (B, m, n) standardised columns (:func:`runs_pairs_gradient`); at, partner : (B, 2k) int64,
    the column each term lands in and the column it is a multiple of (both orientations of every
    pair); factor : (B, 2k), ``g_e / norm_at`` (0 into a constant column). Returns (B, m, n),
    ``H - Z * (Z . H)`` column by column, as ``_CorrelationOfPairs``' backward computes it.
    """
    if not runs_pairs_gradient(Z):
        raise ValueError("pairs_gradient needs numba and a contiguous float32/float64 CPU tensor")
    G = torch.zeros_like(Z)
    for Zb, Gb, at_b, partner_b, factor_b in zip(Z, G, at, partner, factor):
        _pairs_gradient_compiled(Zb.numpy(), at_b.contiguous().numpy(), partner_b.contiguous().numpy(),
                                 factor_b.to(Z.dtype).contiguous().numpy(), Gb.numpy())
    return G


def mirror_upper_(C: torch.Tensor) -> torch.Tensor:
    """In place, tile by tile: the lower triangle of ``C`` becomes the mirror of the upper one.

    C : (n, n) C-contiguous float32/float64 CPU tensor, without grad. Returns ``C``.
    """
    if not HAVE_NUMBA:
        raise RuntimeError("mirror_upper_ needs numba")
    _mirror_upper_compiled(C.numpy())
    return C


def runs_rho_prim(C: torch.Tensor) -> bool:
    """Whether :func:`prim_edges_of_correlation` takes ``C`` (numba, CPU, contiguous float32, n <= 65536)."""
    return (HAVE_NUMBA and C.device.type == "cpu" and C.dtype == torch.float32 and C.ndim == 2
            and C.is_contiguous() and C.shape[0] <= _PACKED_MAX_N)


def prim_edges_of_correlation(C: torch.Tensor, dissimilarity: str) -> torch.Tensor:
    """The MST of ``dissimilarity`` computed from the correlation matrix ``C``, without forming it.

    C : (n, n) exactly symmetric float32 CPU tensor (:func:`runs_rho_prim`), read in place;
    dissimilarity : a key of :data:`RHO_DISSIMILARITY_MODES`. Returns (n - 1, 2) int64 edges
    ``(i, j)``, ``i < j``, in the order they join the tree: the edges Prim (the ``torch`` and
    ``numba`` backends on CPU) finds on the dense dissimilarity matrix.
    """
    if not runs_rho_prim(C):
        raise ValueError("prim_edges_of_correlation needs numba and a contiguous float32 CPU matrix, n <= 65536")
    n = C.shape[0]
    out = np.empty((n - 1, 2), dtype=np.int64)
    _prim_rho_packed_compiled(C.detach().numpy(), RHO_DISSIMILARITY_MODES[dissimilarity], out)
    return torch.from_numpy(out)


def runs_dense_baseline(C: torch.Tensor) -> bool:
    """Whether :func:`mean_abs_sign_` and :func:`off_diagonal_covariance_` take ``C`` (..., n, n):
    numba, a contiguous float32/float64 CPU tensor."""
    return (HAVE_NUMBA and C.device.type == "cpu" and C.dtype in (torch.float32, torch.float64)
            and C.is_contiguous())


def mean_abs_sign_(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MinCorr's pass over exactly symmetric products ``C`` (..., n, n), in place.

    Returns the sums of ``|clamp(c, -1, 1)|`` and the counts (each (...,), float64 and int64)
    over the off-diagonal entries not clamped to 0, and leaves in ``C`` ``sign(c)`` on the
    counted entries with ``|c| <= 1`` (where clamp passes the gradient), 0 elsewhere.
    """
    flat = C.view(-1, *C.shape[-2:])
    out = [_mean_abs_sign_compiled(Cb.numpy()) for Cb in flat]
    total = torch.tensor([t for t, _ in out], dtype=torch.float64).view(C.shape[:-2])
    count = torch.tensor([c for _, c in out], dtype=torch.int64).view(C.shape[:-2])
    return total, count


def off_diagonal_covariance_(C: torch.Tensor, m: int) -> torch.Tensor:
    """DeCov's pass over products ``C = Ac^T Ac`` (..., n, n), in place: ``C / m`` with a zero
    diagonal. Returns the sums of the squares (...,), float64."""
    flat = C.view(-1, *C.shape[-2:])
    return torch.tensor([_off_diagonal_covariance_compiled(Cb.numpy(), m) for Cb in flat],
                        dtype=torch.float64).view(C.shape[:-2])
