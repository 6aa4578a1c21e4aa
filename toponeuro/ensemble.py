"""The batched engine: K models of one MLP trained in lock-step as stacked weights.

:func:`fit_stack` trains ``K`` members of one network (``mlp``,
``mlp-dropout``, ``mlp-deep``) at once: the weights of layer ``l`` are one
tensor ``(K, out, in)`` and a step is one batched matrix product per layer
(``torch.baddbmm``). Every member has its own seed (initialisation, data
order, dropout masks), method (``none``, ``t1``, ``t2``, ``min_corr``,
``decov``, ``l1``, ``l2``), weight and early-stopping state; the paper's SGD
with Nesterov momentum, the staircase schedule and restore-best-weights apply
per member, exactly as :func:`toponeuro.training.fit` applies them to one
model. A member that stops (patience, divergence, epoch cap) leaves the stack
at once (compaction), so the others no longer pay for it and it pays for no
straggler. The CNN is not stacked: the runner trains it with the single engine.

Equivalence with the single engine. Member ``k`` follows the same recipe as
``fit`` on the same run: ``training.seeded_build(seed, ...)`` gives the
initial weights and the dropout stream, ``training.data_order_generator(seed)``
the batches, the same recorded neurons (every ReLU output before dropout, and
the logits), the same sampler, dissimilarity, persistence backend and formula,
the same optimiser update (``torch.optim.SGD``'s, written out on the stacked
tensors). What can differ is rounding: ``baddbmm`` against ``addmm``, the
per-member cross-entropy mean and the regulariser sums reduced in another
order, so weights agree to float32 tolerance, not bit for bit, and the gap
grows slowly with the epochs (the tests compare a few epochs on digits). The
early-stopping decisions compare validation losses, so a near tie can in
principle fall the other way. On CUDA the dropout masks differ from the
single engine's (it uses the fused dropout kernel; here each member draws from
a CUDA generator seeded with its seed): same distribution, other masks.
``seconds`` of a member is the wall time of the stack while it trained.

Checkpoints: :meth:`StackTrainer.state` / :meth:`StackTrainer.load_state`
hold everything a resumed stack needs (weights, momentum buffers, best
weights, generators, histories, step and epoch); :func:`fit_stack` saves it
with ``torch.save`` at epoch ends every ``checkpoint_every`` seconds and
resumes from it (``torch.load(..., weights_only=True)``): a resumed stack
gives the numbers of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import dissimilarity as _dissimilarity
from ._io import replace_atomically
from . import persistence, regularisers, training
from .sampling import OUTPUT, AllNeurons, Sampler
from .tree_deaths import Workspace, tree_deaths
from .nn import check_bounded, check_edges_backend
from .training import METHODS, WEIGHTED_METHODS, FitResult, TrainConfig

__all__ = ["STACKABLE", "ACTIVATION_METHODS", "TOPOLOGICAL_METHODS", "Member", "StackTrainer", "fit_stack",
           "stackable"]

#: networks the batched engine stacks (the CNN runs on the single engine)
STACKABLE = ("mlp", "mlp-dropout", "mlp-deep")
# the methods that read activations / go through persistence (re-exported)
ACTIVATION_METHODS, TOPOLOGICAL_METHODS = training.ACTIVATION_METHODS, training.TOPOLOGICAL_METHODS

CHECKPOINT_VERSION = 1


def stackable(network: str) -> bool:
    """Whether :func:`fit_stack` can train ``network`` (the MLPs; not the CNN)."""
    return network in STACKABLE


@dataclass
class Member:
    """One run of a stack: its method, weight and seed; ``key`` names it in callbacks and checkpoints.

    sampler : which neurons the regulariser uses (``None``: all), as in ``fit``;
    each member needs its own (a random sampler draws from its own generator).
    """

    method: str
    weight: float
    seed: int
    sampler: Sampler | None = None
    key: object = None

    def __post_init__(self):
        if self.method not in METHODS or self.method == "dropout":
            raise ValueError(f"member method {self.method!r}: choose from "
                             f"{', '.join(m for m in METHODS if m != 'dropout')} (dropout is the network mlp-dropout)")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"member weight must be a finite number >= 0, got {w!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"member seed must be a non-negative integer, got {self.seed!r}")
        if self.sampler is not None and not isinstance(self.sampler, Sampler):
            raise ValueError(f"member sampler must be a toponeuro.sampling.Sampler, got {type(self.sampler).__name__}")
        if self.key is None:
            self.key = (self.method, float(self.weight), self.seed)

    @property
    def weighted(self) -> bool:
        """Whether the loss has a ``weight * R`` term (as in ``fit``: a weighted method and weight > 0)."""
        return self.method in WEIGHTED_METHODS and self.weight > 0


@dataclass
class _MemberState:
    member: Member
    dropout_generator: torch.Generator
    best_loss: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    diverged: bool = False
    stopped_early: bool = False
    seconds: float = 0.0
    history: list = field(default_factory=list)


def _architecture(model: nn.Module) -> list[tuple[str, str, object]]:
    """The layers of an MLP from ``models.build``: [(kind, name, arg)], kind in linear/relu/dropout/flatten."""
    if not isinstance(model, nn.Sequential):
        raise ValueError("the batched engine stacks nn.Sequential MLPs (toponeuro.models.build); "
                         "use the single engine (training.fit) for other models")
    layers = []
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            layers.append(("linear", name, None))
        elif isinstance(module, nn.ReLU):
            layers.append(("relu", name, None))
        elif isinstance(module, nn.Dropout):
            layers.append(("dropout", name, float(module.p)))
        elif isinstance(module, nn.Flatten) and not layers:
            layers.append(("flatten", name, None))
        else:
            raise ValueError(f"the batched engine stacks MLPs of Linear/ReLU/Dropout layers; layer {name!r} is "
                             f"{type(module).__name__}: train this network with the single engine")
    return layers


def _topological_deaths(A: torch.Tensor, dissimilarity, backend: str, workspace: Workspace | None = None) -> torch.Tensor:
    """(K, n - 1) deaths of each member's activations, differentiable.

    A : (K, m, n) recorded (sampled) activations, one member per slice. As
    :class:`~toponeuro.TopologicalRegulariser` computes them: through the tree
    edges (:func:`toponeuro.tree_deaths.tree_deaths`, the whole stack in one call)
    where the backend gives edges and the dissimilarity has a pairwise form, else
    the dense matrices and :func:`toponeuro.persistence.deaths` on the stack. ``workspace``
    keeps the (K, n, n) scratch matrix between steps (a fresh one each step costs its page
    faults: about 3.5 ms for K = 3, n = 1010, on the CPU).
    """
    diss = _dissimilarity.get(dissimilarity)
    if persistence.get_backend(backend).gives_edges and _dissimilarity.get_pairwise(diss) is not None:
        return tree_deaths(A, diss, backend, check=False, workspace=workspace)
    builtin = diss in _dissimilarity.DISSIMILARITIES.values()
    # built-ins take the stack (A is validated); a user's function one member at a time, checked by deaths
    D = diss(A, check=False) if builtin else torch.stack([diss(a) for a in A])
    return persistence.deaths(D, backend=backend, check=not builtin)


def _formula_on_deaths(deaths: torch.Tensor, method: str, alpha: float) -> torch.Tensor:
    """(K,) T1 or T2 of (K, n - 1) deaths (the formulas of :mod:`toponeuro.regularisers`, per row)."""
    return regularisers._t1(deaths) if method == "t1" else regularisers._t2(deaths, alpha)


class StackTrainer:
    """K members of one MLP, trained in lock-step; see the module docstring.

    Parameters
    ----------
    build : callable () -> nn.Sequential
        Builds the network (``lambda: models.build(name, in_shape=..., num_classes=...)``);
        called once per member, after seeding with the member's seed.
    members : list of Member
    train, val : (X, y)
        ``X`` (N, ...) float32, ``y`` (N,) int64, as for ``fit``.
    test : (X, y), optional
    config : TrainConfig
    backend, dissimilarity, alpha : as for ``fit`` (shared by the members).
    include_bias : ``l1``/``l2`` members penalise the biases too (default: the weight matrices only,
        as :func:`toponeuro.regularisers.l1`'s default).
    device : str or torch.device
    build_member : callable (Member) -> nn.Module, optional
        Builds (and seeds) a member's network instead of ``training.seeded_build(member.seed, build)``,
        e.g. to load a saved initialisation; the CPU generator's state it leaves starts the member's
        dropout stream, as for ``seeded_build``.
    """

    def __init__(self, build: Callable[[], nn.Module], members, train, val, test=None, *,
                 config: TrainConfig | None = None, backend: str = "torch", dissimilarity="abs_correlation",
                 alpha: float = 0.5, include_bias: bool = False, device="cpu", build_member=None):
        self.config = TrainConfig() if config is None else config
        if not isinstance(self.config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        members = list(members)
        if not members or not all(isinstance(m, Member) for m in members):
            raise ValueError("members must be a non-empty list of toponeuro.ensemble.Member")
        keys = [m.key for m in members]
        if len(set(keys)) != len(keys):
            raise ValueError("members must have distinct keys (two members with the same method, weight and seed?)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        for method in dict.fromkeys(m.method for m in members if m.method in TOPOLOGICAL_METHODS and m.weighted):
            # as TopologicalRegulariser (hence fit) refuses them
            check_edges_backend(method, backend)
            check_bounded(method, dissimilarity, alpha)
        self.dev = training.resolve_device(device)
        if not isinstance(include_bias, bool):
            raise ValueError(f"include_bias must be true or false, got {include_bias!r}")
        self.backend, self.dissimilarity, self.alpha = backend, dissimilarity, float(alpha)
        self.include_bias = include_bias
        self.workspace = Workspace()  # the tree path's (K, n, n) scratch, reused across steps
        X_train, self.y_train = training._check_xy(train, "train")
        X_val, self.y_val = training._check_xy(val, "val")
        if X_train.shape[0] < 2:
            raise ValueError("train needs at least 2 samples")
        self.X_train = X_train.to(self.dev).flatten(1)
        self.y_train = self.y_train.to(self.dev)
        self.X_val, self.y_val = X_val.to(self.dev).flatten(1), self.y_val.to(self.dev)
        self.test = None
        if test is not None:
            X_test, y_test = training._check_xy(test, "test")
            self.test = (X_test.to(self.dev).flatten(1), y_test.to(self.dev))

        self.members = members
        self.states: list[_MemberState] = []
        params_per_member = []
        layers = None
        for m in members:
            model = training.seeded_build(m.seed, build)[0] if build_member is None else build_member(m)
            rng_state = torch.get_rng_state()  # what building left: fit's dropout stream on the CPU
            if layers is None:
                layers = _architecture(model)  # refuses what the engine cannot stack, before the probe
                training.check_model_takes(model.to(self.dev), {"train": (self.X_train, self.y_train),
                                                                "val": (self.X_val, self.y_val),
                                                                **({"test": self.test} if self.test else {})})
            if self.dev.type == "cpu":
                gen = torch.Generator()
                gen.set_state(rng_state)  # fit's dropout stream on the CPU (see training.seeded_build)
            else:
                gen = torch.Generator(device=self.dev).manual_seed(m.seed)
            self.states.append(_MemberState(member=m, dropout_generator=gen))
            params_per_member.append([p.detach() for p in model.parameters()])
            if [p.shape for p in params_per_member[-1]] != [p.shape for p in params_per_member[0]]:
                raise ValueError(f"member {m.key} has another network than the first member: a stack holds "
                                 "members of one network")
            self.param_names = [name for name, _ in model.named_parameters()]
        self.layers = layers
        #: the stacked parameters W1, b1, W2, b2, ... (each (K, ...)) in model.parameters() order
        self.params = [torch.stack(ps).to(self.dev).requires_grad_(True) for ps in zip(*params_per_member)]
        self.buffers: list[torch.Tensor] | None = None  # momentum buffers, created by the first step
        self.best = [p.detach().clone() for p in self.params]
        self.data_generators = [training.data_order_generator(m.seed) for m in members]
        self.active = list(range(len(members)))  # member index of each slice of the stack
        self.epoch, self.step = 0, 0
        self.results: dict[int, FitResult] = {}
        #: member index -> its restored best weights ({parameter name: tensor}, on the CPU), if keep_weights
        self.weights: dict[int, dict] = {}
        self.keep_weights = False
        self._constants: dict[tuple, torch.Tensor] = {}  # see _on_device

    def _on_device(self, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """``torch.tensor(values)`` on the stack's device, made once per distinct value until the
        next compaction: on a GPU a copy from host memory waits for every queued kernel, and the
        step's index and weight vectors only change when members leave."""
        key = (tuple(values), dtype)
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = torch.tensor(key[0], dtype=dtype, device=self.dev)
        return t

    # -- the stacked network ---------------------------------------------------------------------
    def _forward(self, X: torch.Tensor, params, train: bool, generators=None, record: bool = False):
        """Logits (K, m, C) of inputs X (K, m, d) (or (m, d), shared), and the recorded layers.

        Recorded: each ReLU's output before dropout, and the logits under ``OUTPUT``, as (K, m, n).
        """
        recorded: OrderedDict[str, torch.Tensor] = OrderedDict()
        h = X
        i = 0
        for kind, name, arg in self.layers:
            if kind == "linear":
                W, b = params[i], params[i + 1]
                i += 2
                if h.ndim == 2:
                    h = h.expand(W.shape[0], -1, -1)
                h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))
            elif kind == "relu":
                h = torch.relu(h)
                if record:
                    recorded[name] = h
            elif kind == "dropout" and train:
                # F.dropout on the CPU: noise = bernoulli(1 - p) / (1 - p); out = in * noise
                noise = torch.empty_like(h)
                for k, gen in enumerate(generators):
                    noise[k].bernoulli_(1.0 - arg, generator=gen)
                noise.div_(1.0 - arg)
                h = h * noise
        if record:
            recorded[OUTPUT] = h
        return h, recorded

    @torch.no_grad()
    def _evaluate(self, params, X: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per slice: mean cross-entropy and accuracy on (X, y), in eval mode (as ``training.evaluate``)."""
        K = params[0].shape[0]
        total = torch.zeros(K, dtype=torch.float64, device=X.device)
        correct = torch.zeros(K, dtype=torch.long, device=X.device)
        bs = self.config.eval_batch_size
        for start in range(0, X.shape[0], bs):
            xb, yb = X[start:start + bs], y[start:start + bs]
            logits, _ = self._forward(xb, params, train=False)
            ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(K), reduction="none").view(K, -1)
            total += ce.sum(1).double()
            correct += (logits.argmax(2) == yb).sum(1)
        n = X.shape[0]
        return (total / n).tolist(), (correct.double() / n).tolist()

    # -- regularisers ------------------------------------------------------------------------------
    def _regularisers(self, recorded, active_states) -> tuple[torch.Tensor, list[int]]:
        """(K,) regulariser values (0 for unweighted members) and the slices whose activations are not finite."""
        K = len(active_states)
        reg = torch.zeros(K, dtype=self.params[0].dtype, device=self.dev)
        bad: list[int] = []
        need = [k for k, s in enumerate(active_states) if s.member.weighted and s.member.method in ACTIVATION_METHODS]
        if need:
            all_neurons = all(isinstance(active_states[k].member.sampler, (type(None), AllNeurons)) for k in need)
            if all_neurons:
                layers = list(recorded.values())
                if len(need) < K:  # (a stack of T1/T2 members alone skips the gather and its backward)
                    idx = self._on_device(need)
                    layers = [L.index_select(0, idx) for L in layers]
                stacked = torch.cat(layers, dim=2)
                acts = list(stacked)
            else:
                acts = [(active_states[k].member.sampler or AllNeurons())(
                    OrderedDict((n, L[k]) for n, L in recorded.items()), OUTPUT, sync="local") for k in need]
            # members of one method and width share one batched call
            groups: dict[tuple, list[int]] = {}
            for j, k in enumerate(need):
                groups.setdefault((active_states[k].member.method, acts[j].shape[1]), []).append(j)
            for (method, width), js in groups.items():
                if width < 2:
                    raise ValueError(f"the sampler chose {width} neuron; persistence and correlations need 2: "
                                     "raise its p or keep the output")
                if all_neurons:
                    sub = stacked if len(js) == len(need) else stacked[self._on_device(js)]
                else:
                    sub = torch.stack([acts[j] for j in js])
                # one host sync per group (fit checks each model's activations): a member whose activations
                # overflowed diverges, as in fit
                finite = torch.isfinite(sub.detach()).flatten(1).all(1).tolist()
                bad += [need[j] for j, ok in zip(js, finite) if not ok]
                if not all(finite):
                    js = [j for j, ok in zip(js, finite) if ok]
                    if not js:
                        continue
                    sub = sub[self._on_device([i for i, ok in enumerate(finite) if ok])]
                if method in TOPOLOGICAL_METHODS:
                    deaths = _topological_deaths(sub, self.dissimilarity, self.backend, self.workspace)
                    values = _formula_on_deaths(deaths, method, self.alpha)
                else:
                    fn = regularisers._min_corr if method == "min_corr" else regularisers._decov
                    values = fn(sub)  # (B,): the stack's products in one call
                reg = reg.index_put((self._on_device([need[j] for j in js]),), values)
        for method in ("l1", "l2"):
            ks = [k for k, s in enumerate(active_states) if s.member.weighted and s.member.method == method]
            if ks:
                # as regularisers.l1 / l2: the weight matrices (3-d when stacked), the biases if include_bias
                idx = self._on_device(ks)
                ws = [p.index_select(0, idx) for p in self.params if self.include_bias or p.ndim > 2]
                per_layer = [(w.abs() if method == "l1" else w * w).flatten(1).sum(1) for w in ws]
                reg = reg.index_put((idx,), sum(per_layer))
        return reg, bad

    # -- the optimiser ------------------------------------------------------------------------------
    @torch.no_grad()
    def _sgd_step(self, lr: float) -> None:
        """torch.optim.SGD's update (momentum, dampening 0, Nesterov as configured) on the stacked tensors."""
        c = self.config
        first = self.buffers is None
        if first:
            self.buffers = [None] * len(self.params)
        for i, p in enumerate(self.params):
            g = p.grad
            if c.momentum != 0:
                if first:
                    self.buffers[i] = torch.clone(g).detach()
                else:
                    self.buffers[i].mul_(c.momentum).add_(g)
                g = g.add(self.buffers[i], alpha=c.momentum) if c.nesterov else self.buffers[i]
            p.add_(g, alpha=-lr)
            p.grad = None

    # -- stack bookkeeping --------------------------------------------------------------------------
    def _keep(self, slices: list[int]) -> None:
        """Keep these slices of the stack (compaction), in order."""
        if slices == list(range(len(self.active))):
            return
        idx = torch.tensor(slices, dtype=torch.long, device=self.dev)
        self.params = [p.detach().index_select(0, idx).requires_grad_(True) for p in self.params]
        if self.buffers is not None and self.buffers[0] is not None:
            self.buffers = [b.index_select(0, idx) for b in self.buffers]
        self.best = [b.index_select(0, idx) for b in self.best]
        self.active = [self.active[k] for k in slices]
        self._constants.clear()

    def _finish(self, slices: list[int], on_finish) -> None:
        """Restore the best weights of these slices, evaluate them, store their FitResults, call on_finish."""
        if not slices:
            return
        idx = torch.tensor(slices, dtype=torch.long, device=self.dev)
        best = [b.index_select(0, idx) for b in self.best]
        val_loss, val_acc = self._evaluate(best, self.X_val, self.y_val)
        if self.test is not None:
            test_loss, test_acc = self._evaluate(best, *self.test)
        else:
            test_loss = test_acc = [math.nan] * len(slices)
        label = training.device_label(self.dev)
        for j, k in enumerate(slices):
            i = self.active[k]
            s = self.states[i]
            epochs = len(s.history)
            result = FitResult(
                val_accuracy=val_acc[j], val_loss=val_loss[j], test_accuracy=test_acc[j], test_loss=test_loss[j],
                best_epoch=s.best_epoch, epochs=epochs, seconds=s.seconds,
                seconds_per_epoch=s.seconds / max(epochs, 1), stopped_early=s.stopped_early,
                diverged=s.diverged, device=label, history=list(s.history))
            self.results[i] = result
            if self.keep_weights:
                self.weights[i] = {n: b[j].cpu().clone() for n, b in zip(self.param_names, best)}
            if on_finish is not None:
                on_finish(s.member, result)

    def _end_epoch(self, slices, sums, lr: float, seconds: float, on_epoch) -> list[int]:
        """Record the epoch of these slices (validation, early stopping); return the slices that stop."""
        if not slices:
            return []
        idx = torch.tensor(slices, dtype=torch.long, device=self.dev)
        current = [p.detach().index_select(0, idx) for p in self.params]
        val_loss, val_acc = self._evaluate(current, self.X_val, self.y_val)
        ce_sum, reg_sum, batches = sums
        stop = []
        for j, k in enumerate(slices):
            s = self.states[self.active[k]]
            n_b = max(batches[k], 1)
            train_loss = float(ce_sum[k]) / n_b
            train_reg = float(reg_sum[k]) / n_b if s.member.weighted else 0.0
            if not (math.isfinite(train_loss) and math.isfinite(train_reg)) or not math.isfinite(val_loss[j]):
                s.diverged = True
            record = {"epoch": self.epoch, "train_loss": train_loss, "train_reg": train_reg,
                      "val_loss": val_loss[j], "val_accuracy": val_acc[j], "lr": lr, "seconds": seconds}
            s.history.append(record)
            s.seconds += seconds
            if on_epoch is not None:
                on_epoch(s.member, dict(record))
            if s.diverged:
                stop.append(k)
                continue
            if val_loss[j] < s.best_loss:
                s.best_loss, s.best_epoch, s.since_best = val_loss[j], self.epoch, 0
                for b, p in zip(self.best, current):
                    b[k] = p[j]
            else:
                s.since_best += 1
                if s.since_best >= self.config.patience:
                    s.stopped_early = True
                    stop.append(k)
        return stop

    # -- training -----------------------------------------------------------------------------------
    def train_epoch(self, on_epoch=None, on_finish=None) -> None:
        """One epoch of every member still in the stack; members that stop are finished and removed."""
        c = self.config
        self.epoch += 1
        t0 = time.perf_counter()
        n_train = self.X_train.shape[0]
        K = len(self.active)
        orders = torch.stack([torch.randperm(n_train, generator=self.data_generators[i]) for i in self.active])
        orders = orders.to(self.dev)
        ce_sum = torch.zeros(K, dtype=torch.float64, device=self.dev)
        reg_sum = torch.zeros(K, dtype=torch.float64, device=self.dev)
        batches = [0] * K
        lr = c.lr_at(self.step)
        for lo in range(0, n_train, c.batch_size):
            idx = orders[:, lo:lo + c.batch_size]
            if idx.shape[1] < 2:  # as fit: a lone leftover sample has no correlations
                continue
            lr = c.lr_at(self.step)
            states = [self.states[i] for i in self.active]
            X = self.X_train[idx]  # (K, m, d)
            y = self.y_train[idx]
            gens = [s.dropout_generator for s in states]
            logits, recorded = self._forward(X, self.params, train=True, generators=gens,
                                             record=any(s.member.weighted and s.member.method in ACTIVATION_METHODS
                                                        for s in states))
            Kn, m, C = logits.shape
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(Kn, m).mean(1)
            reg, bad = self._regularisers(recorded, states)
            if bad:
                # as fit: a member whose activations overflowed diverges; its epoch ends before this step
                # (its weights as they are now); the stack still steps it below, then drops it
                for k in bad:
                    self.states[self.active[k]].diverged = True
                self._end_epoch(bad, (ce_sum, reg_sum, batches), lr, time.perf_counter() - t0, on_epoch)
                self._finish(bad, on_finish)
            weights = self._on_device([s.member.weight if s.member.weighted else 0.0 for s in states],
                                      self.params[0].dtype)
            loss = (ce + weights * reg).sum()  # members are independent: grad of the sum = grad of each
            loss.backward()
            self._sgd_step(lr)
            ce_sum += ce.detach().double()
            reg_sum += reg.detach().double()
            for k in range(len(batches)):
                batches[k] += 1
            self.step += 1
            if bad:
                keep = [k for k in range(Kn) if k not in bad]
                self._keep(keep)
                keep_t = torch.tensor(keep, dtype=torch.long, device=self.dev)
                ce_sum, reg_sum, orders = ce_sum[keep_t], reg_sum[keep_t], orders[keep_t]
                batches = [batches[k] for k in keep]
                if not self.active:
                    return
        seconds = time.perf_counter() - t0
        slices = list(range(len(self.active)))
        stop = self._end_epoch(slices, (ce_sum, reg_sum, batches), lr, seconds, on_epoch)
        if self.epoch >= c.max_epochs:
            stop = slices
        self._finish(stop, on_finish)
        self._keep([k for k in slices if k not in stop])

    @property
    def done(self) -> bool:
        return not self.active

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resumed stack needs, as tensors and plain containers (``torch.save``-able, weights_only)."""
        members = []
        for i in self.active:
            s = self.states[i]
            sampler_gen = getattr(s.member.sampler, "_generator", None)
            members.append({
                "key": list(s.member.key) if isinstance(s.member.key, tuple) else s.member.key,
                "best_loss": s.best_loss, "best_epoch": s.best_epoch, "since_best": s.since_best,
                "seconds": s.seconds, "history": s.history,
                "data_generator": self.data_generators[i].get_state(),
                "dropout_generator": s.dropout_generator.get_state(),
                "sampler_generator": sampler_gen.get_state() if sampler_gen is not None else None,
            })
        return {
            "version": CHECKPOINT_VERSION, "epoch": self.epoch, "step": self.step, "members": members,
            "params": [p.detach().cpu() for p in self.params],
            "buffers": None if self.buffers is None else [b.cpu() for b in self.buffers],
            "best": [b.cpu() for b in self.best],
        }

    def load_state(self, state: dict) -> list:
        """Continue from :meth:`state`; members of the checkpoint not in this stack are dropped.

        Returns the keys of this stack's members that the checkpoint did not hold
        (they cannot join a stack mid-way: train them in another stack).
        """
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}; "
                             "delete the checkpoint to start the stack afresh")
        norm = lambda key: tuple(key) if isinstance(key, list) else key  # noqa: E731
        index = {norm(m.key): i for i, m in enumerate(self.members)}
        slices, active = [], []
        for j, entry in enumerate(state["members"]):
            i = index.get(norm(entry["key"]))
            if i is None:
                continue  # finished since (its row is written) or not in this stack
            slices.append(j)
            active.append(i)
            s = self.states[i]
            s.best_loss, s.best_epoch, s.since_best = entry["best_loss"], entry["best_epoch"], entry["since_best"]
            s.seconds, s.history = entry["seconds"], list(entry["history"])
            self.data_generators[i].set_state(entry["data_generator"])
            s.dropout_generator.set_state(entry["dropout_generator"])
            if entry["sampler_generator"] is not None:
                s.member.sampler._generator.set_state(entry["sampler_generator"])
        if len(state["params"]) != len(self.params) or any(
                a.shape[1:] != b.shape[1:] for a, b in zip(state["params"], self.params)):
            raise ValueError("the checkpoint holds another network's weights; delete it to start afresh")
        idx = torch.tensor(slices, dtype=torch.long)
        self.params = [p.index_select(0, idx).to(self.dev).requires_grad_(True) for p in state["params"]]
        self.buffers = None if state["buffers"] is None else [b.index_select(0, idx).to(self.dev)
                                                               for b in state["buffers"]]
        self.best = [b.index_select(0, idx).to(self.dev) for b in state["best"]]
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        missing = [m.key for i, m in enumerate(self.members) if i not in set(active)]
        self.active = active
        return missing


def fit_stack(build: Callable[[], nn.Module], members, train, val, test=None, *, config: TrainConfig | None = None,
              backend: str = "torch", dissimilarity="abs_correlation", alpha: float = 0.5, device="cpu",
              deterministic: bool = True, progress: bool = True, progress_desc: str | None = None,
              on_epoch: Callable[[Member, dict], None] | None = None,
              on_finish: Callable[[Member, FitResult], None] | None = None,
              checkpoint=None, checkpoint_every: float = 300.0, checkpoint_extra: dict | None = None,
              weights_out: dict | None = None, include_bias: bool = False, build_member=None) -> list[FitResult]:
    """Train ``members`` of the network ``build()`` in one stack; their FitResults in the members' order.

    Parameters
    ----------
    build, members, train, val, test, config, backend, dissimilarity, alpha, device
        See :class:`StackTrainer` (the arguments of ``training.fit``, per member where they differ).
    deterministic : ask torch for deterministic kernels while training (as ``fit``).
    on_epoch : called with (member, history record) after each epoch of each member.
    on_finish : called with (member, FitResult) as soon as a member stops.
    checkpoint : path, optional
        Resume from this file when it exists; save the stack there (atomically) at the end of an
        epoch when ``checkpoint_every`` seconds have passed since the last save (0: every epoch);
        removed when the stack is done. Members of the file that are not in ``members`` (finished
        meanwhile) are dropped; members not in the file are trained afterwards in a stack of their own.
    checkpoint_extra : dict, optional
        Stored beside the state and checked on resume (e.g. the protocol): a mismatch is a ValueError.
    include_bias, build_member : see :class:`StackTrainer`.
    weights_out : dict, optional
        Filled with member key -> the member's restored best weights (``{parameter name: tensor}``,
        the names of ``build().named_parameters()``), on the CPU.
    """
    members = list(members)
    trainer = StackTrainer(build, members, train, val, test, config=config, backend=backend,
                           dissimilarity=dissimilarity, alpha=alpha, include_bias=include_bias, device=device,
                           build_member=build_member)
    trainer.keep_weights = weights_out is not None
    later: list = []
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("extra") != (checkpoint_extra or {}):
            raise ValueError(f"checkpoint {path} was written for {saved.get('extra')}, not {checkpoint_extra}; "
                             "delete it (or use another folder) to start the stack afresh")
        later = trainer.load_state(saved["state"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=trainer.config.max_epochs, initial=trainer.epoch, unit="epoch", leave=False,
                   dynamic_ncols=True, desc=progress_desc or f"stack of {len(members)}")
    last_save = time.monotonic()
    try:
        with training._deterministic(deterministic, trainer.dev):
            while trainer.active:
                trainer.train_epoch(on_epoch=on_epoch, on_finish=on_finish)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(members=len(trainer.active))
                if path is not None and trainer.active and time.monotonic() - last_save >= checkpoint_every:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    state = {"extra": checkpoint_extra or {}, "state": trainer.state()}
                    replace_atomically(path, lambda tmp: torch.save(state, tmp))
                    last_save = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
    if path is not None and path.is_file():
        path.unlink()
    if weights_out is not None:
        weights_out.update({members[i].key: w for i, w in trainer.weights.items()})
    if later:
        rest = [m for m in members if m.key in set(later)]
        results = fit_stack(build, rest, train, val, test, config=config, backend=backend,
                            dissimilarity=dissimilarity, alpha=alpha, device=device, deterministic=deterministic,
                            progress=progress, progress_desc=progress_desc, on_epoch=on_epoch,
                            on_finish=on_finish, weights_out=weights_out, include_bias=include_bias,
                            build_member=build_member)
        for m, r in zip(rest, results):
            trainer.results[members.index(m)] = r
    return [trainer.results.get(i) for i in range(len(members))]
