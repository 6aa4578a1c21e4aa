"""The ``runs.csv`` file of an experiment folder: its columns, and reading and appending its rows.

One row per finished run (:data:`COLUMNS`), appended, flushed and fsynced
by a single writer (:func:`append_row`). Reading (:func:`read_rows`) keeps
the complete rows, one per run key (:func:`row_key`): a row torn by a kill
mid-write is skipped, and of two rows of one key the first is kept. A file
written before the columns ``init``, ``include_bias``, ``pixel_scale`` and
``engine`` existed reads with :data:`LEGACY_DEFAULTS` (what those runs did),
and :func:`upgrade_header` rewrites it with this version's columns.
The folder around the file, and who writes it when, is
:mod:`toponeuro.experiments.runner`'s.
"""

from __future__ import annotations

import csv
import io
import os

from .._io import replace_atomically
from pathlib import Path

__all__ = [
    "COLUMNS",
    "COLUMNS_BEFORE_ENGINE",
    "PROTOCOL_COLUMNS",
    "LEGACY_DEFAULTS",
    "format_cell",
    "row_key",
    "read_rows",
    "repair_torn_line",
    "append_row",
    "legacy_headers",
    "check_header",
    "upgrade_header",
]

COLUMNS = (
    "run_id", "dataset", "network", "method", "weight", "seed",
    "val_accuracy", "test_accuracy", "val_loss", "test_loss",
    "best_epoch", "epochs", "stopped_early", "diverged", "seconds", "seconds_per_epoch",
    "train_size", "val_size", "test_size", "max_epochs", "patience", "batch_size", "lr", "momentum",
    "nesterov", "lr_decay", "lr_decay_steps", "backend", "dissimilarity", "alpha", "sampler",
    "init", "include_bias", "pixel_scale",
    "device", "torch_version", "commit", "finished_at", "engine",
)

#: the columns of runs.csv before the engine column; such a file is upgraded in place (engine "single")
COLUMNS_BEFORE_ENGINE = tuple(c for c in COLUMNS if c != "engine")

#: columns that must agree between the rows already there and the config being run
PROTOCOL_COLUMNS = ("train_size", "val_size", "test_size", "max_epochs", "patience", "batch_size", "lr",
                    "momentum", "nesterov", "lr_decay", "lr_decay_steps", "backend", "dissimilarity", "alpha",
                    "sampler", "init", "include_bias", "pixel_scale")

#: columns added after the first version of ``runs.csv``, with the value that describes what the runs
#: without them did: PyTorch's default initialisation, L1/L2 over the weights only, pixels divided by 255 once
LEGACY_DEFAULTS = {"init": "torch", "include_bias": "false", "pixel_scale": "1/255", "engine": "single"}


def format_cell(value) -> str:
    """A value as ``runs.csv`` (and a curve file) writes it: booleans ``true``/``false``, floats exactly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def row_key(row: dict) -> tuple:
    """The identity of a run in ``runs.csv``: (dataset, network, method, weight, seed)."""
    return (row["dataset"], row["network"], row["method"], float(row["weight"]), int(row["seed"]))


def read_rows(path) -> list[dict]:
    """The complete rows of a ``runs.csv``, one per run key.

    A torn last line or a malformed row is skipped; of two rows with the same
    :func:`row_key` (two processes on one folder, before the folder lock) the
    first is kept.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        text = fh.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a row torn by a kill mid-write
    rows = []
    seen = set()
    for row in csv.DictReader(io.StringIO(text)):
        if None in row or any(v is None for v in row.values()):
            continue
        for column, value in LEGACY_DEFAULTS.items():
            row.setdefault(column, value)  # a row of a runs.csv written before the column existed
        try:
            key = row_key(row)
        except (KeyError, ValueError):
            continue
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    return rows


def repair_torn_line(path: Path) -> None:
    """Cut a partial last line (killed mid-write) so the next append starts a fresh row."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def append_row(path, row: dict) -> None:
    """Append one row to ``runs.csv`` (header first if new), flush and fsync.

    Appends unconditionally; :func:`toponeuro.experiments.runner.run_experiment`
    first checks that the row's key is not there yet.
    """
    path = Path(path)
    new = not path.is_file() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow({k: format_cell(row[k]) for k in COLUMNS})
    with open(path, "a", newline="", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def legacy_headers() -> tuple[tuple, ...]:
    """The headers of earlier versions of runs.csv: before the fidelity columns, and before the engine column."""
    return tuple(c for c in COLUMNS if c not in LEGACY_DEFAULTS), COLUMNS_BEFORE_ENGINE


def check_header(path: Path) -> None:
    """Refuse (``ValueError``) a ``runs.csv`` whose header is neither this version's nor an earlier one."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) != COLUMNS and tuple(header) not in legacy_headers():
        raise ValueError(f"{path} has columns {header}, not this version's {list(COLUMNS)}; "
                         "use another --out folder (or experiment name) for new runs")


def upgrade_header(path: Path) -> bool:
    """Rewrite a ``runs.csv`` of an earlier version with this version's columns; True if it did.

    The new columns get :data:`LEGACY_DEFAULTS` (what those runs did). The
    rewrite goes to a temporary file that replaces the old one at once, so a
    kill leaves either the old file or the new one. Call it under the folder lock.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) not in legacy_headers():
        return False
    rows = read_rows(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(path, write)
    return True

