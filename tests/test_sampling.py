"""ActivationRecorder (forward hooks) and the neuron samplers.

References are independent: activations recomputed by running the model's
layers by hand, and the samplers' choices recomputed in NumPy.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import warnings
from collections import OrderedDict
from decimal import Decimal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toponeuro import models
from toponeuro.sampling import (
    OUTPUT,
    ActivationRecorder,
    AllNeurons,
    ImportanceSampler,
    IndexSampler,
    RandomSampler,
)

BATCH = 6


@pytest.fixture
def x28():
    torch.manual_seed(0)
    return torch.rand(BATCH, 1, 28, 28)


def _build(name: str) -> nn.Sequential:
    torch.manual_seed(1)
    return models.build(name)


def _hand_forward_mlp(model: nn.Sequential, x: torch.Tensor, hidden: int):
    """The ReLU outputs of each hidden layer and the logits, computed layer by layer."""
    h = x.flatten(1)
    outs = OrderedDict()
    for k in range(1, hidden + 1):
        h = F.relu(getattr(model, f"fc{k}")(h))
        outs[f"relu{k}"] = h
    outs[OUTPUT] = model.out(h)
    return outs


def _no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )


# --------------------------------------------------------------------------
# the recorder on the project's models
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "mlp-deep"])
def test_recorder_captures_relu_outputs_and_logits_in_forward_order(name, x28):
    model = _build(name)
    rec = ActivationRecorder(model)
    out = model(x28)
    layers = rec.layers()
    hidden = models.HIDDEN_WIDTHS[name]
    assert list(layers) == [f"relu{k}" for k in range(1, len(hidden) + 1)] + [OUTPUT]
    assert [A.shape for A in layers.values()] == [(BATCH, w) for w in (*hidden, 10)]
    with torch.no_grad():
        want = _hand_forward_mlp(model, x28, len(hidden))
    for key in want:
        torch.testing.assert_close(layers[key].detach(), want[key], rtol=0, atol=0)
    assert torch.equal(layers[OUTPUT], out)
    # the records keep autograd back to the weights
    layers["relu1"].sum().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0


def test_mlp_widths_are_the_papers():
    model = _build("mlp")
    rec = ActivationRecorder(model)
    model(torch.rand(3, 1, 28, 28))
    assert [A.shape[1] for A in rec.layers().values()] == [450, 350, 200, 10]


def test_dropout_model_records_the_relu_before_dropout(x28):
    model = _build("mlp-dropout")
    model.train()  # dropout active
    dropped = {}

    def keep_dropout_output(module, inputs, output):  # returns None: output unchanged
        dropped["dropout1"] = output.detach()

    handle = model.dropout1.register_forward_hook(keep_dropout_output)
    rec = ActivationRecorder(model)
    model(x28)
    layers = rec.layers()
    assert list(layers) == ["relu1", "relu2", "relu3", OUTPUT]  # no dropout entries
    assert [A.shape[1] for A in layers.values()] == [450, 350, 200, 10]
    with torch.no_grad():
        before = F.relu(model.fc1(x28.flatten(1)))
    torch.testing.assert_close(layers["relu1"].detach(), before, rtol=0, atol=0)
    # and that is not what came out of the dropout (which zeroed and rescaled)
    assert not torch.equal(dropped["dropout1"], before)
    handle.remove()
    # in eval mode dropout is the identity: the whole pass matches the plain MLP by hand
    model.eval()
    model(x28)
    with torch.no_grad():
        want = _hand_forward_mlp(model, x28, 3)
    for key in want:
        torch.testing.assert_close(rec.layers()[key].detach(), want[key], rtol=0, atol=0)


def _hand_forward_cnn(model, x):
    with torch.no_grad():
        r1 = F.relu(model.conv1(x))
        r2 = F.relu(model.conv2(F.max_pool2d(r1, 2)))
        r3 = F.relu(model.fc1(F.max_pool2d(r2, 2).flatten(1)))
        return r1, r2, r3, model.out(r3)


def test_cnn_flatten_makes_every_position_a_neuron(x28):
    model = _build("cnn")
    rec = ActivationRecorder(model, conv="flatten")
    model(x28)
    layers = rec.layers()
    assert list(layers) == ["relu1", "relu2", "relu3", OUTPUT]
    assert [A.shape[1] for A in layers.values()] == [16 * 28 * 28, 32 * 14 * 14, 128, 10]
    r1, r2, r3, logits = _hand_forward_cnn(model, x28)
    for got, want in zip(layers.values(), (r1.flatten(1), r2.flatten(1), r3, logits)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_cnn_channel_makes_every_channel_a_neuron(x28):
    model = _build("cnn")
    rec = ActivationRecorder(model, conv="channel")
    model(x28)
    layers = rec.layers()
    assert [A.shape[1] for A in layers.values()] == [16, 32, 128, 10]
    r1, r2, r3, logits = _hand_forward_cnn(model, x28)
    for got, want in zip(layers.values(), (r1.mean((2, 3)), r2.mean((2, 3)), r3, logits)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_a_new_forward_pass_replaces_the_records(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    model(x28)
    model(x28[:3])
    assert all(A.shape[0] == 3 for A in rec.layers().values())


# --------------------------------------------------------------------------
# when nothing is recorded
# --------------------------------------------------------------------------
def test_nothing_recorded_under_no_grad(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    with torch.no_grad():
        model(x28)
    assert not rec.has_pass
    with pytest.raises(ValueError, match="no activations recorded"):
        rec.layers()


def test_nothing_recorded_when_disabled(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    rec.enabled = False
    model(x28)
    assert not rec.has_pass
    rec.enabled = True
    model(x28)
    assert rec.has_pass


def test_remove_removes_the_hooks(x28):
    model = _build("cnn")
    assert _no_hooks_left(model)
    rec = ActivationRecorder(model)
    assert not _no_hooks_left(model)
    model(x28)
    assert rec.has_pass
    rec.remove()
    assert _no_hooks_left(model)
    model(x28)
    assert not rec.has_pass
    with pytest.raises(ValueError):
        rec.layers()


def test_no_recording_before_any_forward_pass():
    rec = ActivationRecorder(_build("mlp"))
    with pytest.raises(ValueError, match="forward pass"):
        rec.layers()


# --------------------------------------------------------------------------
# explicit modules, options, bad input
# --------------------------------------------------------------------------
def test_explicit_module_names_record_those_modules(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model, modules=["fc2", "relu1"], include_output=False)
    model(x28)
    layers = rec.layers()
    # forward order, whatever order the names were given in; no output
    assert list(layers) == ["relu1", "fc2"]
    with torch.no_grad():
        h1 = F.relu(model.fc1(x28.flatten(1)))
        pre2 = model.fc2(h1)
    torch.testing.assert_close(layers["relu1"].detach(), h1, rtol=0, atol=0)
    torch.testing.assert_close(layers["fc2"].detach(), pre2, rtol=0, atol=0)
    assert (layers["fc2"] < 0).any()  # pre-activation: really the Linear's output


def test_include_output_false_leaves_logits_out(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model, include_output=False)
    model(x28)
    assert list(rec.layers()) == ["relu1", "relu2", "relu3"]
    assert rec.output_name is None


def test_unknown_module_name_raises():
    with pytest.raises(ValueError, match="no module named"):
        ActivationRecorder(_build("mlp"), modules=["relu1", "relu9"])


def test_bad_conv_mode_and_non_module_raise():
    with pytest.raises(ValueError, match="conv"):
        ActivationRecorder(_build("cnn"), conv="pixels")
    with pytest.raises(ValueError, match="nn.Module"):
        ActivationRecorder(lambda x: x)


def test_nothing_to_record_raises():
    with pytest.raises(ValueError, match="nothing to record"):
        ActivationRecorder(nn.Sequential(nn.Linear(3, 2)), include_output=False)


# --------------------------------------------------------------------------
# samplers on hand-made layers, against NumPy
# --------------------------------------------------------------------------
def _layers_with_ties() -> "OrderedDict[str, torch.Tensor]":
    """Three layers; the hidden ones have tied importance scores (dead and copied units)."""
    g = torch.Generator().manual_seed(3)
    h1 = torch.rand(8, 11, generator=g)
    h1[:, [2, 5, 9]] = 0.0                 # three dead units: tied at score 0
    h1[:, 7] = h1[:, 4]                    # a tie among live units
    h2 = torch.randn(8, 7, generator=g)    # negative values: the score uses |a|
    h2[:, 6] = -h2[:, 1]                   # tie between a column and its negative
    out = torch.randn(8, 5, generator=g)
    return OrderedDict([("relu1", h1), ("relu2", h2), (OUTPUT, out)])


def _numpy_importance(layers, p, keep_output=True):
    parts = []
    for name, A in layers.items():
        a = A.detach().numpy()
        if name == OUTPUT and keep_output:
            parts.append(a)
            continue
        k = math.floor(Decimal(repr(p)) * a.shape[1])  # floor(p * width), p as the decimal written
        score = np.abs(a).mean(axis=0)
        top = np.argsort(-score, kind="stable")[:k]  # highest first, ties: lower index
        parts.append(a[:, np.sort(top)])
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("keep_output", [True, False])
def test_importance_sampler_matches_numpy(p, keep_output):
    layers = _layers_with_ties()
    got = ImportanceSampler(p, keep_output=keep_output)(layers, OUTPUT)
    want = _numpy_importance(layers, p, keep_output)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


def test_importance_sampler_keeps_the_output_whole_and_floor_p_width():
    layers = _layers_with_ties()
    chosen = ImportanceSampler(0.5).select(layers, OUTPUT)
    assert chosen[OUTPUT] is None
    assert [len(chosen["relu1"]), len(chosen["relu2"])] == [5, 3]  # floor(5.5), floor(3.5)


def test_importance_sampler_breaks_ties_by_lower_index():
    # mean |a| per column: 2, 1, 1, 1, 0, 3 -> the top 3 are columns 5, 0 and,
    # of the tied 1, 2, 3, column 1; returned in index order
    A = torch.tensor([[2.0, 1.0, -1.0, 1.0, 0.0, 3.0],
                      [-2.0, 1.0, 1.0, -1.0, 0.0, 3.0]])
    layers = OrderedDict([("relu1", A), (OUTPUT, torch.rand(2, 2))])
    chosen = ImportanceSampler(0.5).select(layers, OUTPUT)
    assert chosen["relu1"].tolist() == [0, 1, 5]
    chosen = ImportanceSampler(0.8).select(layers, OUTPUT)  # floor(4.8) = 4
    assert chosen["relu1"].tolist() == [0, 1, 2, 5]


def test_importance_sampler_on_a_recorded_mlp_matches_numpy(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    model(x28)
    layers = rec.layers()
    got = ImportanceSampler(0.25)(layers, rec.output_name)
    want = _numpy_importance(layers, 0.25)
    assert got.shape == (BATCH, 112 + 87 + 50 + 10)
    np.testing.assert_array_equal(got.detach().numpy(), want)
    # the chosen columns keep autograd back to the weights
    got.sum().backward()
    assert model.fc1.weight.grad.abs().sum() > 0


def test_all_neurons_is_every_column_in_order():
    layers = _layers_with_ties()
    got = AllNeurons()(layers, OUTPUT)
    np.testing.assert_array_equal(got.numpy(), np.concatenate([A.numpy() for A in layers.values()], axis=1))


def _random_choice(sampler, layers):
    return {k: (None if v is None else v.tolist()) for k, v in sampler.select(layers, OUTPUT).items()}


def test_random_sampler_is_reproducible_for_a_seed():
    layers = _layers_with_ties()
    a, b = RandomSampler(0.5, seed=7), RandomSampler(0.5, seed=7)
    draws_a = [_random_choice(a, layers) for _ in range(3)]
    draws_b = [_random_choice(b, layers) for _ in range(3)]
    assert draws_a == draws_b
    torch.testing.assert_close(RandomSampler(0.5, seed=7)(layers), RandomSampler(0.5, seed=7)(layers))
    a.reset()
    assert _random_choice(a, layers) == draws_a[0]


def test_random_sampler_differs_for_another_seed():
    layers = OrderedDict([("relu1", torch.rand(4, 200)), (OUTPUT, torch.rand(4, 3))])
    a = _random_choice(RandomSampler(0.5, seed=0), layers)
    b = _random_choice(RandomSampler(0.5, seed=1), layers)
    assert a["relu1"] != b["relu1"]  # C(200, 100) choices: equal only by a miracle


@pytest.mark.filterwarnings("ignore:RandomSampler.*keeps 0 of")
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_random_sampler_takes_floor_p_width_distinct_columns_per_layer(p):
    layers = _layers_with_ties()
    sampler = RandomSampler(p, seed=3)
    chosen = sampler.select(layers, OUTPUT)
    assert chosen[OUTPUT] is None
    for name in ("relu1", "relu2"):
        idx = chosen[name].tolist()
        width = layers[name].shape[1]
        assert len(idx) == math.floor(p * width)
        assert len(set(idx)) == len(idx) and all(0 <= i < width for i in idx)
    # the matrix is those columns, layer by layer, then the whole output
    sampler.reset()
    got = sampler(layers, OUTPUT)
    want = np.concatenate([layers["relu1"].numpy()[:, chosen["relu1"].numpy()],
                           layers["relu2"].numpy()[:, chosen["relu2"].numpy()],
                           layers[OUTPUT].numpy()], axis=1)
    np.testing.assert_array_equal(got.numpy(), want)


def test_random_sampler_keep_output_false_samples_the_output_too():
    layers = _layers_with_ties()
    chosen = RandomSampler(0.6, seed=0, keep_output=False).select(layers, OUTPUT)
    assert len(chosen[OUTPUT]) == 3  # floor(0.6 * 5)


def test_index_sampler_picks_the_named_columns():
    layers = _layers_with_ties()
    got = IndexSampler({"relu2": [4, 0, 6], OUTPUT: None})(layers, OUTPUT)
    want = np.concatenate([layers["relu2"].numpy()[:, [4, 0, 6]], layers[OUTPUT].numpy()], axis=1)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("indices, match", [
    ({"relu1": [0, 11]}, "must lie in"),
    ({"relu1": [-1, 2]}, "must lie in"),
    ({"relu7": [0]}, "not recorded"),
])
def test_index_sampler_bad_indices_raise(indices, match):
    with pytest.raises(ValueError, match=match):
        IndexSampler(indices)(_layers_with_ties(), OUTPUT)


def test_index_sampler_needs_an_entry():
    with pytest.raises(ValueError):
        IndexSampler({})


def test_sampler_that_chooses_nothing_raises():
    layers = OrderedDict([("relu1", torch.rand(4, 3))])
    with pytest.raises(ValueError, match="no neurons"), pytest.warns(UserWarning, match="keeps 0 of"):
        ImportanceSampler(0.1)(layers, None)  # floor(0.3) = 0


@pytest.mark.parametrize("p", [0, 0.0, -0.5, 1.01, 2, float("nan"), "0.5", None])
@pytest.mark.parametrize("cls", [ImportanceSampler, RandomSampler])
def test_p_outside_zero_one_raises(cls, p):
    with pytest.raises(ValueError, match="p must be"):
        cls(p)


@pytest.mark.filterwarnings("ignore:.*keeps 0 of")
@pytest.mark.parametrize("p", [0.29, 0.57, 0.58, 0.07, 0.1, 0.005, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("width", [1, 7, 100, 200, 1000])
def test_fraction_count_is_floor_of_the_decimal_p_times_width(p, width):
    """0.29 * 100 is 28.999999999999996 in binary floating point: the count must still be 29."""
    from toponeuro.sampling import fraction_count

    want = math.floor(Decimal(repr(p)) * width)
    assert fraction_count(p, width) == want
    A = torch.rand(4, width)
    for sampler in (ImportanceSampler(p, keep_output=False), RandomSampler(p, keep_output=False)):
        assert len(sampler.select(OrderedDict([("relu1", A)]), OUTPUT)["relu1"]) == want


def test_a_deepcopy_of_the_model_records_nothing_into_the_original(x28):
    """EMA models and snapshots deepcopy the model, hooks included: the copy's passes must not
    add to (or clear) what the original's last pass recorded."""
    model = _build("mlp")
    rec = ActivationRecorder(model)
    model(x28)
    before = OrderedDict((k, v.detach().clone()) for k, v in rec.layers().items())
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    ema(torch.rand(BATCH + 3, 1, 28, 28))  # another batch size too
    after = rec.layers()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k].detach(), before[k], rtol=0, atol=0)
    model(x28[:2])  # the original still records
    assert all(v.shape[0] == 2 for v in rec.layers().values())


def test_a_dropped_recorder_takes_its_hooks_off_the_model(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    assert any(m._forward_hooks for m in model.modules())
    del rec
    gc.collect()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model(x28)  # and the model runs as before


@pytest.mark.parametrize("act", [nn.SELU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.CELU, nn.LogSigmoid,
                                 nn.Softsign, nn.Tanhshrink])
def test_every_elementwise_nonlinearity_is_recorded_by_default(act):
    model = nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3))
    rec = ActivationRecorder(model)
    x = torch.randn(8, 5)
    model(x)
    layers = rec.layers()
    assert list(layers) == ["1", "3", OUTPUT]
    with torch.no_grad():
        h1 = act()(model[0](x))
        torch.testing.assert_close(layers["1"].detach(), h1)
        torch.testing.assert_close(layers["3"].detach(), act()(model[2](h1)))


def test_softmax_is_not_a_layer_of_neurons():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(dim=1))
    rec = ActivationRecorder(model)
    assert rec.module_names == ["1"]


def test_a_model_without_nonlinearity_modules_warns_that_only_the_output_is_recorded():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    model = Functional()
    with pytest.warns(UserWarning, match="modules=\\[...\\]"):
        rec = ActivationRecorder(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = ActivationRecorder(model, modules=["fc1"])  # named explicitly: no warning
    model(torch.randn(4, 5))
    assert list(rec.layers()) == [OUTPUT] and list(named.layers()) == ["fc1", OUTPUT]


def test_sampler_rejects_an_unknown_sync():
    layers = OrderedDict([("relu1", torch.rand(4, 6)), (OUTPUT, torch.rand(4, 2))])
    with pytest.raises(ValueError, match="sync must be one of"):
        ImportanceSampler(0.5)(layers, OUTPUT, sync="everywhere")


# --------------------------------------------------------------------------
# a pass that records nothing keeps the last recorded one
# --------------------------------------------------------------------------
def _no_grad(rec):
    return torch.no_grad()


def _inference_mode(rec):
    return torch.inference_mode()


class _disabled:
    def __init__(self, rec):
        self.rec = rec

    def __enter__(self):
        self.rec.enabled = False

    def __exit__(self, *exc):
        self.rec.enabled = True


@pytest.mark.parametrize("not_recording", [_no_grad, _inference_mode, _disabled])
def test_a_pass_that_records_nothing_keeps_the_last_recorded_pass(not_recording, x28):
    """A teacher / pseudo-label / logging pass between the training forward and reg() must not erase it."""
    model = _build("mlp")
    rec = ActivationRecorder(model)
    model(x28)
    key = rec.pass_key
    with not_recording(rec):
        model(torch.rand(BATCH + 3, 1, 28, 28))
    assert rec.pass_key is key
    layers = rec.layers()
    with torch.no_grad():
        want = _hand_forward_mlp(model, x28, 3)
    assert list(layers) == list(want)
    for k in want:
        torch.testing.assert_close(layers[k].detach(), want[k], rtol=0, atol=0)
    model(x28[:2])  # the next recording pass replaces it
    assert rec.pass_key is not key
    assert all(A.shape[0] == 2 for A in rec.layers().values())


# --------------------------------------------------------------------------
# IndexSampler input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("indices, match", [
    ([0, 0, 1], "repeat neurons \\[0\\]"),
    (torch.tensor([3, 1, 3, 1]), "repeat neurons \\[1, 3\\]"),
    ([0.9, 1.2], "dtype float64"),
    (torch.tensor([0.0, 1.0]), "dtype torch.float32"),
    (np.array([1.5]), "dtype float64"),
    ([[0, 1], [2, 3]], "shape \\(2, 2\\)"),
    (torch.tensor([[True, False]]), "shape \\(1, 2\\)"),
    (3, "shape \\(\\)"),
    ("0, 1", "string"),
])
def test_index_sampler_rejects_duplicate_fractional_and_non_1d_indices(indices, match):
    with pytest.raises(ValueError, match=f"layer 'relu1'.*{match}"):
        IndexSampler({"relu1": indices})


@pytest.mark.parametrize("as_mask", [lambda m: torch.from_numpy(m), lambda m: m, lambda m: m.tolist()])
def test_index_sampler_takes_a_boolean_mask_as_its_true_positions(as_mask):
    layers = _layers_with_ties()
    mask = np.zeros(11, dtype=bool)
    mask[[3, 7, 9]] = True
    got = IndexSampler({"relu1": as_mask(mask), OUTPUT: None})(layers, OUTPUT)
    want = np.concatenate([layers["relu1"].numpy()[:, np.flatnonzero(mask)], layers[OUTPUT].numpy()], axis=1)
    np.testing.assert_array_equal(got.numpy(), want)
    assert got.shape[1] == 3 + 5


def test_index_sampler_mask_of_another_width_raises_when_the_layer_is_seen():
    sampler = IndexSampler({"relu2": np.ones(11, dtype=bool)})  # relu2 has 7 neurons
    with pytest.raises(ValueError, match="mask for layer 'relu2' has 11 entries, but the layer has 7"):
        sampler(_layers_with_ties(), OUTPUT)


def test_index_sampler_takes_integer_arrays_of_any_integer_dtype_in_their_order():
    layers = _layers_with_ties()
    for idx in (np.array([4, 0, 6], dtype=np.int32), np.array([4, 0, 6], dtype=np.uint8),
                torch.tensor([4, 0, 6], dtype=torch.int16), range(4, 7)):
        got = IndexSampler({"relu2": idx})(layers, OUTPUT)
        np.testing.assert_array_equal(got.numpy(), layers["relu2"].numpy()[:, list(idx)])


# --------------------------------------------------------------------------
# a layer that floor(p * width) leaves out is warned about, once
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ImportanceSampler, RandomSampler])
def test_a_layer_that_p_leaves_out_is_warned_about_once_per_layer(cls):
    # relu1 has 11 neurons, relu2 7: p = 0.1 keeps floor(1.1) = 1 of relu1 and floor(0.7) = 0 of relu2
    layers = _layers_with_ties()
    sampler = cls(0.1)
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            got = sampler(layers, OUTPUT)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert f"{cls.__name__}(p=0.1) keeps 0 of the 7 neurons of layer 'relu2'" in messages[0]
    assert "p >= 1/7 = 0.1429 keeps one" in messages[0]
    assert record[0].filename == __file__  # points at the caller
    # the floor rule is kept: one neuron of relu1, none of relu2, the output whole
    assert got.shape[1] == 1 + 0 + 5
    np.testing.assert_array_equal(got[:, 1:].numpy(), layers[OUTPUT].numpy())


def test_no_warning_when_every_layer_keeps_a_neuron():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImportanceSampler(0.15)(_layers_with_ties(), OUTPUT)  # floor(1.65) = 1, floor(1.05) = 1


# --------------------------------------------------------------------------
# RandomSampler: one draw per recorded pass
# --------------------------------------------------------------------------
def test_random_sampler_draws_once_per_key_in_the_seeds_sequence():
    layers = _layers_with_ties()
    sampler, reference = RandomSampler(0.5, seed=5), RandomSampler(0.5, seed=5)
    for _ in range(3):
        key = object()
        want = _random_choice(reference, layers)  # the reference draws once per pass
        first = sampler(layers, OUTPUT, key=key)
        for _ in range(2):  # logging calls on the same pass see the same neurons
            torch.testing.assert_close(sampler(layers, OUTPUT, key=key), first, rtol=0, atol=0)
        expected = np.concatenate([layers["relu1"].numpy()[:, want["relu1"]],
                                   layers["relu2"].numpy()[:, want["relu2"]], layers[OUTPUT].numpy()], axis=1)
        np.testing.assert_array_equal(first.numpy(), expected)


def test_random_sampler_without_a_key_draws_at_every_call():
    layers = OrderedDict([("relu1", torch.rand(4, 200)), (OUTPUT, torch.rand(4, 3))])
    sampler = RandomSampler(0.5, seed=0)
    assert not torch.equal(sampler(layers, OUTPUT), sampler(layers, OUTPUT))


# --------------------------------------------------------------------------
# copies: pickle, deepcopy
# --------------------------------------------------------------------------
def test_a_model_with_a_recorder_pickles_and_its_copy_records_nowhere(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    model(x28)
    before = rec.layers()["relu2"].detach().clone()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole model, hooks included
    assert buffer.tell() > 0
    clone = pickle.loads(pickle.dumps(model))
    out = clone(torch.rand(BATCH + 1, 1, 28, 28))
    torch.testing.assert_close(clone(x28), model(x28), rtol=0, atol=0)
    assert out.shape == (BATCH + 1, 10)
    torch.testing.assert_close(rec.layers()["relu2"].detach(), before, rtol=0, atol=0)


class _Holder(nn.Module):
    """A LightningModule-style wrapper: the network and a recorder on it, as attributes."""

    def __init__(self):
        super().__init__()
        self.net = _build("mlp")
        self.rec = ActivationRecorder(self.net)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("after_forward", [False, True])
def test_a_copy_of_a_module_holding_a_recorder_records_its_own_model(how, after_forward, x28):
    holder = _Holder()
    if after_forward:
        holder(x28)
    clone = copy.deepcopy(holder) if how == "deepcopy" else pickle.loads(pickle.dumps(holder))
    assert clone.rec.model is clone.net and clone.net is not holder.net
    assert not clone.rec.has_pass  # the recorded tensors are not copied
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    x = torch.rand(BATCH + 2, 1, 28, 28)
    clone(x)
    layers = clone.rec.layers()
    with torch.no_grad():
        want = _hand_forward_mlp(clone.net, x, 3)
    for k in want:
        torch.testing.assert_close(layers[k].detach(), want[k], rtol=0, atol=0)
    if after_forward:  # the original keeps its own pass
        assert all(A.shape[0] == BATCH for A in holder.rec.layers().values())
    else:
        assert not holder.rec.has_pass


def test_a_copy_of_a_removed_recorder_does_not_record(x28):
    holder = _Holder()
    holder.rec.remove()
    clone = copy.deepcopy(holder)
    assert _no_hooks_left(clone.net) or all(
        type(h).__name__ == "_InertHook" for m in clone.net.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
    clone(x28)
    with pytest.raises(ValueError, match="hooks were removed"):
        clone.rec.layers()


class _HoldsItsOwnRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _build("mlp")
        self.rec = ActivationRecorder(self)

    def forward(self, x):
        return self.net(x)


def test_a_model_holding_its_own_recorder_copies_to_one_that_says_it_does_not_record(x28):
    model = _HoldsItsOwnRecorder()
    model(x28)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone(x28)
        with pytest.raises(ValueError, match="does not record: build a new"):
            clone.rec.layers()
    assert model.rec.has_pass


# --------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------
class _TupleOut(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.fc, self.relu, self.head = nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
        self.wrap = wrap

    def forward(self, x):
        logits = self.head(self.relu(self.fc(x)))
        return self.wrap(logits, x)


@pytest.mark.parametrize("wrap", [lambda logits, x: (logits, x), lambda logits, x: {"logits": logits}])
def test_a_tuple_or_dict_output_says_to_leave_the_output_out_and_name_the_logits(wrap):
    model = _TupleOut(wrap)
    rec = ActivationRecorder(model)
    with pytest.raises(ValueError, match="include_output=False, and name the logits' module in modules"):
        model(torch.randn(4, 5))
    rec.remove()
    # which works
    rec = ActivationRecorder(model, modules=["relu", "head"], include_output=False)
    x = torch.randn(4, 5)
    model(x)
    with torch.no_grad():
        h = F.relu(model.fc(x))
        torch.testing.assert_close(rec.layers()["head"].detach(), model.head(h), rtol=0, atol=0)


def test_a_1d_output_names_the_layer_and_the_fix():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1), nn.Flatten(0))
    rec = ActivationRecorder(model)
    model(torch.randn(8, 5))
    with pytest.raises(ValueError, match="layer 'output' returned shape \\(8,\\).*include_output=False"):
        rec.layers()


def test_modules_as_one_string_is_that_module(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model, modules="relu2", include_output=False)
    model(x28)
    assert list(rec.layers()) == ["relu2"]
    with pytest.raises(ValueError, match="modules must be names"):
        ActivationRecorder(model, modules=[model.relu1])


def test_no_activations_message_says_why(x28):
    model = _build("mlp")
    rec = ActivationRecorder(model)
    with pytest.raises(ValueError, match="no forward pass recorded yet"):
        rec.layers()
    rec.enabled = False
    with pytest.raises(ValueError, match="recording is disabled: set enabled = True"):
        rec.layers()
    rec.enabled = True
    rec.remove()
    model(x28)
    with pytest.raises(ValueError, match="hooks were removed \\(remove\\(\\), or the end of the with-block\\)"):
        rec.layers()
    unused = ActivationRecorder(_build("mlp"), modules=["relu1"], include_output=False)
    unused.model.relu1 = nn.Identity()  # the named module is no longer run by the forward pass
    unused.model(x28)
    with pytest.raises(ValueError, match="ran none of the recorded modules \\['relu1'\\]"):
        unused.layers()


@pytest.mark.parametrize("conv, width", [("flatten", 10 * 8), ("channel", 10)])
def test_a_sequence_output_follows_the_documented_rule(conv, width):
    """(m, L, D): flatten gives L * D neurons, channel the L token positions, each the mean over D."""
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    rec = ActivationRecorder(model, conv=conv, include_output=False)
    x = torch.randn(4, 10, 8)
    model(x)
    got = rec.layers()["1"]
    with torch.no_grad():
        h = F.gelu(model[0](x))
    want = h.reshape(4, -1) if conv == "flatten" else h.mean(2)
    assert got.shape == (4, width)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# nn.DataParallel over several devices: replicas are invisible to the hooks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True])
def test_data_parallel_over_several_devices_is_refused(nested, x28):
    model = _build("mlp")
    dp = torch.nn.DataParallel(model)  # on CPU: device_ids = [], it runs the module itself
    rec = ActivationRecorder(dp)       # one device (here none): recorded as usual
    dp(x28)
    want = _hand_forward_mlp(model, x28, hidden=3)
    got = rec.layers()
    assert list(got) == ["module.relu1", "module.relu2", "module.relu3", OUTPUT]
    torch.testing.assert_close(got["module.relu3"].detach(), want["relu3"].detach(), rtol=0, atol=0)
    rec.remove()
    dp.device_ids = [0, 1]           # as on a machine with two GPUs
    wrapped = torch.nn.Sequential(dp) if nested else dp
    with pytest.raises(ValueError, match=r"DataParallel over devices \[0, 1\].*DistributedDataParallel"):
        ActivationRecorder(wrapped)
