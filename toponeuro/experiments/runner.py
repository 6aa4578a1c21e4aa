"""Run an experiment grid, one row per finished run, losing nothing.

Layout of ``<out>/<experiment name>/``:

``runs.csv``
    One row per finished run (:data:`COLUMNS`), appended, flushed and
    fsynced by a single writer (the parent process) as each run finishes.
``curves/<run_id>.csv``
    The training curve of each run (:data:`CURVE_COLUMNS`), one line per
    epoch, written while the run trains.
``config.toml``
    A copy of the config of the last ``run``.
``errors.log``
    Tracebacks of runs that raised; those runs stay pending.

A rerun skips every run whose key (dataset, network, method, weight, seed)
has a row; a run killed half-way (a curve file without a row) is redone from
scratch, its curve overwritten. Rows of a different protocol (epoch cap,
patience, batch size, learning rate, training images, sampler, ...) are
refused rather than mixed: use another experiment name or ``--out``.

``jobs > 1`` trains that many runs at once in worker processes (``spawn``
context, so CUDA works in them), each with ``max(1, cpus // jobs)`` torch
threads; they share one device.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import multiprocessing
import os
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed, training
from .config import ExperimentConfig, RunSpec

__all__ = [
    "COLUMNS",
    "CURVE_COLUMNS",
    "PROTOCOL_COLUMNS",
    "DEFAULT_OUT",
    "RunSummary",
    "git_commit",
    "experiment_dir",
    "read_rows",
    "row_key",
    "pending_runs",
    "append_row",
    "execute_run",
    "run_experiment",
]

DEFAULT_OUT = Path("data") / "results"

COLUMNS = (
    "run_id", "dataset", "network", "method", "weight", "seed",
    "val_accuracy", "test_accuracy", "val_loss", "test_loss",
    "best_epoch", "epochs", "stopped_early", "diverged", "seconds", "seconds_per_epoch",
    "train_size", "val_size", "test_size", "max_epochs", "patience", "batch_size", "lr", "momentum",
    "nesterov", "lr_decay", "lr_decay_steps", "backend", "dissimilarity", "alpha", "sampler",
    "device", "torch_version", "commit", "finished_at",
)

#: columns that must agree between the rows already there and the config being run
PROTOCOL_COLUMNS = ("train_size", "val_size", "test_size", "max_epochs", "patience", "batch_size", "lr",
                    "momentum", "nesterov", "lr_decay", "lr_decay_steps", "backend", "dissimilarity", "alpha",
                    "sampler")

CURVE_COLUMNS = ("epoch", "train_loss", "train_reg", "val_loss", "val_accuracy", "lr", "seconds")


@dataclass
class RunSummary:
    """What :func:`run_experiment` did."""

    directory: Path
    total: int  # runs in the grid
    already_done: int  # skipped: a row was there
    finished: int  # trained and written now
    failed: list = field(default_factory=list)  # run_ids that raised
    pending: int = 0  # still to do after this call


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the package's repository, or ``"unknown"``.

    ``TOPONEURO_COMMIT`` in the environment takes precedence: a copy of the
    tree without ``.git`` (as on a rented GPU machine) can still record the
    commit it was copied from.
    """
    if os.environ.get("TOPONEURO_COMMIT", "").strip():
        return os.environ["TOPONEURO_COMMIT"].strip()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def experiment_dir(config: ExperimentConfig, out_root=DEFAULT_OUT) -> Path:
    return Path(out_root) / config.name


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def row_key(row: dict) -> tuple:
    """The identity of a run in ``runs.csv``: (dataset, network, method, weight, seed)."""
    return (row["dataset"], row["network"], row["method"], float(row["weight"]), int(row["seed"]))


def read_rows(path) -> list[dict]:
    """The complete rows of a ``runs.csv`` (a torn last line or a malformed row is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        text = fh.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a row torn by a kill mid-write
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if None in row or any(v is None for v in row.values()):
            continue
        try:
            row_key(row)
        except (KeyError, ValueError):
            continue
        rows.append(row)
    return rows


def _repair_torn_line(path: Path) -> None:
    """Cut a partial last line (killed mid-write) so the next append starts a fresh row."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def append_row(path, row: dict) -> None:
    """Append one row to ``runs.csv`` (header first if new), flush and fsync."""
    path = Path(path)
    new = not path.is_file() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow({k: _fmt(row[k]) for k in COLUMNS})
    with open(path, "a", newline="", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def _check_header(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) != COLUMNS:
        raise ValueError(f"{path} has columns {header}, not this version's {list(COLUMNS)}; "
                         "use another --out folder (or experiment name) for new runs")


def _protocol(config: ExperimentConfig, spec: RunSpec, sizes: tuple[int, int, int]) -> dict:
    t = config.training
    reg = config.regulariser_for(spec.network)
    return {
        "train_size": sizes[0], "val_size": sizes[1], "test_size": sizes[2],
        "max_epochs": t.max_epochs, "patience": t.patience, "batch_size": t.batch_size, "lr": float(t.lr),
        "momentum": float(t.momentum), "nesterov": t.nesterov, "lr_decay": float(t.lr_decay),
        "lr_decay_steps": t.lr_decay_steps, "backend": reg.backend, "dissimilarity": reg.dissimilarity,
        "alpha": float(reg.alpha), "sampler": reg.sampler_label(),
    }


def _split_sizes(config: ExperimentConfig) -> tuple[int, int, int]:
    """(train, val, test) sizes after the limits, without loading the images."""
    from .. import data

    full = {"mnist": (48000, 12000, 10000), "fashion-mnist": (48000, 12000, 10000)}.get(config.dataset)
    if full is None:
        full = tuple(len(data.load(config.dataset, s)[1]) for s in ("train", "val", "test"))
    limits = (config.limit, config.val_limit, config.test_limit)
    return tuple(n if lim is None else min(n, lim) for n, lim in zip(full, limits))


def _check_protocol(rows: list[dict], config: ExperimentConfig, directory: Path) -> None:
    if not rows:
        return
    sizes = _split_sizes(config)
    for row in rows:
        spec = RunSpec(row["dataset"], row["network"], row["method"], float(row["weight"]), int(row["seed"]))
        if spec.network not in config.networks:
            continue  # not part of this grid; left as it is
        expected = {k: _fmt(v) for k, v in _protocol(config, spec, sizes).items()}
        diff = {k: (row[k], expected[k]) for k in PROTOCOL_COLUMNS if row[k] != expected[k]}
        if diff:
            detail = ", ".join(f"{k}: {a} there vs {b} in the config" for k, (a, b) in diff.items())
            raise ValueError(f"{directory / 'runs.csv'} holds runs of a different protocol ({detail}); "
                             "use another experiment name or --out folder rather than mixing them")


def pending_runs(config: ExperimentConfig, directory) -> tuple[list[RunSpec], list[RunSpec]]:
    """(done, pending) runs of the grid, judged by the rows in ``<directory>/runs.csv``."""
    finished = {row_key(r) for r in read_rows(Path(directory) / "runs.csv")}
    runs = config.runs()
    done = [r for r in runs if r.key in finished]
    return done, [r for r in runs if r.key not in finished]


# -- one run ------------------------------------------------------------------------------------

_DATA_CACHE: dict = {}


def _data(config: ExperimentConfig, device: torch.device):
    """(train, val, test) of the config, limited, on ``device``; cached per process."""
    from .. import data

    key = (config.dataset, config.limit, config.val_limit, config.test_limit, str(device))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset per process at a time
        out = []
        for split, limit in (("train", config.limit), ("val", config.val_limit), ("test", config.test_limit)):
            X, y = data.load(config.dataset, split)
            if limit is not None:
                X, y = X[:limit], y[:limit]
            out.append((X.to(device), y.to(device)))
        _DATA_CACHE[key] = tuple(out)
    return _DATA_CACHE[key]


def execute_run(config: ExperimentConfig, spec: RunSpec, *, device="cpu", curves_dir=None,
                progress: bool = False, commit: str = "unknown") -> dict:
    """Train one run of the grid and return its ``runs.csv`` row.

    Seeds with ``spec.seed`` before building the network (initialisation) and
    passes it to :func:`toponeuro.training.fit` (data order) and to a random
    sampler. The curve goes to ``curves_dir/<run_id>.csv`` epoch by epoch.
    """
    from .. import data, models

    dev = training.resolve_device(device)
    train, val, test = _data(config, dev)
    training.seed_everything(spec.seed)
    model = models.build(spec.network, in_shape=data.input_shape(config.dataset),
                         num_classes=data.num_classes(config.dataset))
    reg = config.regulariser_for(spec.network)

    curve_fh = None
    writer = None
    if curves_dir is not None:
        Path(curves_dir).mkdir(parents=True, exist_ok=True)
        curve_fh = open(Path(curves_dir) / f"{spec.run_id}.csv", "w", newline="", encoding="utf-8")
        writer = csv.DictWriter(curve_fh, fieldnames=CURVE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        curve_fh.flush()

    def on_epoch(record: dict) -> None:
        if writer is not None:
            writer.writerow({k: _fmt(record[k]) for k in CURVE_COLUMNS})
            curve_fh.flush()

    try:
        result = training.fit(
            model, train, val, test, method=spec.method, weight=spec.weight, config=config.training,
            sampler=reg.build_sampler(spec.seed), backend=reg.backend, dissimilarity=reg.dissimilarity,
            alpha=reg.alpha, device=dev, seed=spec.seed, progress=progress,
            progress_desc=f"{spec.network} {spec.method} w={spec.weight:g} s={spec.seed}", on_epoch=on_epoch,
        )
    finally:
        if curve_fh is not None:
            curve_fh.close()
    sizes = (len(train[1]), len(val[1]), len(test[1]))
    row = {
        "run_id": spec.run_id, "dataset": spec.dataset, "network": spec.network, "method": spec.method,
        "weight": float(spec.weight), "seed": int(spec.seed),
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
        "val_loss": result.val_loss, "test_loss": result.test_loss,
        "best_epoch": result.best_epoch, "epochs": result.epochs, "stopped_early": result.stopped_early,
        "diverged": result.diverged, "seconds": round(result.seconds, 3),
        "seconds_per_epoch": round(result.seconds_per_epoch, 4),
        **_protocol(config, spec, sizes),
        "device": result.device, "torch_version": torch.__version__, "commit": commit,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return row


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _worker(task) -> tuple:
    config, spec, device, curves_dir, commit = task
    try:
        return ("ok", spec.run_id, execute_run(config, spec, device=device, curves_dir=curves_dir,
                                               progress=False, commit=commit))
    except Exception:  # reported by the parent; the run stays pending
        return ("error", spec.run_id, traceback.format_exc())


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_experiment(config: ExperimentConfig, *, out_root=DEFAULT_OUT, device=None, jobs: int = 1,
                   limit_runs: int | None = None, threads: int | None = None,
                   progress: bool = True) -> RunSummary:
    """Run every pending run of ``config``; append one row per finished run to ``runs.csv``.

    Parameters
    ----------
    out_root : results root; the experiment goes to ``out_root/<config.name>/``.
    device : ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None``/``"auto"``: CUDA when available.
    jobs : runs trained at once (worker processes with the spawn context when > 1).
    limit_runs : run at most this many of the pending runs (in grid order: seed-major).
    threads : torch threads per run; default ``max(1, cpus // jobs)``.
    progress : tqdm bars over runs (and over epochs when ``jobs == 1``).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if limit_runs is not None and (isinstance(limit_runs, bool) or not isinstance(limit_runs, int)
                                   or limit_runs < 0):
        raise ValueError(f"limit_runs must be a non-negative integer, got {limit_runs!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    dev = training.resolve_device(device)
    # under torchrun every rank trains each run together (DDP); rank 0 alone writes
    dev = distributed.setup(dev)
    if distributed.world_size() > 1 and jobs > 1:
        raise ValueError("under torchrun the ranks train each run together (DDP): use --jobs 1")
    writer = distributed.rank() == 0
    progress = progress and writer
    directory = experiment_dir(config, out_root)
    runs_csv = directory / "runs.csv"
    curves_dir = directory / "curves" if writer else None
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        _repair_torn_line(runs_csv)
    _check_header(runs_csv)
    _check_protocol(read_rows(runs_csv), config, directory)
    if config.text and writer:
        (directory / "config.toml").write_text(config.text, encoding="utf-8")

    done, pending = pending_runs(config, directory)
    todo = pending if limit_runs is None else pending[:limit_runs]
    summary = RunSummary(directory=directory, total=len(done) + len(pending), already_done=len(done),
                         finished=0, pending=len(pending))
    if not todo:
        return summary
    commit = git_commit()
    threads = threads or max(1, _cpus() // jobs)
    jobs = min(jobs, len(todo))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{config.name} ({len(done)} done before)", unit="run",
                   dynamic_ncols=True)

    def record(status: str, run_id: str, payload) -> None:
        if status == "ok":
            if writer:
                append_row(runs_csv, payload)
            summary.finished += 1
            summary.pending -= 1
            if bar is not None:
                bar.set_postfix_str(f"{run_id}: test {payload['test_accuracy']:.4f}")
        else:
            summary.failed.append(run_id)
            with open(directory / f"errors{'' if writer else f'.rank{distributed.rank()}'}.log", "a",
                      encoding="utf-8") as fh:
                stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                fh.write(f"--- {stamp} {run_id}\n{payload}\n")
            message = f"run {run_id} failed (traceback in {directory / 'errors.log'}): " \
                      f"{payload.strip().splitlines()[-1]}"
            if bar is not None:
                bar.write(message)
            else:
                print(message)
        if bar is not None:
            bar.update(1)

    try:
        if jobs == 1:
            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for spec in todo:
                    try:
                        row = execute_run(config, spec, device=dev, curves_dir=curves_dir,
                                          progress=progress, commit=commit)
                    except Exception:
                        record("error", spec.run_id, traceback.format_exc())
                    else:
                        record("ok", spec.run_id, row)
            finally:
                torch.set_num_threads(previous_threads)
        else:
            context = multiprocessing.get_context("spawn")
            tasks = [(config, spec, str(dev), curves_dir, commit) for spec in todo]
            with context.Pool(jobs, initializer=_init_worker, initargs=(threads,)) as pool:
                for status, run_id, payload in pool.imap_unordered(_worker, tasks):
                    record(status, run_id, payload)
    finally:
        if bar is not None:
            bar.close()
    return summary

