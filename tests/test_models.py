"""toponeuro.models: shapes, parameter counts by hand, layer structure."""

import pytest
import torch
from torch import nn

from toponeuro import models


def _linear(n_in, n_out):
    return n_in * n_out + n_out


def _conv3x3(c_in, c_out):
    return c_in * c_out * 9 + c_out


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _hand_counts(features, side):
    """Parameters of every network by hand, for ``features`` input pixels; the CNN's
    two poolings leave ``side x side`` maps of 32 channels."""
    mlp = _linear(features, 450) + _linear(450, 350) + _linear(350, 200) + _linear(200, 10)
    return {
        "mlp": mlp,
        "mlp-dropout": mlp,
        "mlp-deep": _linear(features, 300)
        + _linear(300, 250)
        + _linear(250, 200)
        + _linear(200, 150)
        + _linear(150, 100)
        + _linear(100, 10),
        "cnn": _conv3x3(1, 16) + _conv3x3(16, 32) + _linear(32 * side * side, 128) + _linear(128, 10),
    }


PARAMS_28 = _hand_counts(28 * 28, 7)  # 28x28 inputs
PARAMS_8 = _hand_counts(8 * 8, 2)  # 8x8 inputs (digits): the CNN pools 8 -> 4 -> 2

HIDDEN = {
    "mlp": [450, 350, 200],
    "mlp-dropout": [450, 350, 200],
    "mlp-deep": [300, 250, 200, 150, 100],
    "cnn": [(16, 28, 28), (32, 14, 14), 128],
}


def test_models_tuple():
    assert models.MODELS == ("mlp", "mlp-dropout", "mlp-deep", "cnn")


@pytest.mark.parametrize("name", models.MODELS)
def test_output_shape_and_parameter_count(name):
    torch.manual_seed(0)
    model = models.build(name)
    assert _n_params(model) == PARAMS_28[name]
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlp", "mlp-deep", "cnn"])
def test_digits_input_shape(name):
    model = models.build(name, in_shape=(1, 8, 8))
    assert _n_params(model) == PARAMS_8[name]
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_num_classes():
    assert models.build("mlp", num_classes=3)(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    assert models.build("cnn", num_classes=4)(torch.rand(2, 1, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize("name", models.MODELS)
def test_relu_modules_are_hookable_with_expected_widths(name):
    model = models.build(name)
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape[1:])))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    model(torch.rand(4, 1, 28, 28))
    for h in hooks:
        h.remove()
    expected = [w if isinstance(w, tuple) else (w,) for w in HIDDEN[name]]
    assert seen == expected


@pytest.mark.parametrize("name", ["mlp", "mlp-dropout", "mlp-deep"])
def test_mlp_structure(name):
    model = models.build(name)
    layers = list(model.children())
    assert isinstance(layers[0], nn.Flatten)
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 10
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == HIDDEN[name] + [10]
    # every hidden Linear is followed directly by a ReLU
    for i, m in enumerate(layers[:-1]):
        if isinstance(m, nn.Linear):
            assert isinstance(layers[i + 1], nn.ReLU)


def test_dropout_after_each_hidden_relu():
    layers = list(models.build("mlp-dropout").children())
    relu_positions = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    dropouts = [m for m in layers if isinstance(m, nn.Dropout)]
    assert len(relu_positions) == 3 and len(dropouts) == 3
    for i in relu_positions:
        assert isinstance(layers[i + 1], nn.Dropout) and layers[i + 1].p == 0.5
    for name in ["mlp", "mlp-deep", "cnn"]:
        assert not any(isinstance(m, nn.Dropout) for m in models.build(name).modules())


def test_dropout_active_only_in_training_mode():
    torch.manual_seed(0)
    model = models.build("mlp-dropout")
    x = torch.rand(8, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_seeding_is_the_callers_job():
    torch.manual_seed(1)
    a = models.build("mlp")
    torch.manual_seed(1)
    b = models.build("mlp")
    c = models.build("mlp")  # no reseed: different weights
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(b.fc1.weight, c.fc1.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"mlp, mlp-dropout, mlp-deep, cnn"):
        models.build("resnet18")
    with pytest.raises(ValueError, match=r"in_shape"):
        models.build("mlp", in_shape=(28, 28))
    with pytest.raises(ValueError, match=r"in_shape"):
        models.build("mlp", in_shape=(1, 0, 28))
    with pytest.raises(ValueError, match=r"at least 4x4"):
        models.build("cnn", in_shape=(1, 3, 3))
    with pytest.raises(ValueError, match=r"num_classes"):
        models.build("mlp", num_classes=0)
