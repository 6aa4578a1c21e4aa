"""Tests for toponeuro.gradcheck: the finite-difference check, the diagnosis, the
subgradient check at ties, and the ``toponeuro gradcheck`` command.

References: scipy's MST and a brute-force enumeration of spanning trees (the
MST margin), a depth-first search (tree path maxima), hand-built matrices and
activations whose correlations are exactly 0 or whose MST is exactly tied,
and central finite differences (the tool's own reference, validated here by
showing that it catches a deliberately wrong gradient).
"""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree

import toponeuro.cli
from toponeuro import dissimilarity as ds
from toponeuro import gradcheck as gc
from toponeuro import persistence

EDGE_BACKENDS = gc.edge_backends()
DISSIMILARITIES = list(ds.DISSIMILARITIES)
COMBOS = [(f, d, b) for f in ("t1", "t2") for d in DISSIMILARITIES for b in EDGE_BACKENDS] + [
    ("min_corr", None, None), ("decov", None, None)]


def _combo_id(c):
    return "-".join(x for x in c if x)


# ---------------------------------------------------------------------------
# the MST margin against independent references
# ---------------------------------------------------------------------------


def _dfs_path_max(W: np.ndarray, edges: np.ndarray, u: int, v: int) -> float:
    adj = {k: [] for k in range(W.shape[0])}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    stack = [(u, -1, 0.0)]
    while stack:
        node, parent, best = stack.pop()
        if node == v:
            return best
        stack += [(nb, node, max(best, W[node, nb])) for nb in adj[node] if nb != parent]
    raise AssertionError("not a tree")


def test_tree_path_max_matches_depth_first_search(rng):
    n = 9
    X = rng.random((n, n))
    W = np.triu(X, 1) + np.triu(X, 1).T
    tree = minimum_spanning_tree(np.triu(W, 1)).tocoo()
    edges = np.stack([tree.row, tree.col], 1)
    M = gc.tree_path_max(W, edges)
    for u in range(n):
        for v in range(n):
            expect = 0.0 if u == v else _dfs_path_max(W, edges, u, v)
            assert M[u, v] == expect
    # the margin is positive exactly because scipy's tree is the unique MST here
    margin = gc.mst_margin(W, edges)
    non_tree = [(i, j) for i in range(n) for j in range(i + 1, n)
                if not any({i, j} == {a, b} for a, b in edges)]
    assert margin == min(W[i, j] - _dfs_path_max(W, edges, i, j) for i, j in non_tree)
    assert margin > 0


def _minimal_spanning_trees(W: np.ndarray) -> int:
    """How many spanning trees attain the minimum weight (brute force)."""
    n = W.shape[0]
    pairs = list(itertools.combinations(range(n), 2))
    weights = []
    for subset in itertools.combinations(pairs, n - 1):
        parent = list(range(n))

        def root(a):
            while parent[a] != a:
                a = parent[a]
            return a

        ok = True
        for a, b in subset:
            ra, rb = root(a), root(b)
            if ra == rb:
                ok = False
                break
            parent[ra] = rb
        if ok:
            weights.append(sum(W[a, b] for a, b in subset))
    best = min(weights)
    return sum(w == best for w in weights)


@pytest.mark.parametrize("trial", range(12))
def test_margin_zero_exactly_when_the_mst_is_not_unique(trial):
    # small integer weights: many ties, exact sums
    rng = np.random.default_rng(1000 + trial)
    n = 5
    X = rng.integers(1, 5, size=(n, n)).astype(float)
    W = np.triu(X, 1) + np.triu(X, 1).T
    edges = persistence.death_edges(torch.from_numpy(W), backend="torch")
    margin = gc.mst_margin(W, edges)
    assert margin >= 0
    assert (margin == 0) == (_minimal_spanning_trees(W) > 1)


def test_margin_is_infinite_without_non_tree_edges():
    assert gc.mst_margin(np.array([[0.0, 0.3], [0.3, 0.0]]), [[0, 1]]) == np.inf


def test_tree_path_max_rejects_a_non_tree():
    W = np.ones((4, 4)) - np.eye(4)
    with pytest.raises(ValueError, match="cycle"):
        gc.tree_path_max(W, [[0, 1], [1, 2], [0, 2]])
    with pytest.raises(ValueError, match="3 edges"):
        gc.tree_path_max(W, [[0, 1], [1, 2]])


# ---------------------------------------------------------------------------
# agreement at generic points
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_autograd_agrees_with_finite_differences_at_a_generic_point(combo):
    formula, diss, backend = combo
    A = gc.random_activations(m=10, n=6, seed=3)
    report = gc.check_activations_gradient(A, formula=formula, dissimilarity=diss or "abs_correlation",
                                           backend=backend or "torch")
    d = report.diagnosis
    assert d.differentiable, d.reasons
    if formula in ("t1", "t2"):
        assert d.mst_margin > 1e-3  # comfortably unique
    assert report.jumps == 0
    assert report.size == 60
    assert report.max_rel_err <= 1e-6
    assert report.verdict == "ok" and report.passed
    assert "must agree" in d.sentence()


@pytest.mark.parametrize("formula", ["t1", "t2"])
def test_backends_give_the_same_gradient_report_at_a_generic_point(formula):
    A = gc.random_activations(m=10, n=6, seed=4)
    reports = [gc.check_activations_gradient(A, formula=formula, backend=b) for b in EDGE_BACKENDS]
    assert len({r.diagnosis.mst_margin for r in reports}) == 1
    assert all(r.verdict == "ok" for r in reports)


def test_a_wrong_gradient_fails_at_a_differentiable_point():
    A = gc.random_activations(m=10, n=6, seed=3)
    report = gc.check_activations_gradient(A, formula="t1", perturb_gradient=1e-4)
    assert report.diagnosis.differentiable
    assert report.max_abs_err == pytest.approx(1e-4, rel=1e-3)
    assert report.verdict == "FAIL" and not report.passed
    assert "FAIL" in report.row()


@pytest.mark.parametrize("formula, diss", [("t1", "abs_correlation"), ("t1", "one_minus_rho"),
                                           ("min_corr", "abs_correlation")])
def test_a_gradient_that_is_zero_up_to_rounding_passes(formula, diss):
    # m = 2: every rho is +-1 whatever the activations, so these formulas are constant and their
    # gradient is 0; autograd returns ~1e-16 of rounding and finite differences 0, a relative error of 1
    A = gc.random_activations(m=2, n=2, seed=0)
    report = gc.check_activations_gradient(A, formula=formula, dissimilarity=diss)
    assert report.diagnosis.differentiable and 0 < report.max_abs_err < 1e-12
    assert report.max_rel_err > report.tolerance  # the relative rule alone calls this a FAIL
    assert report.max_abs_err <= report.abs_floor and report.verdict == "ok" and report.passed
    # the floor, by hand: 8 float64 epsilons of |R| in each of the two evaluations, over the
    # smallest difference 2h of the central quotient
    value = float(gc.regulariser_value(A, formula, diss))
    assert report.abs_floor == pytest.approx(8 * np.finfo(np.float64).eps * abs(value) / report.min_step)
    # it is rounding, far below any real error: a gradient wrong by 1e-6 still fails
    wrong = gc.check_activations_gradient(A, formula=formula, dissimilarity=diss, perturb_gradient=1e-6)
    assert wrong.verdict == "FAIL" and wrong.abs_floor < 1e-6


def test_cli_two_neurons_two_samples_passes(capsys):
    assert toponeuro.cli.main(["gradcheck", "--n", "2", "--m", "2"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.rstrip().splitlines()[-1].startswith("OK")


@pytest.mark.parametrize("scale", [1e3, 1e4])
@pytest.mark.parametrize("formula", ["t1", "t2", "min_corr"])
def test_one_neuron_on_a_much_larger_scale_still_passes(formula, scale):
    # T1, T2 and MinCorr (correlation-based) do not change when a neuron is rescaled, so
    # by the chain rule the gradient at B = A with column 0 times s is that at A with
    # column 0 divided by s: an independent check that the gradient there is right. A
    # single step 1e-6 * max|B| for every entry made this point FAIL (t2: rel err 2e-6).
    A = gc.random_activations(m=12, n=8, seed=0)
    B = A.clone()
    B[:, 0] *= scale

    def grad(X):
        Xg = X.clone().requires_grad_(True)
        return torch.autograd.grad(gc.regulariser_value(Xg, formula), Xg)[0]

    expected = grad(A)
    expected[:, 0] /= scale
    assert torch.allclose(grad(B), expected, rtol=1e-9, atol=1e-12)
    report = gc.check_activations_gradient(B, formula=formula)
    assert report.diagnosis.differentiable and report.jumps == 0
    assert report.verdict == "ok" and report.passed
    assert report.max_rel_err <= 1e-8  # as at the unscaled point (~1e-9), far under the 1e-6 tolerance
    # each neuron's entries had their own step: 1e-6 times its column's scale
    assert report.step == pytest.approx(1e-6 * float(B[:, 0].abs().max()))
    assert report.min_step == pytest.approx(1e-6 * float(B[:, 1:].abs().amax(0).min()))
    # a gradient wrong by 1e-5 (relative ~1e-5) at this very point is caught, and measured accurately
    wrong = gc.check_activations_gradient(B, formula=formula, perturb_gradient=1e-5)
    assert wrong.verdict == "FAIL" and not wrong.passed
    assert wrong.max_abs_err == pytest.approx(1e-5, rel=1e-2)


@pytest.mark.parametrize("formula", ["t1", "decov"])
def test_scale_dependent_formulas_pass_with_one_neuron_1000_times_larger(formula):
    # euclidean and decov change when a neuron is rescaled: their steps have a floor
    # (1e-2 * max|A| and max|A|), so the small neurons' steps do not drown in rounding
    A = gc.random_activations(m=12, n=8, seed=0)
    A[:, 0] *= 1e3
    report = gc.check_activations_gradient(A, formula=formula, dissimilarity="euclidean")
    assert report.verdict == "ok" and report.jumps == 0
    assert report.min_step >= (1e-8 if formula == "t1" else 1e-6) * float(A.abs().max()) * (1 - 1e-12)
    Ag = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gc.regulariser_value(Ag, formula, "euclidean"), Ag)
    shift = 1e-5 * float(g.abs().max())  # a gradient wrong by 1e-5 relative is caught
    wrong = gc.check_activations_gradient(A, formula=formula, dissimilarity="euclidean", perturb_gradient=shift)
    assert wrong.verdict == "FAIL"


def test_finite_differences_alone_match_a_hand_derivative():
    # decov = 0.5 * sum_{k != l} C_kl^2 with C = Ac^T Ac / m, so
    # d decov / dA = (2 / m) * Ac @ offdiag(C), an independent formula
    A = gc.random_activations(m=7, n=4, seed=5)
    m = A.shape[0]
    Ac = A - A.mean(0)
    C = Ac.T @ Ac / m
    expected = 2.0 / m * Ac @ (C - torch.diag(C.diagonal()))
    report = gc.check_activations_gradient(A, formula="decov")
    assert report.verdict == "ok"
    Ag = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gc.regulariser_value(Ag, "decov"), Ag)
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# ties: diagnosis and the subgradient check
# ---------------------------------------------------------------------------


def _tied_matrix() -> torch.Tensor:
    """Neurons 0, 1, 2 pairwise at 0.2 (any two of the three edges form an MST of them), the rest farther."""
    rng = np.random.default_rng(7)
    n = 6
    X = 0.5 + 0.4 * rng.random((n, n))
    W = np.triu(X, 1) + np.triu(X, 1).T
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        W[a, b] = W[b, a] = 0.2
    return torch.from_numpy(W)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_constructed_tie_has_margin_zero_and_passes_the_subgradient_check(backend):
    D = _tied_matrix()
    assert gc.mst_margin(D, persistence.death_edges(D, backend=backend)) == 0.0
    sub = gc.check_subgradient(D, backend=backend, trials=200, seed=1)
    assert sub.mst_margin == 0.0
    assert sub.passed, str(sub)
    assert sub.strict > 0  # the tie matters: in some directions the inequality is strict
    assert "holds" in str(sub)


def test_subgradient_check_catches_a_wrong_gradient_at_a_tie():
    sub = gc.check_subgradient(_tied_matrix(), trials=200, seed=1, perturb_gradient=1e-2)
    assert not sub.passed
    assert "VIOLATED" in str(sub)


@pytest.mark.parametrize("diss", DISSIMILARITIES)
def test_duplicated_neuron_is_diagnosed_as_a_tie(diss):
    A = gc.random_activations(m=10, n=6, seed=3, tie=True)
    report = gc.check_activations_gradient(A, formula="t1", dissimilarity=diss, subgradient_trials=100)
    d = report.diagnosis
    assert d.mst_margin == 0.0
    assert d.tie and not d.differentiable
    assert "expected" in d.sentence() and "subgradient" in d.sentence()
    assert report.subgradient is not None and report.subgradient.passed
    assert report.verdict == "subgradient ok" and report.passed
    if diss == "sqrt_one_minus_rho2":
        assert d.unit_rho_tree_edges == [(0, 1)]
    if diss == "euclidean":
        assert d.zero_tree_edges == [(0, 1)]
    t2 = gc.check_activations_gradient(A, formula="t2", dissimilarity=diss)
    assert t2.verdict == "kink" and t2.passed and t2.subgradient is None


# ---------------------------------------------------------------------------
# the other kinks
# ---------------------------------------------------------------------------


def _hadamard16() -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(4):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H  # columns 1..15: zero-mean, pairwise orthogonal, entries +-1


def test_zero_correlation_tree_edge_n2_is_diagnosed():
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert ds.correlation(A)[0, 1] == 0.0
    d = gc.diagnose(A, "t1", "abs_correlation")
    assert d.mst_margin == np.inf  # the tree is unique, yet:
    assert d.min_abs_rho == 0.0 and not d.differentiable
    assert any("kink at 0" in r for r in d.reasons)
    report = gc.check_activations_gradient(A, formula="t1", dissimilarity="abs_correlation")
    assert report.verdict == "kink" and report.passed
    # 1 - rho and sqrt(1 - rho^2) are smooth at rho = 0: the same point is differentiable for them
    for diss in ("one_minus_rho", "sqrt_one_minus_rho2"):
        smooth = gc.check_activations_gradient(A, formula="t1", dissimilarity=diss)
        assert smooth.diagnosis.min_abs_rho == 0.0 and smooth.diagnosis.differentiable
        assert smooth.verdict == "ok"


def test_zero_correlation_tree_edge_between_two_blocks_is_diagnosed():
    # two blocks of correlated neurons, exactly uncorrelated across blocks (dyadic
    # entries and norms: every product and sum in the correlation is exact)
    H = _hadamard16()
    u = H[:, 1]
    v = H[:, 1] + H[:, 2] + H[:, 5] + H[:, 6]
    w = H[:, 3]
    z = H[:, 3] + H[:, 4] + H[:, 7] + H[:, 8]
    A = torch.stack([u, v, w, z], 1)
    C = ds.correlation(A)
    assert C[0, 1] == 0.5 and C[2, 3] == 0.5 and C[:2, 2:].abs().max() == 0.0
    d = gc.diagnose(A, "t1", "abs_correlation")
    assert d.min_abs_rho == 0.0
    assert not d.differentiable
    assert any("|rho| = 0 on a tree edge" in r for r in d.reasons)
    assert d.mst_margin == 0.0  # all four cross edges tie at d = 1
    mc = gc.diagnose(A, "min_corr")
    assert mc.min_abs_rho == 0.0 and mc.rho_scope == "all pairs" and not mc.differentiable


def test_constant_neuron_is_diagnosed():
    A = gc.random_activations(m=10, n=5, seed=6)
    A[:, 2] = 3.0
    for formula, diss in [("t1", "abs_correlation"), ("t2", "one_minus_rho"), ("min_corr", None)]:
        d = gc.diagnose(A, formula, diss or "abs_correlation")
        assert d.constant_neurons == [2]
        assert not d.differentiable and any("constant neuron" in r for r in d.reasons)
    # harmless where no correlation is taken
    for formula, diss in [("t1", "euclidean"), ("decov", None)]:
        report = gc.check_activations_gradient(A, formula=formula, dissimilarity=diss or "abs_correlation")
        assert report.diagnosis.constant_neurons == [2]
        assert report.diagnosis.differentiable and report.verdict == "ok"


def test_equal_deaths_are_a_t2_kink():
    # neurons on a line at equal spacing: every death equals the spacing (exact with small integers)
    v = torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    A = torch.stack([k * v for k in range(5)], 1)
    d = gc.diagnose(A, "t2", "euclidean")
    assert d.mst_margin > 0
    assert d.deaths_std == 0.0
    assert not d.differentiable and any("deaths equal" in r for r in d.reasons)
    assert gc.diagnose(A, "t1", "euclidean").differentiable


def test_step_is_shrunk_or_point_called_inconclusive_near_a_tie():
    A = gc.random_activations(m=10, n=6, seed=3, tie=True)
    A[2, 1] += 1e-9  # break the tie by a hair: differentiable, margin tiny
    report = gc.check_activations_gradient(A, formula="t1", dissimilarity="one_minus_rho")
    assert report.diagnosis.differentiable and 0 < report.diagnosis.mst_margin < 1e-8
    assert report.step < 1e-6 * float(A.abs().max())  # the default step was shrunk
    assert report.verdict in ("ok", "inconclusive")
    assert report.passed == (report.verdict == "ok") and not report.failed
    # a step forced to be large jumps across the tie, and the report says so
    forced = gc.check_activations_gradient(A, formula="t1", dissimilarity="one_minus_rho", eps=1e-3)
    assert forced.jumps > 0 and forced.verdict == "inconclusive"
    assert forced.inconclusive and not forced.passed and not forced.failed


# ---------------------------------------------------------------------------
# with respect to a model's parameters
# ---------------------------------------------------------------------------


def _mlp_and_batch(seed=0, m=12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 4, generator=gen, dtype=torch.float64)
    return gc.tiny_mlp(n=8, in_features=4, seed=seed, x=x), x


@pytest.mark.parametrize("formula,diss", [("t1", "abs_correlation"), ("t2", "sqrt_one_minus_rho2"),
                                          ("t1", "euclidean"), ("min_corr", "abs_correlation"),
                                          ("decov", "abs_correlation")])
def test_model_parameter_gradient_agrees(formula, diss):
    model, x = _mlp_and_batch()
    before = copy.deepcopy(model.state_dict())
    report = gc.check_model_gradient(model, x, formula=formula, dissimilarity=diss)
    assert report.wrt == "parameters"
    assert report.size == sum(p.numel() for p in model.parameters())
    assert report.diagnosis.differentiable, report.diagnosis.reasons
    assert report.diagnosis.relu_margin > 0
    assert report.max_rel_err <= 1e-6 and report.verdict == "ok"
    assert report.frozen_tree is None  # no tie: the frozen-tree comparison is not run, nothing changes
    # the model passed in is untouched and carries no hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_model_check_detects_steps_that_flip_a_relu():
    # decov has no tree and no |rho|: any jump is a ReLU input changing sign
    model, x = _mlp_and_batch()
    forced = gc.check_model_gradient(model, x, formula="decov", eps=0.3)
    assert forced.jumps > 0 and forced.verdict == "inconclusive" and not forced.passed
    assert gc.check_model_gradient(model, x, formula="decov").jumps == 0


def test_model_check_fails_with_a_wrong_gradient_and_flags_dead_relus():
    model, x = _mlp_and_batch()
    assert gc.check_model_gradient(model, x, formula="t1", perturb_gradient=1e-4).verdict == "FAIL"
    with torch.no_grad():
        model[2].bias[0] = -100.0  # a dead ReLU: neuron 3 (the first of the second hidden layer) is constant
    report = gc.check_model_gradient(model, x, formula="t1")
    assert report.diagnosis.constant_neurons == [3]
    assert not report.diagnosis.differentiable and report.passed
    # the constant neuron is a kink of every piece, the frozen tree's included: nothing is compared
    assert report.frozen_tree is None


def _twin_model_and_batch():
    """The book's twin-unit model: units 0 and 1 of the first layer share weights and bias."""
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5)
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    return model, x


def _scipy_mst_weight(D: np.ndarray) -> float:
    # scipy reads a 0 as a missing edge: shift by +1 (every spanning tree has n - 1 edges)
    return float(minimum_spanning_tree(np.triu(D + 1.0, 1)).sum()) - (D.shape[0] - 1)


def _frozen_tree_reference(model, x, formula, edges, h=1e-6):
    """Independent reference: central differences of T on the frozen edges, correlations by NumPy."""
    from toponeuro import TopologicalRegulariser

    net = copy.deepcopy(model)
    params = list(net.parameters())
    E = np.asarray(edges)

    def piece():
        with TopologicalRegulariser(net, formula="t1") as reg, torch.enable_grad():
            net(x)
            A = reg.activations().detach().numpy()
        w = 1.0 - np.abs(np.corrcoef(A, rowvar=False))[E[:, 0], E[:, 1]]
        return (1.0 - w).sum() if formula == "t1" else 0.5 * w.std() - 0.5 * w.mean()

    theta0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    fd = np.zeros(theta0.numel())
    for k in range(theta0.numel()):
        for sign in (1, -1):
            theta = theta0.clone()
            theta[k] += sign * h
            torch.nn.utils.vector_to_parameters(theta, params)
            fd[k] += sign * piece() / (2 * h)
    return fd


@pytest.mark.parametrize("formula", ["t1", "t2"])
def test_at_a_tie_the_parameter_gradient_agrees_with_the_frozen_tree(formula):
    model, x = _twin_model_and_batch()
    report = gc.check_model_gradient(model, x, formula=formula)
    d = report.diagnosis
    assert d.tie and d.reasons == [r for r in d.reasons if r.startswith("MST not unique")]
    # finite differences of R itself straddle the tie: that comparison cannot certify anything
    assert report.max_rel_err > 1e-3 and report.jumps > 0
    ft = report.frozen_tree
    assert ft is not None and ft.jumps == 0 and ft.max_rel_err <= 1e-6 and ft.verdict == "ok"
    assert report.verdict == ("subgradient ok + frozen tree ok" if formula == "t1" else "frozen tree ok")
    assert report.passed and not report.failed and not report.inconclusive and gc.exit_status([report]) == 0
    assert "parameters agree with the frozen tree" in str(report)
    # the frozen edges are a minimum spanning tree (scipy) of a tied d, one of several
    net = copy.deepcopy(model)
    from toponeuro import TopologicalRegulariser

    with TopologicalRegulariser(net, formula="t1") as reg, torch.enable_grad():
        net(x)
        D = reg.dissimilarity_matrix().detach().numpy()
    E = np.asarray(ft.edges)
    assert len(E) == D.shape[0] - 1
    assert D[E[:, 0], E[:, 1]].sum() == pytest.approx(_scipy_mst_weight(D), abs=1e-12)
    assert gc.mst_margin(D, E) == pytest.approx(0.0, abs=1e-12)
    # autograd (the pipeline, independently of gradcheck) against the NumPy reference of the piece
    with TopologicalRegulariser(net, formula=formula) as reg, torch.enable_grad():
        net(x)
        g = torch.cat([p.flatten() for p in torch.autograd.grad(reg(), list(net.parameters()))]).numpy()
    fd = _frozen_tree_reference(model, x, formula, ft.edges)
    assert np.abs(g - fd).max() <= 1e-6 * np.abs(g).max()


@pytest.mark.parametrize("formula", ["t1", "t2"])
def test_at_a_tie_a_wrong_parameter_gradient_fails_the_frozen_tree_comparison(formula):
    model, x = _twin_model_and_batch()
    report = gc.check_model_gradient(model, x, formula=formula, perturb_gradient=1e-4)
    assert report.frozen_tree.verdict == "FAIL" and report.frozen_tree.jumps == 0
    assert "frozen tree FAIL" in report.verdict and report.failed and not report.passed
    assert gc.exit_status([report]) == 1
    assert gc.summary_line([report], 0.0).startswith("FAILED: 1 of 1")
    assert "parameters DISAGREE with the frozen tree" in report.note()


@pytest.mark.parametrize("formula", ["t1", "t2"])
def test_a_large_parameter_does_not_set_the_step_of_the_others(formula):
    # one bias at -100 (a dead ReLU) among parameters of size ~0.5: T1/T2 with the euclidean
    # dissimilarity stay differentiable (a constant neuron is harmless there). One step
    # 1e-6 * max|theta| = 1e-4 for every parameter gave rel err ~8e-7 (tolerance 1e-6);
    # each entry's own step (its size, its tensor's median, 1e-2 * max|theta|) gives ~1e-10.
    model, x = _mlp_and_batch()
    with torch.no_grad():
        model[2].bias[0] = -100.0
    report = gc.check_model_gradient(model, x, formula=formula, dissimilarity="euclidean")
    assert report.diagnosis.differentiable and report.jumps == 0
    assert report.verdict == "ok"
    assert report.step == pytest.approx(1e-4) and report.min_step == pytest.approx(1e-6)
    one_step = gc.check_model_gradient(model, x, formula=formula, dissimilarity="euclidean", eps=1e-4)
    assert report.max_rel_err < one_step.max_rel_err / 100
    wrong = gc.check_model_gradient(model, x, formula=formula, dissimilarity="euclidean", perturb_gradient=1e-5)
    assert wrong.verdict == "FAIL"


# ---------------------------------------------------------------------------
# inconclusive checks are not passes
# ---------------------------------------------------------------------------


def _near_tie() -> torch.Tensor:
    A = gc.random_activations(m=12, n=8, seed=0)
    g = torch.Generator().manual_seed(1)
    A[:, 1] = A[:, 0] + 1e-10 * torch.randn(12, generator=g, dtype=torch.float64)  # MST margin ~4e-12
    return A


def test_a_wrong_gradient_at_a_near_tie_is_inconclusive_not_passed():
    report = gc.check_activations_gradient(_near_tie(), formula="t1", perturb_gradient=1e-3)
    assert report.diagnosis.differentiable and 0 < report.diagnosis.mst_margin < 1e-10
    assert report.jumps > 0 and report.verdict == "inconclusive"
    assert report.inconclusive and not report.passed and not report.failed
    assert "nothing verified" in report.note() and "verifies nothing" in str(report)


def test_exit_status_and_summary_count_inconclusive_checks_apart():
    A = gc.random_activations(m=10, n=6, seed=3)
    ok = gc.check_activations_gradient(A, formula="t1")
    fail = gc.check_activations_gradient(A, formula="t1", perturb_gradient=1e-3)
    unsure = gc.check_activations_gradient(_near_tie(), formula="t1", eps=1e-3)
    assert (ok.verdict, fail.verdict, unsure.verdict) == ("ok", "FAIL", "inconclusive")
    assert gc.exit_status([ok]) == 0
    assert gc.exit_status([ok, unsure]) == 3
    assert gc.exit_status([ok, unsure, fail]) == 1
    line = gc.summary_line([ok, unsure], 1.0)
    assert line.startswith("INCONCLUSIVE: 1 of 2 checks") and "1 ok, 1 inconclusive" in line
    assert "agrees" not in line
    line = gc.summary_line([ok, unsure, fail], 1.0)
    assert line.startswith("FAILED: 1 of 3 checks") and "1 ok, 1 inconclusive, 1 FAIL" in line
    assert gc.summary_line([ok, ok], 1.0).startswith("OK: 2 checks (2 ok)")


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def test_cli_defaults_exit_zero(capsys):
    assert toponeuro.cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in gc.FORMULAS]
    assert len(lines) == len(COMBOS)
    assert all(ln.rstrip().endswith("ok") for ln in lines)
    assert "max rel err" in out and "MST margin" in out and out.rstrip().splitlines()[-1].startswith("OK")


def test_cli_exits_nonzero_with_a_perturbed_gradient(capsys):
    code = toponeuro.cli.main(["gradcheck", "--n", "5", "--m", "8", "--backend", "torch",
                               "--perturb-gradient", "1e-3"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_tie_mode_uses_the_subgradient_check(capsys):
    args = ["gradcheck", "--n", "5", "--m", "8", "--backend", "torch", "--formula", "t1", "--tie"]
    assert toponeuro.cli.main(args) == 0
    out = capsys.readouterr().out
    assert "subgradient ok" in out and "MST not unique" in out
    assert toponeuro.cli.main(args + ["--perturb-gradient", "1e-2"]) == 1
    assert "subgradient FAIL" in capsys.readouterr().out


def test_cli_inconclusive_checks_exit_3_and_are_not_called_ok(capsys):
    # a step of 0.3 on the MLP's weights flips ReLUs: every evaluation is off the smooth piece
    args = ["gradcheck", "--mlp", "--formula", "decov,t1", "--backend", "torch", "--dissimilarity",
            "abs_correlation", "--eps", "0.3"]
    assert toponeuro.cli.main(args) == 3
    out = capsys.readouterr().out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("INCONCLUSIVE: 2 of 2 checks verified nothing") and "2 inconclusive" in last
    assert "agrees" not in out and "OK" not in out
    assert out.count("inconclusive, nothing verified") == 2
    # a wrong gradient found outranks an inconclusive check
    assert toponeuro.cli.main(["gradcheck", "--mlp", "--formula", "decov", "--eps", "1e-7",
                               "--perturb-gradient", "1e-3"]) == 1


def test_cli_kinks_are_counted_in_the_last_line(capsys):
    args = ["gradcheck", "--n", "5", "--m", "8", "--backend", "torch", "--dissimilarity", "abs_correlation",
            "--formula", "t1,t2", "--tie"]
    assert toponeuro.cli.main(args) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("OK: 2 checks (1 subgradient ok, 1 kink (not differentiable: not compared))")


def test_cli_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        toponeuro.cli.main(["gradcheck", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "3 if nothing failed but some check was inconclusive" in text
    assert "exit status: 0 if every check passed" in text.lower()
    assert "3 when nothing failed but some check was" in " ".join(gc.__doc__.split())


def test_cli_mlp_mode(capsys):
    args = ["gradcheck", "--mlp", "--backend", "torch", "--dissimilarity", "abs_correlation"]
    assert toponeuro.cli.main(args) == 0
    assert "parameters of a tiny MLP" in capsys.readouterr().out


def test_cli_rejects_bad_choices(capsys):
    assert toponeuro.cli.main(["gradcheck", "--formula", "t3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("toponeuro gradcheck: error:") and "unknown formula" in err
    assert toponeuro.cli.main(["gradcheck", "--backend", "ripser"]) == 2
    assert "no death edges" in capsys.readouterr().err


def test_python_m_gradcheck_subprocess():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    base = [sys.executable, "-m", "toponeuro", "gradcheck", "--n", "5", "--m", "8", "--formula", "t1,decov"]
    ok = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK:" in ok.stdout
    bad = subprocess.run(base + ["--perturb-gradient", "1e-3"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAILED" in bad.stdout
