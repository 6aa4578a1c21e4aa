"""The Triton Boruvka (``persistence/boruvka_triton.py``), against SciPy's MST and the compiled Prim.

Without a GPU, Triton's interpreter (``TRITON_INTERPRET=1``) runs the same
kernels on CPU tensors; the tests marked ``cuda`` run the compiled kernels.
Both orders ties by ``(D[i, j], i, j)``, so the edges must equal Prim's
exactly, ties included, not only the deaths.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from toponeuro import persistence as ph
from toponeuro.persistence import boruvka_triton as bt
from toponeuro.persistence import torch_mst

from test_persistence import assert_spanning_tree, make_D, scipy_deaths, symmetric

pytestmark = pytest.mark.skipif(not bt.HAVE_TRITON, reason="Triton is not installed")
needs_numba = pytest.mark.skipif(not torch_mst.HAVE_NUMBA, reason="prim_edges needs numba")


# conftest turns the interpreter on where there is no GPU; with one, the cuda tests below run instead
interpreted = pytest.mark.skipif(not bt._interpreting(), reason="Triton's interpreter is off (TRITON_INTERPRET)")


def line_D(n: int, rng) -> torch.Tensor:
    """Points on a line, gaps growing along it: every vertex picks its left neighbour, so the
    links of the first round form one chain through all n vertices."""
    x = np.cumsum(1.0 + np.arange(n) / n + 0.01 * rng.random(n))
    return torch.from_numpy(np.abs(x[:, None] - x[None, :])).float()


def matrices(kind: str, n: int, rng) -> torch.Tensor:
    if kind == "line":
        D = line_D(n, rng)
    else:
        D = make_D(kind, n, torch.float32, rng)
    assert torch.equal(D, D.T)
    return D


def prim(D: torch.Tensor) -> torch.Tensor:
    return ph.canonical_order(D, torch_mst.prim_edges(D))


def check_against_references(D: torch.Tensor, e: torch.Tensor) -> None:
    n = D.shape[0]
    assert_spanning_tree(e, n)
    Dc = D.cpu()
    e = e.cpu()
    assert torch.equal(ph.canonical_order(Dc, e), e), "not in canonical order"
    np.testing.assert_allclose(Dc[e[:, 0], e[:, 1]].double().numpy(), scipy_deaths(Dc), rtol=0, atol=1e-12)
    if torch_mst.HAVE_NUMBA:
        assert torch.equal(e, prim(Dc)), "not Prim's tree"


KINDS = ["random", "tied", "duplicated", "constant", "line"]


@interpreted
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 17, 130])
def test_interpreted_kernels_match_scipy_and_prim(kind, n, rng):
    D = matrices(kind, n, rng)
    check_against_references(D, bt.triton_boruvka_edges(D))


@interpreted
def test_interpreted_random_sizes_and_tiles(rng):
    """Sizes that are not multiples of the tiles, and other tiles, give the same tree."""
    for _ in range(6):
        n = int(rng.integers(4, 90))
        D = matrices(str(rng.choice(KINDS)), n, rng)
        e = bt.triton_boruvka_edges(D)
        check_against_references(D, e)
        assert torch.equal(bt.triton_boruvka_edges(D, rows=1, cols=16, warps=1), e)


@interpreted
def test_interpreted_negative_zero_orders_like_zero(rng):
    """-0.0 passes validation and must tie with +0.0 (the keys drop the sign bit)."""
    for n in [3, 4, 7]:
        D = torch.zeros(n, n)
        D[(torch.arange(n) + 1) % n, torch.arange(n)] = -0.0  # D[i+1, i] = -0.0 around a cycle
        e = bt.triton_boruvka_edges(D)
        assert_spanning_tree(e, n)
        if torch_mst.HAVE_NUMBA:
            assert torch.equal(e, prim(D))
    X = symmetric(rng.choice([0.0, 0.5, 0.7], size=(12, 12), p=[0.3, 0.35, 0.35]))
    X = torch.from_numpy(X).float()
    X[(X == 0) & (torch.rand(12, 12) < 0.5)] = -0.0
    check_against_references(X.abs(), bt.triton_boruvka_edges(X))


@interpreted
def test_interpreted_non_contiguous_rows(rng):
    D = make_D("random", 40, torch.float32, rng)
    assert torch.equal(bt.triton_boruvka_edges(D.T), bt.triton_boruvka_edges(D))  # D.T: columns of D


@interpreted
@pytest.mark.parametrize("bad", ["nan row", "negative", "asymmetric", "no finite edge"])
def test_interpreted_bad_input_raises_not_hangs(bad, rng):
    D = make_D("random", 24, torch.float32, rng)
    if bad == "nan row":
        D[5, :] = D[:, 5] = float("nan")
    elif bad == "negative":
        D = -D
    elif bad == "asymmetric":
        D = torch.from_numpy(rng.random((24, 24))).float()
    else:
        D = torch.full((6, 6), float("inf"))
        D.fill_diagonal_(0)
    with pytest.raises(ValueError, match="exactly symmetric matrix of finite weights"):
        bt.triton_boruvka_edges(D)


@interpreted
def test_runs_on_and_refusals(monkeypatch):
    assert bt.runs_on(torch.zeros(3, 3))  # CPU, under the interpreter
    assert not bt.runs_on(torch.zeros(3, 3, dtype=torch.float64))
    assert not bt.runs_on(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="float32"):
        bt.triton_boruvka_edges(torch.zeros(3, 3, dtype=torch.float64))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not bt.runs_on(torch.zeros(3, 3))  # a CPU tensor needs the interpreter


# the row kernel reading a correlation matrix (of_rho)

def correlation_and_dissimilarity(kind: str, name: str, n: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 correlation matrix C of activations of one kind, and the dense dissimilarity of them."""
    from toponeuro import dissimilarity

    A = torch.from_numpy(rng.standard_normal((40, n))).float()
    if kind == "tied":  # two-valued neurons: many exactly equal correlations
        A = torch.from_numpy(rng.integers(0, 2, (4, n))).float().repeat(10, 1)
        A[0] += 2.0
    elif kind == "duplicated":
        A[:, 5], A[:, 6], A[:, 9] = A[:, 1], -A[:, 1], 2.0 * A[:, 3] + 1.0
    elif kind == "dead":
        A[:, 2] = 0.0
    return dissimilarity.correlation(A), dissimilarity.get(name)(A)


@interpreted
@needs_numba
@pytest.mark.parametrize("name", ["abs_correlation", "one_minus_rho", "sqrt_one_minus_rho2"])
@pytest.mark.parametrize("kind", ["random", "tied", "duplicated", "dead"])
def test_interpreted_kernels_on_correlations_give_prims_tree_of_the_dissimilarity(name, kind, rng):
    C, D = correlation_and_dissimilarity(kind, name, 70, rng)
    e = bt.triton_boruvka_edges(C, of_rho=name)
    check_against_references(D, e)  # the tree of the dense dissimilarity, ties and order included
    C.diagonal().copy_(torch.from_numpy(rng.random(70)).float())  # the diagonal is never read
    assert torch.equal(bt.triton_boruvka_edges(C, of_rho=name), e)
    stack = torch.stack([C, C.flip(0, 1)])  # a stack: each member its own tree
    es = bt.triton_boruvka_edges(stack, of_rho=name)
    assert torch.equal(es[0], e) and torch.equal(es[1], bt.triton_boruvka_edges(C.flip(0, 1), of_rho=name))


@interpreted
def test_interpreted_unknown_of_rho_is_refused():
    with pytest.raises(ValueError, match="of_rho must be one of"):
        bt.triton_boruvka_edges(torch.eye(4), of_rho="euclidean")


# the in-place mirror that makes the correlation matrix exactly symmetric

@interpreted
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 130])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interpreted_mirror_copies_the_upper_triangle_into_the_lower(n, dtype, rng):
    from toponeuro.persistence import mirror_triton

    C = rng.standard_normal((n, n)).astype(dtype)
    X = torch.from_numpy(C.copy())
    assert mirror_triton.mirror_upper_(X) is X
    assert np.array_equal(X.numpy(), np.triu(C) + np.triu(C, 1).T)
    S = torch.from_numpy(rng.standard_normal((3, n, n)).astype(dtype))
    expected = torch.triu(S) + torch.triu(S, 1).mT
    mirror_triton.mirror_upper_(S)
    assert torch.equal(S, expected)


@interpreted
def test_interpreted_mirror_refuses_what_it_cannot_write():
    from toponeuro.persistence import mirror_triton

    for bad in (torch.zeros(4, 4).T.contiguous().T,  # columns contiguous
                torch.zeros(4, 4, requires_grad=True), torch.zeros(4, 5), torch.zeros(4, 4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="mirror_upper_ needs"):
            mirror_triton.mirror_upper_(bad)


# ----------------------------------------------------------------------------
# compiled kernels


@pytest.mark.cuda
@needs_numba
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 17, 300, pytest.param(3000, marks=pytest.mark.slow)])
def test_cuda_kernels_match_scipy_and_prim(kind, n, rng):
    D = matrices(kind, n, rng).cuda()
    e = bt.triton_boruvka_edges(D)
    assert e.is_cuda
    check_against_references(D, e)
    assert torch.equal(bt.triton_boruvka_edges(D), e)


@pytest.mark.cuda
def test_cuda_torch_backend_runs_the_triton_kernels(monkeypatch, rng):
    calls = []
    real = bt.triton_boruvka_edges
    monkeypatch.setattr(bt, "triton_boruvka_edges", lambda D, **kw: calls.append(D.shape) or real(D, **kw))
    D = make_D("random", 50, torch.float32, rng).cuda()
    ph.death_edges(D)
    assert calls == [(50, 50)]
    ph.death_edges(D.double())  # float64: the torch Boruvka
    assert calls == [(50, 50)]


@pytest.mark.cuda
def test_cuda_kernel_failure_falls_back_to_torch_boruvka(monkeypatch, rng):
    def broken(D, **kw):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(bt, "triton_boruvka_edges", broken)
    monkeypatch.setattr(torch_mst, "_TRITON_FAILED", set())
    D = make_D("tied", 60, torch.float32, rng).cuda()
    with pytest.warns(RuntimeWarning, match="Triton Boruvka failed"):
        e = ph.death_edges(D)
    assert torch.equal(e, ph.canonical_order(D, torch_mst.boruvka_edges(D)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ph.death_edges(D), e)  # not tried again: no second warning


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_kernels_run_on_the_matrix_device_not_the_current_one(rng):
    D = make_D("random", 200, torch.float32, rng).to("cuda:1")
    with torch.cuda.device(0):
        e = bt.triton_boruvka_edges(D)
    assert e.device == D.device
    check_against_references(D, e)


@pytest.mark.cuda
@needs_numba
@pytest.mark.parametrize("name", ["abs_correlation", "one_minus_rho", "sqrt_one_minus_rho2"])
@pytest.mark.parametrize("kind", ["random", "tied", "duplicated", "dead"])
def test_cuda_kernels_on_correlations_give_prims_tree_of_the_dissimilarity(name, kind, rng):
    from toponeuro.persistence import mirror_triton

    C, D = correlation_and_dissimilarity(kind, name, 300, rng)
    check_against_references(D, bt.triton_boruvka_edges(C.cuda(), of_rho=name))
    U = torch.from_numpy(rng.standard_normal((2, 300, 300))).float()
    X = mirror_triton.mirror_upper_(U.cuda())
    assert torch.equal(X.cpu(), torch.triu(U) + torch.triu(U, 1).mT)
