"""Numerical gradient validation: autograd against central finite differences.

The regulariser ``R`` is differentiable only where the combinatorial part of
the pipeline is locally constant: the minimum spanning tree must be unique,
the gathered ``|rho|`` away from its kink at 0, the neurons non-constant, and
so on. This module

* compares, in float64, the autograd gradient of ``R`` with central finite
  differences, with respect to the activations
  (:func:`check_activations_gradient`) or a model's parameters
  (:func:`check_model_gradient`): they agree when the largest error relative
  to the gradient's size is within ``tolerance`` (1e-6), or when the largest
  absolute error is within the rounding of the central differences,
  ``8 * eps * |R| / h`` at the smallest step ``h`` (an absolute floor: a
  gradient that is 0 up to rounding, 1e-16 against 0, is not a failure);
* diagnoses the point (:func:`diagnose`): the MST margin (:func:`mst_margin`),
  the smallest ``|rho|`` on a tree edge, constant neurons, the spread of the
  deaths for T2, ``|rho| = 1`` tree edges for ``sqrt(1 - rho^2)``, and ReLU
  inputs at 0 for models, and says plainly whether disagreement is expected;
* at a tie (MST not unique) checks the subgradient inequality of T1, which is
  convex as a function of the dissimilarities (:func:`check_subgradient`);
  for a model, where the tie is the only kink, it also compares the parameter
  gradient with central differences of the frozen-tree piece
  ``theta -> T(d(theta)[E])``, ``E`` the tree the backend chose (T1 and T2;
  see :func:`check_model_gradient`).

The command ``toponeuro gradcheck`` runs every combination on generated
activations (or a tiny MLP) and prints one table row per combination::

    python -m toponeuro gradcheck                 # all formulas, dissimilarities, backends
    python -m toponeuro gradcheck --mlp           # w.r.t. the parameters of a tiny MLP
    python -m toponeuro gradcheck --tie           # a duplicated neuron: MST not unique

Its exit status: 0 when every check passed (``ok``, ``subgradient ok``,
``frozen tree ok``, or ``kink``: a point diagnosed not differentiable, where
there is no derivative to compare with); 1 when a check found a wrong
gradient (``FAIL``, ``subgradient FAIL``, ``frozen tree FAIL``); 3 when nothing failed but some check was
``inconclusive`` (differentiable, but every finite-difference step tried
crossed a kink, so nothing was verified: an unverified gradient is not a
pass, and a CI job must not read it as one); 2 for bad options.

The package, one idea a module (every public name is re-exported here):
``pipeline`` (the function under test and its combinatorial state),
``diagnosis``, ``finite_differences`` (steps and errors), ``activations`` and
``model`` (the two checks), ``ties`` (subgradient and frozen-tree checks),
``reports``, ``points`` (generated activations, a tiny MLP), ``suite`` (every
combination, the table, the exit status) and ``cli``. The MST analysis
(:func:`tree_path_max`, :func:`mst_margin`) lives in :mod:`toponeuro.persistence.tree`.
"""

from __future__ import annotations

from ..persistence import edge_backends
from ..persistence.tree import mst_margin, tree_path_max
from .activations import check_activations_gradient
from .cli import configure_parser, run
from .diagnosis import Diagnosis, diagnose
from .model import check_model_gradient
from .pipeline import CORRELATION_BASED, FORMULAS, regulariser_value
from .points import random_activations, tiny_mlp
from .reports import FrozenTreeReport, GradcheckReport, SubgradientReport
from .suite import exit_status, format_table, report_text, resolve_choices, run_checks, summary_line
from .ties import check_subgradient

__all__ = [
    "FORMULAS",
    "CORRELATION_BASED",
    "edge_backends",
    "tree_path_max",
    "mst_margin",
    "Diagnosis",
    "diagnose",
    "SubgradientReport",
    "check_subgradient",
    "FrozenTreeReport",
    "GradcheckReport",
    "regulariser_value",
    "check_activations_gradient",
    "check_model_gradient",
    "random_activations",
    "tiny_mlp",
    "run_checks",
    "resolve_choices",
    "format_table",
    "report_text",
    "summary_line",
    "exit_status",
    "configure_parser",
    "run",
]
