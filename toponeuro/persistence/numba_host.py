"""numba backend: the compiled Prim of the torch backend, run on the host for any device.

For CUDA matrices of a few thousand neurons, one copy to the host and an
O(n^2) compiled loop on one CPU core cost less than Boruvka's rounds of
kernel launches and synchronisations, and scale across processes that share
one GPU (many small runs at once). The copy makes it the wrong choice for
large ``n``; the ``"torch"`` backend never leaves the device.

A stack of matrices (B, n, n) runs the same Prim on each member, the members
spread over numba's threads (:func:`prim_edges_stack`); the CPU path of the
torch backend uses it too.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .torch_mst import HAVE_NUMBA, _prim_compiled, _prim_input, _prim_packed_compiled, prim_edges

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
