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

import copy
import math
import os
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable as _Iterable
from fractions import Fraction
from typing import Iterable, Mapping

import numpy as np
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


def _as_neurons(t: torch.Tensor, conv: str, name: str) -> torch.Tensor:
    """(m, ...) output of layer ``name`` -> (m, neurons)."""
    if t.ndim < 2:
        fix = ("pass include_output=False (and name the module whose output is (batch, logits) in "
               "modules=[...] to keep the logits)" if name == OUTPUT else
               "leave it out of modules=[...]")
        raise ValueError(
            f"layer {name!r} returned shape {tuple(t.shape)}; a layer of neurons must be (batch, ...), "
            f"batch first: {fix}"
        )
    if t.ndim >= 3 and conv == "channel":
        return t.flatten(2).mean(2)
    return t.flatten(1)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside toponeuro and torch (for ``warnings.warn``
    called directly from the caller of this function)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


class ActivationRecorder:
    """Forward hooks that record layer outputs of a model, batch first.

    Parameters
    ----------
    model : nn.Module
    modules : iterable of str, or str, optional
        Names (as in ``model.named_modules()``) of the modules whose outputs
        to record; one name alone may be passed as a string. By default every
        non-linearity module (:data:`NONLINEARITIES`) plus the model's final
        output. Functional calls (``F.relu``) and custom activation modules
        have no non-linearity module to hook: name the modules whose outputs
        are their neurons here. Dropout is never a layer of neurons: the
        default records the ReLU before it, as the paper did.
    include_output : bool
        Record the model's final output (logits) under the name ``"output"``;
        it must be one tensor, batch first (for a model that returns a tuple
        or a dict, pass ``False`` and name the logits' module in ``modules``).
    conv : {"flatten", "channel"}
        How an output of more than two dimensions becomes neurons. A
        convolutional map ``(m, C, H, W)``: ``"flatten"`` makes each position
        of each channel a neuron (``C * H * W``), ``"channel"`` each channel one
        neuron, its spatial mean (``C``). The rule is on the dimensions, not the
        layer type: a sequence ``(m, L, D)`` (a Transformer's MLP) gives ``L * D``
        neurons with ``"flatten"`` and, with ``"channel"``, ``L`` neurons (the
        token positions, each the mean over the ``D`` features).

    Notes
    -----
    Recording happens only while :attr:`enabled` is true and autograd is on:
    a forward under ``torch.no_grad()`` or ``torch.inference_mode()`` (an
    evaluation, a teacher or pseudo-label pass) records and costs nothing,
    and leaves the last recorded pass as it was. Each recording forward pass
    of the model replaces what the previous one recorded.

    Copies. The hooks record only for the modules they were registered on:
    a copy of the model alone (``copy.deepcopy``: an EMA or ``AveragedModel``,
    a snapshot; ``pickle`` or ``torch.save`` of the whole model) carries
    inert hooks that record nothing, here or anywhere. A copy of the recorder
    (``copy.deepcopy``, ``pickle``), alone or with a module that holds it
    and the model, records the passes of the copied model; it starts with
    nothing recorded. The hooks hold the recorder weakly, so a recorder
    dropped without :meth:`remove` takes its hooks off the model when it is
    garbage collected.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | str | None = None,
                 include_output: bool = True, conv: str = "flatten"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if conv not in _CONV_MODES:
            raise ValueError(f"conv must be one of {_CONV_MODES}, got {conv!r}")
        _refuse_multi_device_data_parallel(model)
        named = dict(model.named_modules())
        if modules is None:
            names = [n for n, m in named.items() if n and isinstance(m, NONLINEARITIES)]
        else:
            names = [modules] if isinstance(modules, str) else list(modules)
            not_str = [n for n in names if not isinstance(n, str)]
            if not_str:
                raise ValueError(
                    f"modules must be names (str) as in model.named_modules(), got {not_str!r}; "
                    f"valid names: {[n for n in named if n]}"
                )
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
                "outputs are the neurons with modules=[...]", UserWarning, stacklevel=_user_stacklevel())
        self.model = model
        self.conv = conv
        self.enabled = True
        self.output_name = OUTPUT if include_output else None
        self.module_names = names
        self._removed = False
        self._attach()

    def _attach(self) -> None:
        """Empty records, and hooks on :attr:`model` (none once removed, or on a model still
        being copied: see :meth:`__deepcopy__`)."""
        self._records: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pass_key = None
        model = self.model
        # a model that holds its own recorder is, while it is copied, an object whose state is not set yet
        self._inert_copy = not self._removed and "_modules" not in vars(model)
        handles = []
        if not self._removed and not self._inert_copy:
            named = dict(model.named_modules())
            handles.append(model.register_forward_pre_hook(_PassStartHook(self, model)))
            for name in self.module_names:
                handles.append(named[name].register_forward_hook(_RecordHook(self, named[name], name)))
            if self.output_name is not None:
                handles.append(model.register_forward_hook(_RecordHook(self, model, OUTPUT)))
        self._handles = handles
        self._finalizer = weakref.finalize(self, _remove_handles, handles)

    # -- copies: the copy records the copied model, without the recorded tensors ------------
    _CONFIG = ("model", "module_names", "output_name", "conv", "enabled", "_removed")

    def __getstate__(self) -> dict:
        # non-leaf tensors (the last pass) can be neither deep-copied nor sensibly pickled
        return {k: self.__dict__[k] for k in self._CONFIG}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    def __deepcopy__(self, memo) -> "ActivationRecorder":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # -- recording -------------------------------------------------------------------------
    def _recording(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def _start_pass(self) -> None:
        # a pass that records nothing (no_grad, inference_mode, disabled) keeps the last recorded one
        if self._recording():
            self._records = OrderedDict()
            self._pass_key = object()

    def _record(self, name: str, output) -> None:
        if not self._recording():
            return
        if not isinstance(output, torch.Tensor):
            if name == OUTPUT:
                raise ValueError(
                    f"the model returned a {type(output).__name__}, not one tensor, so its output cannot be "
                    "recorded as neurons: pass include_output=False, and name the logits' module in "
                    "modules=[...] to keep them"
                )
            raise ValueError(
                f"module {name!r} returned a {type(output).__name__}; only tensor outputs can be recorded: "
                "leave it out of modules=[...] and name a module that returns a tensor"
            )
        key, k = name, 1
        while key in self._records:  # a module applied twice in one pass
            k += 1
            key = f"{name}#{k}"
        self._records[key] = output

    @property
    def has_pass(self) -> bool:
        return bool(self._records)

    @property
    def pass_key(self) -> object | None:
        """An object that identifies the last recorded pass (a new one per recording pass),
        None when nothing is recorded; samplers that draw at random draw once per key."""
        return self._pass_key if self._records else None

    def layers(self) -> "OrderedDict[str, torch.Tensor]":
        """The last pass's activations: name -> (m, neurons), in forward order, output last."""
        if not self._records:
            raise ValueError(self._why_nothing_recorded())
        out = OrderedDict((k, _as_neurons(v, self.conv, k)) for k, v in self._records.items() if k != OUTPUT)
        if OUTPUT in self._records:
            out[OUTPUT] = _as_neurons(self._records[OUTPUT], self.conv, OUTPUT)
        return out

    def _why_nothing_recorded(self) -> str:
        if self._removed:
            return ("no activations recorded: the hooks were removed (remove(), or the end of the with-block), "
                    "so nothing records any more: build a new regulariser (or recorder) on the model")
        if self._inert_copy:
            return ("no activations recorded: this is a copy made while copying a model that holds it, and it "
                    "does not record: build a new regulariser (or recorder) on the copied model")
        if not self.enabled:
            return "no activations recorded: recording is disabled: set enabled = True and run a forward pass"
        if self._pass_key is not None:
            return (f"no activations recorded: the last forward pass ran none of the recorded modules "
                    f"{self.module_names}" + (" and returned no output" if self.output_name is None else ""))
        return ("no activations recorded: no forward pass recorded yet; run a forward pass of the model with "
                "autograd enabled (passes under torch.no_grad() or torch.inference_mode() record nothing) "
                "before asking for them; the replicas of nn.DataParallel on several GPUs are not recorded: "
                "use DistributedDataParallel (see toponeuro.distributed)")

    def clear(self) -> None:
        self._records = OrderedDict()
        self._pass_key = None

    def remove(self) -> None:
        """Remove every hook from the model."""
        self._finalizer()
        self._handles = []
        self._removed = True
        self.clear()


def _remove_handles(handles) -> None:
    for h in handles:
        h.remove()


# The hooks hold the recorder and the module they were registered on weakly: the recorder is
# not kept alive by the model. A copy of a hook (copy.deepcopy or pickle of the model, which
# carries its hooks along) is an inert hook: a copied model records nothing, and pickles.
def _refuse_multi_device_data_parallel(model: nn.Module) -> None:
    """nn.DataParallel over several devices runs copies of the model (replicas) whose passes the
    hooks cannot see: only the gathered output would be recorded, a silently different regulariser."""
    for name, m in model.named_modules():
        if isinstance(m, nn.DataParallel) and len(m.device_ids) > 1:
            where = "the model" if not name else f"module {name!r}"
            raise ValueError(
                f"{where} is an nn.DataParallel over devices {m.device_ids}: its replicas' activations cannot be "
                "recorded (only the gathered output would be); use DistributedDataParallel (see "
                "toponeuro.distributed) or nn.DataParallel on one device"
            )


class _InertHook:
    """A recorder's hook in a copy of the model: does nothing."""

    def __call__(self, *args):
        return None


class _RecorderHook:
    def __init__(self, recorder: ActivationRecorder, owner: nn.Module):
        self._recorder = weakref.ref(recorder)
        self._owner = weakref.ref(owner)

    def _recorder_for(self, module):
        # the identity test also keeps a shallow copy of the module (which shares its hook dict) out
        return self._recorder() if module is self._owner() else None

    def __reduce__(self):
        return (_InertHook, ())


class _PassStartHook(_RecorderHook):
    def __call__(self, module, inputs):
        rec = self._recorder_for(module)
        if rec is not None:
            rec._start_pass()


class _RecordHook(_RecorderHook):
    def __init__(self, recorder: ActivationRecorder, owner: nn.Module, name: str):
        super().__init__(recorder, owner)
        self.name = name

    def __call__(self, module, inputs, output):
        rec = self._recorder_for(module)
        if rec is not None:
            rec._record(self.name, output)


class Sampler:
    """Chooses neurons from the recorded layers.

    Subclasses implement :meth:`select`; calling a sampler gathers the chosen
    columns and concatenates them into one ``(m, n)`` matrix that keeps autograd.
    """

    def select(self, layers: Mapping[str, torch.Tensor], output_name: str | None) -> dict[str, torch.Tensor | None]:
        """name -> LongTensor of column indices (None: all columns); absent names are skipped."""
        raise NotImplementedError

    def __call__(self, layers: Mapping[str, torch.Tensor], output_name: str | None = OUTPUT,
                 sync: str = "local", key: object | None = None) -> torch.Tensor:
        """(m, n) chosen activations.

        ``sync="global"`` (under a process group): a sampler whose choice reads
        the activations makes it from the statistics of the global batch, so
        that every rank chooses the same neurons before they are gathered.
        ``key`` identifies the recorded pass (:attr:`ActivationRecorder.pass_key`):
        a sampler that draws at random draws once per key, and anew at every
        call without one.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        chosen = self._choose(layers, output_name, sync, key)
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
            widths = {name: A.shape[1] for name, A in layers.items()}
            raise ValueError(f"{self!r} chose no neurons of the layers {widths}; raise p or name more layers")
        return torch.cat(parts, dim=1)

    def _choose(self, layers, output_name, sync: str, key: object | None = None) -> dict:
        """:meth:`select`; samplers whose choice reads the values override this to honour ``sync``,
        samplers that draw at random to draw once per ``key``."""
        return self.select(layers, output_name)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_fraction(p: float) -> float:
    if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):  # True is not a fraction
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
    output layer whole when ``keep_output``. A layer of which ``p`` keeps no neuron
    is left out, with a warning (once per layer)."""

    def select(self, layers, output_name):
        return self._choose(layers, output_name, "local")

    def _choose(self, layers, output_name, sync, key=None):
        chosen = {}
        for name, A in layers.items():
            if name == output_name and self.keep_output:
                chosen[name] = None
                continue
            width = A.shape[1]
            k = fraction_count(self.p, width)
            if k == 0:
                self._warn_dropped(name, width)
            chosen[name] = torch.sort(self._pick(A, k, sync)).values
        return chosen

    def _warn_dropped(self, name: str, width: int) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if (name, width) in warned:
            return
        warned.add((name, width))
        warnings.warn(
            f"{type(self).__name__}(p={self.p}) keeps 0 of the {width} neurons of layer {name!r} "
            f"(floor(p * width)), so the layer is left out; p >= 1/{width} = {1 / width:.4g} keeps one",
            UserWarning, stacklevel=_user_stacklevel())

    def _pick(self, A: torch.Tensor, k: int, sync: str) -> torch.Tensor:
        """k column indices of the layer's (m, width) activations ``A``."""
        raise NotImplementedError


class ImportanceSampler(_FractionSampler):
    """The paper's importance sampler.

    For every hidden layer, the ``floor(p * width)`` neurons with the highest
    mean absolute activation on the batch (ties: the lower index); the output
    layer is kept whole when ``keep_output``. A layer narrower than ``1 / p``
    keeps no neuron (floor): it is left out, with a warning. Called with
    ``sync="global"`` under a process group (as
    :class:`~toponeuro.TopologicalRegulariser` does by default), the batch is
    the global one.
    """

    def __init__(self, p: float, keep_output: bool = True):
        self.p = _check_fraction(p)
        self.keep_output = keep_output

    def _pick(self, A, k, sync):
        # the sum ranks as the mean does (m is the same for every neuron) and adds up over ranks
        score = global_sum(A.detach().abs().sum(0, dtype=torch.promote_types(A.dtype, torch.float32)), sync)
        return torch.argsort(score, descending=True, stable=True)[:k]


class RandomSampler(_FractionSampler):
    """Uniformly random ``floor(p * width)`` neurons per layer, drawn once per recorded pass.

    Inside :class:`~toponeuro.TopologicalRegulariser`, ``reg.activations()``,
    ``reg.deaths()`` and ``reg()`` after the same forward pass see the same
    neurons, and the next recorded pass draws anew. Called directly without a
    ``key`` (and through :meth:`select`), it draws anew at every call. The
    draws come from a generator seeded with ``seed``: the same seed gives the
    same sequence of choices, one per pass. The output layer is kept whole
    when ``keep_output``; a layer narrower than ``1 / p`` is left out, with a
    warning.
    """

    def __init__(self, p: float, seed: int = 0, keep_output: bool = True):
        self.p = _check_fraction(p)
        self.seed = int(seed)
        self.keep_output = keep_output
        self._generator = torch.Generator().manual_seed(self.seed)
        self._drawn = None  # (key, choice) of the last pass drawn for

    def reset(self) -> None:
        """Back to the start of the seed's sequence of draws."""
        self._generator.manual_seed(self.seed)
        self._drawn = None

    def _choose(self, layers, output_name, sync, key=None):
        drawn = getattr(self, "_drawn", None)
        if key is not None and drawn is not None and drawn[0] is key:
            return dict(drawn[1])
        chosen = super()._choose(layers, output_name, sync)
        if key is not None:
            self._drawn = (key, chosen)
        return dict(chosen)

    def _pick(self, A, k, sync):
        # the same seed on every rank draws the same neurons: nothing to synchronise
        return torch.randperm(A.shape[1], generator=self._generator)[:k]

    def __getstate__(self) -> dict:
        # a copy draws afresh for its own passes, from the generator's current state
        return {k: v for k, v in self.__dict__.items() if k != "_drawn"}


def _index_set(name: str, idx) -> torch.Tensor | None:
    """IndexSampler's entry for layer ``name``: None, a 1-d LongTensor of distinct indices, or a
    1-d bool tensor (a mask, its length checked against the layer when the layer is seen)."""
    if idx is None:
        return None
    what = f"IndexSampler: the indices for layer {name!r}"
    if isinstance(idx, torch.Tensor):
        t = idx.detach().cpu()
    else:
        if isinstance(idx, (str, bytes)):
            raise ValueError(f"{what} are a string ({idx!r}); pass a list of neuron indices, or None for all")
        arr = idx if isinstance(idx, np.ndarray) else np.asarray(
            list(idx) if isinstance(idx, _Iterable) else idx)
        if arr.size == 0:
            arr = arr.astype(np.int64)  # [] is float64 to NumPy
        if arr.dtype.kind not in "biu":
            raise ValueError(
                f"{what} have dtype {arr.dtype}; pass integer neuron indices (each neuron once) or a boolean "
                "mask of the layer's width"
            )
        t = torch.from_numpy(arr.astype(bool if arr.dtype.kind == "b" else np.int64))
    if t.ndim != 1:
        raise ValueError(
            f"{what} have shape {tuple(t.shape)}; pass a 1-d sequence of neuron indices ([i] for one neuron) "
            "or a 1-d boolean mask of the layer's width"
        )
    if t.dtype == torch.bool:
        return t
    if t.numel() == 0:
        return t.long()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"{what} have dtype {t.dtype}; pass integer neuron indices (each neuron once) or a boolean mask "
            "of the layer's width"
        )
    t = t.long()
    values, counts = torch.unique(t, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"{what} repeat neurons {values[counts > 1].tolist()}: a repeated neuron is perfectly correlated "
            "with itself (a zero-length MST edge that adds 1 to T1); list each neuron once"
        )
    return t


class IndexSampler(Sampler):
    """Explicit neurons: ``{module_name: indices}`` (``"output"`` for the logits).

    ``indices``: distinct integer column indices (a list, range, LongTensor or
    NumPy array; their order is kept), a boolean mask of the layer's width
    (its ``True`` positions), or ``None`` for the whole layer. Layers not
    named are left out.
    """

    def __init__(self, indices: Mapping[str, Iterable[int] | None]):
        if not indices:
            raise ValueError("IndexSampler needs at least one {module_name: indices} entry")
        self.indices = {name: _index_set(name, idx) for name, idx in indices.items()}

    def select(self, layers, output_name):
        missing = [n for n in self.indices if n not in layers]
        if missing:
            raise ValueError(f"IndexSampler names layers {missing} that were not recorded; recorded: {list(layers)}")
        chosen = {}
        for name, idx in self.indices.items():
            width = layers[name].shape[1]
            if idx is not None and idx.dtype == torch.bool:
                if idx.numel() != width:
                    raise ValueError(
                        f"IndexSampler: the boolean mask for layer {name!r} has {idx.numel()} entries, but the "
                        f"layer has {width} neurons; pass a mask of the layer's width, or integer indices"
                    )
                idx = idx.nonzero().flatten()
            elif idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
                raise ValueError(
                    f"IndexSampler: indices for {name!r} must lie in [0, {width}), "
                    f"got range [{int(idx.min())}, {int(idx.max())}]"
                )
            chosen[name] = idx
        return chosen
