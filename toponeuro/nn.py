"""``TopologicalRegulariser``: the pipeline as an ``nn.Module`` around a model.

It holds configuration and forward hooks; the maths lives in the functional
modules (:mod:`~toponeuro.dissimilarity`, :mod:`~toponeuro.persistence`,
:mod:`~toponeuro.regularisers`).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from . import dissimilarity as _dissimilarity
from . import persistence, regularisers
from ._validation import check_activations
from .distributed import SYNC_MODES, gather_batch
from .dissimilarity import _autocast_off, _full_precision
from .sampling import ActivationRecorder, AllNeurons, Sampler
from . import tree_deaths as _tree_deaths

__all__ = ["TopologicalRegulariser", "FORMULAS", "UNBOUNDED_DISSIMILARITIES", "check_bounded", "check_edges_backend"]

FORMULAS = ("t1", "t2", "min_corr", "decov", "l1", "l2")

# Dissimilarities without an upper bound: T1 = sum(1 - d) and T2's -(1 - alpha) * mean(d) then have
# no lower bound, and the optimiser lowers them without end by scaling the activations up
# (T1 with "euclidean" on digits: 486 -> -1.6e7 in 8 epochs, test accuracy 9.7 % against 74.4 %).
UNBOUNDED_DISSIMILARITIES = ("euclidean",)


def check_bounded(formula: str, dissimilarity, alpha: float = 0.5, allow_unbounded: bool = False) -> None:
    """Refuse a formula that has no lower bound on this dissimilarity (ValueError), or warn if allowed.

    T1, and T2 with ``alpha < 1``, on an unbounded dissimilarity (:data:`UNBOUNDED_DISSIMILARITIES`)
    decrease without end as the activations are scaled up. The constructor of
    :class:`TopologicalRegulariser` calls this; a front end can call it before any training.
    """
    fn = _dissimilarity.get(dissimilarity)
    unbounded = any(fn is _dissimilarity.DISSIMILARITIES[name] for name in UNBOUNDED_DISSIMILARITIES)
    if not (unbounded and (formula == "t1" or (formula == "t2" and alpha < 1.0))):
        return
    what = (f"{formula.upper()} on the unbounded dissimilarity {fn.__name__!r} has no lower bound: the "
            "optimiser lowers it without end by scaling the activations up, and the task is lost")
    if not allow_unbounded:
        bounded = sorted(set(_dissimilarity.DISSIMILARITIES) - set(UNBOUNDED_DISSIMILARITIES))
        raise ValueError(f"{what}. Use a bounded dissimilarity ({', '.join(bounded)})"
                         + (", or T2 with alpha=1" if formula == "t2" else "")
                         + ", or pass allow_unbounded=True to train with it anyway")
    warnings.warn(what + " (allowed by allow_unbounded=True)", UserWarning, stacklevel=3)


def check_edges_backend(formula: str, backend: str):
    """The backend's spec (unknown or not installed: a ValueError naming the others); a ValueError
    when ``formula`` is T1/T2 and the backend gives death values without edges (no gradient)."""
    spec = persistence.get_backend(backend)
    if formula in ("t1", "t2") and not spec.gives_edges:
        raise ValueError(
            f"backend {backend!r} gives death values without gradient; T1/T2 need death edges: "
            f"use one of {persistence.edge_backends()}"
        )
    return spec


class TopologicalRegulariser(nn.Module):
    """Regulariser computed from the activations of the model's last forward pass.

    Parameters
    ----------
    model : nn.Module
        The network; forward hooks are attached to it.
    formula : {"t1", "t2", "min_corr", "decov", "l1", "l2"}
        ``t1``/``t2`` act on the deaths of the 0-dimensional persistence of the
        sampled neurons; ``min_corr``/``decov`` on their activations;
        ``l1``/``l2`` on the model's weights (no recording needed).
    backend : str
        Persistence backend (:func:`toponeuro.persistence.available_backends`).
    dissimilarity : str or callable
        Name in :data:`toponeuro.dissimilarity.DISSIMILARITIES` or a function
        ``(m, n) -> (n, n)``.
    sampler : Sampler
        Which neurons to use; :class:`~toponeuro.sampling.AllNeurons` by default.
    alpha : float
        T2's weight on the standard deviation.
    modules : iterable of str, or str, optional
        Record these modules instead of every non-linearity (see
        :class:`~toponeuro.sampling.ActivationRecorder`); functional calls
        (``F.relu``) and custom activation modules are recorded only if named.
    include_output : bool
        Record the logits as neurons too (the paper does).
    conv : {"flatten", "channel"}
        Outputs of more than two dimensions: each position a neuron, or each
        channel's mean (for a sequence ``(m, L, D)``: the ``L`` token positions,
        each the mean over ``D``; see :class:`~toponeuro.sampling.ActivationRecorder`).
    sync : {"global", "local"}
        Under DistributedDataParallel, compute on the global batch (all-gather
        with autograd) or on this rank's slice. Same thing in one process.
    tree_gradient : bool
        T1/T2 on a dissimilarity with a pairwise form (every built-in; see
        :func:`toponeuro.dissimilarity.get_pairwise`): find the tree on the
        matrix computed without autograd and recompute only its n - 1 pairs
        with autograd (:func:`toponeuro.tree_deaths.tree_deaths`: the same values
        and gradient, an O(m n) backward). False: autograd through the dense
        matrix (:meth:`dissimilarity_matrix`).
    allow_unbounded : bool
        T1, and T2 with ``alpha < 1``, on an unbounded dissimilarity
        (``"euclidean"``) have no lower bound: training drives them to minus
        infinity by scaling activations up. Refused (ValueError) unless this is
        True, which warns instead.
    include_bias : bool
        L1/L2 only: the biases count too (the authors' Keras code regularised
        every trainable weight); False: the weights only.

    Notes
    -----
    The value is that of the last recording forward pass (autograd on,
    :attr:`enabled` true); passes under ``torch.no_grad()`` or
    ``torch.inference_mode()`` leave it as it was. With gradient
    accumulation, call it after each micro-batch's forward pass.

    Mixed precision: under ``torch.autocast`` the recorded activations are
    float16 or bfloat16; the dissimilarity, the persistence and the formulas
    are computed with autocast disabled, in float32, and the value is float32.

    Copies: ``copy.deepcopy`` or ``pickle`` of the regulariser, alone or with
    a module that holds it and the model (a LightningModule-style wrapper, an
    ``AveragedModel`` of it), gives a regulariser on the copied model that
    records the copy's passes, starts with nothing recorded, and leaves the
    original alone. A copy of the model alone (an EMA, ``torch.save(model)``)
    carries inert hooks: its passes are recorded nowhere. A model that holds
    its own regulariser gives, when copied, a regulariser that does not record
    (it says so): build a new one on the copy.

    Examples
    --------
    >>> reg = TopologicalRegulariser(model, formula="t1")
    >>> out = model(x)
    >>> loss = F.cross_entropy(out, y) + 1e-3 * reg()
    """

    def __init__(self, model: nn.Module, formula: str = "t1", backend: str = "torch",
                 dissimilarity="abs_correlation", sampler: Sampler | None = None, alpha: float = 0.5,
                 modules: Iterable[str] | None = None, include_output: bool = True, conv: str = "flatten",
                 sync: str = "global", tree_gradient: bool = True, allow_unbounded: bool = False,
                 include_bias: bool = False):
        super().__init__()
        if formula not in FORMULAS:
            raise ValueError(f"unknown formula {formula!r}; choose one of {FORMULAS}")
        spec = check_edges_backend(formula, backend)
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if sampler is not None and not isinstance(sampler, Sampler):
            raise ValueError(f"sampler must be a toponeuro.sampling.Sampler, got {type(sampler).__name__}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if not isinstance(include_bias, bool):
            raise ValueError(f"include_bias must be true or false, got {include_bias!r}")
        self.include_bias = include_bias
        self.formula = formula
        self.backend = backend
        self.dissimilarity = _dissimilarity.get(dissimilarity)
        check_bounded(formula, self.dissimilarity, alpha, allow_unbounded)
        # built-ins take check=False (activations() already validated them);
        # a user's function is called with the activations alone
        self._builtin_dissimilarity = self.dissimilarity in _dissimilarity.DISSIMILARITIES.values()
        self.sampler = sampler if sampler is not None else AllNeurons()
        self.alpha = alpha
        self.sync = sync
        # the tree path needs edges and a pairwise form; otherwise the dense matrix
        self.tree_gradient = (bool(tree_gradient) and spec.gives_edges
                              and _dissimilarity.get_pairwise(self.dissimilarity) is not None)
        self._workspace = _tree_deaths.Workspace()  # the tree path's (n, n) matrix, reused from call to call
        # the model is not a submodule: reg.parameters() / state_dict() stay empty
        self.__dict__["model"] = model
        self.recorder = None
        if formula not in ("l1", "l2"):
            self.recorder = ActivationRecorder(model, modules=modules, include_output=include_output, conv=conv)

    # -- hooks ---------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.recorder is None or self.recorder.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self.recorder is not None:
            self.recorder.enabled = bool(value)
            if not value:
                self.recorder.clear()

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        if self.recorder is not None:
            self.recorder.remove()

    def __enter__(self) -> "TopologicalRegulariser":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- the pipeline ----------------------------------------------------------
    def activations(self) -> torch.Tensor:
        """The sampled activations of the last forward pass: (m, n), batch first.

        In the recorded dtype (float16 or bfloat16 under autocast). Under a
        process group with ``sync="global"``, ``m`` is the global batch.
        """
        if self.recorder is None:
            raise ValueError(f"formula {self.formula!r} uses the weights, not activations")
        layers = self.recorder.layers()
        # sync: under "global", a sampler that reads the values (importance) chooses on the global batch,
        # so that the gathered columns are the same neurons on every rank; key: one random draw per pass
        A = self.sampler(layers, self.recorder.output_name, sync=self.sync, key=self.recorder.pass_key)
        if A.ndim == 2 and A.shape[1] < 2:
            widths = {name: L.shape[1] for name, L in layers.items()}
            if sum(widths.values()) >= 2:
                raise ValueError(
                    f"the sampler {self.sampler!r} chose {A.shape[1]} neuron of the recorded layers {widths}; "
                    "persistence and the correlations need at least 2: raise p (it keeps floor(p * width) "
                    "neurons of each layer), keep the output (keep_output=True), or name more neurons"
                )
            raise ValueError(
                f"the recorded layers {widths} have {A.shape[1]} neuron in all; persistence and the "
                "correlations need at least 2: record more modules with modules=[...]"
            )
        # gather before checking, so that every rank sees (and rejects) the same batch
        return check_activations(gather_batch(A, self.sync))

    # Under torch.autocast the matrix products would be recast to 16 bits: the dissimilarity (a user's
    # too) and the persistence run with autocast off, on the activations' device and on the CPU (where
    # the numba and giotto-ph backends compute), from float32 activations. The formulas on activations
    # (min_corr, decov) do the same themselves; T1 and T2 on float32 deaths have no matrix product.
    def dissimilarity_matrix(self) -> torch.Tensor:
        """(n, n) dissimilarity of the sampled neurons of the last pass (float32 for 16-bit activations)."""
        A = _full_precision(self.activations())
        with _autocast_off(A.device.type, "cpu"):
            if self._builtin_dissimilarity:
                return self.dissimilarity(A, check=False)
            return self.dissimilarity(A)

    def deaths(self) -> torch.Tensor:
        """(n - 1,) deaths of the sampled neurons of the last pass, differentiable.

        Through the tree edges only when :attr:`tree_gradient` (the same values and gradient).
        """
        if self.tree_gradient:
            # float32 for 16-bit activations and autocast off inside, as on the dense path
            return _tree_deaths.tree_deaths(self.activations(), self.dissimilarity, self.backend, check=False,
                               workspace=self._workspace)
        D = self.dissimilarity_matrix()
        # a user's dissimilarity function is checked (square, finite, >= 0, symmetric); the built-ins are by construction
        with _autocast_off(D.device.type, "cpu"):
            return persistence.deaths(D, backend=self.backend, check=not self._builtin_dissimilarity)

    def forward(self) -> torch.Tensor:
        """The regulariser value (scalar) of the last forward pass."""
        if self.formula == "l1":
            return regularisers.l1(self.model, include_bias=self.include_bias)
        if self.formula == "l2":
            return regularisers.l2(self.model, include_bias=self.include_bias)
        if self.formula == "t1":
            return regularisers.t1(self.deaths())
        if self.formula == "t2":
            return regularisers.t2(self.deaths(), alpha=self.alpha)
        return regularisers.FORMULAS_ON_ACTIVATIONS[self.formula](self.activations())

    def extra_repr(self) -> str:
        return (f"formula={self.formula!r}, backend={self.backend!r}, "
                f"dissimilarity={getattr(self.dissimilarity, '__name__', self.dissimilarity)!r}, "
                f"sampler={self.sampler!r}, sync={self.sync!r}, tree_gradient={self.tree_gradient!r}")
