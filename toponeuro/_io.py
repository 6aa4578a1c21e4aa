"""Files written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["replace_atomically"]


def replace_atomically(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, flushed to disk, then ``os.replace`` onto ``path``.

    A reader, or a kill at any moment, sees the old file or the new one, never half of one. The
    temporary name carries the process id, so two processes writing one path at once do not share
    it; on any error it is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
