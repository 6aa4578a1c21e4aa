"""The lock of an experiment folder: one ``toponeuro experiment run`` per folder at a time.

:func:`toponeuro.experiments.runner.run_experiment` holds an exclusive
``flock`` on ``<folder>/.lock`` (a shard on a file of its own) while it runs,
in the writer process only (under torchrun, rank 0; :func:`agree_on_lock`
tells the other ranks whether it got it). A second ``run`` on the same folder
fails at once with :class:`ExperimentLockedError` instead of training the
same pending runs again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import socket
import warnings
from pathlib import Path

import torch

from .. import distributed

__all__ = ["LOCK_NAME", "ExperimentLockedError", "experiment_lock", "locked_message", "agree_on_lock"]

#: the lock file in an experiment folder (see :func:`experiment_lock`)
LOCK_NAME = ".lock"


class ExperimentLockedError(ValueError):
    """Another process (another ``toponeuro experiment run``) holds the experiment folder's lock."""


def locked_message(directory: Path, holder: str = "") -> str:
    """The refusal of a locked ``directory``; ``holder``: what the lock file says about its holder."""
    return (f"experiment folder {directory} is in use: another `toponeuro experiment run` holds its lock "
            f"({directory / LOCK_NAME}{'; ' + holder if holder else ''}). Wait for it to finish, or run "
            "this config into another --out folder; two runs on one folder would train the same pending "
            "runs twice")


@contextlib.contextmanager
def experiment_lock(directory, name: str = LOCK_NAME):
    """Hold an exclusive, non-blocking ``flock`` on ``<directory>/.lock`` for the ``with`` block.

    The folder is created if needed. The lock file is left in place (removing
    it would let a third process lock a new file while the second still holds
    the old one); while the lock is held it says which process holds it.
    The lock goes with the process: a killed ``run`` releases it.

    Raises
    ------
    ExperimentLockedError : (a ValueError) another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        warnings.warn("fcntl is not available on this platform: the experiment folder is not locked; "
                      "do not run two `toponeuro experiment run` on one folder at once", stacklevel=3)
        yield None
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name  # a shard locks its own file (shards.lock_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
            raise ExperimentLockedError(locked_message(directory, holder)) from None
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"held by pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # nobody holds it now
    finally:
        os.close(fd)  # releases the lock


def agree_on_lock(locked: bool, device: torch.device) -> bool:
    """Under torchrun: whether rank 0 (the only rank that locks) got the lock, on every rank.

    Outside a process group: ``locked`` itself. Every rank must call this.
    """
    if not distributed.is_distributed():
        return locked
    import torch.distributed as dist

    flag = torch.tensor([1 if locked else 0], dtype=torch.int64, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
