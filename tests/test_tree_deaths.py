"""tree_deaths: deaths with a gradient through the tree edges only.

References: the dense pipeline (``persistence.deaths(dissimilarity(A))`` with
autograd through the whole matrix), SciPy's minimum spanning tree, finite
differences, per-member single calls for stacks, torch's own ``0.5 * (C + C.T)``.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree
from torch import nn

import toponeuro as tn
from toponeuro import dissimilarity, persistence, regularisers
from toponeuro.persistence import numba_host
from toponeuro.persistence.torch_mst import prim_edges
from toponeuro.tree_deaths import Workspace, tree_deaths

NAMES = tuple(dissimilarity.DISSIMILARITIES)
KINDS = ("random", "tied", "dead", "duplicated")
FORMULAS = {"t1": regularisers.t1, "t2": regularisers.t2}
needs_numba = pytest.mark.skipif(not numba_host.HAVE_NUMBA, reason="needs numba")


def _activations(kind: str, gen: torch.Generator, m: int = 30, n: int = 24, dtype=torch.float64) -> torch.Tensor:
    """(m, n) activations of one kind: random, tied (few distinct values: equal correlations),
    with dead (constant) neurons, or with duplicated and negated neurons."""
    if kind == "tied":
        # two-valued neurons on 4 samples repeated: many exactly equal correlations
        A = torch.randint(0, 2, (4, n), generator=gen).to(dtype).repeat(m // 4, 1)
        A[0] += 2.0  # no neuron constant
        return A
    A = torch.randn(m, n, generator=gen, dtype=dtype)
    if kind == "dead":
        A[:, 2] = 0.0
        A[:, 7] = 3.5
        A = torch.relu(A)  # dead ReLUs are exactly constant; others partly zero
    elif kind == "duplicated":
        A[:, 5] = A[:, 1]
        A[:, 6] = -A[:, 1]
        A[:, 9] = 2.0 * A[:, 3] + 1.0
    return A


def _dense(A: torch.Tensor, name, backend: str = "torch") -> torch.Tensor:
    """The reference: autograd through the whole matrix."""
    return persistence.deaths(dissimilarity.get(name)(A), backend=backend)


def _value_and_grad(fn, A: torch.Tensor, weights: torch.Tensor):
    X = A.detach().clone().requires_grad_()
    d = fn(X)
    (d * weights).sum().backward()
    return d.detach(), X.grad


# -- values and gradients against the dense pipeline ----------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("formula", sorted(FORMULAS))
def test_gradient_is_the_dense_gradient_float64(name, kind, formula, torch_gen):
    A = _activations(kind, torch_gen)
    f = FORMULAS[formula]
    X1, X2 = A.clone().requires_grad_(), A.clone().requires_grad_()
    tree, dense = tree_deaths(X1, name), _dense(X2, name)
    assert torch.allclose(tree, dense, rtol=0, atol=1e-12)
    f(tree).backward()
    f(dense).backward()
    assert torch.isfinite(X1.grad).all()
    # sqrt(1 - rho^2) at |rho| = 1 (duplicated neurons; tied ones here) is a kink whose slope
    # turns rounding of eps into gradients of sqrt(eps) ~ 1e-8 on either path
    atol = 1e-7 if name == "sqrt_one_minus_rho2" and kind in ("tied", "duplicated") else 1e-12
    assert torch.allclose(X1.grad, X2.grad, rtol=1e-9, atol=atol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "numba", "giotto-ph"])
def test_float32_values_and_gradient_match_the_dense_path(name, kind, backend, torch_gen):
    if backend not in persistence.available_backends():
        pytest.skip(f"{backend} not installed")
    A = _activations(kind, torch_gen, m=40, n=50, dtype=torch.float32)
    w = torch.rand(49, generator=torch_gen)
    tree, g_tree = _value_and_grad(lambda X: tree_deaths(X, name, backend), A, w)
    dense, g_dense = _value_and_grad(lambda X: _dense(X, name, backend), A, w)
    assert torch.allclose(tree, dense, rtol=0, atol=1e-6)
    assert torch.isfinite(g_tree).all()
    scale = g_dense.abs().max().clamp_min(1.0)
    # at |rho| = 1 sqrt(1 - rho^2) turns rounding of eps into gradients of sqrt(eps) ~ 3e-4
    tol = 2e-3 if name == "sqrt_one_minus_rho2" and kind in ("tied", "duplicated") else 1e-4
    assert (g_tree - g_dense).abs().max() <= tol * scale


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_are_the_matrix_gathered_at_its_death_edges_ascending(name, dtype, torch_gen):
    A = torch.randn(64, 90, generator=torch_gen, dtype=dtype)
    D = dissimilarity.get(name)(A)
    edges = persistence.death_edges(D)
    gathered = D[edges[:, 0], edges[:, 1]]
    d = tree_deaths(A, name)
    assert d.shape == (89,) and d.dtype == dtype
    assert torch.allclose(d, gathered, rtol=0, atol=8 * torch.finfo(dtype).eps)
    assert (d[1:] >= d[:-1]).all()
    # and the tree is minimum: its weight is SciPy's (positive weights: SciPy drops zeros)
    assert d.sum().item() == pytest.approx(minimum_spanning_tree(D.numpy() + 1.0).sum() - 89, abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_finite_differences(name, torch_gen):
    A = torch.randn(12, 7, generator=torch_gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda X: tree_deaths(X, name), (A,))


def test_the_gradient_reaches_only_the_tree_pairs_through_o_m_n_backward(torch_gen):
    """No (n, n) tensor is saved for backward: the graph holds (m, n) tensors and smaller."""
    A = torch.randn(16, 40, generator=torch_gen, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        d = tree_deaths(A)
    assert shapes and all(s != (40, 40) and int(np.prod(s)) <= 16 * 40 for s in shapes)
    d.sum().backward()
    assert A.grad.shape == A.shape


# -- the CPU kernels ----------------------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mirror_upper_copies_the_upper_triangle_into_the_lower(n, dtype, rng):
    C = rng.standard_normal((n, n)).astype(dtype)
    expected = np.triu(C) + np.triu(C, 1).T
    X = torch.from_numpy(C.copy())
    numba_host.mirror_upper_(X)
    assert np.array_equal(X.numpy(), expected)


@needs_numba
@pytest.mark.parametrize("n", [2, 255, 256, 257, 700, 2049])
@pytest.mark.parametrize("threads", [1, 2])
def test_correlation_matrix_by_panels_is_the_symmetric_product(n, threads, torch_gen):
    from toponeuro.tree_deaths import symmetric_gram

    Z = dissimilarity.standardised_columns(torch.randn(2, 20, n, generator=torch_gen))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the panel width follows the thread count
    try:
        C = symmetric_gram(Z, Workspace())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(C, C.mT)
    assert torch.allclose(C, Z.mT @ Z, rtol=0, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("name", list(numba_host.RHO_DISSIMILARITY_MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_prim_on_correlation_gives_prims_edges_on_the_dense_matrix(name, kind, torch_gen):
    A = _activations(kind, torch_gen, m=40, n=70, dtype=torch.float32)
    C = dissimilarity.correlation(A)
    D = dissimilarity.get(name)(A)
    assert torch.equal(numba_host.prim_edges_of_correlation(C, name), prim_edges(D))
    # with a diagonal that is not 1 (the product's, before the dense path sets it): the same tree
    C.diagonal().copy_(torch.rand(70, generator=torch_gen))
    assert torch.equal(numba_host.prim_edges_of_correlation(C, name), prim_edges(D))


@needs_numba
def test_prim_on_correlation_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="float32"):
        numba_host.prim_edges_of_correlation(torch.eye(4, dtype=torch.float64), "abs_correlation")


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_the_compiled_backward_equals_the_torch_backward(dtype, kind, torch_gen, monkeypatch):
    """On the CPU the pairs' backward runs in numba (row by row); elsewhere in torch ops (the
    (n, m) layout): both formulations of the same gradient, on a stack with dead neurons."""
    A = torch.stack([_activations(kind, torch_gen, m=32, n=40, dtype=dtype) for _ in range(2)])
    w = torch.rand(2, 39, generator=torch_gen, dtype=dtype)
    _, g_numba = _value_and_grad(lambda X: tree_deaths(X, "abs_correlation"), A, w)
    monkeypatch.setattr(numba_host, "runs_pairs_gradient", lambda Z: False)
    _, g_torch = _value_and_grad(lambda X: tree_deaths(X, "abs_correlation"), A, w)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(g_numba, g_torch, rtol=0, atol=tol * g_torch.abs().max().clamp_min(1.0))


@needs_numba
def test_the_compiled_backward_refuses_what_it_cannot_read():
    Z = torch.zeros(1, 4, 3)
    assert numba_host.runs_pairs_gradient(Z) and not numba_host.runs_pairs_gradient(Z.mT)
    with pytest.raises(ValueError, match="contiguous float32/float64 CPU"):
        numba_host.pairs_gradient(Z.half(), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                                  torch.zeros(1, 2))


# -- the GPU path (Triton mirror and Boruvka on C), in Triton's interpreter -----------------------

RHO_NAMES = tuple(numba_host.RHO_DISSIMILARITY_MODES)


def route_gpu_path_to_cpu(monkeypatch) -> list:
    """Route CPU tensors through the CUDA path of tree_deaths (Triton's kernels, interpreted);
    returns the list of calls made to the two kernels, as they come."""
    from toponeuro import tree_deaths as td
    from toponeuro.persistence import boruvka_triton, mirror_triton, torch_mst

    if not (boruvka_triton.HAVE_TRITON and boruvka_triton._interpreting()):
        pytest.skip("needs Triton and its interpreter (TRITON_INTERPRET=1)")
    calls = []
    mirror, boruvka = mirror_triton.mirror_upper_, boruvka_triton.triton_boruvka_edges
    monkeypatch.setattr(td, "_on_gpu", lambda C: True)
    monkeypatch.setattr(torch_mst, "runs_triton", boruvka_triton.runs_on)
    monkeypatch.setattr(td, "_gpu_panel_rows", lambda n: 16)  # several panels at these sizes
    monkeypatch.setattr(mirror_triton, "mirror_upper_", lambda C: calls.append("mirror") or mirror(C))
    monkeypatch.setattr(boruvka_triton, "triton_boruvka_edges",
                        lambda D, **kw: calls.append(kw.get("of_rho")) or boruvka(D, **kw))
    return calls


@pytest.fixture
def gpu_path_on_cpu(monkeypatch):
    return route_gpu_path_to_cpu(monkeypatch)


@needs_numba
@pytest.mark.parametrize("name", RHO_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_path_gives_the_dense_values_and_the_cpu_paths_gradient(name, kind, torch_gen, monkeypatch):
    """Against the dense values, and against the CPU tree path's gradient (itself checked against
    the dense gradient above; near |rho| = 1, sqrt(1 - rho^2) makes both differ from it by
    amplified rounding, in the same way)."""
    A = _activations(kind, torch_gen, m=40, n=50, dtype=torch.float32)
    w = torch.rand(49, generator=torch_gen)
    cpu, g_cpu = _value_and_grad(lambda X: tree_deaths(X, name), A, w)
    calls = route_gpu_path_to_cpu(monkeypatch)
    tree, g_tree = _value_and_grad(lambda X: tree_deaths(X, name), A, w)
    assert calls == ["mirror", name]  # the kernels ran, the Boruvka on C with the dissimilarity
    dense = _dense(A, name)
    assert torch.allclose(tree, dense, rtol=0, atol=1e-6)
    assert torch.allclose(tree, cpu, rtol=0, atol=2e-7)
    assert (g_tree - g_cpu).abs().max() <= 1e-5 * g_cpu.abs().max().clamp_min(1.0)


@needs_numba
@pytest.mark.parametrize("name", RHO_NAMES)
def test_gpu_path_gives_the_cpu_paths_edges_for_a_stack(name, torch_gen, monkeypatch):
    """The CPU path (numba's Prim on the panel product) and the GPU path (Triton on the batched
    panel product) pick the same tree: the same deaths bit for bit, member by member."""
    A = torch.randn(3, 30, 40, generator=torch_gen)
    A[1, :, 4] = 0.0
    A[2, :, 7] = A[2, :, 3]
    cpu = tree_deaths(A, name)
    calls = route_gpu_path_to_cpu(monkeypatch)
    gpu = tree_deaths(A, name)
    assert calls == ["mirror", name]  # one mirror and one Boruvka for the whole stack
    assert torch.allclose(gpu, cpu, rtol=0, atol=2e-7)
    for b in range(3):
        assert torch.allclose(tree_deaths(A[b], name), gpu[b], rtol=0, atol=2e-7)


@pytest.mark.parametrize("n", [2, 15, 16, 17, 50])
def test_gpu_panels_and_mirror_give_the_symmetric_product(n, torch_gen, gpu_path_on_cpu):
    from toponeuro.tree_deaths import symmetric_gram

    Z = dissimilarity.standardised_columns(torch.randn(2, 20, n, generator=torch_gen))
    C = symmetric_gram(Z, Workspace())
    assert torch.equal(C, C.mT)
    assert torch.allclose(C, Z.mT @ Z, rtol=0, atol=1e-6)
    assert gpu_path_on_cpu == ["mirror"]


# -- stacks, workspace, precision -----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_stack_equals_per_member_calls(name, torch_gen):
    A = torch.randn(3, 20, 15, generator=torch_gen, dtype=torch.float64)
    A[1, :, 4] = 0.0  # a dead neuron in one member
    w = torch.rand(3, 14, generator=torch_gen, dtype=torch.float64)
    d, g = _value_and_grad(lambda X: tree_deaths(X, name), A, w)
    assert d.shape == (3, 14)
    for b in range(3):
        d_b, g_b = _value_and_grad(lambda X: tree_deaths(X, name), A[b], w[b])
        # the stack's column reductions may sum in another order: equal up to rounding
        assert torch.allclose(d[b], d_b, rtol=0, atol=1e-14)
        assert torch.allclose(g[b], g_b, rtol=1e-10, atol=1e-14)


def test_workspace_is_reused_and_does_not_leak_into_earlier_graphs(torch_gen):
    ws = Workspace()
    A1 = torch.randn(30, 40, generator=torch_gen, requires_grad=True)
    A2 = torch.randn(30, 25, generator=torch_gen, requires_grad=True)
    d1 = tree_deaths(A1, workspace=ws)
    held = repr(ws)
    d2 = tree_deaths(A2, workspace=ws)  # overwrites the buffer d1's matrix lived in
    assert repr(ws) == held  # the smaller matrix fitted in the same buffer
    regularisers.t1(d1).backward()
    regularisers.t1(d2).backward()
    for A, d in ((A1, d1), (A2, d2)):
        ref, g = _value_and_grad(lambda X: regularisers.t1(_dense(X, "abs_correlation"))[None], A.detach(),
                                 torch.ones(1))
        assert torch.allclose(regularisers.t1(d.detach()), ref[0], atol=1e-5)
        assert torch.allclose(A.grad, g, atol=1e-5)
    assert repr(copy.deepcopy(ws)) == "Workspace(0.0 MiB)"
    assert repr(pickle.loads(pickle.dumps(ws))) == "Workspace(0.0 MiB)"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations_and_autocast_compute_in_float32(name, dtype, torch_gen):
    A = torch.randn(40, 30, generator=torch_gen).to(dtype)
    expected = _dense(A.float(), name)
    d = tree_deaths(A, name)
    assert d.dtype == torch.float32 and torch.allclose(d, expected, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_autocast = tree_deaths(A.float(), name)
    assert d_autocast.dtype == torch.float32
    assert torch.allclose(d_autocast, _dense(A.float(), name), atol=1e-6)


# -- bad input and user dissimilarities ------------------------------------------------------------

def test_bad_input_raises_value_errors():
    with pytest.raises(ValueError, match="2-d"):
        tree_deaths(torch.randn(5))
    with pytest.raises(ValueError, match="finite|NaN|inf"):
        tree_deaths(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="death values only"):
        tree_deaths(torch.randn(5, 4), backend="ripser")
    with pytest.raises(ValueError, match="unknown dissimilarity"):
        tree_deaths(torch.randn(5, 4), dissimilarity="cosine")


def _cosine(A):
    X = A / A.norm(dim=0, keepdim=True)
    return (1.0 - X.mT @ X).clamp_min(0.0).fill_diagonal_(0.0)


def test_a_users_dissimilarity_without_pairwise_form_is_refused_and_the_regulariser_stays_dense():
    with pytest.raises(ValueError, match="pairwise form"):
        tree_deaths(torch.randn(6, 4), dissimilarity=_cosine)
    reg = tn.TopologicalRegulariser(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), dissimilarity=_cosine)
    assert reg.tree_gradient is False


def test_a_users_pairwise_form_takes_the_tree_path(torch_gen):
    def cosine(A):
        X = A / A.norm(dim=0, keepdim=True)
        C = 0.5 * (X.mT @ X + (X.mT @ X).mT)
        return torch.diagonal_scatter(1.0 - C, torch.zeros(A.shape[1], dtype=A.dtype))

    def cosine_pairs(A, i, j):
        X = A / A.norm(dim=0, keepdim=True)
        return 1.0 - (X[:, i] * X[:, j]).sum(0)

    cosine.pairwise = cosine_pairs
    assert dissimilarity.get_pairwise(cosine) is cosine_pairs
    A = torch.rand(20, 12, generator=torch_gen, dtype=torch.float64) + 0.1
    w = torch.rand(11, generator=torch_gen, dtype=torch.float64)
    d, g = _value_and_grad(lambda X: tree_deaths(X, cosine), A, w)
    d_ref, g_ref = _value_and_grad(lambda X: persistence.deaths(cosine(X)), A, w)
    assert torch.allclose(d, d_ref, atol=1e-12) and torch.allclose(g, g_ref, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_pairwise_forms_are_the_matrix_entries(name, torch_gen):
    A = torch.randn(3, 25, 10, generator=torch_gen, dtype=torch.float64)
    A[0, :, 3] = 1.0  # dead
    A[1, :, 4] = A[1, :, 5]  # duplicated
    i = torch.randint(0, 10, (3, 40), generator=torch_gen)
    j = torch.randint(0, 10, (3, 40), generator=torch_gen)
    pairs = dissimilarity.get_pairwise(name)
    stacked = pairs(A, i, j)
    for b in range(3):
        D = dissimilarity.get(name)(A[b])
        one = pairs(A[b], i[b], j[b])
        # a dot product rounds unlike the matrix product; sqrt(1 - rho^2) at a duplicated pair
        # (rho = 1) turns that eps into sqrt(eps)
        atol = 1e-7 if name == "sqrt_one_minus_rho2" else 1e-12
        assert torch.allclose(one, D[i[b], j[b]], rtol=0, atol=atol)
        assert torch.allclose(stacked[b], one, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        pairs(A[0], torch.tensor([0]), torch.tensor([10]))


# -- through the regulariser and a model ------------------------------------------------------------

def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(10, 16)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(16, 12)), ("relu2", nn.ReLU()),
        ("out", nn.Linear(12, 5)),
    ])).double()


def _parameter_grads(model, reg, x):
    model.zero_grad()
    model(x)
    value = reg()
    value.backward()
    return value.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("formula", sorted(FORMULAS))
def test_through_a_model_the_tree_path_gives_the_dense_parameter_gradients(name, formula, torch_gen):
    model = _mlp()
    x = torch.randn(24, 10, generator=torch_gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # euclidean is allowed here only to compare gradients
        tree = tn.TopologicalRegulariser(model, formula=formula, dissimilarity=name, allow_unbounded=True)
        dense = tn.TopologicalRegulariser(model, formula=formula, dissimilarity=name, allow_unbounded=True,
                                          tree_gradient=False)
    assert tree.tree_gradient and not dense.tree_gradient
    v_tree, g_tree = _parameter_grads(model, tree, x)
    v_dense, g_dense = _parameter_grads(model, dense, x)
    assert torch.allclose(v_tree, v_dense, rtol=0, atol=1e-12)
    for a, b in zip(g_tree, g_dense):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_values_and_gradient_match_the_dense_path(name, dtype, torch_gen):
    A = _activations("dead", torch_gen, m=64, n=300, dtype=dtype).cuda()
    w = torch.rand(299, generator=torch_gen, dtype=dtype).cuda()
    tree, g_tree = _value_and_grad(lambda X: tree_deaths(X, name), A, w)
    dense, g_dense = _value_and_grad(lambda X: _dense(X, name), A, w)
    assert tree.device == A.device and g_tree.device == A.device
    assert torch.allclose(tree, dense, rtol=0, atol=1e-6)
    assert torch.allclose(g_tree, g_dense, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", RHO_NAMES)
def test_cuda_tree_path_reads_c_with_the_kernels_and_gives_the_cpu_paths_deaths(name, torch_gen, monkeypatch):
    from toponeuro.persistence import boruvka_triton, mirror_triton

    A = torch.randn(2, 64, 3000, generator=torch_gen)  # n = 3000: two panels of the product
    A[0, :, 5] = 0.0
    A[1, :, 9] = -A[1, :, 4]
    cpu = tree_deaths(A, name)
    calls = []
    mirror, boruvka = mirror_triton.mirror_upper_, boruvka_triton.triton_boruvka_edges
    monkeypatch.setattr(mirror_triton, "mirror_upper_", lambda C: calls.append("mirror") or mirror(C))
    monkeypatch.setattr(boruvka_triton, "triton_boruvka_edges",
                        lambda D, **kw: calls.append(kw.get("of_rho")) or boruvka(D, **kw))
    workspace = Workspace()
    gpu = tree_deaths(A.cuda(), name, workspace=workspace)
    assert calls == ["mirror", name]
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, rtol=0, atol=1e-6)
    again = tree_deaths(A.cuda(), name, workspace=workspace)  # the buffer reused
    assert torch.equal(again, gpu)
