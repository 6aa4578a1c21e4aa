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
import warnings
import weakref
from collections import OrderedDict
from fractions import Fraction
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules import activation as _activation

from .distributed import SYNC_MODES, global_sum

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

# normalisations over neurons and attention blocks, not layers of neurons
_NOT_NONLINEARITIES = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention")

#: module types whose outputs are recorded by default: every element-wise
#: non-linearity of ``torch.nn`` (``torch.nn.modules.activation``), and GLU
NONLINEARITIES = tuple(
    getattr(_activation, name) for name in _activation.__all__
    if name not in _NOT_NONLINEARITIES and isinstance(getattr(_activation, name), type)
    and issubclass(getattr(_activation, name), nn.Module)
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

    The hooks record only for the modules they were registered on: a
    ``copy.deepcopy`` of the model (an EMA or ``AveragedModel``, a snapshot)
    carries them along, but its passes record nothing here. They hold the
    recorder weakly, so a recorder dropped without :meth:`remove` takes its
    hooks off the model when it is garbage collected.
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
        if not names and modules is None:
            warnings.warn(
                f"no non-linearity module found in {type(model).__name__} (functional calls such as F.relu "
                "are invisible to hooks): only the model's output is recorded; name the modules whose "
                "outputs are the neurons with modules=[...]", UserWarning, stacklevel=3)
        self.module_names = names
        self._records: OrderedDict[str, torch.Tensor] = OrderedDict()
        me = weakref.ref(self)
        handles = [model.register_forward_pre_hook(_start_pass_hook(me, model))]
        for name in names:
            handles.append(named[name].register_forward_hook(_record_hook(me, named[name], name)))
        if include_output:
            handles.append(model.register_forward_hook(_record_hook(me, model, OUTPUT)))
        self._handles = handles
        self._finalizer = weakref.finalize(self, _remove_handles, handles)

    def _recording(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def _record(self, name: str, output) -> None:
        if not self._recording():
            return
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"module {name!r} returned {type(output).__name__}; can only record tensors")
        key, k = name, 1
        while key in self._records:  # a module applied twice in one pass
            k += 1
            key = f"{name}#{k}"
        self._records[key] = output

    @property
    def has_pass(self) -> bool:
        return bool(self._records)

    def layers(self) -> "OrderedDict[str, torch.Tensor]":
        """The last pass's activations: name -> (m, neurons), in forward order, output last."""
        if not self._records:
            raise ValueError(
                "no activations recorded: run a forward pass of the model with autograd enabled "
                "(not under torch.no_grad()) and the recorder enabled before asking for them; the "
                "replicas of nn.DataParallel on several GPUs are not recorded: use "
                "DistributedDataParallel (see toponeuro.distributed)"
            )
        out = OrderedDict((k, _as_neurons(v, self.conv)) for k, v in self._records.items() if k != OUTPUT)
        if OUTPUT in self._records:
            out[OUTPUT] = _as_neurons(self._records[OUTPUT], self.conv)
        return out

    def clear(self) -> None:
        self._records = OrderedDict()

    def remove(self) -> None:
        """Remove every hook from the model."""
        self._finalizer()
        self._handles = []
        self._records = OrderedDict()


def _remove_handles(handles) -> None:
    for h in handles:
        h.remove()


# The hooks are closures over a weak reference to the recorder and over the module they
# were registered on: copy.deepcopy(model) copies the hook functions as they are, so the
# copy's modules fail the identity test, and the recorder is not kept alive by the model.
def _start_pass_hook(recorder: "weakref.ref[ActivationRecorder]", model: nn.Module):
    def start_pass(module, inputs):
        rec = recorder()
        if rec is not None and module is model:
            rec._records = OrderedDict()
    return start_pass


def _record_hook(recorder: "weakref.ref[ActivationRecorder]", owner: nn.Module, name: str):
    def record(module, inputs, output):
        rec = recorder()
        if rec is not None and module is owner:
            rec._record(name, output)
    return record


class Sampler:
    """Chooses neurons from the recorded layers.

    Subclasses implement :meth:`select`; calling a sampler gathers the chosen
    columns and concatenates them into one ``(m, n)`` matrix that keeps autograd.
    """

    def select(self, layers: Mapping[str, torch.Tensor], output_name: str | None) -> dict[str, torch.Tensor | None]:
        """name -> LongTensor of column indices (None: all columns); absent names are skipped."""
        raise NotImplementedError

    def __call__(self, layers: Mapping[str, torch.Tensor], output_name: str | None = OUTPUT,
                 sync: str = "local") -> torch.Tensor:
        """(m, n) chosen activations.

        ``sync="global"`` (under a process group): a sampler whose choice reads
        the activations makes it from the statistics of the global batch, so
        that every rank chooses the same neurons before they are gathered.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        chosen = self._choose(layers, output_name, sync)
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

    def _choose(self, layers, output_name, sync: str) -> dict:
        """:meth:`select`; samplers whose choice reads the values override this to honour ``sync``."""
        return self.select(layers, output_name)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_fraction(p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
        raise ValueError(f"p must be a fraction in (0, 1], got {p!r}")
    return float(p)


def fraction_count(p: float, width: int) -> int:
    """``floor(p * width)`` with ``p`` read as the decimal it prints as.

    In binary floating point ``0.29 * 100`` is 28.999999999999996: the
    sampler would keep 28 neurons of 100, not 29.
    """
    return math.floor(Fraction(repr(float(p))) * width)


class AllNeurons(Sampler):
    """Every recorded neuron (the paper's choice on MNIST, ``p = 1``)."""

    def select(self, layers, output_name):
        return {name: None for name in layers}


class _FractionSampler(Sampler):
    """``floor(p * width)`` neurons of every hidden layer (subclasses say which); the
    output layer whole when ``keep_output``."""

    def select(self, layers, output_name):
        return self._choose(layers, output_name, "local")

    def _choose(self, layers, output_name, sync):
        chosen = {}
        for name, A in layers.items():
            if name == output_name and self.keep_output:
                chosen[name] = None
            else:
                chosen[name] = torch.sort(self._pick(A, fraction_count(self.p, A.shape[1]), sync)).values
        return chosen

    def _pick(self, A: torch.Tensor, k: int, sync: str) -> torch.Tensor:
        """k column indices of the layer's (m, width) activations ``A``."""
        raise NotImplementedError


class ImportanceSampler(_FractionSampler):
    """The paper's importance sampler.

    For every hidden layer, the ``floor(p * width)`` neurons with the highest
    mean absolute activation on the batch (ties: the lower index); the output
    layer is kept whole when ``keep_output``. Called with ``sync="global"``
    under a process group (as :class:`~toponeuro.TopologicalRegulariser`
    does by default), the batch is the global one.
    """

    def __init__(self, p: float, keep_output: bool = True):
        self.p = _check_fraction(p)
        self.keep_output = keep_output

    def _pick(self, A, k, sync):
        # the sum ranks as the mean does (m is the same for every neuron) and adds up over ranks
        score = global_sum(A.detach().abs().sum(0, dtype=torch.promote_types(A.dtype, torch.float32)), sync)
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

    def _pick(self, A, k, sync):
        # the same seed on every rank draws the same neurons: nothing to synchronise
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
