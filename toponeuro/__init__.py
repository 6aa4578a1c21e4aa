"""toponeuro: decorrelating neurons using persistence.

Pipeline: model -> recorded activations (:mod:`toponeuro.sampling`) ->
dissimilarity (:mod:`toponeuro.dissimilarity`) -> death edges and deaths
(:mod:`toponeuro.persistence`) -> regulariser value
(:mod:`toponeuro.regularisers`) -> loss. :mod:`toponeuro.tree_deaths` goes from
activations straight to deaths whose gradient runs through the tree edges only. :class:`TopologicalRegulariser`
wraps the pipeline around a model with forward hooks.
"""

from . import dissimilarity, distributed, persistence, regularisers, sampling, tree_deaths
from .nn import TopologicalRegulariser

__version__ = "0.1.0"

__all__ = [
    "dissimilarity", "distributed", "persistence", "regularisers", "sampling", "tree_deaths",
    "TopologicalRegulariser", "__version__",
]


def __getattr__(name):
    # heavier modules load on first use: tn.models, tn.data, tn.gradcheck, ...
    import importlib

    if name in ("models", "data", "gradcheck", "training", "bench", "experiments"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'toponeuro' has no attribute {name!r}")
