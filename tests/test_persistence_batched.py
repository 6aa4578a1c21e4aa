"""Stacks of matrices: ``death_edges`` and ``deaths`` on ``D: (B, n, n)``, the dissimilarities on ``A: (B, m, n)``.

The reference for every member is the call on that member alone (equal bit
for bit, ``torch.equal``), and SciPy's MST for the deaths. The stacks mix
the kinds of test_persistence.py: random, tied, duplicated neurons (d = 0
between copies) and dead neurons (a constant column: d = 1 rows). The Triton
kernels run in Triton's interpreter here (tests/conftest.py); the tests
marked ``cuda`` run the compiled ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toponeuro import dissimilarity as ds
from toponeuro import persistence as ph
from toponeuro.persistence import boruvka_triton as bt
from toponeuro.persistence import numba_host, torch_mst

from test_persistence import (BACKENDS, EDGE_BACKENDS, KINDS, assert_spanning_tree, make_D, rounding_asymmetric,
                              scipy_deaths, tolerance)
from test_persistence_triton import line_D

needs_numba = pytest.mark.skipif(not torch_mst.HAVE_NUMBA, reason="the compiled Prim needs numba")
interpreted = pytest.mark.skipif(not (bt.HAVE_TRITON and bt._interpreting()),
                                 reason="Triton or its interpreter (TRITON_INTERPRET) is off")
DTYPES = [torch.float32, torch.float64]


def make_stack(kinds, n: int, dtype, rng) -> torch.Tensor:
    """(len(kinds), n, n): one valid matrix of each kind (a kind may repeat: new draws)."""
    return torch.stack([line_D(n, rng).to(dtype) if k == "line" else make_D(k, n, dtype, rng) for k in kinds])


def mixed_kinds(B: int, rng) -> list[str]:
    return [str(k) for k in rng.choice(KINDS, size=B)]


def assert_members_equal(stacked: torch.Tensor, single, D: torch.Tensor) -> None:
    """Each member of the stacked result equals the single call on that member, bit for bit."""
    assert stacked.shape[0] == D.shape[0]
    for b in range(D.shape[0]):
        one = single(D[b])
        assert stacked[b].dtype == one.dtype and stacked[b].device == one.device
        assert torch.equal(stacked[b], one), f"member {b} differs from its own call"


def assert_scipy_deaths(d: torch.Tensor, D: torch.Tensor, backend: str) -> None:
    for b in range(D.shape[0]):
        np.testing.assert_allclose(d[b].double().cpu().numpy(), scipy_deaths(D[b]), rtol=0,
                                   atol=tolerance(backend, D[b]))


# ----------------------------------------------------------------------------
# every backend: members equal their own calls, and SciPy


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS + ["mixed"])
@pytest.mark.parametrize("n", [2, 3, 17, 130])
def test_stack_edges_and_deaths_equal_member_calls_and_scipy(backend, dtype, kind, n, rng):
    B = 4
    D = make_stack(mixed_kinds(B, rng) if kind == "mixed" else [kind] * B, n, dtype, rng)
    E = ph.death_edges(D, backend=backend)
    d = ph.deaths(D, backend=backend)
    assert E.shape == (B, n - 1, 2) and E.dtype == torch.long
    assert d.shape == (B, n - 1) and d.dtype == dtype
    assert_members_equal(E, lambda M: ph.death_edges(M, backend=backend), D)
    assert_members_equal(d, lambda M: ph.deaths(M, backend=backend), D)
    for b in range(B):
        assert_spanning_tree(E[b], n)
    assert_scipy_deaths(d, D, backend)


@pytest.mark.skipif("ripser" not in BACKENDS, reason="ripser.py is not installed")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 17, 60])
def test_stack_ripser_values_equal_member_calls_and_scipy(dtype, n, rng):
    D = make_stack(mixed_kinds(5, rng), n, dtype, rng)
    d = ph.deaths(D, backend="ripser")
    assert d.shape == (5, n - 1) and d.dtype == dtype and not d.requires_grad
    assert_members_equal(d, lambda M: ph.deaths(M, backend="ripser"), D)
    assert_scipy_deaths(d, D, "ripser")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS + ["mixed"])
def test_stack_torch_operator_boruvka(dtype, kind, monkeypatch, rng):
    """Without numba the torch backend runs its torch Boruvka on CPU (as for float64 on CUDA),
    member by member: the same edges as its single calls, and SciPy's deaths."""
    monkeypatch.setattr(torch_mst, "HAVE_NUMBA", False)
    for n in [2, 17, 150]:
        D = make_stack(mixed_kinds(3, rng) if kind == "mixed" else [kind] * 3, n, dtype, rng)
        E = ph.death_edges(D)
        assert_members_equal(E, ph.death_edges, D)
        assert_members_equal(ph.deaths(D), ph.deaths, D)
        assert_scipy_deaths(ph.deaths(D), D, "torch")


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_prim_edges_stack_is_prim_per_member(dtype, rng):
    """The prange kernel runs the single-matrix Prim on each member: the same edges, in the
    same (join) order, for the packed float32 kernel and the general one, on a
    non-contiguous stack too."""
    D = make_stack(mixed_kinds(6, rng) + ["line"], 45, torch.float64, rng).to(dtype)
    E = numba_host.prim_edges_stack(D)
    assert E.shape == (7, 44, 2)
    assert_members_equal(E, torch_mst.prim_edges, D)
    assert torch.equal(numba_host.prim_edges_stack(D.mT), E)  # symmetric members: D.mT is D, strided
    assert numba_host.prim_edges_stack(D[:0]).shape == (0, 44, 2)


@needs_numba
def test_prim_edges_stack_respects_the_torch_thread_budget(monkeypatch, rng):
    """One torch thread: one numba thread for the stack, the same edges, and torch's thread count
    as it was (numba's OpenMP layer shares libgomp with torch and resets it on its first launch)."""
    import numba

    seen = []
    real = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda k: seen.append(k) or real(k))
    D = make_stack(["random"] * 3, 30, torch.float32, rng)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        E = numba_host.prim_edges_stack(D)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [1] and after == 1
    assert_members_equal(E, torch_mst.prim_edges, D)


# ----------------------------------------------------------------------------
# the Triton Boruvka, interpreted


@interpreted
@pytest.mark.parametrize("kind", KINDS + ["line", "mixed"])
@pytest.mark.parametrize("n", [2, 3, 40])
def test_interpreted_triton_stack_equals_member_calls_and_prim(kind, n, rng):
    kinds = (mixed_kinds(3, rng) + ["line"]) if kind == "mixed" else [kind] * 3
    D = make_stack(kinds, n, torch.float32, rng)
    E = bt.triton_boruvka_edges(D)
    assert E.shape == (len(kinds), n - 1, 2)
    assert_members_equal(E, bt.triton_boruvka_edges, D)
    if torch_mst.HAVE_NUMBA:
        assert_members_equal(E, lambda M: ph.canonical_order(M, torch_mst.prim_edges(M)), D)
    assert_scipy_deaths(D[(torch.arange(len(kinds))[:, None], E[..., 0], E[..., 1])], D, "torch")


@interpreted
def test_interpreted_triton_stack_members_finish_in_different_rounds(rng):
    """A chain (many rounds) beside matrices of all equal weights (two rounds): the finished
    members idle while the chain goes on, and keep their trees; other tiles agree."""
    n = 70
    D = torch.stack([torch.ones(n, n) - torch.eye(n), line_D(n, rng), torch.zeros(n, n),
                     make_D("random", n, torch.float32, rng)])
    E = bt.triton_boruvka_edges(D)
    assert_members_equal(E, bt.triton_boruvka_edges, D)
    assert torch.equal(bt.triton_boruvka_edges(D, rows=1, cols=16, warps=1), E)
    assert torch.equal(bt.triton_boruvka_edges(D.mT), E)  # non-contiguous rows: a working copy
    assert bt.triton_boruvka_edges(D[:0]).shape == (0, n - 1, 2)


@interpreted
def test_interpreted_triton_finished_members_idle(monkeypatch, rng):
    """Once a member's tree is complete its programs are switched off (``active`` 0) for the
    rounds that the others still need; the first round runs every member."""
    real = bt._kernels(True)
    launches = []  # per launch of the row kernel: the active flags it was given

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args[3].tolist())  # (D, comp, keys, active, ...)
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(bt, "_kernels", lambda interpret: (Recorded(real[0]), *real[1:]))
    n = 64
    D = torch.stack([torch.zeros(n, n), make_D("random", n, torch.float32, rng)])  # one round; several
    E = bt.triton_boruvka_edges(D)
    assert len(launches) >= 3 and launches[0] == [1, 1]
    assert all(flags == [0, 1] for flags in launches[1:])
    monkeypatch.undo()
    assert_members_equal(E, bt.triton_boruvka_edges, D)


@interpreted
@pytest.mark.parametrize("bad", ["nan row", "asymmetric", "no finite edge"])
def test_interpreted_triton_stack_bad_member_is_named(bad, rng):
    D = make_stack(["random"] * 4, 24, torch.float32, rng)
    if bad == "nan row":
        D[2, 5, :] = D[2, :, 5] = float("nan")
    elif bad == "asymmetric":
        D[2] = torch.from_numpy(rng.random((24, 24))).float()
    else:
        D[2] = torch.full((24, 24), float("inf"))
        D[2].fill_diagonal_(0)
    with pytest.raises(ValueError, match="member 2 of the stack: .*exactly symmetric matrix of finite weights"):
        bt.triton_boruvka_edges(D)


@interpreted
def test_interpreted_runs_on_stacks():
    assert bt.runs_on(torch.zeros(3, 4, 4)) and bt.runs_on(torch.zeros(0, 4, 4))
    assert not bt.runs_on(torch.zeros(3, 4, 5))
    assert not bt.runs_on(torch.zeros(2, 3, 4, 4))
    assert not bt.runs_on(torch.zeros(3, 1, 1))


# ----------------------------------------------------------------------------
# gradient, canonical order, the check


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stack_gradient_is_the_member_gradients(backend, dtype, rng, torch_gen):
    """The gradient of the deaths of a stack is the gather's: each member's gradient, as from
    its own call (a weighted sum, so that every death counts differently)."""
    B, n = 4, 30
    D = make_stack(mixed_kinds(B, rng), n, dtype, rng).requires_grad_(True)
    w = torch.rand(B, n - 1, generator=torch_gen, dtype=dtype)
    (ph.deaths(D, backend=backend) * w).sum().backward()
    for b in range(B):
        M = D[b].detach().clone().requires_grad_(True)
        (ph.deaths(M, backend=backend) * w[b]).sum().backward()
        assert torch.equal(D.grad[b], M.grad), f"member {b}"
        # the gather's gradient: w at the death edges (upper triangle), 0 elsewhere
        e = ph.death_edges(M.detach(), backend=backend)
        G = torch.zeros(n, n, dtype=dtype).index_put_((e[:, 0], e[:, 1]), w[b], accumulate=True)
        assert torch.equal(M.grad, G)


def test_stack_gradient_through_the_dissimilarity(rng):
    """A (B, m, n) -> 1 - |corr| -> deaths -> sum(1 - d): each member's activation gradient
    equals its own pipeline's."""
    A = torch.from_numpy(rng.standard_normal((3, 16, 12))).requires_grad_(True)
    with torch.no_grad():
        A[1, :, 4] = 0.25  # a dead neuron
        A[2, :, 7] = A[2, :, 3]  # a duplicated one
    (1 - ph.deaths(ds.abs_correlation(A))).sum().backward()
    for b in range(3):
        a = A[b].detach().clone().requires_grad_(True)
        (1 - ph.deaths(ds.abs_correlation(a))).sum().backward()
        assert torch.equal(A.grad[b], a.grad), f"member {b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_canonical_order_of_a_stack_is_per_member(dtype, rng):
    D = make_stack(["tied"] * 3 + ["duplicated"], 25, torch.float64, rng).to(dtype)
    shuffled = torch.stack([torch.from_numpy(rng.permutation(24)) for _ in range(4)])
    E = torch.stack([ph.death_edges(M) for M in D])
    scrambled = E.gather(1, shuffled[..., None].expand(-1, -1, 2)).flip(-1)  # reordered and reversed
    got = ph.canonical_order(D, scrambled)
    assert torch.equal(got, E)
    for b in range(4):
        assert torch.equal(got[b], ph.canonical_order(D[b], scrambled[b]))


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_stack_with_a_rounding_asymmetric_member(backend, rng):
    """A member within the symmetry tolerance but not exactly symmetric is read through its upper
    triangle, as alone; the exactly symmetric members are unchanged by that."""
    D = make_stack(["random", "tied", "random"], 40, torch.float32, rng)
    D[1] = rounding_asymmetric(D[1], rng)
    assert not torch.equal(D[1], D[1].T)
    assert_members_equal(ph.death_edges(D, backend=backend), lambda M: ph.death_edges(M, backend=backend), D)
    assert_members_equal(ph.deaths(D, backend=backend), lambda M: ph.deaths(M, backend=backend), D)


@pytest.mark.parametrize("call", ["death_edges", "deaths"])
@pytest.mark.parametrize("bad", ["negative", "nan", "inf", "diagonal", "asymmetric"])
@pytest.mark.parametrize("n", [20, 400])  # 4 x 400^2 entries: the check overlaps the MST
def test_stack_check_names_the_member_at_fault(call, bad, n, rng):
    D = make_stack(["random"] * 4, n, torch.float32, rng)
    if bad == "negative":
        D[2, 3, 5] = D[2, 5, 3] = -0.5
    elif bad in ("nan", "inf"):
        D[2, 3, 5] = float(bad)
    elif bad == "diagonal":
        D[2, 4, 4] = 0.25
    else:
        D[2, 3, 5] += 0.5
    message = {"negative": "negative entry", "nan": "NaN or inf", "inf": "NaN or inf", "diagonal": "non-zero diagonal",
               "asymmetric": "not symmetric"}[bad]
    with pytest.raises(ValueError, match=rf"\[2\] \(member 2 of the stack\).*{message}"):
        getattr(ph, call)(D)
    D[3] = D[2]  # two bad members: the first is named
    D[2] = make_D("random", n, torch.float32, rng)
    with pytest.raises(ValueError, match=r"member 3 of the stack"):
        getattr(ph, call)(D)


@pytest.mark.parametrize("call", ["death_edges", "deaths"])
def test_stack_shapes_refused_and_empty(call):
    f = getattr(ph, call)
    for shape in [(2, 3, 4, 4), (1, 1, 2, 3, 3)]:
        with pytest.raises(ValueError, match=r"square \(n, n\), or a stack \(B, n, n\).*got shape"):
            f(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"square .* got shape \(3, 4, 5\)"):
        f(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="1 x 1; persistence needs at least 2 points"):
        f(torch.zeros(3, 1, 1))
    with pytest.raises(ValueError, match="at least 2 points"):
        f(torch.zeros(0, 1, 1))
    # an empty stack of n x n matrices: an empty result of the member shape, with a gradient path
    D = torch.zeros(0, 5, 5, requires_grad=True)
    out = f(D)
    assert out.shape == ((0, 4, 2) if call == "death_edges" else (0, 4))
    if call == "deaths":
        out.sum().backward()
        assert D.grad.shape == D.shape
        if "ripser" in BACKENDS:
            assert ph.deaths(D, backend="ripser").shape == (0, 4)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_input_refused_with_to_dense(layout, rng):
    D = make_D("random", 6, torch.float32, rng)
    S = D.to_sparse() if layout == "sparse_coo" else D.to_sparse_csr()
    for f in (ph.death_edges, ph.deaths):
        with pytest.raises(ValueError, match=r"dissimilarity matrix is a torch\.sparse.* tensor.*to_dense\(\)"):
            f(S)
    A = torch.from_numpy(rng.standard_normal((8, 5))).float()
    As = A.to_sparse() if layout == "sparse_coo" else A.to_sparse_csr()
    for f in list(ds.DISSIMILARITIES.values()) + [ds.correlation]:
        with pytest.raises(ValueError, match=r"activations is a torch\.sparse.* tensor.*to_dense\(\)"):
            f(As)


def test_stack_check_false_skips_the_values(rng):
    """check=False: the O(1) form checks still run per stack; the values are not read (a NaN
    member is not refused by the check)."""
    D = make_stack(["random"] * 3, 10, torch.float32, rng)
    assert_members_equal(ph.death_edges(D, check=False), lambda M: ph.death_edges(M, check=False), D)
    with pytest.raises(ValueError, match="stack"):
        ph.death_edges(torch.zeros(2, 2, 3, 3), check=False)


# ----------------------------------------------------------------------------
# dissimilarities on stacks


def activation_stack(B: int, m: int, n: int, dtype, rng) -> torch.Tensor:
    A = torch.from_numpy(rng.standard_normal((B, m, n))).to(dtype)
    A[0, :, 1] = A[0, :, 0]  # duplicated neuron
    A[-1, :, n - 1] = 0.5  # dead neuron (constant column)
    A[-1, :, 0] = torch.relu(A[-1, :, 0])
    return A


@pytest.mark.parametrize("name", sorted(ds.DISSIMILARITIES) + ["correlation"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 2), (3, 5, 4), (4, 32, 17), (2, 64, 130)])
def test_dissimilarity_stack_equals_member_calls(name, dtype, shape, rng):
    """On CPU a stack goes member by member; ``__wrapped__`` is the whole-stack computation (a
    GPU's), checked here on CPU as well."""
    f = ds.correlation if name == "correlation" else ds.DISSIMILARITIES[name]
    A = activation_stack(*shape, dtype, rng)
    M = f(A)
    B, _, n = shape
    assert M.shape == (B, n, n) and M.dtype == dtype
    assert_members_equal(M, f, A)
    assert torch.equal(f.__wrapped__(A), M)
    if name != "correlation":  # the stack passes the persistence check as a whole, and goes through
        assert_members_equal(ph.deaths(M.float()), ph.deaths, M.float())


def test_dissimilarity_stack_checks_name_the_member(rng):
    A = activation_stack(3, 8, 5, torch.float32, rng)
    A[1, 2, 3] = float("nan")
    for f in (ds.abs_correlation, ds.abs_correlation.__wrapped__, ds.euclidean, ds.euclidean.__wrapped__):
        with pytest.raises(ValueError, match=r"activations \[1\] \(member 1 of the stack\) contains NaN"):
            f(A)
    with pytest.raises(ValueError, match=r"or a stack \(B, m, n\).*got shape \(2, 3, 8, 5\)"):
        ds.abs_correlation(torch.zeros(2, 3, 8, 5))
    with pytest.raises(ValueError, match="1 sample"):
        ds.euclidean(torch.zeros(3, 1, 5))
    assert ds.abs_correlation(torch.zeros(0, 8, 5)).shape == (0, 5, 5)


# ----------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS + ["line", "mixed"])
@pytest.mark.parametrize("n", [2, 3, 17, 300])
def test_cuda_stack_equals_member_calls_and_prim(dtype, kind, n, rng):
    """float32: one Triton grid over the stack; float64: the torch Boruvka per member. The same
    edges as the single calls (and, in float32, as the CPU's Prim), SciPy's deaths."""
    kinds = (mixed_kinds(3, rng) + ["line"]) if kind == "mixed" else [kind] * 4
    D = make_stack(kinds, n, dtype, rng).cuda()
    E = ph.death_edges(D)
    assert E.is_cuda and E.shape == (len(kinds), n - 1, 2)
    assert_members_equal(E, ph.death_edges, D)
    assert_members_equal(ph.deaths(D), ph.deaths, D)
    if dtype == torch.float32 and torch_mst.HAVE_NUMBA:
        assert torch.equal(E.cpu(), ph.death_edges(D.cpu()))
    assert_scipy_deaths(ph.deaths(D), D, "torch")


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_stack_of_n3000_equals_member_calls_and_prim(rng):
    """Four members of 3000 neurons, one of each kind, in one Triton grid."""
    D = make_stack(KINDS, 3000, torch.float32, rng).cuda()
    E = ph.death_edges(D)
    assert_members_equal(E, ph.death_edges, D)
    if torch_mst.HAVE_NUMBA:
        assert torch.equal(E.cpu(), ph.death_edges(D.cpu()))
    assert_scipy_deaths(ph.deaths(D), D, "torch")


@pytest.mark.cuda
def test_cuda_stack_runs_one_triton_call(monkeypatch, rng):
    calls = []
    real = bt.triton_boruvka_edges
    monkeypatch.setattr(bt, "triton_boruvka_edges", lambda D: calls.append(tuple(D.shape)) or real(D))
    D = make_stack(["random"] * 5, 64, torch.float32, rng).cuda()
    ph.death_edges(D)
    assert calls == [(5, 64, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_cuda_stack_backends_and_gradient(backend, rng, torch_gen):
    B, n = 3, 50
    D = make_stack(mixed_kinds(B, rng), n, torch.float32, rng).cuda().requires_grad_(True)
    assert_members_equal(ph.death_edges(D, backend=backend), lambda M: ph.death_edges(M, backend=backend), D)
    w = torch.rand(B, n - 1, generator=torch_gen).cuda()
    (ph.deaths(D, backend=backend) * w).sum().backward()
    for b in range(B):
        M = D[b].detach().clone().requires_grad_(True)
        (ph.deaths(M, backend=backend) * w[b]).sum().backward()
        assert torch.equal(D.grad[b], M.grad)


@pytest.mark.cuda
def test_cuda_stack_bad_member_is_named(rng):
    D = make_stack(["random"] * 3, 40, torch.float32, rng).cuda()
    D[1, 2, 3] = -1.0
    with pytest.raises(ValueError, match=r"member 1 of the stack.*negative"):
        ph.deaths(D)
    D[1, 2, 3] = D[1, 3, 2]
    D[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"member 2 of the stack.*NaN"):
        ph.death_edges(D)
    D[2, 0, 1] = D[2, 1, 0]
    D[2, 3, 3] = 1.0
    with pytest.raises(ValueError, match=r"member 2 of the stack.*diagonal"):
        ph.death_edges(D)


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(ds.DISSIMILARITIES) + ["correlation"])
def test_cuda_dissimilarity_stack_equals_member_calls(name, rng):
    f = ds.correlation if name == "correlation" else ds.DISSIMILARITIES[name]
    A = activation_stack(4, 64, 33, torch.float32, rng).cuda()
    assert_members_equal(f(A), f, A)
