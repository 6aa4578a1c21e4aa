"""Tests for toponeuro.training: the fit loop against hand computations."""

from __future__ import annotations

import importlib

import math
from collections import OrderedDict

import numpy as np
import pytest
import scipy.sparse.csgraph
import torch
from torch import nn

from toponeuro import data, persistence, training
from toponeuro.nn import TopologicalRegulariser
from toponeuro.sampling import IndexSampler
from toponeuro.training import TrainConfig, fit, seed_everything


def small_net(in_features=64, hidden=20, classes=10):
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(in_features, hidden)),
        ("relu1", nn.ReLU()),
        ("out", nn.Linear(hidden, classes)),
    ]))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "val"), data.load("digits", "test")


def test_lr_schedule_is_a_staircase():
    cfg = TrainConfig(lr=0.1, lr_decay=0.5, lr_decay_steps=3)
    assert [cfg.lr_at(s) for s in range(7)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    paper = TrainConfig()
    assert (paper.lr, paper.momentum, paper.nesterov, paper.batch_size, paper.max_epochs, paper.patience) == (
        0.01, 0.9, True, 256, 1200, 20)
    assert paper.lr_at(3519) == 0.01 and paper.lr_at(3520) == pytest.approx(0.0095)


def test_history_records_the_decayed_learning_rate(digits):
    train, val, _ = digits
    n = train[0].shape[0]  # 1149 images -> 5 batches of 256 (the last has 125)
    assert n == 1149
    seed_everything(0)
    cfg = TrainConfig(lr=0.1, lr_decay=0.5, lr_decay_steps=3, max_epochs=2, patience=5)
    res = fit(small_net(), train, val, config=cfg, progress=False)
    # epoch 1 ends with step 4 -> 0.1 * 0.5 ** (4 // 3); epoch 2 with step 9 -> 0.1 * 0.5 ** 3
    assert [h["lr"] for h in res.history] == [0.05, 0.0125]
    assert math.isnan(res.test_accuracy)


def test_one_full_batch_epoch_is_one_nesterov_step_on_the_penalised_loss(digits):
    train, val, _ = digits
    X, y = train
    weight = 0.01
    seed_everything(3)
    model = small_net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=0.05, momentum=0.9, nesterov=True, batch_size=4096, max_epochs=1)
    fit(model, train, val, method="l2", weight=weight, config=cfg, progress=False)
    # by hand: first SGD step with momentum buffer = g, Nesterov update p -= lr * (g + m * g)
    ref = small_net()
    ref.load_state_dict(start)
    ce = nn.functional.cross_entropy(ref(X), y)
    l2 = sum((p * p).sum() for name, p in ref.named_parameters() if p.ndim > 1)
    grads = torch.autograd.grad(ce + weight * l2, list(ref.parameters()))
    expected = {name: p.detach() - 0.05 * (1 + 0.9) * g for (name, p), g in zip(ref.named_parameters(), grads)}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_train_reg_of_a_single_batch_is_the_t1_of_the_initial_network(digits):
    """T1 = sum of |rho| over the MST edges, computed with NumPy and scipy's MST."""
    train, val, _ = digits
    X, _ = train
    seed_everything(5)
    model = small_net(hidden=30)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(batch_size=4096, max_epochs=1)
    res = fit(model, train, val, method="t1", weight=1e-3, config=cfg, progress=False)
    ref = small_net(hidden=30)
    ref.load_state_dict(start)
    with torch.no_grad():
        h = torch.relu(ref.fc1(X.flatten(1)))
        A = torch.cat([h, ref.out(h)], 1).double().numpy()
    Ac = A - A.mean(0)
    sd = np.sqrt((Ac ** 2).sum(0))
    live = sd > 0
    rho = np.zeros((A.shape[1], A.shape[1]))
    rho[np.ix_(live, live)] = (Ac[:, live].T @ Ac[:, live]) / np.outer(sd[live], sd[live])
    d = 1.0 - np.abs(rho)
    np.fill_diagonal(d, 0.0)
    # scipy's MST drops zero-weight edges; shift weights by a constant (same tree) and undo it
    shift = 1.0
    mst = scipy.sparse.csgraph.minimum_spanning_tree(np.triu(d + shift, 1)).toarray()
    deaths = mst[mst > 0] - shift
    assert deaths.size == A.shape[1] - 1
    expected_t1 = float((1.0 - deaths).sum())
    assert res.history[0]["train_reg"] == pytest.approx(expected_t1, rel=1e-4)


def _mst_deaths(d):
    """Deaths of the 0-dimensional persistence of the dissimilarity ``d``: its MST's edge weights (scipy)."""
    # scipy's MST drops zero-weight edges; shift weights by a constant (same tree) and undo it
    shift = 1.0
    mst = scipy.sparse.csgraph.minimum_spanning_tree(np.triu(d + shift, 1)).toarray()
    deaths = mst[mst > 0] - shift
    assert deaths.size == d.shape[0] - 1
    return deaths


def _t2_by_hand(A, dissimilarity, alpha):
    """T2 = alpha * std(D) - (1 - alpha) * mean(D) (population std) of the (m, n) activations ``A`` (NumPy).

    A constant column (a dead ReLU) has rho = 0 with every other column.
    """
    Ac = A - A.mean(0)
    sd = np.sqrt((Ac ** 2).sum(0))
    live = sd > 0
    rho = np.zeros((A.shape[1], A.shape[1]))
    rho[np.ix_(live, live)] = (Ac[:, live].T @ Ac[:, live]) / np.outer(sd[live], sd[live])
    d = {"one_minus_rho": 1.0 - rho, "abs_correlation": 1.0 - np.abs(rho)}[dissimilarity]
    np.fill_diagonal(d, 0.0)
    deaths = _mst_deaths(d)
    return alpha * deaths.std() - (1 - alpha) * deaths.mean()


def test_fit_passes_sampler_dissimilarity_alpha_and_backend_to_the_regulariser(digits, monkeypatch):
    """One full batch: train_reg is T2 of the chosen columns, with 1 - rho and alpha = 0.2 (NumPy, scipy)."""
    train, val, _ = digits
    X, _ = train
    seed_everything(6)
    model = small_net(hidden=30)
    with torch.no_grad():  # the regulariser of the only batch sees the initial weights (the step comes after)
        h = torch.relu(model.fc1(X.flatten(1)))
        logits = model.out(h)
    alive = [j for j in range(30) if float(h[:, j].std()) > 0]
    hidden_cols, output_cols = alive[::2][:10], [1, 4, 6, 9]
    assert len(hidden_cols) == 10
    sampler = IndexSampler({"relu1": hidden_cols, "output": output_cols})
    # the backend reaches the persistence call
    backend = "numba" if "numba" in persistence.edge_backends() else "torch-graph"
    seen_backends = []
    real_deaths = persistence.deaths

    def recording_deaths(D, backend="torch", check=True):
        seen_backends.append(backend)
        return real_deaths(D, backend=backend, check=check)

    monkeypatch.setattr(persistence, "deaths", recording_deaths)
    # the regulariser's default path, T2 on the tree edges only (toponeuro.tree_deaths), names the backend there
    tree_module = importlib.import_module("toponeuro.tree_deaths")
    real_tree_deaths = tree_module.tree_deaths

    def recording_tree_deaths(A, dissimilarity="abs_correlation", backend="torch", **kw):
        seen_backends.append(backend)
        return real_tree_deaths(A, dissimilarity, backend, **kw)

    monkeypatch.setattr(tree_module, "tree_deaths", recording_tree_deaths)
    cfg = TrainConfig(batch_size=4096, max_epochs=1)
    res = fit(model, train, val, method="t2", weight=0.1, alpha=0.2, sampler=sampler,
              dissimilarity="one_minus_rho", backend=backend, config=cfg, progress=False)
    assert seen_backends == [backend]  # one batch, one regulariser evaluation, on the named backend

    chosen = torch.cat([h[:, hidden_cols], logits[:, output_cols]], 1).double().numpy()
    expected = _t2_by_hand(chosen, "one_minus_rho", 0.2)
    got = res.history[0]["train_reg"]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # each setting matters here: dropping any one of them gives a value outside the tolerance
    everything = torch.cat([h, logits], 1).double().numpy()
    for other in (_t2_by_hand(chosen, "abs_correlation", 0.2),  # dissimilarity dropped
                  _t2_by_hand(chosen, "one_minus_rho", 0.5),  # alpha dropped
                  _t2_by_hand(everything, "one_minus_rho", 0.2)):  # sampler dropped
        assert abs(other - expected) > 1e-2 * abs(expected)


def test_regulariser_runs_on_every_batch_and_a_lone_leftover_sample_is_skipped(digits, monkeypatch):
    """513 images, batch 256: batches of 256, 256 and 1; the regulariser runs on the first two of every epoch."""
    (X, y), val, _ = digits
    train = (X[:513], y[:513])
    calls = []  # (rows of the batch, value), one per regulariser call
    real_forward = TopologicalRegulariser.forward

    def counting_forward(self):
        value = real_forward(self)
        calls.append((self.recorder.layers()["output"].shape[0], float(value.detach())))
        return value

    monkeypatch.setattr(TopologicalRegulariser, "forward", counting_forward)
    seed_everything(1)
    cfg = TrainConfig(lr=0.05, batch_size=256, max_epochs=2)
    res = fit(small_net(), train, val, method="t1", weight=1e-3, config=cfg, progress=False)
    assert res.epochs == 2 and not res.diverged
    assert [rows for rows, _ in calls] == [256, 256, 256, 256]  # two full batches per epoch, the lone sample skipped
    for epoch, record in enumerate(res.history):
        values = [v for _, v in calls[2 * epoch: 2 * epoch + 2]]
        assert values[0] != values[1]
        assert record["train_reg"] == pytest.approx(sum(values) / 2, rel=1e-6)


def test_same_seed_gives_identical_runs(digits):
    train, val, test = digits
    results = []
    for _ in range(2):
        seed_everything(11)
        model = small_net()
        results.append(fit(model, train, val, test, method="t2", weight=0.1,
                           config=TrainConfig(lr=0.05, max_epochs=3), seed=11, progress=False))
    a, b = results
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    assert [h["train_reg"] for h in a.history] == [h["train_reg"] for h in b.history]
    assert (a.val_loss, a.test_accuracy) == (b.val_loss, b.test_accuracy)
    # a different data-order seed changes the run
    seed_everything(11)
    c = fit(small_net(), train, val, test, method="t2", weight=0.1,
            config=TrainConfig(lr=0.05, max_epochs=3), seed=12, progress=False)
    assert [h["val_loss"] for h in c.history] != [h["val_loss"] for h in a.history]


def test_early_stopping_restores_the_best_weights(digits):
    """Random training labels: the model memorises noise and the validation loss rises."""
    (X, y), val, _ = digits
    noisy = (X, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    seed_everything(0)
    model = small_net(hidden=64)
    snapshots = {}

    def snapshot(record):
        snapshots[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = TrainConfig(lr=0.2, batch_size=64, max_epochs=60, patience=3)
    res = fit(model, noisy, val, config=cfg, progress=False, on_epoch=snapshot)
    losses = [h["val_loss"] for h in res.history]
    best = int(np.argmin(losses)) + 1
    assert res.stopped_early and res.epochs < cfg.max_epochs
    assert res.best_epoch == best
    assert res.epochs == best + cfg.patience
    assert best < res.epochs  # the final epoch's weights are not the best ones
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[best][name]), name
    # the returned validation numbers are those of the restored weights
    assert res.val_loss == pytest.approx(losses[best - 1], rel=1e-6)
    assert res.val_accuracy == res.history[best - 1]["val_accuracy"]


def test_none_ignores_the_weight_and_dropout_is_none(digits):
    train, val, _ = digits
    runs = []
    for method, weight in (("none", 0.0), ("none", 5.0), ("dropout", 1.0)):
        seed_everything(2)
        runs.append(fit(small_net(), train, val, method=method, weight=weight,
                        config=TrainConfig(max_epochs=1), progress=False))
    assert runs[0].val_loss == runs[1].val_loss == runs[2].val_loss
    assert runs[0].history[0]["train_reg"] == 0.0


@pytest.mark.parametrize("kwargs, needle", [
    ({"method": "foo"}, "unknown method 'foo'"),
    ({"weight": -1.0}, "weight"),
    ({"weight": float("nan")}, "weight"),
    ({"seed": -3}, "seed"),
    ({"config": {"lr": 0.1}}, "TrainConfig"),
])
def test_fit_rejects_bad_arguments(digits, kwargs, needle):
    train, val, _ = digits
    with pytest.raises(ValueError, match=needle):
        fit(small_net(), train, val, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    ({"lr": 0}, "lr"), ({"momentum": 1.5}, "momentum"), ({"batch_size": 1}, "batch_size"),
    ({"max_epochs": 0}, "max_epochs"), ({"patience": 2.5}, "patience"), ({"nesterov": "yes"}, "nesterov"),
])
def test_train_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kwargs)


def test_fit_rejects_bad_data(digits):
    train, val, _ = digits
    with pytest.raises(ValueError, match="pair"):
        fit(small_net(), train[0], val, progress=False)
    with pytest.raises(ValueError, match="rows"):
        fit(small_net(), (train[0], train[1][:10]), val, progress=False)


def test_divergence_stops_and_keeps_finite_weights(digits):
    train, val, _ = digits
    seed_everything(0)
    model = small_net()
    res = fit(model, train, val, method="l2", weight=1e4, config=TrainConfig(lr=1.0, max_epochs=20),
              progress=False)
    assert res.diverged and res.epochs < 20
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_device_label_and_resolve():
    assert training.device_label("cpu") == "cpu"
    assert training.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        training.resolve_device("tpu-7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            training.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_fit_on_cuda_matches_cpu_roughly(digits):
    train, val, test = digits
    out = {}
    for dev in ("cpu", "cuda"):
        seed_everything(4)
        out[dev] = fit(small_net(hidden=32), train, val, test, method="t1", weight=1e-3,
                       config=TrainConfig(lr=0.05, max_epochs=2), device=dev, seed=4, progress=False)
    assert out["cuda"].device.startswith("cuda:")
    assert out["cuda"].val_loss == pytest.approx(out["cpu"].val_loss, rel=1e-3)


@pytest.mark.parametrize("device", ["mps", "meta", "xpu", "mps:0"])
def test_devices_torch_knows_but_training_cannot_use_are_refused_up_front(device):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    X, y = torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=rf"device '{device}' is not supported: toponeuro trains on 'cpu' or 'cuda'"):
        training.fit(model, (X, y), (X, y), device=device, progress=False)
    assert next(model.parameters()).device.type == "cpu"  # nothing was moved


def _tiny_data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 2, 2, generator=g), torch.randint(0, 2, (n,), generator=g)


@pytest.mark.parametrize("edit, match", [
    (lambda X, y: (X, y.float() + 0.7), r"train: y must hold integer class labels \(int64\), got torch.float32"),
    (lambda X, y: (X, y.bool()), r"train: y must hold integer class labels \(int64\), got torch.bool"),
    (lambda X, y: (X, y - 3), r"train: y has a negative class label \(-3\)"),
    (lambda X, y: (X.index_fill(0, torch.tensor([5]), float("nan")), y),
     r"train: X contains NaN or inf \(first in row 5\)"),
    (lambda X, y: (X.index_fill(0, torch.tensor([2, 6]), float("-inf")), y), r"first in row 2\)"),
    (lambda X, y: (torch.full_like(X, 1e308, dtype=torch.float64), y), r"train: X is too large to sum"),
])
def test_fit_refuses_labels_and_inputs_that_would_train_wrong(edit, match):
    X, y = _tiny_data()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=match):
        training.fit(model, edit(X, y), (X, y), config=TrainConfig(max_epochs=1, batch_size=4), progress=False)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_fit_refuses_labels_the_model_has_no_output_for(split):
    X, y = _tiny_data()
    data = {"train": (X, y), "val": (X, y), "test": (X, y)}
    data[split] = (X, y.clone().index_fill(0, torch.tensor([3]), 2))  # a third class for a 2-output model
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"{split}: class label 2 is out of range for a model with 2 outputs"):
        training.fit(model, data["train"], data["val"], data["test"], config=TrainConfig(max_epochs=1, batch_size=4),
                     progress=False)


def test_fit_refuses_inputs_the_model_does_not_take_and_leaves_it_untouched():
    X, y = _tiny_data()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 2), torch.nn.Dropout(0.5))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the model does not take inputs of shape \(1, 2, 2\)"):
        training.fit(model, (X, y), (X, y), config=TrainConfig(max_epochs=1, batch_size=4), progress=False)
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"must return \(N, classes\) logits, got \(2, 1, 2, 2\)"):
        training.fit(torch.nn.Identity(), (X, y), (X, y), config=TrainConfig(max_epochs=1, batch_size=4),
                     progress=False)


def test_fit_refuses_a_model_that_is_not_a_module():
    X, y = _tiny_data()
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got function"):
        training.fit(lambda x: x, (X, y), (X, y), progress=False)


@pytest.mark.parametrize("field, value, match", [
    ("lr", float("inf"), "TrainConfig.lr must be a positive number"),
    ("lr", float("nan"), "TrainConfig.lr must be a positive number"),
    ("lr_decay", float("inf"), "TrainConfig.lr_decay must be a positive number"),
    ("lr_decay", 1.5, r"TrainConfig.lr_decay must lie in \(0, 1\]"),
])
def test_train_config_refuses_infinite_rates_and_a_growing_decay(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})
    TrainConfig(lr_decay=1.0)  # no decay is allowed
