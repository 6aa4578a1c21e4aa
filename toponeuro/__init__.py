"""toponeuro: decorrelating neurons using persistence.

Pipeline: model -> recorded activations (:mod:`toponeuro.sampling`) ->
dissimilarity (:mod:`toponeuro.dissimilarity`) -> death edges and deaths
(:mod:`toponeuro.persistence`) -> regulariser value
(:mod:`toponeuro.regularisers`) -> loss. :class:`TopologicalRegulariser`
wraps the pipeline around a model with forward hooks.
"""

from . import dissimilarity, persistence, regularisers

__version__ = "0.1.0"

__all__ = ["dissimilarity", "persistence", "regularisers", "__version__"]
