"""The batched engine in the runner: the grid's MLP runs trained in stacks, checkpointed.

:func:`run_stacks` groups the pending runs into stacks, by network and by
regulariser path (``topological``: T1/T2, whose persistence is per member;
``other``: the rest), at most ``stack_size`` runs each, and trains each stack
with :func:`toponeuro.ensemble.fit_stack`. A member's row (the single
engine's columns, ``engine = batched``) is appended and its curve written as
soon as it stops, so a killed stack loses no finished run. Runs of networks
the engine cannot stack (the CNN) are handed back to the single engine.

Checkpoints: ``<experiment>/checkpoints/<stack>.pt`` holds a stack's whole
state, saved at the end of an epoch every ``checkpoint_every`` seconds
(``torch.save``; read back with ``weights_only=True``), with
``<stack>.json`` listing its runs. A rerun first resumes every checkpointed
stack that still has pending runs (its finished members are dropped), then
stacks the remaining runs anew. A stack's files are removed when it is done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import traceback
from pathlib import Path

import torch

from .. import data, ensemble, models
from . import runner
from .config import ExperimentConfig, RunSpec
from .runs_csv import format_cell

__all__ = ["CHECKPOINT_DIR", "stack_groups", "run_stacks"]

CHECKPOINT_DIR = "checkpoints"


def _kind(method: str) -> str:
    return "topological" if method in ensemble.TOPOLOGICAL_METHODS else "other"


def stack_groups(runs: list[RunSpec], stack_size: int) -> tuple[list[tuple[str, list[RunSpec]]], list[RunSpec]]:
    """([(stack name, runs)], runs left to the single engine), stacks in grid order, at most ``stack_size`` runs.

    The name is ``<network>-<kind>-<hash of the run ids>``: the same runs give the same name.
    """
    if isinstance(stack_size, bool) or not isinstance(stack_size, int) or stack_size < 1:
        raise ValueError(f"stack_size must be a positive integer, got {stack_size!r}")
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    single = []
    for spec in runs:
        if ensemble.stackable(spec.network):
            groups.setdefault((spec.network, _kind(spec.method)), []).append(spec)
        else:
            single.append(spec)
    stacks = []
    for (network, kind), specs in groups.items():
        for lo in range(0, len(specs), stack_size):
            chunk = specs[lo:lo + stack_size]
            digest = hashlib.sha1("\n".join(s.run_id for s in chunk).encode()).hexdigest()[:12]
            stacks.append((f"{network}-{kind}-{digest}", chunk))
    return stacks, single


def _write_curve(curves_dir: Path, run_id: str, history: list[dict]) -> None:
    """The whole curve at once, to a temporary file renamed into place (as the single engine's)."""
    curves_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = runner.curve_tempfile(curves_dir, run_id)
    with open(fd, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=runner.CURVE_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for record in history:
            writer.writerow({k: format_cell(record[k]) for k in runner.CURVE_COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, curves_dir / f"{run_id}.csv")


def _resumable(checkpoints: Path, todo: list[RunSpec]) -> list[tuple[str, list[RunSpec]]]:
    """Checkpointed stacks with pending runs among ``todo``: [(name, those runs)].

    A checkpoint none of whose runs is in ``todo`` is left alone (``--limit-runs`` may have left its runs
    for a later call); a stack removes its files when it is done.
    """
    if not checkpoints.is_dir():
        return []
    by_id = {s.run_id: s for s in todo}
    out = []
    for listing in sorted(checkpoints.glob("*.json")):
        run_ids = json.loads(listing.read_text(encoding="utf-8"))["run_ids"]
        pending = [by_id[r] for r in run_ids if r in by_id]
        state = listing.with_suffix(".pt")
        if pending and state.is_file():
            out.append((listing.stem, pending))
    return out


def stack_members(config: ExperimentConfig, specs: list[RunSpec]) -> list:
    """The batched engine's members for runs of one network: method, weight, seed, the config's sampler."""
    reg = config.regulariser_for(specs[0].network)
    return [ensemble.Member(s.method, s.weight, s.seed, sampler=reg.build_sampler(s.seed), key=s.key) for s in specs]


def run_stacks(config: ExperimentConfig, todo: list[RunSpec], device: torch.device, *, directory: Path,
               curves_dir: Path | None, commit: str, record, progress: bool, threads: int | None = None,
               checkpoint_every: float = 300.0, stack_size: int = 128) -> list[RunSpec]:
    """Train the stackable runs of ``todo``; return the others (for the single engine).

    ``record(status, run_id, payload)`` is the runner's: ``("ok", run_id, row)`` as each member stops,
    ``("error", run_id, traceback)`` for the unfinished members of a stack that raised (they stay pending).
    """
    checkpoints = Path(directory) / CHECKPOINT_DIR
    resumed = _resumable(checkpoints, todo)
    taken = {s.run_id for _, specs in resumed for s in specs}  # runs of checkpointed stacks: all stackable
    fresh, single = stack_groups([s for s in todo if s.run_id not in taken], stack_size)
    train, val, test = runner._data(config, device)
    sizes = (len(train[1]), len(val[1]), len(test[1]))
    in_shape, classes = data.input_shape(config.dataset), data.num_classes(config.dataset)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for name, specs in resumed + fresh:
            _train_stack(config, name, specs, device, train, val, test, sizes, in_shape, classes,
                         checkpoints=checkpoints, curves_dir=curves_dir, commit=commit, record=record,
                         progress=progress, checkpoint_every=checkpoint_every)
    finally:
        torch.set_num_threads(previous_threads)
    return single


def _train_stack(config, name, specs, device, train, val, test, sizes, in_shape, classes, *, checkpoints,
                 curves_dir, commit, record, progress, checkpoint_every) -> None:
    network = specs[0].network
    reg = config.regulariser_for(network)
    by_key = {s.key: s for s in specs}
    members = stack_members(config, specs)
    finished = set()

    def on_finish(member, result) -> None:
        spec = by_key[tuple(member.key)]
        if curves_dir is not None:
            _write_curve(Path(curves_dir), spec.run_id, result.history)
        finished.add(spec.key)
        record("ok", spec.run_id, runner.result_row(config, spec, result, sizes, commit, engine="batched"))

    path = None
    if curves_dir is not None:  # the writer (rank 0) checkpoints
        checkpoints.mkdir(parents=True, exist_ok=True)
        listing = checkpoints / f"{name}.json"
        if not listing.is_file():
            listing.write_text(json.dumps({"run_ids": [s.run_id for s in specs]}), encoding="utf-8")
        path = checkpoints / f"{name}.pt"
    protocol = {k: format_cell(v) for k, v in runner._protocol(config, specs[0], sizes).items()}
    try:
        ensemble.fit_stack(
            lambda: models.build(network, in_shape=in_shape, num_classes=classes, init=config.init), members,
            train, val, test,
            config=config.training, backend=reg.backend, dissimilarity=reg.dissimilarity, alpha=reg.alpha,
            include_bias=reg.include_bias, device=device,
            # the same initial weights as the single engine: the (network, seed)'s saved ones where the
            # folder has them (init/ beside curves/), else drawn with the member's seed
            build_member=lambda m: runner.initial_weights(
                config, by_key[tuple(m.key)], None if curves_dir is None else Path(curves_dir).parent / "init"), progress=progress, progress_desc=f"{network} stack of {len(members)}",
            on_finish=on_finish, checkpoint=path, checkpoint_every=checkpoint_every,
            checkpoint_extra={"network": network, **protocol})
    except Exception:
        trace = traceback.format_exc()
        for spec in specs:
            if spec.key not in finished:
                record("error", spec.run_id, trace)
        return
    if path is not None:
        (checkpoints / f"{name}.json").unlink(missing_ok=True)
