"""Tests for toponeuro.ensemble: a stacked member against the same run trained alone by training.fit."""

from __future__ import annotations

import math

import pytest
import torch

from toponeuro import data, ensemble, models, regularisers, training
from toponeuro.ensemble import Member, StackTrainer, fit_stack
from toponeuro.sampling import ImportanceSampler, RandomSampler
from toponeuro.training import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "val"), data.load("digits", "test")


def _builder(network="mlp"):
    return lambda: models.build(network, in_shape=(1, 8, 8), num_classes=10)


def _sampler(kind, seed):
    return {"all": None, "importance": ImportanceSampler(0.5), "random": RandomSampler(0.5, seed=seed)}[kind]


# (method, weight, seed, sampler kind): every method, the samplers, a weight-0 member of a weighted method
MEMBERS = [("none", 0.0, 0, "all"), ("t1", 1e-4, 1, "all"), ("t2", 0.1, 2, "importance"),
           ("min_corr", 0.1, 3, "random"), ("decov", 1e-3, 4, "all"), ("l1", 1e-4, 5, "all"),
           ("l2", 1e-3, 6, "all"), ("t1", 0.0, 7, "all")]


def _alone(build, spec, train, val, test, config, device="cpu"):
    method, weight, seed, kind = spec
    model, _ = training.seeded_build(seed, build)
    result = training.fit(model, train, val, test, method=method, weight=weight, config=config, seed=seed,
                          sampler=_sampler(kind, seed), device=device, progress=False)
    return result, {k: v.detach().cpu() for k, v in model.named_parameters()}


def _compare(stacked, alone, weights_a, weights_b, *, atol_w, atol_loss, n_test):
    assert (stacked.epochs, stacked.best_epoch, stacked.stopped_early, stacked.diverged) == (
        alone.epochs, alone.best_epoch, alone.stopped_early, alone.diverged)
    for a, b in zip(stacked.history, alone.history):
        for key in ("train_loss", "train_reg", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=atol_loss, abs=atol_loss), key
        assert a["lr"] == b["lr"] and a["epoch"] == b["epoch"]
    assert stacked.val_loss == pytest.approx(alone.val_loss, abs=atol_loss)
    assert abs(stacked.test_accuracy - alone.test_accuracy) <= 1.0 / n_test + 1e-12
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=atol_w, rtol=0)


@pytest.mark.parametrize("network, specs", [("mlp-dropout", MEMBERS), ("mlp-deep", MEMBERS[1:3])])
def test_each_member_is_its_run_trained_alone(digits, network, specs):
    train, val, test = digits
    config = TrainConfig(max_epochs=2, batch_size=128, patience=5)
    build = _builder(network)
    members = [Member(m, w, s, sampler=_sampler(kind, s)) for m, w, s, kind in specs]
    weights = {}
    results = fit_stack(build, members, train, val, test, config=config, progress=False, weights_out=weights)
    for member, spec, stacked in zip(members, specs, results):
        alone, alone_weights = _alone(build, spec, train, val, test, config)
        # the same initialisation, batches and dropout masks; only rounding differs (baddbmm vs addmm, and the
        # tree path's reductions over a stack against one member), which T2 at 0.1 amplifies to a few 1e-5
        # in a weight after two epochs (3.6e-5 seen); a wrong gradient or batch moves weights by far more
        _compare(stacked, alone, weights[member.key], alone_weights, atol_w=5e-5, atol_loss=2e-5,
                 n_test=len(test[1]))


def test_t1_at_a_large_weight_agrees_in_float64(digits):
    # In float32 a T1 weight of 1e-3 or more amplifies the rounding gap (near-ties in the MST fall the other
    # way: 0.1 % apart after an epoch); in float64 the same member agrees to ~1e-9: the maths is fit's.
    train, val, test = ((X.double(), y) for X, y in digits)
    config = TrainConfig(max_epochs=1, batch_size=128, patience=5)

    def build():
        return models.build("mlp", in_shape=(1, 8, 8)).double()

    weights = {}
    (stacked,) = fit_stack(build, [Member("t1", 1e-3, 3)], train, val, test, config=config, progress=False,
                           weights_out=weights)
    alone, alone_weights = _alone(build, ("t1", 1e-3, 3, "all"), train, val, test, config)
    _compare(stacked, alone, weights[("t1", 1e-3, 3)], alone_weights, atol_w=1e-7, atol_loss=1e-7,
             n_test=len(test[1]))


def test_the_stacked_sgd_step_is_torch_optim_sgd(torch_gen):
    # property: random weights and gradients, several steps with changing learning rates, per slice
    for momentum, nesterov in ((0.9, True), (0.5, False), (0.0, False)):
        config = TrainConfig(momentum=momentum, nesterov=nesterov)
        shapes = [(4, 3, 5), (4, 3)]
        params = [torch.randn(s, generator=torch_gen) for s in shapes]
        trainer = StackTrainer.__new__(StackTrainer)  # the optimiser alone: no data needed
        trainer.config, trainer.buffers = config, None
        trainer.params = [p.clone().requires_grad_(True) for p in params]
        singles = [[p[k].clone().requires_grad_(True) for p in params] for k in range(4)]
        optims = [torch.optim.SGD(ps, lr=0.1, momentum=momentum, nesterov=nesterov) for ps in singles]
        for lr in (0.1, 0.1, 0.05, 0.3):
            grads = [torch.randn(s, generator=torch_gen) for s in shapes]
            for p, g in zip(trainer.params, grads):
                p.grad = g.clone()
            trainer._sgd_step(lr)
            for k, (ps, opt) in enumerate(zip(singles, optims)):
                for group in opt.param_groups:
                    group["lr"] = lr
                for p, g in zip(ps, grads):
                    p.grad = g[k].clone()
                opt.step()
        for k, ps in enumerate(singles):
            for stacked, single in zip(trainer.params, ps):
                assert torch.equal(stacked[k].detach(), single.detach())


def test_stopped_members_leave_the_stack_and_the_rest_is_unchanged(digits):
    train, val, test = digits
    config = TrainConfig(max_epochs=3, batch_size=256, patience=5)
    build = _builder("mlp")
    # l2 at 1e6 overflows in the first epoch (its loss becomes inf/NaN: diverged at the epoch's end);
    # t1 at 1e9 makes the activations overflow mid-epoch (fit stops that run before the step)
    doomed = [Member("l2", 1e6, 1), Member("t1", 1e9, 2)]
    healthy = [Member("none", 0.0, 3), Member("decov", 1e-3, 4)]
    trainer = StackTrainer(build, doomed + healthy, train, val, test, config=config)
    trainer.keep_weights = True
    trainer.train_epoch()
    assert [trainer.members[i].key for i in trainer.active] == [m.key for m in healthy]
    assert all(p.shape[0] == 2 for p in trainer.params + trainer.best + trainer.buffers)
    while not trainer.done:
        trainer.train_epoch()
    for i, member in enumerate(doomed):
        result = trainer.results[i]
        alone, _ = _alone(build, (member.method, member.weight, member.seed, "all"), train, val, test, config)
        assert result.diverged and alone.diverged and result.epochs == alone.epochs == 1
        assert len(result.history) == len(alone.history)
        assert result.best_epoch == alone.best_epoch == 0
    # the healthy members train as in a stack of their own
    weights = {}
    again = fit_stack(build, healthy, train, val, test, config=config, progress=False, weights_out=weights)
    for j, member in enumerate(healthy):
        first = trainer.results[len(doomed) + j]
        assert first.epochs == again[j].epochs == 3
        assert [h["val_loss"] for h in first.history] == pytest.approx([h["val_loss"] for h in again[j].history],
                                                                       abs=1e-6)
        for name, w in weights[member.key].items():
            torch.testing.assert_close(trainer.weights[len(doomed) + j][name], w, atol=1e-6, rtol=0)


class _Kill(KeyboardInterrupt):
    pass


def test_a_killed_stack_resumes_from_its_checkpoint(digits, tmp_path):
    train, val, test = digits
    config = TrainConfig(max_epochs=4, batch_size=256, patience=2)
    build = _builder("mlp-dropout")
    members = lambda: [Member("t1", 1e-4, 0), Member("none", 0.0, 1, key="plain"),  # noqa: E731
                       Member("min_corr", 0.1, 2, sampler=RandomSampler(0.5, seed=2))]
    weights_ref = {}
    reference = fit_stack(build, members(), train, val, test, config=config, progress=False,
                          weights_out=weights_ref)
    path = tmp_path / "stack.pt"

    def kill_at_epoch_3(member, record):
        if record["epoch"] == 3:
            raise _Kill  # after the checkpoint of epoch 2 (saved at the end of every epoch)

    with pytest.raises(_Kill):
        fit_stack(build, members(), train, val, test, config=config, progress=False, on_epoch=kill_at_epoch_3,
                  checkpoint=path, checkpoint_every=0, checkpoint_extra={"protocol": "a"})
    saved = torch.load(path, weights_only=True)
    assert saved["state"]["epoch"] == 2
    with pytest.raises(ValueError, match="delete it"):
        fit_stack(build, members(), train, val, test, config=config, progress=False, checkpoint=path,
                  checkpoint_extra={"protocol": "b"})
    seen_epochs = []
    weights = {}
    resumed = fit_stack(build, members(), train, val, test, config=config, progress=False, checkpoint=path,
                        checkpoint_extra={"protocol": "a"}, weights_out=weights,
                        on_epoch=lambda m, r: seen_epochs.append(r["epoch"]))
    assert min(seen_epochs) == 3  # continued, not restarted
    assert not path.exists()  # removed when the stack is done
    for a, b in zip(resumed, reference):
        strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
        assert strip(a.history) == strip(b.history)
        assert (a.test_accuracy, a.val_loss, a.best_epoch) == (b.test_accuracy, b.val_loss, b.best_epoch)
    for key in weights_ref:
        for name in weights_ref[key]:
            assert torch.equal(weights[key][name], weights_ref[key][name])


def test_a_checkpoint_drops_finished_members_and_trains_new_ones_apart(digits, tmp_path):
    train, val, test = digits
    config = TrainConfig(max_epochs=3, batch_size=256, patience=5)
    build = _builder("mlp")
    path = tmp_path / "stack.pt"

    def kill(member, record):
        if record["epoch"] == 2:
            raise _Kill

    with pytest.raises(_Kill):
        fit_stack(build, [Member("none", 0.0, 0), Member("l2", 1e-3, 1)], train, val, test, config=config,
                  progress=False, on_epoch=kill, checkpoint=path, checkpoint_every=0)
    # ("none", 0) finished meanwhile (its row was written); ("l1", 2) is new: it trains in a stack of its own
    finished = []
    results = fit_stack(build, [Member("l2", 1e-3, 1), Member("l1", 1e-4, 2)], train, val, test, config=config,
                        progress=False, checkpoint=path, on_finish=lambda m, r: finished.append(m.key))
    assert finished == [("l2", 1e-3, 1), ("l1", 1e-4, 2)]
    for member, result in zip([("l2", 1e-3, 1, "all"), ("l1", 1e-4, 2, "all")], results):
        alone, _ = _alone(build, member, train, val, test, config)
        assert [h["val_loss"] for h in result.history] == pytest.approx([h["val_loss"] for h in alone.history],
                                                                        abs=2e-5)


def test_bad_input_is_refused_with_a_reason(digits):
    train, val, test = digits
    with pytest.raises(ValueError, match="single engine"):
        StackTrainer(lambda: models.build("cnn", in_shape=(1, 8, 8)), [Member("none", 0.0, 0)], train, val)
    with pytest.raises(ValueError, match="mlp-dropout"):
        Member("dropout", 0.0, 0)
    with pytest.raises(ValueError, match="weight"):
        Member("t1", math.nan, 0)
    with pytest.raises(ValueError, match="distinct keys"):
        StackTrainer(_builder(), [Member("t1", 0.1, 0), Member("t1", 0.1, 0)], train, val)
    with pytest.raises(ValueError, match="death edges"):
        StackTrainer(_builder(), [Member("t1", 0.1, 0)], train, val, backend="ripser")
    with pytest.raises(ValueError, match="T1 on the unbounded dissimilarity 'euclidean' has no lower bound"):
        StackTrainer(_builder(), [Member("t1", 0.1, 0)], train, val, dissimilarity="euclidean")  # as fit refuses
    nets = iter(["mlp", "mlp-deep"])
    with pytest.raises(ValueError, match="one network"):
        StackTrainer(None, [Member("none", 0.0, 0), Member("none", 0.0, 1)], train, val,
                     build_member=lambda m: _builder(next(nets))())
    assert ensemble.stackable("mlp") and not ensemble.stackable("cnn")
    X, y = train
    with pytest.raises(ValueError, match="train: class label 12 is out of range for a model with 10 outputs"):
        StackTrainer(_builder(), [Member("none", 0.0, 0)], (X, y.clone().fill_(12)), val)
    with pytest.raises(ValueError, match=r"does not take inputs of shape \(56,\)"):
        StackTrainer(_builder(), [Member("none", 0.0, 0)], (X[..., :7], y), (val[0][..., :7], val[1]))


@pytest.mark.cuda
def test_each_member_is_its_run_trained_alone_on_cuda(digits):
    train, val, test = digits
    config = TrainConfig(max_epochs=2, batch_size=128, patience=5)
    build = _builder("mlp")  # no dropout: on CUDA the masks come from another stream than fit's
    members = [Member(m, w, s, sampler=_sampler(kind, s)) for m, w, s, kind in MEMBERS]
    weights = {}
    results = fit_stack(build, members, train, val, test, config=config, progress=False, device="cuda",
                        weights_out=weights)
    for member, spec, stacked in zip(members, MEMBERS, results):
        alone, alone_weights = _alone(build, spec, train, val, test, config, device="cuda")
        _compare(stacked, alone, weights[member.key], alone_weights, atol_w=1e-4, atol_loss=1e-4,
                 n_test=len(test[1]))


@pytest.mark.parametrize("include_bias", [False, True])
def test_weight_penalties_of_the_stack_are_each_members(digits, include_bias):
    train, val, _ = digits
    members = [Member("l1", 0.5, 0), Member("none", 0.0, 1), Member("l2", 0.25, 2)]
    trainer = StackTrainer(_builder("mlp-deep"), members, train, val, include_bias=include_bias)
    reg, bad = trainer._regularisers({}, [trainer.states[i] for i in trainer.active])
    assert bad == [] and reg[1] == 0
    for k, fn in ((0, regularisers.l1), (2, regularisers.l2)):
        model, _ = training.seeded_build(members[k].seed, _builder("mlp-deep"))
        assert float(reg[k].detach()) == pytest.approx(float(fn(model, include_bias=include_bias).detach()), rel=1e-5)


def test_a_member_builder_replaces_the_seeded_build(digits):
    train, val, _ = digits
    saved = {}

    def build_member(member):  # e.g. weights saved by an earlier run of that seed
        model, _ = training.seeded_build(member.seed, _builder())
        saved[member.key] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    trainer = StackTrainer(None, [Member("none", 0.0, 4), Member("l2", 0.1, 5)], train, val,
                           build_member=build_member)
    for k, member in enumerate(trainer.members):
        for name, p in zip(trainer.param_names, trainer.params):
            assert torch.equal(p[k].detach(), saved[member.key][name])


def test_a_step_copies_no_index_or_weight_vector_from_the_host(digits, monkeypatch):
    """On a GPU a tensor made from a host list waits for the queued kernels: the step's index and
    weight vectors are made once, then reused until members leave the stack."""
    train, val, _ = digits
    config = TrainConfig(max_epochs=3, batch_size=128, patience=5)
    members = [Member(*spec[:3]) for spec in MEMBERS if spec[3] == "all"]
    trainer = StackTrainer(_builder(), members, train, val, config=config)
    trainer.train_epoch()
    made = []
    tensor = torch.tensor
    # those made for the stack's device (the host-side kernels' results stay on the host)
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: ("device" in k and made.append(a[0])) or tensor(*a, **k))
    trainer.train_epoch()
    steps = -(-len(train[1]) // config.batch_size)
    assert steps >= 8 and len(made) <= 1, made  # at most the epoch's end (the validated slices), no step
