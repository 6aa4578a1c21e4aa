"""The training-step case (``--cases step``): one SGD step of the paper's ``mlp``, without a regulariser,
with T1, and with T1 through the dense matrix, timed in alternation (:func:`step_calls`).

The step does not depend on ``n``: it is timed once per device, recorded under ``results["steps"]`` and
summarised (the medians and their ratios to the step without a regulariser) by :func:`summarise_steps`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..nn import TopologicalRegulariser
from ..training import TrainConfig

STEP_MODEL = "mlp"  # 784-450-350-200-10, the paper's
STEP_IN_SHAPE = (1, 28, 28)  # one (Fashion-)MNIST image
STEP_BATCH = 256  # the paper's batch size
STEP_NEURONS = sum(models.HIDDEN_WIDTHS[STEP_MODEL]) + 10  # the neurons T1 sees: every ReLU output and the logits
STEP_WEIGHT = 1e-4  # lambda of T1 in the loss
TARGET_STEP_RATIO = 2.0  # a step with T1 at most twice one without, on a CPU
#: series -> the TopologicalRegulariser options of its step (None: cross-entropy alone). Every
#: series records what ``toponeuro train`` records: every ReLU output and the logits
STEP_SERIES = {"none": None, "t1": {"tree_gradient": True}, "t1-dense": {"tree_gradient": False}}
_CALLS = {"none": "cross-entropy", "t1": "cross-entropy + 1e-4 T1 (tree-edge gradient)",
          "t1-dense": "cross-entropy + 1e-4 T1 (tree_gradient=False: autograd through D)"}


def step_members() -> list[tuple[str, str, str]]:
    """``(kind, series, call in words)`` of each timed step, in the order :func:`step_calls` returns them."""
    return [("step", series, f"SGD step of {STEP_MODEL!r}, batch {STEP_BATCH}: forward, {_CALLS[series]}, "
                             "backward, optimiser step") for series in STEP_SERIES]


def step_inputs(seed: int, device: torch.device | str = "cpu", batch: int = STEP_BATCH):
    """``(X, y)`` on ``device``: ``X: (batch, 1, 28, 28)`` standard normal, ``y: (batch,)`` labels in
    0..9, drawn on the CPU from a generator seeded by ``seed`` (the same on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, *STEP_IN_SHAPE, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return X.to(device), y.to(device)


def mlp_step(seed: int, device: torch.device | str, regulariser: dict | None
             ) -> tuple[nn.Module, TopologicalRegulariser | None, Callable[[], torch.Tensor]]:
    """``(model, reg, step)``: the ``mlp`` initialised from ``seed`` (the global generator is left as
    it was), T1 on it with the options ``regulariser`` (None: no regulariser), and ``step()``, one SGD
    step (``toponeuro train``'s optimiser) on :func:`step_inputs`, returning the loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.build(STEP_MODEL, in_shape=STEP_IN_SHAPE).to(device)
    reg = None if regulariser is None else TopologicalRegulariser(model, formula="t1", **regulariser)
    config = TrainConfig()
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov)
    X, y = step_inputs(seed, device)

    def step() -> torch.Tensor:
        loss = F.cross_entropy(model(X), y)
        if reg is not None:
            loss = loss + STEP_WEIGHT * reg()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.detach()

    return model, reg, step


def step_calls(seed: int, device: torch.device | str) -> list[Callable[[], torch.Tensor]]:
    """One step per series of :data:`STEP_SERIES`, each on its own model (the same initial weights):
    hooks on a shared model would make the step without a regulariser record activations too."""
    return [mlp_step(seed, device, options)[2] for options in STEP_SERIES.values()]


def summarise_steps(steps: list[dict]) -> list[dict]:
    """Per device: the median step time of each series and the ratios of the T1 steps to the step
    without a regulariser (``ratio``: T1, ``dense_ratio``: T1 dense), from the recorded medians."""
    out = []
    for device in dict.fromkeys(s["device"] for s in steps):
        median = {s["series"]: s["median_s"] for s in steps if s["device"] == device and s["status"] == "ok"}
        if "none" not in median:
            continue
        ratio = lambda series: None if series not in median else median[series] / median["none"]  # noqa: E731
        out.append({"device": device, "without_s": median["none"], "t1_s": median.get("t1"),
                    "t1_dense_s": median.get("t1-dense"), "ratio": ratio("t1"), "dense_ratio": ratio("t1-dense"),
                    "target_ratio": TARGET_STEP_RATIO})
    return out
