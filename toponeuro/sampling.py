"""Recording activations with forward hooks, and choosing which neurons to use.

A *neuron* is one output unit of a layer, taken after its non-linearity (the
output of the ``ReLU`` that follows a ``Linear`` or ``Conv2d``); the network's
final output (logits) counts as neurons too. For a convolution, each position
of each channel is one neuron (``conv="flatten"``, the paper's choice), or
each channel is one neuron, its spatial mean (``conv="channel"``).

:class:`ActivationRecorder` holds the hooks and the activations of the last
forward pass, per layer; a sampler turns those into one ``(m, n)`` matrix,
keeping autograd::

    rec = ActivationRecorder(model)
    out = model(x)
    A = ImportanceSampler(0.5)(rec.layers(), rec.output_name)   # (m, n)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "ActivationRecorder",
    "NONLINEARITIES",
    "OUTPUT",
    "Sampler",
    "AllNeurons",
    "ImportanceSampler",
    "RandomSampler",
    "IndexSampler",
]

#: the name under which the network's final output is recorded
OUTPUT = "output"

#: module types whose outputs are recorded by default
NONLINEARITIES = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ReLU6, nn.PReLU,
)

_CONV_MODES = ("flatten", "channel")


def _as_neurons(t: torch.Tensor, conv: str) -> torch.Tensor:
    """(m, ...) layer output -> (m, neurons)."""
    if t.ndim < 2:
        raise ValueError(f"a recorded layer output has shape {tuple(t.shape)}; expected (batch, ...)")
    if t.ndim >= 3 and conv == "channel":
        return t.flatten(2).mean(2)
    return t.flatten(1)


class ActivationRecorder:
    """Forward hooks that record layer outputs of a model, batch first.

    Parameters
    ----------
    model : nn.Module
    modules : iterable of str, optional
        Names (as in ``model.named_modules()``) of the modules whose outputs
        to record. By default every non-linearity module (:data:`NONLINEARITIES`)
        plus the model's final output. Dropout is never a layer of neurons:
        the default records the ReLU before it, as the paper did.
    include_output : bool
        Record the model's final output (logits) under the name ``"output"``.
    conv : {"flatten", "channel"}
        How a convolutional map ``(m, C, H, W)`` becomes neurons.

    Notes
    -----
    Recording happens only while :attr:`enabled` is true and autograd is on,
    so evaluation under ``torch.no_grad()`` records (and costs) nothing. Each
    forward pass of the model replaces what the previous one recorded.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | None = None,
                 include_output: bool = True, conv: str = "flatten"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if conv not in _CONV_MODES:
            raise ValueError(f"conv must be one of {_CONV_MODES}, got {conv!r}")
        self.model = model
        self.conv = conv
        self.enabled = True
        self.output_name = OUTPUT if include_output else None
        named = dict(model.named_modules())
        if modules is None:
            names = [n for n, m in named.items() if n and isinstance(m, NONLINEARITIES)]
        else:
            names = list(modules)
            unknown = [n for n in names if n not in named or n == ""]
            if unknown:
                raise ValueError(
                    f"no module named {unknown} in the model; valid names: {[n for n in named if n]}"
                )
        if not names and not include_output:
            raise ValueError("nothing to record: no non-linearity modules found and include_output=False")
        self.module_names = names
        self._records: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._handles = [model.register_forward_pre_hook(self._start_pass)]
        for name in names:
            self._handles.append(named[name].register_forward_hook(self._hook(name)))
        if include_output:
            self._handles.append(model.register_forward_hook(self._hook(OUTPUT)))

    def _recording(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def _start_pass(self, module, inputs):
        self._records = OrderedDict()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self._recording():
                return
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"module {name!r} returned {type(output).__name__}; can only record tensors")
            key, k = name, 1
            while key in self._records:  # a module applied twice in one pass
                k += 1
                key = f"{name}#{k}"
            self._records[key] = output
        return hook

    @property
    def has_pass(self) -> bool:
        return bool(self._records)

    def layers(self) -> "OrderedDict[str, torch.Tensor]":
        """The last pass's activations: name -> (m, neurons), in forward order, output last."""
        if not self._records:
            raise ValueError(
                "no activations recorded: run a forward pass of the model with autograd enabled "
                "(not under torch.no_grad()) and the recorder enabled before asking for them"
            )
        out = OrderedDict((k, _as_neurons(v, self.conv)) for k, v in self._records.items() if k != OUTPUT)
        if OUTPUT in self._records:
            out[OUTPUT] = _as_neurons(self._records[OUTPUT], self.conv)
        return out

    def clear(self) -> None:
        self._records = OrderedDict()

    def remove(self) -> None:
        """Remove every hook from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = OrderedDict()


class Sampler:
    """Chooses neurons from the recorded layers.

    Subclasses implement :meth:`select`; calling a sampler gathers the chosen
    columns and concatenates them into one ``(m, n)`` matrix that keeps autograd.
    """

    def select(self, layers: Mapping[str, torch.Tensor], output_name: str | None) -> dict[str, torch.Tensor | None]:
        """name -> LongTensor of column indices (None: all columns); absent names are skipped."""
        raise NotImplementedError

    def __call__(self, layers: Mapping[str, torch.Tensor], output_name: str | None = OUTPUT) -> torch.Tensor:
        chosen = self.select(layers, output_name)
        parts = []
        for name, A in layers.items():
            if name not in chosen:
                continue
            idx = chosen[name]
            if idx is None:
                parts.append(A)
            elif idx.numel():
                parts.append(A.index_select(1, idx.to(A.device)))
        if not parts:
            raise ValueError("the sampler chose no neurons; raise p or name more layers")
        return torch.cat(parts, dim=1)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_fraction(p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
        raise ValueError(f"p must be a fraction in (0, 1], got {p!r}")
    return float(p)


class AllNeurons(Sampler):
    """Every recorded neuron (the paper's choice on MNIST, ``p = 1``)."""

    def select(self, layers, output_name):
        return {name: None for name in layers}


class _FractionSampler(Sampler):
    """``floor(p * width)`` neurons of every hidden layer (subclasses say which); the
    output layer whole when ``keep_output``."""

    def select(self, layers, output_name):
        chosen = {}
        for name, A in layers.items():
            if name == output_name and self.keep_output:
                chosen[name] = None
            else:
                chosen[name] = torch.sort(self._pick(A, math.floor(self.p * A.shape[1]))).values
        return chosen

    def _pick(self, A: torch.Tensor, k: int) -> torch.Tensor:
        """k column indices of the layer's (m, width) activations ``A``."""
        raise NotImplementedError


class ImportanceSampler(_FractionSampler):
    """The paper's importance sampler.

    For every hidden layer, the ``floor(p * width)`` neurons with the highest
    mean absolute activation on the batch (ties: the lower index); the output
    layer is kept whole when ``keep_output``.
    """

    def __init__(self, p: float, keep_output: bool = True):
        self.p = _check_fraction(p)
        self.keep_output = keep_output

    def _pick(self, A, k):
        score = A.detach().abs().mean(0)
        return torch.argsort(score, descending=True, stable=True)[:k]


class RandomSampler(_FractionSampler):
    """Uniformly random ``floor(p * width)`` neurons per layer, redrawn at every call.

    The draws come from a generator seeded with ``seed``: the same seed gives
    the same sequence of choices. The output layer is kept whole when ``keep_output``.
    """

    def __init__(self, p: float, seed: int = 0, keep_output: bool = True):
        self.p = _check_fraction(p)
        self.seed = int(seed)
        self.keep_output = keep_output
        self._generator = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self._generator.manual_seed(self.seed)

    def _pick(self, A, k):
        return torch.randperm(A.shape[1], generator=self._generator)[:k]


class IndexSampler(Sampler):
    """Explicit neurons: ``{module_name: indices}`` (``"output"`` for the logits).

    Layers not named are left out; ``None`` as indices takes the whole layer.
    """

    def __init__(self, indices: Mapping[str, Iterable[int] | None]):
        if not indices:
            raise ValueError("IndexSampler needs at least one {module_name: indices} entry")
        self.indices = {
            name: None if idx is None else torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx,
                                                          dtype=torch.long)
            for name, idx in indices.items()
        }

    def select(self, layers, output_name):
        missing = [n for n in self.indices if n not in layers]
        if missing:
            raise ValueError(f"IndexSampler names layers {missing} that were not recorded; recorded: {list(layers)}")
        for name, idx in self.indices.items():
            if idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= layers[name].shape[1]):
                raise ValueError(
                    f"IndexSampler: indices for {name!r} must lie in [0, {layers[name].shape[1]}), "
                    f"got range [{int(idx.min())}, {int(idx.max())}]"
                )
        return dict(self.indices)
