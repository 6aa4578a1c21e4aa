"""toponeuro: decorrelating neurons using persistence.

Pipeline: model -> recorded activations (:mod:`toponeuro.sampling`) ->
dissimilarity (:mod:`toponeuro.dissimilarity`) -> death edges and deaths
(:mod:`toponeuro.persistence`) -> regulariser value
(:mod:`toponeuro.regularisers`) -> loss. :class:`TopologicalRegulariser`
wraps the pipeline around a model with forward hooks.
"""

from . import dissimilarity, distributed, persistence, regularisers, sampling
from .nn import TopologicalRegulariser

__version__ = "0.1.0"

__all__ = [
    "dissimilarity", "distributed", "persistence", "regularisers", "sampling",
    "TopologicalRegulariser", "__version__",
]


def __getattr__(name):
    # heavier modules load on first use: tn.models, tn.data, tn.gradcheck, ...
    import importlib

    if name in ("models", "data", "gradcheck", "training", "bench", "experiments"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'toponeuro' has no attribute {name!r}")
