"""The default backend: an exact minimum spanning tree without leaving the device.

* CPU tensors: Prim's algorithm in O(n^2), compiled with numba when it is
  installed. It reads each row of the matrix once, straight from the tensor's
  memory (no copy for a contiguous float32/float64 CPU tensor), and keeps
  O(n) state besides.
* CUDA float32 tensors (n <= 65536) with Triton installed (it comes with
  torch's CUDA builds): Boruvka's algorithm in four Triton kernels per round
  (:mod:`toponeuro.persistence.boruvka_triton`), whose one pass over the
  matrix reads each row in place and skips the rows whose lightest outgoing
  edge is still known. A logarithmic number of rounds, one host
  synchronisation each.
* Other CUDA tensors (float64, or no Triton), and CPU without numba:
  Boruvka's algorithm in torch operations
  (:mod:`toponeuro.persistence.boruvka`), rounds of whole-matrix reductions
  with row contraction, so that later rounds work on ``(components, n)``
  matrices, also with one synchronisation per round.

None of them copies a CUDA matrix to the host or loops once per vertex on
the device. Prim and the Triton Boruvka break ties by one strict total order,
``(D[i, j], i, j)`` with ``i < j``, so they return the same edges; the torch
Boruvka orders ties by component labels. Each returns the same edges every
time on the same matrix, ties and duplicate neurons included; where the MST is
not unique the torch Boruvka may pick another (equally light) tree, and the
deaths agree exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import boruvka_triton
from .boruvka import _PACKED_MAX_N, boruvka_edges

try:  # numba is optional: without it the torch Boruvka serves CPU tensors too
    import numba
except Exception:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ["death_edges", "death_edges_stack", "prim_edges", "boruvka_edges", "HAVE_NUMBA"]

HAVE_NUMBA = numba is not None

# devices where the Triton kernels failed to compile or launch once: not tried again in this process
_TRITON_FAILED: set = set()

# The packed Prim kernel stores an edge as one int64 key
# ``bits(w) << 32 | i << 16 | j`` (i < j): vertex labels must fit 16 bits, the
# same bound as Boruvka's packed picks (``_PACKED_MAX_N``).


def _prim_packed_kernel(D, out):
    """Prim's MST on a dense C-contiguous float32 matrix, n <= 65536.

    Writes the (n - 1, 2) edges ``(i, j)``, ``i < j``, into ``out``, in the
    order they join the tree.

    The order on edges is ``(D[i, j], i, j)`` lexicographically. A
    non-negative float32 orders like its bit pattern read as an integer, so
    the whole order is the integer order of the key
    ``bits(D[i, j]) << 32 | i << 16 | j``; the lightest edge from the tree to
    ``v`` is ``key[v]`` and the next tree edge is ``min(key)``. The inner loop
    is a branch-free pass over one contiguous row that the compiler
    vectorises; vertices already in the tree are masked by ``block[v]``
    (all ones), which pins their key at the maximum.
    """
    bits = D.view(np.int32)
    key, block = _packed_prim_start(D.shape[0])
    u = 0
    for step in range(D.shape[0] - 1):
        u = _packed_prim_step(bits[u], u, key, block, out[step])


def _packed_prim_start(n):
    """The packed Prim's state with vertex 0 in the tree: keys (n,) int64 all at the maximum,
    and the mask ``block`` (n,) int64, the maximum for tree vertices and 0 for the others."""
    top = np.iinfo(np.int64).max
    key = np.full(n, top, dtype=np.int64)
    block = np.zeros(n, dtype=np.int64)
    block[0] = top
    return key, block


def _packed_prim_step(row, u, key, block, edge):
    """One step of the packed Prim: relax the keys from ``u``'s row, take the lightest edge into ``edge``.

    row : (n,) int32, the bits of ``D[u]`` (non-negative float32); key, block : (n,) int64 as in
    :func:`_prim_packed_kernel`. Returns the vertex that joins the tree. Shared with the kernel
    that computes the row from a correlation matrix (``numba_host._prim_rho_packed_kernel``).
    """
    top = np.iinfo(np.int64).max
    n = row.shape[0]
    best = top
    for v in range(n):
        lo = min(u, v)
        hi = max(u, v)
        # & 0x7FFFFFFF reads -0.0 as +0.0 (equal weights tie by (i, j))
        cand = (np.int64(row[v] & 0x7FFFFFFF) << 32) | (np.int64(lo) << 16) | np.int64(hi)
        k = min(key[v], cand) | block[v]
        key[v] = k
        best = min(best, k)
    lo = (best >> 16) & 0xFFFF
    hi = best & 0xFFFF
    v = lo if block[lo] == 0 else hi
    block[v] = top
    edge[0] = lo
    edge[1] = hi
    return v


def _prim_kernel(D, out):
    """Prim's MST on a dense C-contiguous matrix; writes (n - 1, 2) edges into ``out``.

    The general kernel, for float64 and for n > 65536; float32 with
    n <= 65536 takes :func:`_prim_packed_kernel` (same edges, faster).

    ``best_w[v], best_u[v]`` is the lightest edge from the tree to ``v``, under
    the order (weight, min endpoint, max endpoint). ``rest`` holds the
    vertices still outside the tree, compacted by swap-removal so each step
    scans only those.
    """
    n = D.shape[0]
    rest = np.arange(1, n)
    n_rest = n - 1
    best_w = np.full(n, np.inf, dtype=D.dtype)
    best_u = np.zeros(n, dtype=np.int64)
    u = 0
    for step in range(n - 1):
        row = D[u]
        arg = -1
        aw = np.inf
        alo = 0
        ahi = 0
        for k in range(n_rest):
            v = rest[k]
            w = row[v]
            bw = best_w[v]
            if w < bw:
                best_w[v] = w
                best_u[v] = u
                bw = w
            elif w == bw:
                # tie: keep the lexicographically smaller (min, max) pair
                bu = best_u[v]
                if min(u, v) < min(bu, v) or (min(u, v) == min(bu, v) and max(u, v) < max(bu, v)):
                    best_u[v] = u
            if bw < aw:
                arg = k
                aw = bw
                bu = best_u[v]
                alo = min(bu, v)
                ahi = max(bu, v)
            elif bw == aw:
                bu = best_u[v]
                lo = min(bu, v)
                hi = max(bu, v)
                if lo < alo or (lo == alo and hi < ahi):
                    arg = k
                    alo = lo
                    ahi = hi
        v = rest[arg]
        out[step, 0] = alo
        out[step, 1] = ahi
        n_rest -= 1
        rest[arg] = rest[n_rest]
        u = v


if HAVE_NUMBA:
    # inlined into both packed kernels: compiled first, as they resolve it when they compile
    _packed_prim_start = numba.njit(cache=True, nogil=True, inline="always")(_packed_prim_start)
    _packed_prim_step = numba.njit(cache=True, nogil=True, inline="always")(_packed_prim_step)
    _prim_compiled = numba.njit(cache=True, nogil=True)(_prim_kernel)
    _prim_packed_compiled = numba.njit(cache=True, nogil=True)(_prim_packed_kernel)
else:  # pragma: no cover
    _prim_compiled = _prim_packed_compiled = None


def _prim_input(D: torch.Tensor, name: str) -> tuple[np.ndarray, bool]:
    """A CPU matrix (or stack) as the C-contiguous float32/float64 array Prim reads, and whether
    the packed kernel takes it (float32, n <= 65536)."""
    if not HAVE_NUMBA:
        raise RuntimeError(f"{name} needs numba; use boruvka_edges instead")
    X = D.detach()
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()  # half and bfloat16 widen to float32 exactly
    X = X.contiguous().numpy()
    return X, X.dtype == np.float32 and X.shape[-1] <= _PACKED_MAX_N


def prim_edges(D: torch.Tensor) -> torch.Tensor:
    """Exact MST by compiled Prim. D: (n, n) CPU tensor -> (n - 1, 2) LongTensor."""
    X, packed = _prim_input(D, "prim_edges")
    n = X.shape[0]
    out = np.empty((n - 1, 2), dtype=np.int64)
    if packed:
        _prim_packed_compiled(X, out)
    else:
        _prim_compiled(X, out)
    return torch.from_numpy(out)


def runs_triton(D: torch.Tensor) -> bool:
    """Whether the torch backend takes ``D`` (n, n) or (B, n, n) to the Triton Boruvka: CUDA
    float32 that it takes, on a device where it has not failed."""
    return D.is_cuda and boruvka_triton.runs_on(D) and D.device not in _TRITON_FAILED


def _triton_edges(D: torch.Tensor, of_rho: str | None = None) -> torch.Tensor | None:
    """The Triton Boruvka's edges of ``D`` (n, n) or (B, n, n) (of a correlation dissimilarity of
    ``D`` with ``of_rho``), or None where it does not run (or failed to compile or launch on this
    device before, or now)."""
    if not runs_triton(D):
        return None
    try:
        return boruvka_triton.triton_boruvka_edges(D, of_rho=of_rho)
    except ValueError:  # bad input, as the torch Boruvka would say
        raise
    except Exception as e:  # the kernels did not compile or launch on this device
        _TRITON_FAILED.add(D.device)
        warnings.warn(f"the Triton Boruvka failed on {D.device} ({type(e).__name__}: {e}); the torch "
                      f"backend uses its torch Boruvka there from now on", RuntimeWarning, stacklevel=3)
    return None


def death_edges(D: torch.Tensor) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1, 2) death edges on D's device."""
    if D.device.type == "cpu" and HAVE_NUMBA:
        return prim_edges(D)
    edges = _triton_edges(D)
    return boruvka_edges(D) if edges is None else edges


def death_edges_stack(D: torch.Tensor) -> torch.Tensor:
    """(B, n, n) dissimilarities -> (B, n - 1, 2) death edges on D's device, member ``b`` equal to
    ``death_edges(D[b])``: on CPU the compiled Prim over the members in parallel
    (:func:`.numba_host.prim_edges_stack`), on CUDA float32 one Triton Boruvka over the whole
    stack; otherwise (float64 on CUDA, CPU without numba) the torch Boruvka member by member."""
    if D.device.type == "cpu" and HAVE_NUMBA:
        from .numba_host import prim_edges_stack  # it imports this module

        return prim_edges_stack(D)
    edges = _triton_edges(D)
    return torch.stack([boruvka_edges(M) for M in D]) if edges is None else edges
