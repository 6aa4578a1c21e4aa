"""Run an experiment grid, one row per finished run, losing nothing.

Layout of ``<out>/<experiment name>/``:

``runs.csv``
    One row per finished run (:data:`COLUMNS`), appended, flushed and
    fsynced by a single writer (the parent process) as each run finishes.
    A key already there is never appended again, and a reader keeps the
    first row of a key (a folder written by two processes before the lock
    existed still reads once per run). The file format: :mod:`.runs_csv`.
``curves/<run_id>.csv``
    The training curve of each run (:data:`CURVE_COLUMNS`), one line per
    epoch. It is written while the run trains to a temporary file of its
    own, ``curves/.<run_id>.csv.<pid>.<random>.tmp``, and renamed
    (``os.replace``) to the final name when the run finishes: a killed run
    leaves no half curve under the final name, and two writers never share
    a file.
``init/<network>_<init>_s<seed>.pt``
    The initial weights of a (network, seed), saved by its first run and
    loaded by every other method's run (:func:`initial_weights`).
``runs.shard-I-of-N.csv``, ``.lock.shard-I-of-N``
    The rows and the lock of shard I of N (``--shard I/N``, :mod:`.shards`).
``checkpoints/``
    The batched engine's stack checkpoints (:mod:`.engine`), removed when a stack is done.
``config.toml``
    A copy of the config of the last ``run``.
``errors.log``
    Tracebacks of runs that raised; those runs stay pending.
``.lock``
    :func:`run_experiment` holds an exclusive ``flock`` on it while it runs
    (the writer process only; under torchrun, rank 0). A second ``run`` on
    the same folder fails at once with :class:`ExperimentLockedError`
    instead of training the same pending runs again (:mod:`.lock`).

A rerun skips every run whose key (dataset, network, method, weight, seed)
has a row; a run killed half-way (no row) is redone from scratch, and its
curve replaces any earlier one. Rows of a different protocol (epoch cap,
patience, batch size, learning rate, training images, sampler,
initialisation, L1/L2 over biases, pixel scale, ...) are refused rather than
mixed: use another experiment name or ``--out``. A ``runs.csv`` written
before the columns ``init``, ``include_bias`` and ``pixel_scale`` existed
reads with :data:`LEGACY_DEFAULTS` (what those runs did) and is rewritten
with this version's header when a ``run`` resumes it.

``jobs > 1`` trains that many runs at once in worker processes (``spawn``
context, so CUDA works in them), each with ``max(1, cpus // jobs)`` torch
threads; they share one device.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import multiprocessing
import os
import re
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed, training
from .._io import replace_atomically
from ..provenance import git_commit
from . import shards
from .config import ExperimentConfig, RunSpec
# the runs.csv format and the folder lock live in their own modules; their names stay importable from here
from .lock import LOCK_NAME, ExperimentLockedError, agree_on_lock, experiment_lock, locked_message
from .runs_csv import (COLUMNS, COLUMNS_BEFORE_ENGINE, LEGACY_DEFAULTS, PROTOCOL_COLUMNS, append_row, check_header,
                       format_cell, read_rows, repair_torn_line, row_key, upgrade_header)

__all__ = [
    "COLUMNS",
    "COLUMNS_BEFORE_ENGINE",
    "CURVE_COLUMNS",
    "PROTOCOL_COLUMNS",
    "LEGACY_DEFAULTS",
    "DEFAULT_OUT",
    "LOCK_NAME",
    "RunSummary",
    "ExperimentLockedError",
    "experiment_lock",
    "experiment_dir",
    "read_rows",
    "row_key",
    "pending_runs",
    "append_row",
    "initial_weights",
    "execute_run",
    "run_experiment",
]

DEFAULT_OUT = Path("data") / "results"

#: the engines that train runs: one model per process, or stacks of models (toponeuro.ensemble)
ENGINES = ("single", "batched")

#: the columns of a curve file, ``curves/<run_id>.csv``
CURVE_COLUMNS = ("epoch", "train_loss", "train_reg", "val_loss", "val_accuracy", "lr", "seconds")

#: a curve being written: ``.<run_id>.csv.<pid>.<random>.tmp`` (mkstemp's random part has no dots)
_CURVE_TMP = re.compile(r"^\.(?P<run_id>.+)\.csv\.(?P<pid>\d+)\.[^.]+\.tmp$")


@dataclass
class RunSummary:
    """What :func:`run_experiment` did."""

    directory: Path
    total: int  # runs in the grid
    already_done: int  # skipped: a row was there
    finished: int  # trained and written now
    failed: list = field(default_factory=list)  # run_ids that raised
    pending: int = 0  # still to do after this call


def experiment_dir(config: ExperimentConfig, out_root=DEFAULT_OUT) -> Path:
    return Path(out_root) / config.name


def _protocol(config: ExperimentConfig, spec: RunSpec, sizes: tuple[int, int, int]) -> dict:
    t = config.training
    reg = config.regulariser_for(spec.network)
    return {
        "train_size": sizes[0], "val_size": sizes[1], "test_size": sizes[2],
        "max_epochs": t.max_epochs, "patience": t.patience, "batch_size": t.batch_size, "lr": float(t.lr),
        "momentum": float(t.momentum), "nesterov": t.nesterov, "lr_decay": float(t.lr_decay),
        "lr_decay_steps": t.lr_decay_steps, "backend": reg.backend, "dissimilarity": reg.dissimilarity,
        "alpha": float(reg.alpha), "sampler": reg.sampler_label(),
        "init": config.init, "include_bias": reg.include_bias, "pixel_scale": config.pixel_scale,
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
        expected = {k: format_cell(v) for k, v in _protocol(config, spec, sizes).items()}
        diff = {k: (row[k], expected[k]) for k in PROTOCOL_COLUMNS if row[k] != expected[k]}
        if diff:
            detail = ", ".join(f"{k}: {a} there vs {b} in the config" for k, (a, b) in diff.items())
            raise ValueError(f"{directory / 'runs.csv'} holds runs of a different protocol ({detail}); "
                             "use another experiment name or --out folder rather than mixing them")


def pending_runs(config: ExperimentConfig, directory, shard=None) -> tuple[list[RunSpec], list[RunSpec]]:
    """(done, pending) runs of the grid (of shard ``(I, N)`` of it), judged by the rows of every rows file
    in ``directory`` (``runs.csv`` and the shards', see :mod:`.shards`)."""
    finished = {row_key(r) for path in shards.rows_files(directory) for r in read_rows(path)}
    runs = shards.shard_runs(config.runs(), shard)
    done = [r for r in runs if r.key in finished]
    return done, [r for r in runs if r.key not in finished]


# -- one run ------------------------------------------------------------------------------------

_DATA_CACHE: dict = {}


def _data(config: ExperimentConfig, device: torch.device):
    """(train, val, test) of the config, limited, on ``device``; cached per process."""
    from .. import data

    key = (config.dataset, config.limit, config.val_limit, config.test_limit, config.pixel_scale, str(device))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset per process at a time
        out = []
        for split, limit in (("train", config.limit), ("val", config.val_limit), ("test", config.test_limit)):
            X, y = data.load(config.dataset, split, pixel_scale=config.pixel_scale)
            if limit is not None:
                X, y = X[:limit], y[:limit]
            out.append((X.to(device), y.to(device)))
        _DATA_CACHE[key] = tuple(out)
    return _DATA_CACHE[key]


def initial_weights(config: ExperimentConfig, spec: RunSpec, init_dir=None) -> torch.nn.Module:
    """The network of ``spec``, initialised as the config says, with torch's generator seeded by ``spec.seed``.

    With ``init_dir``, the first run of a (network, seed) saves its initial
    weights to ``init_dir/<network>_s<seed>.pt`` and every later run of that
    (network, seed), whatever its method or weight, loads them (as the
    authors' code shared one saved initialisation between methods). The
    network is always built first, so the generator is left in the same
    state whether the weights were loaded or drawn.
    """
    from .. import data, models

    model, _ = training.seeded_build(spec.seed, lambda: models.build(
        spec.network, in_shape=data.input_shape(config.dataset), num_classes=data.num_classes(config.dataset),
        init=config.init))
    if init_dir is None:
        return model
    init_dir = Path(init_dir)
    path = init_dir / f"{spec.network}_{config.init}_s{spec.seed}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    init_dir.mkdir(parents=True, exist_ok=True)
    # two runs of one (network, seed) at once write the same weights, each through its own temporary file
    replace_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model


def curve_tempfile(curves_dir, run_id: str) -> tuple[int, str]:
    """(fd, path) of a new temporary curve file for ``run_id`` in ``curves_dir`` (see the module docstring)."""
    # a name of this writer alone (O_EXCL): an orphaned worker of a killed run and its rerun never share one
    fd, path = tempfile.mkstemp(prefix=f".{run_id}.csv.{os.getpid()}.", suffix=".tmp", dir=curves_dir)
    os.chmod(path, 0o644)
    return fd, path


def execute_run(config: ExperimentConfig, spec: RunSpec, *, device="cpu", curves_dir=None,
                progress: bool = False, commit: str = "unknown", init_dir=None) -> dict:
    """Train one run of the grid and return its ``runs.csv`` row.

    Builds the network with :func:`initial_weights` (seeded with ``spec.seed``;
    ``init_dir``, by default ``init/`` beside ``curves_dir``: the saved
    initialisation shared by every method; none without either) and
    passes the seed to :func:`toponeuro.training.fit` (data order) and to a random
    sampler. The curve is written epoch by epoch to a temporary file of this
    process in ``curves_dir`` and renamed to ``curves_dir/<run_id>.csv``
    when the run finishes (a run that raises removes it).
    """
    dev = training.resolve_device(device)
    train, val, test = _data(config, dev)
    if init_dir is None and curves_dir is not None:
        init_dir = Path(curves_dir).parent / "init"
    model = initial_weights(config, spec, init_dir)
    reg = config.regulariser_for(spec.network)

    curve_fh = None
    curve_tmp = None
    writer = None
    if curves_dir is not None:
        Path(curves_dir).mkdir(parents=True, exist_ok=True)
        fd, curve_tmp = curve_tempfile(curves_dir, spec.run_id)
        curve_fh = open(fd, "w", newline="", encoding="utf-8")
        writer = csv.DictWriter(curve_fh, fieldnames=CURVE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        curve_fh.flush()

    def on_epoch(record: dict) -> None:
        if writer is not None:
            writer.writerow({k: format_cell(record[k]) for k in CURVE_COLUMNS})
            curve_fh.flush()

    try:
        result = training.fit(
            model, train, val, test, method=spec.method, weight=spec.weight, config=config.training,
            sampler=reg.build_sampler(spec.seed), backend=reg.backend, dissimilarity=reg.dissimilarity,
            alpha=reg.alpha, include_bias=reg.include_bias, device=dev, seed=spec.seed, progress=progress,
            progress_desc=f"{spec.network} {spec.method} w={spec.weight:g} s={spec.seed}", on_epoch=on_epoch,
        )
        if curve_fh is not None:
            curve_fh.flush()
            os.fsync(curve_fh.fileno())
            curve_fh.close()
            os.replace(curve_tmp, Path(curves_dir) / f"{spec.run_id}.csv")
    except BaseException:
        if curve_fh is not None:
            curve_fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(curve_tmp)
        raise
    sizes = (len(train[1]), len(val[1]), len(test[1]))
    return result_row(config, spec, result, sizes, commit)


def result_row(config: ExperimentConfig, spec: RunSpec, result: training.FitResult, sizes: tuple[int, int, int],
               commit: str, engine: str = "single") -> dict:
    """The ``runs.csv`` row of a finished run; ``sizes``: (train, val, test) sizes."""
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
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "engine": engine,
    }
    return row


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker process when the process ``parent_pid`` (the ``run`` that started it) dies.

    A killed ``run`` (SIGKILL, a lost terminal) would otherwise leave its
    pool workers training on, holding the device and writing curves nobody
    collects. On Linux the kernel sends SIGTERM at the parent's death
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the
    parent pid once a second.
    """
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the prctl: no signal will come
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="toponeuro-parent-watchdog", daemon=True).start()


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent alone handles it (it keeps the rows written
    # and stops the pool), so the workers do not each print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _worker(task) -> tuple:
    config, spec, device, curves_dir, commit = task
    try:
        return ("ok", spec.run_id, execute_run(config, spec, device=device, curves_dir=curves_dir,
                                               progress=False, commit=commit))
    except Exception:  # reported by the parent; the run stays pending
        return ("error", spec.run_id, traceback.format_exc())


def _remove_orphaned_curves(curves_dir: Path, run_ids=None) -> list[Path]:
    """Remove temporary curves whose writer process is gone (a killed run); return them.

    ``run_ids``: only those runs' (a shard's: the other shards' writers may run on other hosts,
    where their pids mean nothing here).

    Called under the folder lock. A temporary curve whose process is still
    alive (an orphaned worker of a killed ``run`` still training) is left to
    it: that worker renames it into place itself when it finishes.
    """
    removed = []
    if not curves_dir.is_dir():
        return removed
    for path in curves_dir.glob(".*.tmp"):
        match = _CURVE_TMP.match(path.name)
        if match is None or (run_ids is not None and match["run_id"] not in run_ids):
            continue
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
        except (PermissionError, OverflowError):
            pass  # alive (another user's), or not a pid
    return removed


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_experiment(config: ExperimentConfig, *, out_root=DEFAULT_OUT, device=None, jobs: int = 1,
                   limit_runs: int | None = None, threads: int | None = None,
                   progress: bool = True, commit: str | None = None, engine: str = "single", shard=None,
                   checkpoint_every: float = 300.0, stack_size: int = 128) -> RunSummary:
    """Run every pending run of ``config``; append one row per finished run to ``runs.csv``.

    Parameters
    ----------
    out_root : results root; the experiment goes to ``out_root/<config.name>/``.
    device : ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None``/``"auto"``: CUDA when available.
    jobs : runs trained at once (worker processes with the spawn context when > 1).
    limit_runs : run at most this many of the pending runs (in grid order: seed-major).
    threads : torch threads per run; default ``max(1, cpus // jobs)``.
    progress : tqdm bars over runs (and over epochs when ``jobs == 1``).
    commit : the code's commit recorded in every new row; default
        :func:`toponeuro.provenance.git_commit` (``TOPONEURO_COMMIT``, else git, else ``"unknown"``).
    engine : ``"single"`` (one model per run) or ``"batched"``: the MLP runs in stacks
        (:mod:`toponeuro.experiments.engine`), the others as ``"single"``; the rows are the same
        but for their ``engine`` column. ``"auto"``: batched, but single under torchrun (the ranks
        of one job train each run together; the batched engine has no DDP).
    shard : ``(I, N)`` or ``"I/N"``: only the I-th of N disjoint parts of the grid, rows in
        ``runs.shard-I-of-N.csv`` (:mod:`toponeuro.experiments.shards`).
    checkpoint_every, stack_size : batched engine: seconds between a stack's checkpoints, members per stack.

    The writer process (rank 0 under torchrun) holds the folder's lock
    (:func:`experiment_lock`) from before it reads ``runs.csv`` until it
    returns; the other ranks of the same torchrun job do not lock, and learn
    from rank 0 whether it got the lock.

    Raises
    ------
    ExperimentLockedError : (a ValueError) another ``run`` is using the folder; raised on every rank.
    ValueError : bad arguments, a ``runs.csv`` of another version or protocol.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if limit_runs is not None and (isinstance(limit_runs, bool) or not isinstance(limit_runs, int)
                                   or limit_runs < 0):
        raise ValueError(f"limit_runs must be a non-negative integer, got {limit_runs!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if commit is not None and (not isinstance(commit, str) or not commit.strip() or "," in commit
                               or any(c.isspace() for c in commit.strip())):
        raise ValueError(f"commit must be a non-empty word (a git hash), got {commit!r}")
    if engine not in ENGINES + ("auto",):
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)} or auto")
    shard = shards.parse_shard(shard)
    dev = training.resolve_device(device)
    # under torchrun every rank trains each run together (DDP); rank 0 alone writes
    dev = distributed.setup(dev)
    if engine == "auto":
        engine = "single" if distributed.world_size() > 1 else "batched"
    if engine == "batched" and distributed.world_size() > 1:
        raise ValueError("the batched engine trains stacks in one process: under torchrun use --engine single "
                         "(or --shard I/N, one process per GPU, to spread a grid over GPUs)")
    if distributed.world_size() > 1 and jobs > 1:
        raise ValueError("under torchrun the ranks train each run together (DDP): use --jobs 1")
    writer = distributed.rank() == 0
    directory = experiment_dir(config, out_root)
    with contextlib.ExitStack() as stack:
        refusal = None
        if writer:
            try:
                stack.enter_context(experiment_lock(directory, shards.lock_name(shard, LOCK_NAME)))
            except ExperimentLockedError as err:
                refusal = err
        # the other ranks wait here for rank 0's lock, so they read runs.csv only under it
        if not agree_on_lock(refusal is None, dev):
            raise refusal if refusal is not None else ExperimentLockedError(
                f"rank 0 could not lock the folder: {locked_message(directory)}")
        return _run_locked(config, directory, dev, writer=writer, jobs=jobs, limit_runs=limit_runs,
                           threads=threads, progress=progress and writer,
                           commit=commit.strip() if commit is not None else None, engine=engine, shard=shard,
                           checkpoint_every=checkpoint_every, stack_size=stack_size)


def _run_locked(config: ExperimentConfig, directory: Path, dev: torch.device, *, writer: bool, jobs: int,
                limit_runs: int | None, threads: int | None, progress: bool,
                commit: str | None = None, engine: str = "single", shard=None,
                checkpoint_every: float = 300.0, stack_size: int = 128) -> RunSummary:
    """The body of :func:`run_experiment`, with the folder locked by the writer."""
    runs_csv = directory / shards.runs_file_name(shard)
    curves_dir = directory / "curves" if writer else None
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        repair_torn_line(runs_csv)
        upgrade_header(runs_csv)
        _remove_orphaned_curves(curves_dir, None if shard is None else
                                {r.run_id for r in shards.shard_runs(config.runs(), shard)})
    check_header(runs_csv)
    _check_protocol([r for path in shards.rows_files(directory) for r in read_rows(path)], config, directory)
    if config.text and writer:
        (directory / "config.toml").write_text(config.text, encoding="utf-8")

    done, pending = pending_runs(config, directory, shard)
    todo = pending if limit_runs is None else pending[:limit_runs]
    summary = RunSummary(directory=directory, total=len(done) + len(pending), already_done=len(done),
                         finished=0, pending=len(pending))
    if not todo:
        return summary
    commit = commit or git_commit()
    threads = threads or max(1, _cpus() // jobs)
    jobs = min(jobs, len(todo))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{config.name} ({len(done)} done before)", unit="run",
                   dynamic_ncols=True)

    def say(message: str) -> None:
        if bar is not None:
            bar.write(message)
        else:
            print(message)

    def record(status: str, run_id: str, payload) -> None:
        if status == "ok":
            summary.pending -= 1
            if writer and row_key(payload) in {row_key(r) for r in read_rows(runs_csv)}:
                # only a process that ignores the lock can have written it meanwhile; the first row stays
                summary.already_done += 1
                say(f"run {run_id} already has a row in {runs_csv} (written by another process); "
                    "kept that row, not appending a second")
            else:
                if writer:
                    append_row(runs_csv, payload)
                summary.finished += 1
            if bar is not None:
                bar.set_postfix_str(f"{run_id}: test {payload['test_accuracy']:.4f}")
        else:
            summary.failed.append(run_id)
            with open(directory / f"errors{'' if writer else f'.rank{distributed.rank()}'}.log", "a",
                      encoding="utf-8") as fh:
                stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                fh.write(f"--- {stamp} {run_id}\n{payload}\n")
            say(f"run {run_id} failed (traceback in {directory / 'errors.log'}): "
                f"{payload.strip().splitlines()[-1]}")
        if bar is not None:
            bar.update(1)

    try:
        if engine == "batched":
            from .engine import run_stacks

            # the MLP runs train in stacks here; the rest (the CNN) falls through to the single engine below
            todo = run_stacks(config, todo, dev, directory=directory, curves_dir=curves_dir, commit=commit,
                              record=record, progress=progress, threads=threads,
                              checkpoint_every=checkpoint_every, stack_size=stack_size)
            jobs = max(1, min(jobs, len(todo)))
        if not todo:
            pass
        elif jobs == 1:
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
            with context.Pool(jobs, initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
                for status, run_id, payload in pool.imap_unordered(_worker, tasks):
                    record(status, run_id, payload)
    finally:
        if bar is not None:
            bar.close()
    return summary

