"""Checks before the first run: refuse up front what could only fail at run time.

:func:`check_experiment` looks at everything a config implies for the runs
about to train, before any of them starts, and raises one ``ValueError``
with one line per problem, each naming the config key (or command-line
option) and what to do:

- the device exists and is supported (``--device``);
- each network's persistence backend is installed, and gives death edges
  where T1/T2 need them (``regulariser.backend``);
- the split sizes can train: at least one full batch of training images
  (``experiment.limit`` against ``training.batch_size``);
- the results folder can be created and written, and its disk has room for
  the rows and curves (``--out``);
- the regulariser's matrices for the largest recorded layer set fit in the
  device's memory, ``--jobs`` runs at once (``regulariser.sampler``).

:func:`recorded_neurons` and :func:`regulariser_memory` are shared with
``toponeuro train``, which makes the same memory check.
"""

from __future__ import annotations

import torch

from .. import persistence, training
from ..nn import check_bounded
from ..training import ACTIVATION_METHODS, TOPOLOGICAL_METHODS
from .._validation import check_free_disk, check_memory, format_bytes, prepare_output_folder

__all__ = [
    "REGULARISER_MATRICES",
    "ACTIVATION_METHODS",
    "recorded_neurons",
    "regulariser_memory",
    "check_regulariser_memory",
    "check_experiment",
]

#: n x n float32 matrices alive at the peak of one regulariser step (forward and backward): the
#: correlation, the dissimilarity, their gradients and the backend's scratch. Measured 6.5 for T1
#: with the torch backend at n = 4000 (peak resident memory of the step); rounded up.
REGULARISER_MATRICES = 7


# bytes a run writes: its row, and one curve line per epoch (generous: the numbers are reprs)
_ROW_BYTES = 1024
_CURVE_LINE_BYTES = 200


def recorded_neurons(network: str, dataset: str, sampler=None) -> int:
    """The number of neurons the regulariser sees on ``network`` for ``dataset``'s images.

    ``sampler`` is a :mod:`toponeuro.sampling` sampler (``None``: all
    neurons). Builds the network once and runs a batch of two blank images
    through it; the global random state is left as it was.
    """
    from .. import data, models
    from ..sampling import ActivationRecorder, AllNeurons

    in_shape = data.input_shape(dataset)
    with torch.random.fork_rng(devices=[]):
        model = models.build(network, in_shape=in_shape, num_classes=data.num_classes(dataset))
        model.eval()  # dropout off; the count does not depend on it
        # the regulariser's defaults: every non-linearity and the logits, each position of a conv map a neuron
        recorder = ActivationRecorder(model)
        try:
            with torch.enable_grad():  # a pass without autograd is not recorded
                model(torch.zeros((2, *in_shape)))
            chosen = (sampler or AllNeurons())(recorder.layers(), recorder.output_name)
        finally:
            recorder.remove()
    return int(chosen.shape[1])


def regulariser_memory(n: int) -> int:
    """Bytes the regulariser holds at the peak of a step on ``n`` neurons (:data:`REGULARISER_MATRICES`)."""
    return REGULARISER_MATRICES * n * n * 4


def check_regulariser_memory(n: int, device, *, runs_at_once: int = 1, key: str, override: str,
                             fewer_at_once: str = "--jobs") -> None:
    """Refuse (ValueError) when ``runs_at_once`` regularisers on ``n`` neurons do not fit in ``device``'s memory.

    ``key`` names the setting that decides ``n`` (the sampler), ``override``
    the way to skip the check, ``fewer_at_once`` the option that sets ``runs_at_once``.
    """
    at_once = f" x {runs_at_once} runs at once" if runs_at_once > 1 else ""
    check_memory(
        regulariser_memory(n) * runs_at_once, device,
        what=f"the regulariser on {n} neurons ({REGULARISER_MATRICES} float32 {n} x {n} matrices, "
             f"{format_bytes(regulariser_memory(n))}{at_once})",
        fix=f"keep fewer neurons with {key} (e.g. importance, p = 0.01){f', lower {fewer_at_once}' if at_once else ''}, "
            f"or pass {override} to try anyway",
    )


def _setting_key(config, network: str, setting: str) -> str:
    """The config key that decides ``setting`` (backend, sampler, ...) of ``network``: its own table's, or the shared one."""
    own = dict(config.per_network).get(network)
    if own is not None and getattr(own, setting) != getattr(config.regulariser, setting):
        return f"regulariser.networks.{network}.{setting}"
    return f"regulariser.{setting}"


def _check_backends(config, runs) -> list[str]:
    problems = []
    for network in dict.fromkeys(r.network for r in runs):
        methods = {r.method for r in runs if r.network == network and r.weight > 0}
        if not methods & set(training.WEIGHTED_METHODS):
            continue  # no regulariser is built for this network: its backend is never used
        backend = config.regulariser_for(network).backend
        key = _setting_key(config, network, "backend")
        try:
            spec = persistence.get_backend(backend)
        except ValueError as err:
            problems.append(f"{key} = {backend!r}: {err}")
            continue
        needs_edges = sorted(methods & set(TOPOLOGICAL_METHODS))
        if needs_edges and not spec.gives_edges:
            problems.append(f"{key} = {backend!r} gives death values only (no death edges, hence no gradient), "
                            f"and {network} trains {', '.join(needs_edges)}: use one of "
                            f"{persistence.edge_backends()}")
        settings = config.regulariser_for(network)
        for method in needs_edges:  # T1/T2 on an unbounded dissimilarity would wreck every run
            try:
                check_bounded(method, settings.dissimilarity, settings.alpha)
            except ValueError as err:
                key = _setting_key(config, network, "dissimilarity")
                problems.append(f"{key} = {settings.dissimilarity!r} "
                                f"({network}, {method}): {err}")
    return problems



def _check_sizes(config) -> list[str]:
    from .runner import _split_sizes

    train_size = _split_sizes(config)[0]  # val/test: a limit of 0 means all, never empty
    batch = config.training.batch_size
    problems = []
    if train_size < batch:
        if config.limit is not None:
            problems.append(f"experiment.limit = {config.limit} leaves {train_size} training images, fewer than "
                            f"training.batch_size = {batch}: raise experiment.limit or lower training.batch_size")
        else:
            problems.append(f"training.batch_size = {batch} is larger than the {train_size} training images of "
                            f"{config.dataset}: lower training.batch_size")
    return problems


def _check_output(config, out_root, runs) -> list[str]:
    from .runner import experiment_dir

    try:
        prepare_output_folder(out_root, "--out")  # as given: an empty --out is refused, not read as "."
        directory = experiment_dir(config, out_root)
        if directory.exists() and not directory.is_dir():
            return [f"--out {out_root}: {directory} (experiment.name {config.name!r}) is a file, not a folder: "
                    f"move it, or give another --out or experiment.name"]
        prepare_output_folder(directory, "--out")
        needed = len(runs) * (_ROW_BYTES + config.training.max_epochs * _CURVE_LINE_BYTES)
        check_free_disk(directory, needed, "--out")
    except ValueError as err:
        return [str(err)]
    return []


def _check_memory(config, runs, device: torch.device, jobs: int, stack_size: int | None = None) -> list[str]:
    from .. import ensemble

    problems = []
    for network in dict.fromkeys(r.network for r in runs):
        regularised = [r for r in runs if r.network == network and r.method in ACTIVATION_METHODS and r.weight > 0]
        if not regularised:
            continue
        # the batched engine holds the regulariser's matrices of a whole stack at once
        batched = stack_size is not None and ensemble.stackable(network)
        runs_at_once = min(stack_size, len(regularised)) if batched else min(jobs, len(runs))
        settings = config.regulariser_for(network)
        n = recorded_neurons(network, config.dataset, settings.build_sampler(0))
        key = _setting_key(config, network, "sampler")
        try:
            check_regulariser_memory(n, device, runs_at_once=runs_at_once, key=key,
                                     override="--no-memory-check",
                                     fewer_at_once="--stack-size" if batched else "--jobs")
        except ValueError as err:
            problems.append(f"{key} ({network}, {settings.sampler_label()}): {err}")
    return problems


def check_experiment(config, runs=None, *, out_root, device="auto", jobs: int = 1,
                     memory_check: bool = True, stack_size: int | None = None) -> torch.device:
    """Check that ``runs`` (default: the whole grid) of ``config`` can train; return the device.

    ``stack_size``: the batched engine's runs per stack (``None``: the single
    engine, ``jobs`` runs at once), for the memory estimate.

    Raises
    ------
    ValueError
        One line per problem found, each naming the config key or option and the fix.
    """
    runs = config.runs() if runs is None else list(runs)
    problems = []
    dev = None
    try:
        dev = training.resolve_device(device)
    except ValueError as err:
        problems.append(f"--device: {err}")
    problems += _check_backends(config, runs)
    problems += _check_sizes(config)
    problems += _check_output(config, out_root, runs)
    if memory_check and dev is not None and not problems and runs:
        problems += _check_memory(config, runs, dev, jobs, stack_size)
    if problems:
        raise ValueError("\n".join(problems))
    return dev
