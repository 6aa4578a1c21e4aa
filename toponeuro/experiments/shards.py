"""Shards: the I-th of N disjoint parts of a grid, each with its own rows file.

``toponeuro experiment run CONFIG --shard I/N`` (1 <= I <= N) trains the runs
at grid positions ``I - 1, I - 1 + N, I - 1 + 2N, ...`` of
:meth:`ExperimentConfig.runs` (round robin: every shard gets a share of every
network, method and seed), and appends their rows to
``runs.shard-I-of-N.csv`` in the experiment folder, under a lock of its own
(``.lock.shard-I-of-N``): N processes (a SLURM job array, one per GPU) share
one folder without sharing a file. A run whose key has a row in any rows file
of the folder (``runs.csv`` or a shard's) counts as done, so a grid begun
unsharded can be finished sharded, and the reverse. ``experiment report``
reads them all (:func:`rows_files`).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["parse_shard", "shard_runs", "runs_file_name", "lock_name", "rows_files"]

_SHARD_FILE = re.compile(r"^runs\.shard-(\d+)-of-(\d+)\.csv$")


def parse_shard(text) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N``; ``None`` or ``""`` -> ``None`` (the whole grid)."""
    if text is None or text == "":
        return None
    if isinstance(text, tuple):
        i, n = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise ValueError(f"shard {text!r}: write it as I/N, e.g. 2/8 for the second of 8 parts")
        i, n = int(match[1]), int(match[2])
    if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
        raise ValueError(f"shard {i}/{n}: needs 1 <= I <= N (shards are numbered from 1, like SLURM's "
                         "--array=1-N)")
    return i, n


def shard_runs(runs: list, shard: tuple[int, int] | None) -> list:
    """The runs of shard ``(I, N)``: positions ``I - 1`` modulo ``N`` of the grid's order; all for ``None``."""
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for pos, r in enumerate(runs) if pos % n == i - 1]


def runs_file_name(shard: tuple[int, int] | None) -> str:
    """``runs.csv``, or ``runs.shard-I-of-N.csv`` for a shard."""
    return "runs.csv" if shard is None else f"runs.shard-{shard[0]}-of-{shard[1]}.csv"


def lock_name(shard: tuple[int, int] | None, base: str = ".lock") -> str:
    """The folder lock's file name: ``.lock``, or ``.lock.shard-I-of-N`` for a shard."""
    return base if shard is None else f"{base}.shard-{shard[0]}-of-{shard[1]}"


def rows_files(directory) -> list[Path]:
    """Every rows file of an experiment folder: ``runs.csv`` first, then the shards' in (N, I) order."""
    directory = Path(directory)
    found = []
    if (directory / "runs.csv").is_file():
        found.append(directory / "runs.csv")
    shards = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = _SHARD_FILE.match(path.name)
            if match and path.is_file():
                shards.append(((int(match[2]), int(match[1])), path))
    return found + [p for _, p in sorted(shards)]
