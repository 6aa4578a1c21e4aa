"""0-dimensional persistence of the Vietoris-Rips filtration on neurons.

The 0-dimensional diagram of a clique with edge weights ``D`` has ``n``
points born at 0; ``n - 1`` die at finite times, which are exactly the edge
weights of a minimum spanning tree (MST). The *death edges* are the MST edges.

The combinatorial question "which edges kill which components" is answered by
a swappable backend, without gradient. The deaths are then *gathered* from
``D`` in torch, so the gradient never depends on the backend::

    edges = death_edges(D, backend="giotto-ph")   # (n - 1, 2), no grad
    d = deaths(D, backend="torch")                # (n - 1,), differentiable

A backend is a module with ``death_edges(D) -> LongTensor (n - 1, 2)`` (or,
for value-only backends such as ripser.py, ``death_values(D) -> Tensor``),
registered in :data:`BACKENDS` below: adding one touches one file and one line.

Both functions also take a stack ``D: (B, n, n)`` of matrices and return
``(B, n - 1, 2)`` edges and ``(B, n - 1)`` deaths, each member equal (bit for
bit) to the call on that member alone. A backend module that has
``death_edges_stack(D) -> (B, n - 1, 2)`` does the stack in one call (the
torch backend: numba threads over the members on CPU, one Triton grid on
CUDA); the others are called once per member.
"""

from __future__ import annotations

import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from .._validation import _check_dissimilarity_form, _check_dissimilarity_values
from .tree import mst_margin, tree_path_max  # noqa: F401  (MST analysis: toponeuro.persistence.tree)

__all__ = ["death_edges", "deaths", "available_backends", "edge_backends", "get_backend", "BACKENDS", "Backend",
           "canonical_order"]


@dataclass(frozen=True)
class Backend:
    """A registered persistence backend.

    name : the name users pass (``backend="giotto-ph"``).
    module : the import path of the plug-in module.
    requires : top-level modules that must import for it to be available.
    gives_edges : whether it returns death edges (else death values only).
    """

    name: str
    module: str
    requires: tuple[str, ...]
    gives_edges: bool

    def load(self):
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "toponeuro.persistence.torch_mst", ("torch",), True),
    "giotto-ph": Backend("giotto-ph", "toponeuro.persistence.giotto", ("gph",), True),
    "ripser": Backend("ripser", "toponeuro.persistence.ripser_values", ("ripser",), False),
    "numba": Backend("numba", "toponeuro.persistence.numba_host", ("numba",), True),
    "torch-graph": Backend("torch-graph", "toponeuro.persistence.cuda_graph", ("torch",), True),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a broken binary extension
        return False
    return True


def _installed(b: Backend) -> bool:
    """The backend's requirements and its own module import here."""
    return all(_importable(r) for r in b.requires) and _importable(b.module)


def available_backends() -> list[str]:
    """Names of the backends whose requirements and module import here, in registry order."""
    return [name for name, b in BACKENDS.items() if _installed(b)]


def edge_backends() -> list[str]:
    """The available backends that give death edges (hence gradients), in registry order."""
    return [name for name in available_backends() if BACKENDS[name].gives_edges]


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; a ValueError naming the available ones if it
    is unknown or not installed here."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown persistence backend {name!r}; available here: {available_backends()} "
            f"(all known: {sorted(BACKENDS)})"
        )
    b = BACKENDS[name]
    if not _installed(b):
        raise ValueError(
            f"persistence backend {name!r} is not installed (needs {', '.join(b.requires)} and its module "
            f"{b.module}); available here: {available_backends()}"
        )
    return b


def canonical_order(D: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Orient edges as ``(i < j)`` and sort them by ``(D[i, j], i, j)``.

    Parameters
    ----------
    D : (n, n) tensor, or a stack (B, n, n)
    edges : (k, 2) integer tensor of vertex pairs, or (B, k, 2): member ``b``'s edges of ``D[b]``

    Returns
    -------
    (k, 2) (or (B, k, 2)) LongTensor on ``D``'s device, ascending by weight,
    ties by ``(i, j)``; each member ordered as it would be alone.
    """
    edges = edges.to(device=D.device, dtype=torch.long)
    if D.device.type == "cpu" and D.dtype in (torch.float32, torch.float64):
        return _canonical_order_numpy(D, edges)
    return _canonical_order_torch(D, edges)


def _canonical_order_numpy(D: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    # On CPU the torch dispatches cost more than the two small sorts
    # themselves (0.5 ms against 0.1 ms at n = 2048): the same order in NumPy.
    e = edges.numpy()
    lo, hi = np.minimum(e[..., 0], e[..., 1]), np.maximum(e[..., 0], e[..., 1])
    members = tuple(np.indices(lo.shape)[:-1])  # () for one matrix, (b,) for a stack
    return _sorted_by_weight(lo, hi, D.detach().numpy()[(*members, lo, hi)], D.shape[-1])


def _sorted_by_weight(lo: np.ndarray, hi: np.ndarray, weights: np.ndarray, n: int) -> torch.Tensor:
    """Edges ``(lo, hi)``, ``lo < hi < n``, with their weights, all (..., k) arrays -> (..., k, 2)
    LongTensor sorted by ``(weight, lo, hi)`` along the last axis (the canonical order)."""
    by_pair = np.argsort(lo * n + hi, axis=-1)  # equal keys are equal rows: stability is moot
    lo, hi, weights = (np.take_along_axis(x, by_pair, -1) for x in (lo, hi, weights))
    by_weight = np.argsort(weights, axis=-1, kind="stable")
    lo, hi = np.take_along_axis(lo, by_weight, -1), np.take_along_axis(hi, by_weight, -1)
    return torch.from_numpy(np.stack([lo, hi], axis=-1))


def _canonical_order_torch(D: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    lo = torch.minimum(edges[..., 0], edges[..., 1])
    hi = torch.maximum(edges[..., 0], edges[..., 1])
    n = D.shape[-1]
    by_pair = torch.argsort(lo * n + hi, dim=-1)
    lo, hi = lo.gather(-1, by_pair), hi.gather(-1, by_pair)
    w = D.detach()[(*_members(D), lo, hi)]
    by_weight = torch.argsort(w, dim=-1, stable=True)
    return torch.stack([lo.gather(-1, by_weight), hi.gather(-1, by_weight)], dim=-1)


def _members(D: torch.Tensor) -> tuple:
    """The index of the leading (member) dimension of a stack (B, n, n), to index ``D`` beside a
    (B, k) pair of vertex indices; () for one matrix."""
    return () if D.ndim == 2 else (torch.arange(D.shape[0], device=D.device)[:, None],)


def _at_edges(D: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """D: (n, n) or (B, n, n), edges: (k, 2) or (B, k, 2) -> (k,) or (B, k), ``D[(b,) i, j]``."""
    return D[(*_members(D), edges[..., 0], edges[..., 1])]


# Backends whose CPU kernel is safe on any values of a square floating matrix
# (NaN, inf, negative, asymmetric): the compiled Prim loops of torch_mst run
# a fixed n - 1 steps and only ever index inside the matrix. For these, on
# CPU, the O(n^2) check of D runs while the backend computes.
_OVERLAP_SAFE = ("torch", "numba")
_OVERLAP_MIN_N = 768  # below this the hand-off (~0.1 ms) costs what it saves (measured, 2 cores)

_worker = None
_worker_pid = None
_worker_lock = threading.Lock()


def _mst_worker() -> ThreadPoolExecutor:
    """The one-thread pool that runs a backend while the caller checks D.

    Created on first use; a forked child makes its own (a pool's thread does
    not survive ``fork``). Its idle thread is joined at interpreter exit.
    """
    global _worker, _worker_pid
    with _worker_lock:
        if _worker is None or _worker_pid != os.getpid():
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="toponeuro-mst")
            _worker_pid = os.getpid()
        return _worker


def _can_overlap(D: torch.Tensor, b: Backend) -> bool:
    # the work goes with the entries: a stack (B, n, n) overlaps from that of one matrix of _OVERLAP_MIN_N
    if b.name not in _OVERLAP_SAFE or D.device.type != "cpu" or D.numel() < _OVERLAP_MIN_N ** 2:
        return False
    if torch.get_num_threads() < 2:  # the user's thread budget: one core, run in turn
        return False
    from . import torch_mst

    return torch_mst.HAVE_NUMBA  # without numba the torch backend runs Boruvka: not overlapped


def _backend_edges(D: torch.Tensor, b: Backend) -> torch.Tensor:
    """The backend's MST of ``D`` (unchecked), in canonical order, without grad.

    D : (n, n) -> (n - 1, 2), or a stack (B, n, n) -> (B, n - 1, 2)."""
    with torch.no_grad():
        X = D.detach()
        if X.dtype not in (torch.float32, torch.float64):
            X = X.float()  # half and bfloat16 widen exactly; plug-ins see float32/float64 only
        n = X.shape[-1]
        if X.ndim == 2:
            edges = b.load().death_edges(X)
            _check_spanning_tree(edges, n, b.name)
        else:
            edges = _stack_edges(X, b)
            if tuple(edges.shape) != (X.shape[0], n - 1, 2):
                raise RuntimeError(f"backend {b.name!r} returned edges of shape {tuple(edges.shape)} for a "
                                   f"stack of shape {tuple(X.shape)}; please report this, and use "
                                   f"backend='torch' meanwhile")
            for k in range(edges.shape[0]):
                _check_spanning_tree(edges[k], n, b.name, member=k)
        return canonical_order(D, edges)


def _stack_edges(X: torch.Tensor, b: Backend) -> torch.Tensor:
    """(B, n, n) -> (B, n - 1, 2): the backend's ``death_edges_stack`` where it has one, else its
    ``death_edges`` member by member."""
    if X.shape[0] == 0:
        return torch.empty((0, X.shape[-1] - 1, 2), dtype=torch.long, device=X.device)
    module = b.load()
    if hasattr(module, "death_edges_stack"):
        return module.death_edges_stack(X)
    return torch.stack([module.death_edges(M) for M in X])


# Kernels that build their tree by union-find or component contraction, tested against SciPy:
# checking that their edges span would cost a host copy (and a sync on a GPU) per call for nothing
_TREE_BY_CONSTRUCTION = ("torch", "torch-graph", "numba")


def _check_spanning_tree(edges: torch.Tensor, n: int, name: str, member: int | None = None) -> None:
    """Refuse a backend's answer that is not n - 1 edges spanning all n vertices.

    The deaths are gathered at these edges, so anything else would give
    silently wrong values. The count is checked for every backend; that the
    edges span (connected components on the host), for the others.
    ``member``: the index of the matrix in a stack, for the message.
    """
    def refuse(what: str):
        of = "" if member is None else f" (member {member} of the stack)"
        raise RuntimeError(f"backend {name!r} returned {what} for n = {n}{of}, not a spanning tree; "
                           f"please report this, and use backend='torch' meanwhile")

    if tuple(edges.shape) != (n - 1, 2):
        refuse(f"edges of shape {tuple(edges.shape)} (a spanning tree has ({n - 1}, 2))")
    if name in _TREE_BY_CONSTRUCTION or n < 2:
        return
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    e = edges.detach().cpu().numpy()
    if e.min() < 0 or e.max() >= n:
        refuse(f"a vertex index outside [0, {n})")
    graph = coo_matrix((np.ones(n - 1), (e[:, 0], e[:, 1])), shape=(n, n))
    count, _ = connected_components(graph, directed=False)
    if count != 1:
        refuse(f"n - 1 edges that leave {count} components")


def _upper_mirrored(D: torch.Tensor) -> torch.Tensor:
    """``D`` with its lower triangle replaced by the upper one's mirror (a copy, without grad).

    The check accepts a ``D`` whose two triangles differ by rounding (up to
    100 machine epsilons, 4 in 16 bits); the backends assume exact symmetry, and the deaths
    are gathered from the upper triangle, so that is the one they are given.
    """
    X = D.detach()
    k = torch.arange(X.shape[-1], device=X.device)
    return torch.where(k[:, None] <= k[None, :], X, X.mT)  # a stack (B, n, n): each member


# backends whose kernels have no data-dependent shapes or host reads, hence run on
# the 'meta' device (shape propagation, e.g. to check a model under FakeTensor)
_META_BACKENDS = ("torch-graph",)


def _formed(D, b: Backend) -> torch.Tensor:
    """``D`` as a floating square (n, n) tensor, or a stack (B, n, n) of them, n >= 2, on a device
    ``b`` runs on: the O(1) checks (no sync), made even when ``check=False``."""
    D = _check_dissimilarity_form(D, stack=True)
    if D.is_meta and b.name not in _META_BACKENDS:
        raise ValueError(
            f"dissimilarity matrix is on the 'meta' device, which backend {b.name!r} cannot run on "
            f"(it reads values); use backend={_META_BACKENDS[0]!r} with check=False there"
        )
    return D


def _checked_edges(D, b: Backend, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(D as a tensor, its death edges), validating D first when ``check``.

    On CPU, for a backend in :data:`_OVERLAP_SAFE`, n >= 768 and
    ``torch.get_num_threads() >= 2``, the backend runs in a worker thread
    (:func:`_mst_worker`) while this thread checks D's values (both kernels
    release the GIL). If the check fails, its ValueError is raised once the
    backend has finished, and the backend's result is discarded. A ``D`` that
    passes but is not exactly symmetric goes to the backend as
    :func:`_upper_mirrored`.
    """
    D = _formed(D, b)
    if not check:
        return D, _backend_edges(D, b)
    job = None
    if _can_overlap(D, b):
        try:
            job = _mst_worker().submit(_backend_edges, D, b)
        except RuntimeError:  # the interpreter is shutting down: no new threads
            job = None
    try:
        asym = _check_dissimilarity_values(D)
    except BaseException:
        if job is not None:
            wait([job])  # let the kernel finish with D before the error propagates
        raise
    if asym > 0:
        if job is not None:
            wait([job])
        return D, _backend_edges(_upper_mirrored(D), b)
    return D, job.result() if job is not None else _backend_edges(D, b)


def death_edges(D: torch.Tensor, backend: str = "torch", check: bool = True) -> torch.Tensor:
    """The MST edges of the complete graph weighted by ``D``: the death edges.

    Parameters
    ----------
    D : (n, n) tensor, or a stack (B, n, n)
        Symmetric, non-negative, finite dissimilarity matrix. A ``D`` whose
        triangles differ by rounding only (the check allows 100 machine
        epsilons, 4 in 16 bits) is read through its upper triangle, from which the deaths
        are gathered. With ``check=False`` the backends assume all this: the
        torch backend's Boruvka (CUDA) raises a ValueError on weights it
        cannot order consistently; the results of the others are unspecified.
    backend : str
        A name from :func:`available_backends` that gives edges.
    check : bool
        Validate ``D`` first (one pass over the matrix, a few syncs on GPU).
        On CPU with at least 2 torch threads and n >= 768, the check of the
        ``"torch"`` and ``"numba"`` backends runs alongside the MST, in one
        module-level worker thread: a bad ``D`` still raises the check's
        ValueError, and no edges are returned. Inside a CUDA graph capture
        the check's sync is not allowed: it raises a ValueError there, so
        pass ``check=False`` (and check ``D`` once before capturing).

    Returns
    -------
    (n - 1, 2) LongTensor on ``D``'s device, without grad: rows ``(i, j)`` with
    ``i < j``, ascending by ``D[i, j]``, ties by ``(i, j)``. For a given backend
    the same matrix always gives the same edges, ties included.
    For a stack, (B, n - 1, 2): member ``b`` equals ``death_edges(D[b])``
    (B = 0 gives (0, n - 1, 2)). The stack is checked in one pass, and an
    error names the member at fault.
    """
    b = get_backend(backend)
    if not b.gives_edges:
        raise ValueError(
            f"backend {backend!r} gives death values only, not death edges; "
            f"use one of {edge_backends()}"
        )
    return _checked_edges(D, b, check)[1]


def deaths(D: torch.Tensor, backend: str = "torch", check: bool = True) -> torch.Tensor:
    """Finite death times of the 0-dimensional persistence diagram.

    Parameters
    ----------
    D : (n, n) tensor, or a stack (B, n, n)
    backend : str
    check : bool
        As in :func:`death_edges` (the same overlap of check and MST).

    Returns
    -------
    (n - 1,) tensor, ascending. For edge-giving backends it is ``D`` gathered at
    the death edges, hence differentiable with respect to ``D``; a value-only
    backend (``"ripser"``) returns values without gradient. For a stack,
    (B, n - 1): row ``b`` equals ``deaths(D[b])``, gathered from ``D[b]``.

    Notes
    -----
    Each death is read from ``D[i, j]`` with ``i < j``, so the gradient with
    respect to ``D`` lands on the upper triangle only. Through a ``D`` built
    symmetric from parameters (every built-in dissimilarity) the chain rule
    makes this the full gradient. To descend on a ``D`` that is itself a
    leaf, symmetrise its gradient (``(G + G.T) / 2``) or parametrise ``D``
    symmetrically, or the next call will find it asymmetric.
    """
    b = get_backend(backend)
    if b.gives_edges:
        D, e = _checked_edges(D, b, check)
        return _at_edges(D, e)
    D = X = _formed(D, b)
    if check:
        X = _upper_mirrored(D) if _check_dissimilarity_values(D) > 0 else D
    with torch.no_grad():
        if X.ndim == 2:
            values = b.load().death_values(X.detach())
        elif X.shape[0]:
            values = torch.stack([b.load().death_values(M) for M in X.detach()])
        else:
            values = torch.empty((0, X.shape[-1] - 1))
    return torch.sort(values.to(device=D.device, dtype=D.dtype), dim=-1).values
