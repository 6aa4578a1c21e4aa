"""The paper's networks, plus a small CNN for the Fashion-MNIST benchmark.

``build(name)`` returns an ``nn.Sequential`` with named children that maps
inputs ``(batch, C, H, W)`` (default ``(batch, 1, 28, 28)``) to logits
``(batch, num_classes)``.

=================  ==========================================================
``"mlp"``          784-450-350-200-10, ReLU
``"mlp-dropout"``  the same with ``Dropout(0.5)`` after each hidden ReLU
``"mlp-deep"``     784-300-250-200-150-100-10, ReLU
``"cnn"``          Conv(1->16, 3x3, pad 1)-ReLU-MaxPool(2)-Conv(16->32, 3x3,
                   pad 1)-ReLU-MaxPool(2)-Flatten-Linear(32*7*7 -> 128)-ReLU-
                   Linear(128 -> 10)
=================  ==========================================================

Every hidden non-linearity is its own ``nn.ReLU`` module (never the
functional form), so forward hooks can record it; dropout comes after the
ReLU, so recording the ReLU output records the activations before dropout,
as the paper did. Children are named ``fc1, relu1, dropout1, fc2, ...`` and
the last ``Linear`` is ``out`` (for the CNN: ``conv1, relu1, pool1, conv2,
relu2, pool2, flatten, fc1, relu3, out``).

Initialisation (``init``): ``"torch"`` keeps PyTorch's default for each
layer (Kaiming-uniform weights, uniform biases); ``"glorot"`` is the
initialisation of the authors' Keras code: Glorot (Xavier) uniform weights,
``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))`` (for a convolution the
fans are multiplied by the kernel's area), and zero biases.

Seeding is the caller's job: call ``torch.manual_seed`` before ``build``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["MODELS", "INITS", "HIDDEN_WIDTHS", "build", "initialise"]

MODELS = ("mlp", "mlp-dropout", "mlp-deep", "cnn")

#: initialisations :func:`build` offers (see the module docstring)
INITS = ("torch", "glorot")

HIDDEN_WIDTHS = {
    "mlp": (450, 350, 200),
    "mlp-dropout": (450, 350, 200),
    "mlp-deep": (300, 250, 200, 150, 100),
}

DROPOUT_P = 0.5
CNN_CHANNELS = (16, 32)
CNN_HIDDEN = 128


def _check_in_shape(in_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(in_shape)
    except TypeError:
        shape = None
    if (
        shape is None
        or len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError(
            f"in_shape must be three positive ints (channels, height, width), e.g. (1, 28, 28); "
            f"got {in_shape!r}"
        )
    return shape


def _mlp(in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float | None):
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = in_features
    for k, h in enumerate(hidden, start=1):
        layers.append((f"fc{k}", nn.Linear(width, h)))
        layers.append((f"relu{k}", nn.ReLU()))
        if dropout is not None:
            layers.append((f"dropout{k}", nn.Dropout(dropout)))
        width = h
    layers.append(("out", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _cnn(in_shape: tuple[int, int, int], num_classes: int):
    c, h, w = in_shape
    c1, c2 = CNN_CHANNELS
    # two 2x2 max-pools (floor), 3x3 convolutions with padding 1 keep the size
    h_out, w_out = h // 4, w // 4
    if h_out == 0 or w_out == 0:
        raise ValueError(
            f"the cnn needs inputs of at least 4x4 pixels (two 2x2 poolings); got {h}x{w}"
        )
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(c, c1, kernel_size=3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(c2 * h_out * w_out, CNN_HIDDEN)),
                ("relu3", nn.ReLU()),
                ("out", nn.Linear(CNN_HIDDEN, num_classes)),
            ]
        )
    )


def initialise(model: nn.Module, init: str) -> nn.Module:
    """Re-initialise every ``Linear`` and ``Conv2d`` of ``model`` in place; return it.

    ``init="glorot"``: Glorot-uniform weights and zero biases (the authors' Keras
    default); ``init="torch"``: leave PyTorch's default initialisation as it is.
    Draws from torch's global generator, in module order.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if init == "torch":
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def build(name: str, *, in_shape=(1, 28, 28), num_classes: int = 10, init: str = "torch") -> nn.Sequential:
    """Build one of the networks in :data:`MODELS`.

    Parameters
    ----------
    name : {"mlp", "mlp-dropout", "mlp-deep", "cnn"}
    in_shape : (C, H, W)
        Shape of one input; ``(1, 28, 28)`` for (Fashion-)MNIST, ``(1, 8, 8)``
        for digits (see :func:`toponeuro.data.input_shape`). MLPs take
        ``C * H * W`` input features.
    num_classes : int
        Number of output logits.
    init : {"torch", "glorot"}
        Initialisation (see the module docstring); ``"glorot"`` is the authors'.

    Returns
    -------
    nn.Sequential
        Maps ``(batch, C, H, W)`` inputs to ``(batch, num_classes)`` logits.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {', '.join(MODELS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    shape = _check_in_shape(in_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name == "cnn":
        model = _cnn(shape, num_classes)
    else:
        dropout = DROPOUT_P if name == "mlp-dropout" else None
        model = _mlp(math.prod(shape), HIDDEN_WIDTHS[name], num_classes, dropout)
    return initialise(model, init)
