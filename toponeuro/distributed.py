"""The regulariser under DistributedDataParallel: global or local batch.

Correlations estimated on one rank's slice of the batch are noisier than on
the global batch. With ``sync="global"`` every rank all-gathers the recorded
activations *with autograd*, so the dissimilarity, the MST and the value are
those of the global batch and identical on every rank.

Why the world-size factor works out: the backward of
``torch.distributed.nn.functional.all_gather`` sums, over ranks, the gradient
each rank's (identical) value sends to a slice, so rank ``r`` receives
``W * dR/dA_r``. DDP then averages parameter gradients over the ``W`` ranks,
which leaves exactly ``sum_r dR/dA_r dA_r/dtheta = dR/dtheta``, the
single-process gradient of the global batch. (The task loss, a mean over each
rank's equal slice, is averaged by DDP to the global mean as usual.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["SYNC_MODES", "is_distributed", "gather_batch"]

SYNC_MODES = ("global", "local")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(A: torch.Tensor, sync: str = "global") -> torch.Tensor:
    """Activations of the batch the regulariser should see.

    Parameters
    ----------
    A : (m_local, n) this rank's activations, batch first.
    sync : {"global", "local"}
        ``"global"``: all ranks' rows, concatenated in rank order, with
        autograd; every rank must call this with the same ``n``.
        ``"local"``: ``A`` itself. Without an initialised process group both
        return ``A``.

    Returns
    -------
    (m_global, n) or (m_local, n) tensor.
    """
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
    if sync == "local" or not is_distributed():
        return A
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=A.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([A.shape[0]], device=A.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"sync='global' needs the same batch size on every rank, got {[int(s) for s in sizes]}; "
            "drop the last incomplete batch (drop_last=True)"
        )
    return torch.cat(all_gather(A.contiguous()), dim=0)
