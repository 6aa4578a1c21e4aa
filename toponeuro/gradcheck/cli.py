"""``toponeuro gradcheck``: the argument parser and ``run(args)`` (see :mod:`toponeuro.gradcheck`)."""

from __future__ import annotations

import argparse
import sys
import time

from .. import dissimilarity as _dissimilarity
from .pipeline import FORMULAS
from .suite import exit_status, report_text, resolve_choices, run_checks, summary_line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compare autograd gradients of the regularisers with central finite differences (float64), "
        "and diagnose whether the point is differentiable (MST margin, |rho| on the tree, constant "
        "neurons, spread of the deaths). Exit status: 0 if every check passed (ok, subgradient ok, or "
        "kink: a point diagnosed not differentiable, with no derivative to compare); 1 if they disagree "
        "at a point diagnosed differentiable, or if the gradient fails the subgradient inequality of T1 "
        "at a tie, or if a model's parameter gradient disagrees with the frozen-tree piece at a tie; "
        "3 if nothing failed but some check was inconclusive (differentiable, but every "
        "finite-difference step tried crossed a kink, so nothing was verified); 2 for bad options."
    )
    parser.add_argument("--formula", default="all", help=f"one of {list(FORMULAS)}, comma-separated, or 'all'")
    parser.add_argument("--dissimilarity", default="all",
                        help=f"one of {list(_dissimilarity.DISSIMILARITIES)}, comma-separated, or 'all' (T1/T2)")
    parser.add_argument("--backend", default="all",
                        help="edge-giving persistence backend(s), comma-separated, or 'all' (those installed)")
    parser.add_argument("--n", type=int, default=8, help="neurons (default 8)")
    parser.add_argument("--m", type=int, default=12, help="samples in the batch (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated point (default 0)")
    parser.add_argument("--alpha", type=float, default=0.5, help="T2's weight on the std (default 0.5)")
    parser.add_argument("--mlp", action="store_true",
                        help="differentiate w.r.t. the parameters of a tiny ReLU MLP (n recorded neurons: two "
                             "hidden layers and 2 logits) on a random batch of m inputs")
    parser.add_argument("--tie", action="store_true",
                        help="duplicate a neuron so that the MST is not unique (activations mode): shows the "
                             "diagnosis and the subgradient check of T1")
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="largest acceptable relative error at a differentiable point (default 1e-6); an "
                             "absolute error within the rounding of the finite differences (8 float64 "
                             "epsilons of |R| over the smallest step) passes too, so a gradient that is 0 up "
                             "to rounding is not a FAIL")
    parser.add_argument("--eps", type=float, default=None,
                        help="finite-difference step for every entry (default: each entry's own, 1e-6 times "
                             "the scale of the entry and of its neuron or parameter tensor, shrunk as needed)")
    parser.add_argument("--perturb-gradient", type=float, default=0.0, metavar="FLOAT",
                        help="for testing the tool: adds this to the autograd gradient (the check must then fail)")
    parser.add_argument("--verbose", action="store_true", help="print each report in full after the table")


def run(args: argparse.Namespace) -> int:
    """Run every chosen check and print the table; bad options exit 2 with a one-line error."""
    try:
        formulas, dissimilarities, backends = resolve_choices(args.formula, args.dissimilarity, args.backend)
        start = time.perf_counter()
        reports = run_checks(formulas, dissimilarities, backends, n=args.n, m=args.m, seed=args.seed,
                             mlp=args.mlp, tie=args.tie, tolerance=args.tolerance, alpha=args.alpha,
                             eps=args.eps, perturb_gradient=args.perturb_gradient, progress=True)
    except ValueError as err:
        print(f"toponeuro gradcheck: error: {err}", file=sys.stderr)
        return 2
    wrt = "parameters of a tiny MLP" if args.mlp else "activations"
    print(f"gradcheck w.r.t. the {wrt}: n={args.n} neurons, m={args.m} samples, seed={args.seed}, float64, "
          f"tolerance {args.tolerance:g} (relative to max |gradient|)")
    print(report_text(reports, verbose=args.verbose))
    print()
    print(summary_line(reports, time.perf_counter() - start))
    return exit_status(reports)
