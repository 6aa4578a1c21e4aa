"""In place on the GPU: the lower triangle of a square matrix becomes the mirror of its upper one.

The tree path (:mod:`toponeuro.tree_deaths`) computes the upper triangle of the
correlation matrix ``C = Z^T Z`` by row panels (about half the product's flops)
and needs ``C`` exactly symmetric for the MST, whose order must not depend on
which of ``C[i, j]`` and ``C[j, i]`` a kernel reads. ``0.5 * (C + C.T)`` costs
a second (n, n) matrix; :func:`mirror_upper_` costs nothing but one read of the
upper triangle and one write of the lower one. It is the GPU twin of
:func:`toponeuro.persistence.numba_host.mirror_upper_`.

One Triton program per tile of the upper triangle (diagonal tiles included):
it loads the tile by rows and stores its transpose into the mirror tile, which
Triton stages through shared memory so that both sides are accessed by rows.
No two programs touch the same entry, so the update is race-free in place.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .boruvka_triton import HAVE_TRITON, _interpreting, triton, tl

__all__ = ["mirror_upper_", "runs_on"]

TILE = 64  # a 64 x 64 tile and its mirror per program
_MAX_MEMBERS = 65535  # CUDA's limit on the grid's third axis


if HAVE_TRITON:
    def _mirror_upper_source(C, n, member_stride, stride, TILE: tl.constexpr):
        """C[j, i] = C[i, j] for i < j, within the tile pair (program_id(0), program_id(1)) of
        member program_id(2); programs below the diagonal return at once."""
        bi = tl.program_id(0)
        bj = tl.program_id(1)
        if bj >= bi:
            C += tl.program_id(2).to(tl.int64) * member_stride
            rows = bi * TILE + tl.arange(0, TILE)
            cols = bj * TILE + tl.arange(0, TILE)
            upper = (rows[:, None] < cols[None, :]) & (cols[None, :] < n)  # i < j < n: the strict upper part
            x = tl.load(C + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=upper)
            # the transposed tile, written by rows of the lower triangle
            mirror = C + cols.to(tl.int64)[:, None] * stride + rows[None, :]
            tl.store(mirror, tl.trans(x), mask=tl.trans(upper))


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    # one compiled (or interpreted) kernel per mode, as boruvka_triton's kernels
    return triton.jit(_mirror_upper_source)


def runs_on(C: torch.Tensor) -> bool:
    """Whether :func:`mirror_upper_` takes ``C``: a row-contiguous float32/float64 (n, n) or
    (B, n, n) tensor on CUDA (or on the CPU under Triton's interpreter), Triton installed."""
    return (HAVE_TRITON and C.dtype in (torch.float32, torch.float64) and C.dim() in (2, 3)
            and C.shape[-1] == C.shape[-2] and C.stride(-1) == 1 and not C.requires_grad
            and (C.dim() == 2 or C.shape[0] <= _MAX_MEMBERS)
            and (C.is_cuda or (C.device.type == "cpu" and _interpreting())))


def mirror_upper_(C: torch.Tensor) -> torch.Tensor:
    """In place: ``C[..., j, i] = C[..., i, j]`` for ``i < j``; the diagonal is left as it is.

    C : (n, n) or (B, n, n) tensor, see :func:`runs_on`. Returns ``C``.
    """
    if not runs_on(C):
        raise ValueError(f"mirror_upper_ needs a row-contiguous float32/float64 (n, n) or (B, n, n) tensor "
                         f"without grad on CUDA and Triton installed, got {C.dtype} of shape {tuple(C.shape)} "
                         f"on {C.device}")
    X = C if C.dim() == 3 else C[None]
    B, n = X.shape[0], X.shape[-1]
    if B == 0 or n < 2:
        return C
    tiles = triton.cdiv(n, TILE)
    with torch.cuda.device(X.device) if X.is_cuda else contextlib.nullcontext():  # launch on C's device
        _kernel(_interpreting())[(tiles, tiles, B)](X, n, X.stride(0), X.stride(1), TILE=TILE)
    return C
