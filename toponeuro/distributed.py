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

``"global"`` is a collective: every rank must call the regulariser, with the
same number of neurons. A regulariser called on one rank only (a diagnostic
on rank 0, say) waits forever for the others; use ``sync="local"`` there.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

__all__ = ["SYNC_MODES", "is_distributed", "gather_batch", "global_sum", "init_from_env", "rank", "world_size", "local_device", "setup"]

SYNC_MODES = ("global", "local")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group that ``torchrun`` describes, once.

    With ``WORLD_SIZE > 1`` in the environment (``torchrun --nproc_per_node=N``),
    initialise the default group: NCCL when ``device`` is CUDA, gloo otherwise.
    Returns True inside a group of more than one rank.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device is not None and torch.device(device).type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return is_distributed()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device becomes this process's GPU (``LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: str | torch.device) -> torch.device:
    """Join torchrun's process group if there is one; return this rank's device.

    Outside torchrun (or with one process) the device comes back unchanged.
    """
    init_from_env(device)
    return local_device(device)


def _global(sync: str) -> bool:
    """Whether ``sync`` asks for the global batch and there is a process group to give it."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
    return sync == "global" and is_distributed()


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
    if not _global(sync):
        return A
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=A.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([A.shape[0]], device=A.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"sync='global' needs the same batch size on every rank, got {[int(s) for s in sizes]}; "
            "drop the last incomplete batch (drop_last=True)"
        )
    with warnings.catch_warnings():
        # torch >= 2.9 marks this autograd-aware all_gather deprecated in favour of a private API
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(A.contiguous())
    return torch.cat(parts, dim=0)


def global_sum(t: torch.Tensor, sync: str = "global") -> torch.Tensor:
    """``t`` summed over ranks (a copy, without autograd) under ``sync="global"``.

    For statistics that a choice depends on (the importance sampler's
    per-neuron sums of ``|a|``), so that every rank makes the choice of the
    global batch. ``"local"``, or no process group: ``t`` itself.
    """
    if not _global(sync):
        return t
    total = t.detach().clone()
    dist.all_reduce(total)
    return total
