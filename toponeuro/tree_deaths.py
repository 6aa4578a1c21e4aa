"""Deaths from activations, with a gradient through the n - 1 tree edges only.

The deaths of the 0-dimensional persistence are the dissimilarities of the
minimum spanning tree's n - 1 edges. Their gradient needs those n - 1 values
only, so :func:`tree_deaths` finds the tree on a dissimilarity computed
*without* autograd, then recomputes the dissimilarity of the tree's pairs from
the activations *with* autograd (for the correlation-based ones, one dot
product of standardised columns per edge): the backward pass costs O(m n)
instead of the dense pipeline's O(m n^2), and no (n, n) matrix is kept for it.

The values are those of the dense pipeline, ``deaths(dissimilarity(A))``, up to
rounding: each tree pair takes the value the no-grad matrix gave it, and only its
gradient comes from the recomputation (for the correlation-based built-ins the
backward of ``rho_e = Z_i . Z_j`` through the standardisation is written out by
hand in O(m n); for ``euclidean`` and a user's pairwise form, a straight-through
correction ``x + (x_matrix - x).detach()``, which changes the value by rounding
only and the gradient not at all). So the deaths come out ascending exactly as
:func:`toponeuro.persistence.deaths` returns them, and every branch (clamp,
``|.|``, square root) is taken on the same value as there.

On CPU, for a float32 correlation-based dissimilarity with the ``"torch"`` or
``"numba"`` backend (and numba installed), the matrix is the upper triangle of
``C = Z^T Z`` (row panels: up to half the product's flops) in a reusable
buffer, mirrored in place tile by tile, and the MST is read from ``C`` with the
dissimilarity computed on the fly
(:func:`toponeuro.persistence.numba_host.prim_edges_of_correlation`): at most
one matrix product and two passes over ``C``. On CUDA, for float32 with the
``"torch"`` backend (and Triton), the same: the upper triangle by row panels
into the reused buffer, mirrored in place by a Triton kernel
(:mod:`toponeuro.persistence.mirror_triton`), and the Triton Boruvka reading
``C`` with the dissimilarity computed on the fly
(``triton_boruvka_edges(C, of_rho=...)``): no (n, n) matrix besides the
workspace. Elsewhere (float64, other backends, ``euclidean``, a dissimilarity
of your own with a pairwise form) the dense dissimilarity is built without
autograd and handed to :func:`toponeuro.persistence.death_edges`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import dissimilarity as _dissimilarity
from . import persistence
from ._validation import check_activations
from .dissimilarity import _autocast_off, _full_precision
from .persistence import mirror_triton, numba_host, torch_mst

__all__ = ["tree_deaths", "Workspace"]


class Workspace:
    """Reusable scratch memory for :func:`tree_deaths`' (n, n) matrices.

    One flat buffer per (dtype, device), grown to the largest size asked for;
    ``matrix(shape, ...)`` returns a view of it, overwritten by the next call.
    Copies (``copy.deepcopy``, ``pickle``) start empty: scratch is not state.
    """

    def __init__(self):
        self._buffers: dict = {}

    def matrix(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` (contents undefined) in the buffer of ``(dtype, device)``."""
        size = int(np.prod(shape))
        key = (dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < size:
            self._buffers.pop(key, None)  # free the old one first: the new one may be all the memory there is
            buf = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(shape)

    def clear(self) -> None:
        """Release the buffers."""
        self._buffers.clear()

    def __getstate__(self):
        return {"_buffers": {}}

    def __deepcopy__(self, memo):
        return Workspace()

    def __repr__(self) -> str:
        held = sum(b.numel() * b.element_size() for b in self._buffers.values())
        return f"Workspace({held / 2**20:.1f} MiB)"


def _reads_correlation_in_place(C: torch.Tensor, backend: str) -> bool:
    """C: (B, n, n). The CPU fast path: Prim straight from the correlation matrix (same edges as these backends)."""
    return backend in ("torch", "numba") and all(numba_host.runs_rho_prim(Cb) for Cb in C)


def _panel_rows(n: int) -> int:
    """Rows of C per product for its upper triangle (narrower panels: fewer flops, up to half).

    Measured on an idle 2-core machine (m = 256; median ms of the panels for n = 1010 /
    4096 / 8192, the full product in brackets): one thread, 256 rows take 52.7 (101) at
    n = 4096 and 233 (406) at 8192; two threads, 512 rows take 2.22 (2.88), 34.4 (82.3) and
    128 (207), where 256 rows lose at 8192 (144). Under heavy load, narrow panels pay for
    their many parallel regions (measured earlier at a load average of 4 to 6: 256 rows
    took 1021 ms against the full product's 640 at n = 8192 with two threads). Two threads at
    n = 1010 / 2048: 256 rows take 1.92 / 7.45 ms against 512 rows' 2.22 / 8.28.
    """
    return 256 if torch.get_num_threads() == 1 or n <= 2048 else 512


def _on_gpu(C: torch.Tensor) -> bool:
    """Whether ``C`` takes the GPU's kernels (the tests route CPU tensors there, under Triton's interpreter)."""
    return C.is_cuda


def _gpu_panel_rows(n: int) -> int:
    """Rows of C per product on CUDA: at most eight panels (about 56 % of the full product's
    flops), none narrower than 2048 rows, so that each product still fills the GPU."""
    return max(2048, -(-n // 8))


def symmetric_gram(Zd: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """(..., n, n) ``Z^T Z`` of ``Zd`` (..., m, n), exactly symmetric, no grad (diagonal as the product gives it).

    The correlation matrix of standardised columns here, and the dense baselines' products in
    :mod:`toponeuro.regularisers`. In ``workspace`` when one is given, else a fresh buffer.
    """
    n = Zd.shape[-1]
    shape = (*Zd.shape[:-2], n, n)
    C = torch.empty(shape, dtype=Zd.dtype, device=Zd.device) if workspace is None else \
        workspace.matrix(shape, Zd.dtype, Zd.device)
    if _on_gpu(C) and mirror_triton.runs_on(C):
        # the whole stack at once, the upper triangle by row panels, then mirrored in place by Triton
        rows = _gpu_panel_rows(n)
        for lo in range(0, n, rows):
            torch.matmul(Zd[..., lo:lo + rows].mT, Zd[..., lo:], out=C[..., lo:lo + rows, lo:])
        return mirror_triton.mirror_upper_(C)
    if numba_host.HAVE_NUMBA and C.device.type == "cpu" and C.dtype in (torch.float32, torch.float64):
        # a member at a time, the upper triangle by row panels, then mirrored in place tile by tile
        rows = _panel_rows(n)
        for Zb, Cb in zip(Zd.reshape(-1, *Zd.shape[-2:]), C.view(-1, n, n)):
            for lo in range(0, n, rows):
                torch.mm(Zb[:, lo:lo + rows].mT, Zb[:, lo:], out=Cb[lo:lo + rows, lo:])
            numba_host.mirror_upper_(Cb)
        return C
    torch.matmul(Zd.mT, Zd, out=C)
    return 0.5 * (C + C.mT)  # the product is not always bitwise symmetric; the MST wants it exactly


def _edges_of_correlation(C: torch.Tensor, name: str, of_rho, backend: str) -> torch.Tensor:
    """(B, n, n) symmetric correlation matrices -> (B, n - 1, 2) death edges of ``of_rho(clamp(C))``, canonical order."""
    if backend == "torch" and _on_gpu(C):
        # the Triton Boruvka reads C and computes the dissimilarity on the fly (1 - |C| is never built)
        edges = torch_mst._triton_edges(C, of_rho=name)
        if edges is not None:  # None: not float32, or the kernels failed here (warned): the dense path below
            return edges
    if _reads_correlation_in_place(C, backend):
        # the CPU kernel reads one member's C at a time (1 - |C| is never built)
        out = []
        for Cb in C:
            edges = numba_host.prim_edges_of_correlation(Cb, name)
            # canonical order (as persistence.death_edges gives): by (d, i, j); d from the same rho
            rho = Cb[edges[:, 0], edges[:, 1]].clamp(-1.0, 1.0)
            e = edges.numpy()
            out.append(persistence._sorted_by_weight(e[:, 0], e[:, 1], of_rho(rho).numpy(), Cb.shape[-1]))
        return torch.stack(out)
    D = of_rho(C.clamp(-1.0, 1.0))
    D.diagonal(dim1=-2, dim2=-1).zero_()  # as the dense matrix (the product's diagonal is only nearly 1, or 0 for a dead neuron)
    return persistence.death_edges(D, backend=backend, check=False)  # the whole stack in one call


def _straight_through(recomputed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The value of ``reference`` with the gradient of ``recomputed`` (they differ by rounding)."""
    return recomputed + (reference.to(recomputed.dtype) - recomputed).detach()


class _CorrelationOfPairs(torch.autograd.Function):
    """``rho`` of the pairs ``(i, j)`` as a function of ``A``: the value given, the gradient by hand.

    For ``Z = centred(A) / norm`` (columns; constant ones masked to 0) and
    ``rho_e = Z_i . Z_j``, the backward of ``sum_e g_e rho_e`` is, column by column,
    ``G_c = (H_c - Z_c (Z_c . H_c)) / norm_c`` with ``H_c = sum over the pairs e at c of
    g_e Z_partner``, and 0 for a constant column. ``H`` is a combination of centred
    columns, so the centring's backward (subtract each column's mean) has nothing left
    to remove and is skipped. Per-edge factors ``g_e / norm_c`` are folded in on the
    (k,) side, so the (m, n) work is one gather, one product, one scatter, a column dot
    product and one fused update: six passes where autograd through the standardisation
    takes some twenty-five (each a parallel region, which costs most on a loaded machine).
    On the CPU a numba kernel does the same row by row in the (m, n) layout
    (:func:`toponeuro.persistence.numba_host.pairs_gradient`), without the two transposed
    copies: 1.4 ms against 2.3 ms for the backward at m = 256, n = 1010. First order only.
    """

    @staticmethod
    def forward(ctx, A, rho, Z, norm, constant, i, j):
        ctx.save_for_backward(Z, norm, constant, i, j)
        return rho.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        Z, norm, constant, i, j = ctx.saved_tensors
        at = torch.cat([i, j], -1)  # the column each term lands in ...
        partner = torch.cat([j, i], -1)  # ... and the column it is a multiple of
        # g_e / norm_at, and 0 into a constant column (its masked centring stops the gradient)
        scale = torch.where(constant, torch.zeros_like(norm), 1.0 / norm).squeeze(-2)
        factor = torch.cat([g, g], -1) * scale.gather(-1, at)
        if numba_host.runs_pairs_gradient(Z):  # CPU: row by row in (m, n), no transposed copies
            return numba_host.pairs_gradient(Z, at, partner, factor), None, None, None, None, None, None
        # in the (n, m) layout, where a neuron is a row: index_select / index_add_ copy whole rows
        # (along a row-major (m, n) matrix's columns they cost several times more)
        Zt = Z.mT.contiguous()
        Gt = torch.zeros_like(Zt)
        for Zb, Gb, at_b, partner_b, factor_b in zip(Zt, Gt, at, partner, factor):  # member by member
            Gb.index_add_(0, at_b, Zb.index_select(0, partner_b) * factor_b.unsqueeze(-1))
        # the normalisation's backward, (H - Z (Z . H)) / norm, with the 1 / norm already in H
        Gt = torch.addcmul(Gt, Zt, torch.linalg.vecdot(Zt, Gt, dim=-1).unsqueeze(-1), value=-1.0)
        # contiguous: a strided gradient reaches collectives (all_gather's backward under DDP) as it is
        return Gt.mT.contiguous(), None, None, None, None, None, None


def _tree_deaths_of_correlation(A: torch.Tensor, fn, backend: str, workspace) -> torch.Tensor:
    """A: (B, m, n) float -> (B, n - 1) deaths of a correlation-based built-in."""
    of_rho = _dissimilarity.OF_CORRELATION[fn]
    with torch.no_grad():
        # the one standardisation: the matrix's and the pairs' (whose gradient _CorrelationOfPairs gives)
        Z, norm, constant = _dissimilarity._standardise(A.detach())
        C = symmetric_gram(Z, workspace)
        edges = _edges_of_correlation(C, fn.__name__, of_rho, backend).to(A.device)
        rho_matrix = persistence._at_edges(C, edges)  # read before the buffer is reused
    rho = _CorrelationOfPairs.apply(A, rho_matrix, Z, norm, constant, edges[..., 0], edges[..., 1])
    # clamped here, on the matrix's value, as on the dense path (the gradient stops where it clamps)
    return of_rho(rho.clamp(-1.0, 1.0))


def _tree_deaths_of_dense(A: torch.Tensor, fn, pairwise, backend: str, builtin: bool) -> torch.Tensor:
    """A: (B, m, n) -> (B, n - 1): the tree of ``fn(A)`` (no grad), the pairs' values by ``pairwise``."""
    with torch.no_grad():
        # built-ins take check=False (A is validated); a user's matrix is checked by death_edges
        # the built-ins take the stack (a user's function one (m, n) member at a time)
        D = fn(A.detach(), check=False) if builtin else torch.stack([fn(a) for a in A.detach()])
        edges = persistence.death_edges(D, backend=backend, check=not builtin)  # the whole stack in one call
        values_matrix = persistence._at_edges(D, edges)
    if builtin:
        values = pairwise(A, edges[..., 0], edges[..., 1], check=False)
    else:  # a user's pairwise form takes (m, n) activations: one member at a time
        values = torch.stack([pairwise(A[b], edges[b, :, 0], edges[b, :, 1]) for b in range(A.shape[0])])
    return _straight_through(values, values_matrix)


def tree_deaths(A: torch.Tensor, dissimilarity="abs_correlation", backend: str = "torch", *,
                check: bool = True, workspace: Workspace | None = None) -> torch.Tensor:
    """Deaths of the 0-dimensional persistence of the neurons, differentiable through the tree edges.

    Parameters
    ----------
    A : (m, n) or (B, m, n) tensor
        Activations, batch first; a stack of B independent sets of activations.
    dissimilarity : str or callable
        A built-in name (:data:`toponeuro.dissimilarity.DISSIMILARITIES`) or a
        function ``(m, n) -> (n, n)`` that has a pairwise form
        (:func:`toponeuro.dissimilarity.get_pairwise`).
    backend : str
        Persistence backend that gives death edges.
    check : bool
        Validate ``A`` (shape, finiteness); a user's matrix is checked too.
    workspace : Workspace, optional
        Scratch memory reused across calls for the (n, n) matrix (one is kept
        by :class:`~toponeuro.TopologicalRegulariser`); without it, a fresh one.

    Returns
    -------
    (n - 1,) or (B, n - 1) tensor
        Ascending, equal (up to rounding) to ``persistence.deaths(dissimilarity(A))``
        and, at every point where that is differentiable, with the same gradient
        with respect to ``A``. Float16/bfloat16 activations are computed, and
        returned, in float32, with autocast disabled inside.
    """
    fn = _dissimilarity.get(dissimilarity)
    pairwise = _dissimilarity.get_pairwise(fn)
    if pairwise is None:
        raise ValueError(
            f"dissimilarity {getattr(fn, '__name__', fn)!r} has no pairwise form; give it one "
            "(fn.pairwise = pairs, see toponeuro.dissimilarity.get_pairwise) or use "
            "persistence.deaths(fn(A)) on the dense matrix"
        )
    spec = persistence.get_backend(backend)  # unknown or not installed: ValueError naming the others
    if not spec.gives_edges:
        raise ValueError(f"backend {backend!r} gives death values only; the tree path needs death edges: "
                         f"use one of {persistence.edge_backends()}")
    stacked = torch.is_tensor(A) and A.ndim == 3
    if check:
        A = check_activations(A, stack=True)
    A = _full_precision(A)
    A = A if stacked else A[None]
    with _autocast_off(A.device.type, "cpu"):
        if fn in _dissimilarity.OF_CORRELATION:
            deaths = _tree_deaths_of_correlation(A, fn, backend, workspace)
        else:
            builtin = fn in _dissimilarity.DISSIMILARITIES.values()
            deaths = _tree_deaths_of_dense(A, fn, pairwise, backend, builtin)
    return deaths if stacked else deaths[0]
