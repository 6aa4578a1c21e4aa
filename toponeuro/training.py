"""The shared training loop: the paper's optimiser, schedule and early stopping.

:func:`fit` trains a model with cross-entropy plus ``weight * R``, where ``R``
is one of the regularisers (evaluated on every training batch), and returns a
:class:`FitResult`. It is a plain function: the experiment runner
(:mod:`toponeuro.experiments`) and ``toponeuro train`` both call it.

Protocol (the paper's, the defaults of :class:`TrainConfig`): SGD with learning
rate 0.01, momentum 0.9, Nesterov; the learning rate is multiplied by 0.95
every 3520 optimiser steps (staircase: ``lr * 0.95 ** (step // 3520)``);
batch 256; up to 1200 epochs; early stopping on the validation loss with
patience 20; the weights of the best epoch are restored at the end.

Reproducibility: call :func:`seed_everything` before building the model (it
fixes the initialisation); ``fit(seed=...)`` fixes the data order (a
``torch.Generator`` per run) and, with ``deterministic=True``, asks torch for
deterministic kernels. The same config and seed on the same device give the
same numbers (checked on CPU). On a GPU, an operator that has no deterministic
kernel only warns (``warn_only=True``, so that training is never refused) and
may then differ from run to run: the warning names it.

Example
-------
>>> seed_everything(0)
>>> model = toponeuro.models.build("mlp")
>>> result = fit(model, data.load("mnist", "train"), data.load("mnist", "val"),
...              data.load("mnist", "test"), method="t1", weight=1e-3)
>>> result.test_accuracy
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed

__all__ = [
    "METHODS",
    "WEIGHTED_METHODS",
    "TrainConfig",
    "FitResult",
    "seed_everything",
    "seeded_build",
    "data_order_generator",
    "device_label",
    "resolve_device",
    "evaluate",
    "make_regulariser",
    "fit",
]

#: training methods: ``none`` (cross-entropy only), the topological
#: regularisers ``t1``/``t2``, the activation baselines ``min_corr``/``decov``,
#: the weight penalties ``l1``/``l2``, and ``dropout`` (cross-entropy only, meant
#: for the ``mlp-dropout`` network, whose dropout layers are the regulariser).
METHODS = ("none", "t1", "t2", "min_corr", "decov", "l1", "l2", "dropout")

#: methods whose loss has a ``weight * R`` term (the others ignore ``weight``)
WEIGHTED_METHODS = ("t1", "t2", "min_corr", "decov", "l1", "l2")

#: methods whose regulariser reads the recorded activations (an n x n matrix); l1/l2 read the weights
ACTIVATION_METHODS = ("t1", "t2", "min_corr", "decov")

#: methods whose regulariser goes through persistence: their gradient needs death edges
TOPOLOGICAL_METHODS = ("t1", "t2")


@dataclass
class TrainConfig:
    """Optimiser, schedule and stopping rule (defaults: the paper's).

    lr : initial learning rate of SGD.
    momentum, nesterov : SGD momentum and whether it is Nesterov's.
    lr_decay, lr_decay_steps : staircase decay, ``lr * lr_decay ** (step // lr_decay_steps)``.
    batch_size : training batch size.
    max_epochs : epoch cap.
    patience : stop after this many epochs without a lower validation loss.
    eval_batch_size : batch size of the (no-grad) evaluation passes; does not change results.
    """

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    lr_decay: float = 0.95
    lr_decay_steps: int = 3520
    batch_size: int = 256
    max_epochs: int = 1200
    patience: int = 20
    eval_batch_size: int = 4096

    def __post_init__(self):
        positive_floats = {"lr": self.lr, "lr_decay": self.lr_decay}
        for name, value in positive_floats.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a positive number, got {value!r}")
        if self.lr_decay > 1:  # a "decay" above 1 grows the learning rate without bound
            raise ValueError(f"TrainConfig.lr_decay must lie in (0, 1] (1: no decay), got {self.lr_decay!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must lie in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"TrainConfig.nesterov must be true or false, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig.nesterov needs momentum > 0; set nesterov = false or a momentum")
        for name in ("lr_decay_steps", "batch_size", "max_epochs", "patience", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ValueError("TrainConfig.batch_size must be at least 2 (correlations need 2 samples)")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based), staircase decay."""
        return self.lr * self.lr_decay ** (step // self.lr_decay_steps)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class FitResult:
    """What :func:`fit` returns; accuracies are fractions in [0, 1], losses mean cross-entropy.

    ``val_*`` and ``test_*`` are measured with the restored best weights.
    ``best_epoch`` (1-based) is the epoch whose weights were restored (0: the
    initial weights, when no epoch gave a finite validation loss); ``epochs``
    the number of epochs trained. ``diverged``: training stopped because the
    loss became NaN or inf. ``history``: one dict per epoch with ``epoch,
    train_loss, train_reg, val_loss, val_accuracy, lr, seconds``.
    """

    val_accuracy: float
    val_loss: float
    test_accuracy: float
    test_loss: float
    best_epoch: int
    epochs: int
    seconds: float
    seconds_per_epoch: float
    stopped_early: bool
    diverged: bool
    device: str
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """The result without the per-epoch history."""
        d = asdict(self)
        d.pop("history")
        return d


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    Call it before building the model: it fixes the initial weights.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seeded_build(seed: int, build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.Tensor]:
    """A run's model and the start of its dropout stream: ``seed_everything(seed)``, then ``build()``.

    Returns ``(model, rng_state)``: ``rng_state`` is the CPU generator's state
    that building left. :func:`fit` on the CPU draws the dropout masks from
    torch's default generator, which is in that state when training starts, so
    a copy of it (``torch.Generator().set_state(rng_state)``) replays the
    same masks: the batched engine (:mod:`toponeuro.ensemble`) gives every
    member such a generator.
    """
    seed_everything(seed)
    model = build()
    return model, torch.get_rng_state()


def data_order_generator(seed: int) -> torch.Generator:
    """The generator of a run's data order: one ``torch.randperm`` of the training set per epoch."""
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU. A clear error for an unusable device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from err
    if dev.type not in ("cpu", "cuda"):
        # torch knows mps, meta, xpu, ...: training here reads values back (meta has none) and uses
        # float64 reductions (mps has none); refuse now rather than fail inside the first step
        raise ValueError(f"device {device!r} is not supported: toponeuro trains on 'cpu' or 'cuda' "
                         "('cuda:N', or 'auto' for CUDA when available)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def device_label(device: str | torch.device) -> str:
    """A label for results tables: ``"cpu"`` or ``"cuda:<device name>"`` (e.g. ``"cuda:NVIDIA H200"``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device):
    """Ask torch for deterministic kernels for the duration, then restore the previous setting."""
    if not enabled:
        yield
        return
    if device.type == "cuda":
        # needed by cuBLAS for deterministic matmuls; effective if set before cuBLAS starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


def _check_xy(data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{name} must be a pair (X, y) of tensors, as returned by toponeuro.data.load")
    X, y = data
    if not (isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ValueError(f"{name}: X and y must be torch tensors")
    if X.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"{name}: X has {X.shape[0]} rows but y has shape {tuple(y.shape)}; expected (N,)")
    if X.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    if not X.is_floating_point():
        raise ValueError(f"{name}: X must be floating point (float32 in [0, 1]), got {X.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        # .long() would truncate 0.7 to class 0 and train on wrong labels without a word
        raise ValueError(f"{name}: y must hold integer class labels (int64), got {y.dtype}")
    if bool((y < 0).any()):
        raise ValueError(f"{name}: y has a negative class label ({int(y.min())}); labels are 0 .. classes - 1")
    if not bool(torch.isfinite(X.sum(dtype=torch.float64))):  # one reduction; locate only when it fails
        bad = (~torch.isfinite(X)).flatten(1).any(1).nonzero()
        if bad.numel():
            raise ValueError(f"{name}: X contains NaN or inf (first in row {int(bad[0])}); clean or drop those "
                             "samples")
        raise ValueError(f"{name}: X is too large to sum in float64; rescale it")
    return X, y.long()


def check_model_takes(model: torch.nn.Module, datasets: dict) -> None:
    """One forward pass of two samples, in eval mode and without grad, before training starts.

    model : the network; datasets : ``{name: (X, y)}`` already checked by ``_check_xy`` and on the
    model's device. Raises a ValueError when the model does not take ``X``'s shape, does not give
    (N, classes) logits, or has fewer outputs than a label needs, instead of a torch error (or a
    CUDA device-side assert) in the first step.
    """
    X = next(iter(datasets.values()))[0]
    was_training = model.training
    model.eval()  # no dropout draw, no batch-norm statistics updated by the probe
    try:
        with torch.no_grad():
            logits = model(X[:2])
    except RuntimeError as err:
        raise ValueError(f"the model does not take inputs of shape {tuple(X.shape[1:])} (a sample of X): "
                         f"{str(err).splitlines()[0]}; check that the dataset and the network match "
                         f"(input width, channels)") from err
    finally:
        model.train(was_training)
    if not (isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[0] == X[:2].shape[0]):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (N, classes) logits, got {shape} for a batch of 2")
    classes = logits.shape[1]
    for name, (_, y) in datasets.items():
        top = int(y.max())
        if top >= classes:
            raise ValueError(f"{name}: class label {top} is out of range for a model with {classes} outputs "
                             f"(labels are 0 .. {classes - 1}); use a network with more outputs or relabel")


@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(X, y)``, in eval mode, without grad.

    X : (N, ...) inputs on the model's device; y : (N,) labels. Returns ``(loss, accuracy)``.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=X.device)
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    for start in range(0, X.shape[0], batch_size):
        xb, yb = X[start:start + batch_size], y[start:start + batch_size]
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = X.shape[0]
    return float(total_loss) / n, int(correct) / n


def make_regulariser(model, method: str, *, backend: str = "torch", dissimilarity="abs_correlation",
                     sampler=None, alpha: float = 0.5, include_bias: bool = False):
    """The regulariser of ``method``, or ``None`` for ``none``/``dropout``.

    A :class:`toponeuro.TopologicalRegulariser` (``include_bias``: L1/L2 over the biases too).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method not in WEIGHTED_METHODS:
        return None
    from .nn import TopologicalRegulariser

    return TopologicalRegulariser(model, formula=method, backend=backend, dissimilarity=dissimilarity,
                                  sampler=sampler, alpha=alpha, include_bias=include_bias)


def _state_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model: torch.nn.Module, train, val, test=None, *, method: str = "none", weight: float = 0.0,
        config: TrainConfig | None = None, sampler=None, backend: str = "torch",
        dissimilarity="abs_correlation", alpha: float = 0.5, include_bias: bool = False, device="cpu",
        seed: int = 0, deterministic: bool = True, progress: bool = True, progress_desc: str | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` with ``cross_entropy + weight * R`` and early stopping; restore the best weights.

    Parameters
    ----------
    model : nn.Module
        Maps ``(batch, 1, H, W)`` inputs to ``(batch, classes)`` logits; moved to ``device``.
        Build it after :func:`seed_everything` so the initialisation is fixed.
    train, val : (X, y)
        ``X`` (N, 1, H, W) float32, ``y`` (N,) int64 (``toponeuro.data.load``). Moved to ``device`` once.
    test : (X, y), optional
        Evaluated once with the restored weights (NaN in the result when absent).
    method : one of :data:`METHODS`
        ``none``/``dropout``: cross-entropy only (``weight`` ignored). Otherwise the
        regulariser of :class:`toponeuro.TopologicalRegulariser` with that formula.
    weight : float
        ``lambda``, the regulariser's weight (>= 0).
    config : TrainConfig
        Optimiser, schedule, batch size, epoch cap, patience (paper defaults).
    sampler, backend, dissimilarity, alpha
        Passed to the regulariser (``sampler=None``: all neurons).
    include_bias : bool
        ``l1``/``l2`` only: penalise the biases too (the authors' choice); default weights only.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``.
    seed : int
        Seeds the data order (one permutation per epoch from a ``torch.Generator``).
    deterministic : bool
        Ask torch for deterministic kernels while training (restored afterwards).
    progress : bool
        A tqdm bar over epochs.
    on_epoch : callable, optional
        Called after every epoch with that epoch's history dict.

    Returns
    -------
    FitResult

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group (NCCL on
    CUDA, gloo on CPU), wraps the model in DistributedDataParallel on this
    rank's device, and gives each rank an equal slice of every batch of
    ``config.batch_size``; the regulariser sees the global batch (its default
    ``sync="global"``), so the step is the single-process step. Rank 0's
    validation numbers decide early stopping on every rank.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dev = resolve_device(device)
    # under torchrun: one process per device, DDP, each rank a slice of every batch
    dev = distributed.setup(dev)
    rank, world = distributed.rank(), distributed.world_size()
    X_train, y_train = _check_xy(train, "train")
    X_val, y_val = _check_xy(val, "val")
    if X_train.shape[0] < 2:
        raise ValueError("train needs at least 2 samples")
    X_train, y_train = X_train.to(dev), y_train.to(dev)
    X_val, y_val = X_val.to(dev), y_val.to(dev)
    if test is not None:
        X_test, y_test = _check_xy(test, "test")
        X_test, y_test = X_test.to(dev), y_test.to(dev)
    model.to(dev)
    check_model_takes(model, {"train": (X_train, y_train), "val": (X_val, y_val),
                              **({"test": (X_test, y_test)} if test is not None else {})})
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        progress = progress and rank == 0

    weighted = method in WEIGHTED_METHODS and weight > 0
    reg = make_regulariser(model, method, backend=backend, dissimilarity=dissimilarity, sampler=sampler,
                           alpha=alpha, include_bias=include_bias) if weighted else None
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov)
    generator = data_order_generator(seed)
    n_train = X_train.shape[0]
    bs = config.batch_size

    history: list[dict] = []
    best_loss, best_epoch, best_state = math.inf, 0, _state_copy(model)
    since_best, step, diverged, stopped_early = 0, 0, False, False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_epochs, desc=progress_desc or f"{method} w={weight:g}", unit="epoch",
                   leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with _deterministic(deterministic, dev):
            for epoch in range(1, config.max_epochs + 1):
                t0 = time.perf_counter()
                model.train()
                order = torch.randperm(n_train, generator=generator).to(dev)
                ce_sum = torch.zeros((), dtype=torch.float64, device=dev)
                reg_sum = torch.zeros((), dtype=torch.float64, device=dev)
                batches = 0
                for lo in range(0, n_train, bs):
                    idx = order[lo:lo + bs]
                    if world > 1:
                        # equal slices on every rank (the global gather needs them)
                        idx = idx[: idx.numel() // world * world].chunk(world)[rank] if idx.numel() >= world else idx[:0]
                    if idx.numel() < 2:  # a lone leftover sample has no correlations; skip it
                        continue
                    for group in optimiser.param_groups:
                        group["lr"] = config.lr_at(step)
                    logits = net(X_train[idx])
                    ce = F.cross_entropy(logits, y_train[idx])
                    loss = ce
                    if reg is not None:
                        try:
                            r = reg()
                        except ValueError:
                            if not bool(torch.isfinite(logits.detach()).all()):
                                diverged = True  # activations overflowed: the regulariser refuses NaN
                                break
                            raise
                        loss = ce + weight * r
                        reg_sum += r.detach().double()
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    ce_sum += ce.detach().double()
                    step += 1
                    batches += 1
                train_loss = float(ce_sum) / max(batches, 1)
                train_reg = float(reg_sum) / max(batches, 1) if reg is not None else 0.0
                if not (math.isfinite(train_loss) and math.isfinite(train_reg)):
                    diverged = True
                val_loss, val_acc = evaluate(model, X_val, y_val, config.eval_batch_size)
                if world > 1:  # rank 0's numbers decide early stopping everywhere
                    shared = torch.tensor([val_loss, val_acc], dtype=torch.float64, device=dev)
                    torch.distributed.broadcast(shared, 0)
                    val_loss, val_acc = shared.tolist()
                if not math.isfinite(val_loss):
                    diverged = True
                record = {
                    "epoch": epoch, "train_loss": train_loss, "train_reg": train_reg,
                    "val_loss": val_loss, "val_accuracy": val_acc,
                    "lr": optimiser.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                }
                history.append(record)
                if on_epoch is not None and rank == 0:
                    on_epoch(dict(record))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
                if diverged:
                    break
                if val_loss < best_loss:
                    best_loss, best_epoch, best_state = val_loss, epoch, _state_copy(model)
                    since_best = 0
                else:
                    since_best += 1
                    if since_best >= config.patience:
                        stopped_early = True
                        break
    finally:
        if bar is not None:
            bar.close()
        if reg is not None:
            reg.remove()
    seconds = time.perf_counter() - start

    model.load_state_dict(best_state)
    val_loss, val_acc = evaluate(model, X_val, y_val, config.eval_batch_size)
    if test is not None:
        test_loss, test_acc = evaluate(model, X_test, y_test, config.eval_batch_size)
    else:
        test_loss, test_acc = math.nan, math.nan
    epochs = len(history)
    return FitResult(
        val_accuracy=val_acc, val_loss=val_loss, test_accuracy=test_acc, test_loss=test_loss,
        best_epoch=best_epoch, epochs=epochs, seconds=seconds,
        seconds_per_epoch=seconds / max(epochs, 1), stopped_early=stopped_early, diverged=diverged,
        device=device_label(dev), history=history,
    )
