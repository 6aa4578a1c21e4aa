"""0-dimensional persistence: death edges and deaths, against SciPy's minimum spanning tree.

The finite deaths of the 0-dimensional Vietoris-Rips diagram are the edge
weights of a minimum spanning tree (MST) of the complete graph weighted by
``D``. The reference is ``scipy.sparse.csgraph.minimum_spanning_tree`` on the
same numbers in float64. SciPy reads a 0 entry as "no edge", so the reference
adds 1 to every off-diagonal entry, takes the tree, and subtracts 1 from its
``.data`` (an error of at most a few ulps of 2, far below the tolerances).

Tolerances: the torch backend (Prim on CPU, Boruvka on CUDA) is exact in D's
dtype, so its deaths equal SciPy's to the rounding of the +1 trick.
giotto-ph and ripser.py compute in float32, so on float64 input they may pick
an edge that is lighter only by float32 rounding: their tolerance is a few
float32 ulps.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

import toponeuro as tn
from toponeuro import persistence as ph
from toponeuro.persistence import boruvka, boruvka_static, cuda_graph, torch_mst

BACKENDS = ph.available_backends()
EDGE_BACKENDS = [b for b in BACKENDS if ph.BACKENDS[b].gives_edges]
DTYPES = [torch.float32, torch.float64]
KINDS = ["random", "tied", "duplicated", "constant"]
SIZES = [2, 3, 17, 300]
EXACT_BACKENDS = {"torch", "numba", "torch-graph"}  # exact in D's dtype

needs_numba = pytest.mark.skipif(not torch_mst.HAVE_NUMBA, reason="prim_edges needs numba")

KERNELS = [
    pytest.param(torch_mst.prim_edges, marks=needs_numba, id="prim_edges"),
    pytest.param(torch_mst.boruvka_edges, id="boruvka_edges"),
]


# ----------------------------------------------------------------------------
# references and input generators


def scipy_deaths(D) -> np.ndarray:
    """Ascending MST edge weights of the complete graph on D (off-diagonal entries), in float64."""
    X = np.array(torch.as_tensor(D).detach().cpu().double().numpy(), dtype=np.float64)
    n = X.shape[0]
    Y = X + 1.0  # SciPy drops 0 entries as missing edges
    np.fill_diagonal(Y, 0.0)
    tree = minimum_spanning_tree(Y)
    assert tree.nnz == n - 1
    return np.sort(tree.data - 1.0)


def scipy_tree_edges(D) -> set[tuple[int, int]]:
    X = torch.as_tensor(D).detach().cpu().double().numpy() + 1.0
    np.fill_diagonal(X, 0.0)
    T = minimum_spanning_tree(X).tocoo()
    return {(min(i, j), max(i, j)) for i, j in zip(T.row.tolist(), T.col.tolist())}


def tolerance(backend: str, D: torch.Tensor) -> float:
    scale = max(1.0, float(D.detach().abs().max()))
    if backend in EXACT_BACKENDS:
        return 1e-12 * scale
    return 4 * float(np.finfo(np.float32).eps) * scale


def assert_spanning_tree(e: torch.Tensor, n: int) -> None:
    assert e.dtype == torch.long
    assert tuple(e.shape) == (n - 1, 2)
    e = e.cpu().numpy()
    assert (e >= 0).all() and (e < n).all()
    assert (e[:, 0] != e[:, 1]).all(), "self-loop"
    G = sp.coo_matrix((np.ones(n - 1), (e[:, 0], e[:, 1])), shape=(n, n))
    n_components, _ = connected_components(G, directed=False)
    # n - 1 edges that connect n vertices form a tree
    assert n_components == 1, f"edges do not connect the {n} vertices ({n_components} components)"


def symmetric(W: np.ndarray) -> np.ndarray:
    U = np.triu(W, 1)
    return U + U.T


def make_D(kind: str, n: int, dtype: torch.dtype, rng: np.random.Generator) -> torch.Tensor:
    """A valid (n, n) dissimilarity matrix of the given kind, in dtype."""
    if kind == "random":
        D = torch.from_numpy(symmetric(rng.random((n, n))))
    elif kind == "tied":  # a handful of values, 0 included: many equal weights
        D = torch.from_numpy(symmetric(np.round(rng.random((n, n)) * 4) / 4))
    elif kind == "duplicated":  # copies of a few neurons: d = 0 between copies
        k = max(1, n // 4)
        base = torch.from_numpy(rng.standard_normal((24, k)))
        idx = torch.from_numpy(rng.integers(0, k, n))
        D = tn.dissimilarity.abs_correlation(base[:, idx])
        same = idx[:, None] == idx[None, :]
        D = torch.where(same, torch.zeros_like(D), D)  # exactly 0, not just rounding-small
    elif kind == "constant":  # dead ReLUs: their rows are all 1, a big tie at the top
        A = torch.relu(torch.from_numpy(rng.standard_normal((32, n))) + 0.3)
        dead = torch.from_numpy(rng.random(n) < 0.4)
        A[:, dead] = 0.0
        D = tn.dissimilarity.abs_correlation(A)
    else:
        raise KeyError(kind)
    D = D.to(dtype)
    assert torch.equal(D, D.T) and torch.equal(D.diagonal(), torch.zeros(n, dtype=dtype))
    return D


def distinct_weights_D(n: int, dtype, rng) -> torch.Tensor:
    """All off-diagonal weights distinct and exact in float32: the MST is unique."""
    N = n * (n - 1) // 2
    w = (rng.permutation(N) + 1) / N
    X = np.zeros((n, n))
    X[np.triu_indices(n, 1)] = w
    return torch.from_numpy(X + X.T).to(dtype)


def edge_functions():
    """Every way to get death edges: public API per edge backend, and the raw torch kernels."""
    fns = [pytest.param(lambda D, b=b: ph.death_edges(D, backend=b), id=f"death_edges[{b}]") for b in EDGE_BACKENDS]
    return fns + KERNELS


# ----------------------------------------------------------------------------
# the registry here


def test_all_three_backends_available():
    assert {"torch", "giotto-ph", "ripser"} <= set(BACKENDS)
    assert set(EDGE_BACKENDS) >= {"torch", "giotto-ph"}
    assert not ph.BACKENDS["ripser"].gives_edges


# ----------------------------------------------------------------------------
# deaths: every backend against SciPy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_deaths_match_scipy(backend, dtype, kind, n, rng):
    D = make_D(kind, n, dtype, rng)
    d = ph.deaths(D, backend=backend)
    assert d.shape == (n - 1,)
    assert d.dtype == dtype and d.device == D.device
    assert bool((d[1:] >= d[:-1]).all()), "deaths not ascending"
    np.testing.assert_allclose(d.double().numpy(), scipy_deaths(D), rtol=0, atol=tolerance(backend, D))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [3, 17, 300])
def test_backends_agree_with_each_other(dtype, kind, n, rng):
    D = make_D(kind, n, dtype, rng)
    ref = ph.deaths(D, backend="torch").double().numpy()
    for b in BACKENDS:
        np.testing.assert_allclose(ph.deaths(D, backend=b).double().numpy(), ref, rtol=0, atol=tolerance(b, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend, rng):
    D = make_D("tied", 40, torch.float32, rng).to(torch.bfloat16)
    d = ph.deaths(D, backend=backend)
    assert d.dtype == torch.bfloat16
    np.testing.assert_allclose(d.double().numpy(), scipy_deaths(D), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_float16(backend, kind, rng):
    D = make_D(kind, 40, torch.float32, rng).to(torch.float16)
    d = ph.deaths(D, backend=backend)
    assert d.dtype == torch.float16
    # float16 widens to float32 exactly: every backend is exact on these numbers
    np.testing.assert_allclose(d.double().numpy(), scipy_deaths(D), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deaths_hand_computed(backend):
    # points 0, 1, 3, 7 on a line: the MST is the path, deaths 1, 2, 4
    x = torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=torch.float64)
    D = (x[:, None] - x[None, :]).abs()
    np.testing.assert_allclose(ph.deaths(D, backend=backend).numpy(), [1.0, 2.0, 4.0], atol=1e-12)
    # two neurons: the one death is their dissimilarity
    D2 = torch.tensor([[0.0, 0.3], [0.3, 0.0]])
    np.testing.assert_allclose(ph.deaths(D2, backend=backend).numpy(), [0.3], atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_matrix(backend):
    D = torch.zeros(6, 6)
    assert torch.equal(ph.deaths(D, backend=backend), torch.zeros(5))


@pytest.mark.parametrize("fn", edge_functions())
def test_negative_zero_entries(fn, rng):
    """-0.0 passes validation (it is not < 0) and must order like +0.0 (the kernels compare float bits)."""
    # adversarial: D[i + 1, i] = -0.0, D[i, i + 1] = +0.0 around a cycle; if each vertex preferred
    # the edge it sees as -0.0, every vertex would pick its successor and the picks would close a cycle
    for n in [3, 4, 7]:
        for dtype in DTYPES:
            D = torch.zeros(n, n, dtype=dtype)
            D[(torch.arange(n) + 1) % n, torch.arange(n)] = -0.0
            assert torch.signbit(D).sum() == n
            e = fn(D)
            assert_spanning_tree(e, n)
            assert torch.equal(D[e[:, 0], e[:, 1]].abs(), torch.zeros(n - 1, dtype=dtype))
    # a matrix on which a Boruvka that ordered -0.0 before +0.0 returned a cycle
    X = np.full((6, 6), 0.5)
    for i, j in [(0, 4), (1, 3), (1, 4), (2, 5), (3, 5), (4, 5)]:
        X[i, j] = X[j, i] = 0.0
    np.fill_diagonal(X, 0.0)
    for i, j in [(1, 4), (4, 5), (5, 2), (5, 3)]:
        X[i, j] = -0.0
    cases = [X]
    for _ in range(60):  # sparse zeros with random signs, so that later Boruvka rounds meet them
        n = int(rng.integers(4, 16))
        pz = float(rng.choice([0.1, 0.2, 0.3, 0.5]))
        X = symmetric(rng.choice([0.0, 0.5, 0.7], size=(n, n), p=[pz, (1 - pz) / 2, (1 - pz) / 2]))
        flip = (X == 0) & (rng.random((n, n)) < 0.5)
        np.fill_diagonal(flip, False)
        X[flip] = -0.0
        cases.append(X)
    for X in cases:
        n = X.shape[0]
        for dtype in DTYPES:
            D = torch.from_numpy(X).to(dtype)
            e = fn(D)
            assert_spanning_tree(e, n)
            np.testing.assert_allclose(np.sort(D[e[:, 0], e[:, 1]].double().abs().numpy()), scipy_deaths(D.abs()), atol=1e-12)


# ----------------------------------------------------------------------------
# death edges: spanning tree, orientation, exact gather


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_death_edges_public(backend, dtype, kind, n, rng):
    D = make_D(kind, n, dtype, rng)
    e = ph.death_edges(D, backend=backend)
    assert_spanning_tree(e, n)
    assert e.device == D.device and not e.requires_grad
    assert bool((e[:, 0] < e[:, 1]).all()), "edges must be (i, j) with i < j"
    w = D[e[:, 0], e[:, 1]]
    assert torch.equal(w, ph.deaths(D, backend=backend)), "edges do not gather exactly the deaths"
    # documented order: ascending by weight, ties by (i, j)
    key = list(zip(w.tolist(), e[:, 0].tolist(), e[:, 1].tolist()))
    assert key == sorted(key)
    np.testing.assert_allclose(w.double().numpy(), scipy_deaths(D), rtol=0, atol=tolerance(backend, D))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_kernels_give_an_exact_mst(kernel, dtype, kind, n, rng):
    D = make_D(kind, n, dtype, rng)
    e = kernel(D)
    assert_spanning_tree(e, n)
    assert e.device == D.device
    w = D[e[:, 0], e[:, 1]]
    # both kernels are exact in D's dtype: the sorted tree weights are the deaths, bit for bit
    assert torch.equal(torch.sort(w).values, ph.deaths(D, backend="torch"))
    np.testing.assert_allclose(torch.sort(w).values.double().numpy(), scipy_deaths(D), rtol=0, atol=1e-12)
    # oriented as i < j once put in canonical order
    c = ph.canonical_order(D, e)
    assert bool((c[:, 0] < c[:, 1]).all())
    assert {tuple(r) for r in c.tolist()} == {(min(i, j), max(i, j)) for i, j in e.tolist()}


def kruskal_lexicographic(D: torch.Tensor) -> set[tuple[int, int]]:
    """The MST under the strict order (D[i, j], i, j), i < j: unique, ties included (plain Kruskal)."""
    X = D.double().numpy()
    n = X.shape[0]
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tree = set()
    for _, i, j in sorted((X[i, j], i, j) for i in range(n) for j in range(i + 1, n)):
        a, b = root(i), root(j)
        if a != b:
            parent[a] = b
            tree.add((i, j))
    return tree


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prim_breaks_ties_by_weight_then_pair(kind, dtype, rng):
    """prim_edges documents the tie order (D[i, j], i, j): under that strict order the MST is unique."""
    for n in [2, 3, 9, 40]:
        D = make_D(kind, n, dtype, rng)
        e = torch_mst.prim_edges(D)
        assert bool((e[:, 0] < e[:, 1]).all())
        assert {tuple(r) for r in e.tolist()} == kruskal_lexicographic(D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 17, 300])
def test_unique_mst_same_edges_everywhere(dtype, n, rng):
    """With distinct weights the MST is unique: every backend and kernel returns SciPy's tree."""
    D = distinct_weights_D(n, dtype, rng)
    expected = scipy_tree_edges(D)
    for b in EDGE_BACKENDS:
        assert {tuple(r) for r in ph.death_edges(D, backend=b).tolist()} == expected, b
    for fn in [torch_mst.prim_edges] * torch_mst.HAVE_NUMBA + [torch_mst.boruvka_edges]:
        assert {(min(i, j), max(i, j)) for i, j in fn(D).tolist()} == expected


@pytest.mark.parametrize("block_entries", [1, 7, 300, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_boruvka_column_blocks(block_entries, kind, monkeypatch, rng):
    """Round one reads D in column blocks and the endpoint search reads rows in blocks: small blocks, same tree."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", 4)  # rounds at this n, not the dense step alone
    monkeypatch.setattr(boruvka, "_SMALL_SEARCH", 0)
    D = make_D(kind, 100, torch.float32, rng)
    whole = torch_mst.boruvka_edges(D)
    monkeypatch.setattr(boruvka, "_BLOCK_ENTRIES", block_entries)
    blocked = torch_mst.boruvka_edges(D)
    assert_spanning_tree(blocked, 100)
    assert torch.equal(blocked, whole)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_boruvka_general_paths_same_tree(kind, dtype, monkeypatch, rng):
    """The packed one-reduction pick (n <= 65536), the two-step pick used above that,
    and pointer jumping that needs its settle loop all give the same edges."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", 4)
    D = make_D(kind, 120, dtype, rng)
    whole = torch_mst.boruvka_edges(D)
    monkeypatch.setattr(boruvka, "_PACKED_MAX_N", 1)
    monkeypatch.setattr(boruvka, "_JUMPS", 0)
    general = torch_mst.boruvka_edges(D)
    assert_spanning_tree(general, 120)
    assert torch.equal(general, whole)
    got = np.sort(D[general[:, 0], general[:, 1]].double().numpy())
    np.testing.assert_allclose(got, scipy_deaths(D), rtol=0, atol=tolerance("torch", D))


def line_points_D(n: int) -> torch.Tensor:
    """Points on a line with growing gaps 1, 2, 3, ...: each vertex's nearest is its left
    neighbour, so one round picks a chain of depth n - 1. The MST is the path."""
    x = torch.arange(n, dtype=torch.float64).mul(torch.arange(1, n + 1)).div(2)
    return (x[:, None] - x[None, :]).abs()


@pytest.mark.parametrize("dense_max", [1, 128])
@pytest.mark.parametrize("n", [2, 3, 9, 100, 200])
def test_boruvka_one_long_chain(n, dense_max, monkeypatch):
    """Points on a line with growing gaps: each vertex's nearest is its left neighbour,
    so one round picks a chain of depth n - 1 (more than the jumps before the sync reach)."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", dense_max)
    e = torch_mst.boruvka_edges(line_points_D(n))
    assert {(min(i, j), max(i, j)) for i, j in e.tolist()} == {(i, i + 1) for i in range(n - 1)}


def rounding_asymmetric(D: torch.Tensor, rng) -> torch.Tensor:
    """D with about a third of its lower-triangle entries moved one ulp up: what a
    correlation computed without symmetrising looks like; the check accepts it."""
    up = torch.nextafter(D, torch.full_like(D, 2.0))
    lower = torch.tril(torch.from_numpy(rng.random(D.shape) < 0.35), -1)
    lower[1, 0] = True
    return torch.where(lower, up, D)


@pytest.mark.parametrize("kind", ["random", "tied"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("boruvka_on_cpu", [False, True])
def test_slightly_asymmetric_input_gives_the_upper_triangle_mst(kind, dtype, backend, boruvka_on_cpu,
                                                              monkeypatch, rng):
    """A matrix within the check's symmetry tolerance but not exactly symmetric: every
    backend gets the upper triangle mirrored, so the deaths are the exact MST of the
    weights they are gathered from (D[i, j], i < j), and the edges form a tree."""
    if boruvka_on_cpu:
        if backend != "torch":
            pytest.skip("the Boruvka switch concerns the torch backend")
        monkeypatch.setattr(torch_mst, "HAVE_NUMBA", False)  # the CUDA algorithm on CPU
    for n in [3, 40, 150]:
        S = make_D(kind, n, dtype, rng)
        D = rounding_asymmetric(S, rng)
        assert not torch.equal(D, D.T)
        upper = torch.triu(D) + torch.triu(D, 1).T
        e = ph.death_edges(D, backend=backend)
        assert_spanning_tree(e, n)
        assert connected_components(sp.coo_matrix((np.ones(n - 1), (e[:, 0], e[:, 1])), shape=(n, n)))[0] == 1
        got = ph.deaths(D, backend=backend)
        np.testing.assert_allclose(got.double().numpy(), scipy_deaths(upper), rtol=0,
                                   atol=tolerance(backend, upper))
        assert torch.equal(got, D[e[:, 0], e[:, 1]])


@pytest.mark.parametrize("case", ["one-ulp cycle", "asymmetric correlation", "inf block", "all inf", "nan pair"])
@pytest.mark.parametrize("dense_max", [1, 128])
def test_boruvka_rejects_inconsistent_unchecked_input(case, dense_max, monkeypatch, rng):
    """With check=False nothing validates D; Boruvka must stop with a ValueError on weights
    it cannot order consistently (it used to loop forever or return a non-tree)."""
    if case == "one-ulp cycle":  # 0 -> 1 -> 2 -> 0 each at 1.0 while the reverse reads 1 + ulp
        D = torch.full((3, 3), 1.0)
        D.fill_diagonal_(0)
        up = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
        D[2, 0] = D[0, 1] = D[1, 2] = up
    elif case == "asymmetric correlation":
        A = rng.standard_normal((64, 200))
        D = torch.from_numpy(1 - np.abs(np.corrcoef(A.T))).clamp(min=0)
        D.fill_diagonal_(0)
        assert not torch.equal(D, D.T)
    elif case == "inf block":
        D = torch.full((4, 4), float("inf"))
        D[:2, :2] = D[2:, 2:] = 0.5
        D.fill_diagonal_(0)
    elif case == "nan pair":  # n > 128: round one's picks (min propagates NaN) meet it first
        D = make_D("random", 150, torch.float32, rng)
        D[3, 7] = D[7, 3] = float("nan")
    else:
        D = torch.full((4, 4), float("inf"))
        D.fill_diagonal_(0)
    monkeypatch.setattr(boruvka, "DENSE_MAX", dense_max)  # the rounds' checks, and the dense step's
    try:
        e = torch_mst.boruvka_edges(D)
    except ValueError as err:
        assert "exactly symmetric matrix of finite weights" in str(err)
        return
    # an asymmetry can be harmless; then the answer must still be a spanning tree
    assert case == "asymmetric correlation"
    n = D.shape[0]
    assert connected_components(sp.coo_matrix((np.ones(n - 1), (e[:, 0], e[:, 1])), shape=(n, n)))[0] == 1


# ----------------------------------------------------------------------------
# the static-shape Boruvka behind the torch-graph backend (eager here; captured on CUDA)

STATIC_SIZES = [2, 3, 4, 5, 17, 127, 128, 129, 300]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dense_max", [1, 2, 8, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_boruvka_rounds_then_dense_step_exact_mst(static, dense_max, dtype, kind, monkeypatch, rng):
    """Both Boruvkas: rounds, then the dense step, at several hand-over points (1: rounds
    only; 128: the default, where n <= 128 is the dense step alone)."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", dense_max)
    for n in STATIC_SIZES:
        D = make_D(kind, n, dtype, rng)
        X = D.clone()
        e = boruvka_static.boruvka_edges_static(X) if static else torch_mst.boruvka_edges(X)
        assert_spanning_tree(e, n)
        got = np.sort(D[e[:, 0], e[:, 1]].double().numpy())
        np.testing.assert_allclose(got, scipy_deaths(D), rtol=0, atol=tolerance("torch", D))
        if static:  # documented: overwritten
            assert torch.equal(X.diagonal(), torch.full((n,), float("inf"), dtype=dtype))
        else:
            assert torch.equal(X, D)


@pytest.mark.parametrize("dense_max", [1, 128])
@pytest.mark.parametrize("n", [2, 3, 17, 300])
def test_boruvka_unique_mst_is_scipys(dense_max, n, monkeypatch, rng):
    monkeypatch.setattr(boruvka, "DENSE_MAX", dense_max)
    D = distinct_weights_D(n, torch.float32, rng)
    for fn in [boruvka_static.boruvka_edges_static, torch_mst.boruvka_edges]:
        e = fn(D.clone())
        assert {(min(i, j), max(i, j)) for i, j in e.tolist()} == scipy_tree_edges(D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_static_boruvka_rounds_pick_the_dynamic_ones(dtype, kind, monkeypatch, rng):
    """Same tie-breaking, same labels: with rounds only (no dense step), the static kernel
    returns the dynamic Boruvka's tree, ties included."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", 1)
    for n in [2, 17, 300]:
        D = make_D(kind, n, dtype, rng)
        static = {tuple(r) for r in boruvka_static.boruvka_edges_static(D.clone()).tolist()}
        assert static == {tuple(r) for r in torch_mst.boruvka_edges(D).tolist()}


@pytest.mark.parametrize("kind", KINDS)
def test_static_boruvka_blocked_searches_same_tree(kind, monkeypatch, rng):
    D = make_D(kind, 300, torch.float32, rng)
    monkeypatch.setattr(boruvka, "DENSE_MAX", 4)
    whole = boruvka_static.boruvka_edges_static(D.clone())
    monkeypatch.setattr(boruvka, "_BLOCK_ENTRIES", 700)  # blocks of 2 rows
    monkeypatch.setattr(boruvka, "_SMALL_SEARCH", 0)
    assert torch.equal(boruvka_static.boruvka_edges_static(D.clone()), whole)


@pytest.mark.parametrize("n", [9, 100, 129])
def test_static_boruvka_one_long_chain(n, monkeypatch):
    """A chain of depth n - 1 in one round: the fixed ceil(log2 c) jumps must reach its root."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", 1)
    e = boruvka_static.boruvka_edges_static(line_points_D(n))
    assert {(min(i, j), max(i, j)) for i, j in e.tolist()} == {(i, i + 1) for i in range(n - 1)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense_max", [1, 128])
def test_static_boruvka_tree_whole_after_round_one(dtype, dense_max, monkeypatch):
    """A hub nearest to everyone: one round joins all, and every later round (and the
    dense step) sees a single component among padding slots; it must keep nothing more
    (float64 keys are ranks, in which inf is one more value: its picks must not count)."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", dense_max)
    kept = []

    def counting(reps, others, keeps, n):
        kept.append(int(torch.cat(keeps).sum()))
        return boruvka._kept_edges(reps, others, keeps, n)

    monkeypatch.setattr(boruvka_static, "_kept_edges", counting)
    n = 300
    D = torch.ones(n, n, dtype=dtype)
    D[0, :] = D[:, 0] = 0.25
    D.fill_diagonal_(0)
    e = boruvka_static.boruvka_edges_static(D.clone())
    assert {(min(i, j), max(i, j)) for i, j in e.tolist()} == {(0, j) for j in range(1, n)}
    assert kept == [n - 1]


@pytest.mark.parametrize("n", [2, 5, 128, 129, 1000, 65536])
def test_static_boruvka_has_no_data_dependent_shape(n):
    """On the meta device there is no data: an .item(), a nonzero, a boolean mask or a
    unique would raise. The static Boruvka runs there, which is what CUDA graph capture
    needs; the dynamic one (a sync per round) does not, the control that the check bites."""
    M = torch.empty(n, n, device="meta")
    e = boruvka_static.boruvka_edges_static(M)
    assert e.device.type == "meta" and tuple(e.shape) == (n - 1, 2) and e.dtype == torch.long
    if n <= 1000:
        with pytest.raises((RuntimeError, NotImplementedError)):
            boruvka.boruvka_edges(torch.empty(n, n, device="meta"))


# what torch.use_deterministic_algorithms reroutes on CUDA through a sorting kernel (slower;
# in older torch, with a host sync that breaks graph capture) or refuses
DETERMINISTIC_REROUTED = {"index_put", "index_put_", "_index_put_impl_", "scatter", "scatter_", "scatter_add",
                          "scatter_add_", "index_add", "index_add_", "index_copy", "index_copy_", "put", "put_"}


@pytest.mark.parametrize("n", [100, 300])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_boruvka_kernels_avoid_what_deterministic_mode_reroutes(n, static, rng, dispatched_ops):
    """Training runs under deterministic algorithms, and torch-graph captures there: every
    scatter must be an exact min or max, and no index_put_ (CPU sees the same operators)."""
    D = make_D("tied", n, torch.float32, rng)
    fn = boruvka_static.boruvka_edges_static if static else torch_mst.boruvka_edges
    ops = dispatched_ops(lambda: fn(D.clone()))
    assert not {name for name, _ in ops} & DETERMINISTIC_REROUTED
    reductions = {reduce for name, reduce in ops if name.startswith("scatter_reduce")}
    assert reductions <= {"amin", "amax"}
    assert bool(reductions) == (n > boruvka.DENSE_MAX)  # the rounds contract by scatter_reduce_


@pytest.mark.parametrize("case", ["one-ulp cycle", "asymmetric correlation", "inf block", "all inf", "nan"])
def test_static_boruvka_bad_unchecked_input_stays_in_range(case, monkeypatch, rng):
    """With check=False a bad matrix gives unspecified edges, but never an index out of range
    (on CUDA that would be a device-side assert) and never a hang."""
    n = 200 if case == "asymmetric correlation" else 6
    if case == "asymmetric correlation":
        A = rng.standard_normal((64, n))
        D = torch.from_numpy(1 - np.abs(np.corrcoef(A.T))).float().clamp(min=0)
    elif case == "one-ulp cycle":
        D = torch.full((n, n), 1.0)
        up = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
        D[2, 0] = D[0, 1] = D[1, 2] = up
    else:
        D = torch.full((n, n), float("nan" if case == "nan" else "inf"))
        if case == "inf block":
            D[:3, :3] = D[3:, 3:] = 0.5
    D.fill_diagonal_(0)
    for dense_max in [1, 128]:
        monkeypatch.setattr(boruvka, "DENSE_MAX", dense_max)
        e = boruvka_static.boruvka_edges_static(D.clone())
        assert tuple(e.shape) == (n - 1, 2) and bool(((e >= 0) & (e < n)).all())


def test_static_boruvka_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="2 <= n"):
        boruvka_static.boruvka_edges_static(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        boruvka_static.boruvka_edges_static(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="2 <= n <= 65536"):
        boruvka_static.boruvka_edges_static(torch.empty(65537, 65537, device="meta"))
    with pytest.raises(ValueError, match="float32 or float64"):
        boruvka_static.boruvka_edges_static(torch.zeros(3, 3, dtype=torch.int32))


def test_static_bounds_halve_down_to_the_dense_step():
    assert boruvka_static.static_bounds(8192) == [8192, 4096, 2048, 1024, 512, 256, 128]
    assert boruvka_static.static_bounds(129) == [129, 64]
    assert boruvka_static.static_bounds(128) == [128]
    assert boruvka_static.static_bounds(2) == [2]


def test_canonical_order_hand_computed():
    D = torch.tensor(
        [[0.0, 0.5, 0.2, 0.5],
         [0.5, 0.0, 0.5, 0.1],
         [0.2, 0.5, 0.0, 0.5],
         [0.5, 0.1, 0.5, 0.0]]
    )
    edges = torch.tensor([[3, 2], [2, 0], [1, 3]])
    assert ph.canonical_order(D, edges).tolist() == [[1, 3], [0, 2], [2, 3]]


@pytest.mark.parametrize("order", [ph.canonical_order, ph._canonical_order_torch, ph._canonical_order_numpy])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_canonical_order_against_sorted(order, dtype, rng):
    """Random edges with many tied weights (and -0.0 against 0.0), either orientation:
    Python's sorted by (weight, i, j), on the NumPy path (CPU float32/float64) and
    on the torch path (CUDA, and half precision)."""
    if order is ph._canonical_order_numpy and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the NumPy path takes float32/float64 only")
    n = 40
    X = rng.integers(0, 4, size=(n, n)).astype(np.float64) / 4
    X = np.minimum(X, X.T)
    X[X == 0] = -0.0  # compares equal to 0.0: ties are broken by (i, j) all the same
    np.fill_diagonal(X, 0)
    D = torch.from_numpy(X).to(dtype)
    pairs = rng.choice(n * n, size=150, replace=False)
    edges = np.stack([pairs // n, pairs % n], axis=1)
    edges = torch.from_numpy(edges[edges[:, 0] != edges[:, 1]])
    expected = sorted((float(D[i, j]), min(i, j), max(i, j)) for i, j in edges.tolist())
    got = order(D, edges)
    assert got.dtype == torch.long
    assert got.tolist() == [[i, j] for _, i, j in expected]


# ----------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("fn", edge_functions())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(fn, dtype, kind, rng):
    D = make_D(kind, 120, dtype, rng)
    first = fn(D)
    assert torch.equal(fn(D), first)
    # the same numbers in other memory (a copy, a transposed view) give the same edges
    assert torch.equal(fn(D.clone()), first)
    assert torch.equal(fn(D.T), first)
    assert torch.equal(fn(D.T.contiguous()), first)


@pytest.mark.parametrize("fn", edge_functions())
def test_deterministic_all_ties(fn):
    # every weight equal, and every weight 0: any spanning tree is minimal, the pick must be fixed
    for value in [0.0, 0.5]:
        D = torch.full((25, 25), value)
        D.fill_diagonal_(0.0)
        first = fn(D)
        assert_spanning_tree(first, 25)
        for _ in range(3):
            assert torch.equal(fn(D.clone()), first)


# ----------------------------------------------------------------------------
# gradient


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "tied", "constant"])
def test_gradient_is_one_on_the_tree(backend, dtype, kind, rng):
    D = make_D(kind, 30, dtype, rng).requires_grad_(True)
    d = ph.deaths(D, backend=backend)
    assert d.requires_grad
    weights = torch.from_numpy(rng.random(29)).to(dtype)
    (d * weights).sum().backward()
    e = ph.death_edges(D, backend=backend)
    expected = torch.zeros_like(D)
    expected[e[:, 0], e[:, 1]] = weights
    assert torch.equal(D.grad, expected)
    assert (D.grad != 0).sum() <= 29


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_t1_gradcheck_through_the_pipeline(backend, rng):
    """T1(deaths(abs_correlation(A))) against central finite differences (the MST is unique here)."""
    A = torch.from_numpy(rng.standard_normal((12, 7))).requires_grad_(True)

    def f(X):
        return tn.regularisers.t1(ph.deaths(tn.dissimilarity.abs_correlation(X), backend=backend))

    assert torch.autograd.gradcheck(f, (A,), eps=1e-6, atol=1e-6)


def test_ripser_returns_values_without_grad(rng):
    D = make_D("random", 20, torch.float64, rng).requires_grad_(True)
    d = ph.deaths(D, backend="ripser")
    assert not d.requires_grad and d.grad_fn is None
    assert d.dtype == D.dtype
    with pytest.raises(ValueError, match=r"'ripser'.*values only.*torch"):
        ph.death_edges(D, backend="ripser")


def test_default_backend_is_torch(rng, monkeypatch):
    D = make_D("tied", 50, torch.float32, rng)
    assert torch.equal(ph.death_edges(D), ph.death_edges(D, backend="torch"))
    assert torch.equal(ph.deaths(D), ph.deaths(D, backend="torch"))
    # on CPU "torch" and "numba" run the same Prim, so equal edges cannot tell them apart: a spy can
    called = []
    for name in EDGE_BACKENDS:
        plugin = ph.BACKENDS[name].load()
        monkeypatch.setattr(plugin, "death_edges", lambda X, f=plugin.death_edges, name=name: (called.append(name), f(X))[1])
    ph.deaths(D)
    ph.death_edges(D)
    assert called == ["torch", "torch"]


# ----------------------------------------------------------------------------
# larger cases


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def large_random(request):
    """(D, SciPy deaths) for a random n = 3000 matrix, built once per dtype."""
    D = make_D("random", 3000, request.param, np.random.default_rng(3000))
    return D, scipy_deaths(D)


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def large_tied(request):
    """(D, SciPy deaths) for n = 1000 with every weight in {0.1, 0.2, 0.3}, built once per dtype."""
    X = symmetric(np.random.default_rng(1000).choice([0.1, 0.2, 0.3], size=(1000, 1000)))
    D = torch.from_numpy(X).to(request.param)
    return D, scipy_deaths(D)


@pytest.mark.slow
@pytest.mark.parametrize("fn", edge_functions())
def test_large_random(fn, large_random):
    D, ref = large_random
    e = fn(D)
    assert_spanning_tree(e, 3000)
    np.testing.assert_allclose(np.sort(D[e[:, 0], e[:, 1]].double().numpy()), ref, rtol=0, atol=tolerance("giotto-ph", D))


@pytest.mark.slow
@pytest.mark.parametrize("fn", edge_functions())
def test_large_tie_heavy(fn, large_tied):
    D, ref = large_tied
    e = fn(D)
    assert_spanning_tree(e, 1000)
    # weights from a 3-value set: the sorted tree weights equal SciPy's exactly (up to the +1 trick)
    np.testing.assert_allclose(np.sort(D[e[:, 0], e[:, 1]].double().numpy()), ref, rtol=0, atol=1e-12)
    assert torch.equal(fn(D), e), "not deterministic"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_random_all_backends(backend, large_random):
    D, ref = large_random
    d = ph.deaths(D, backend=backend)
    assert bool((d[1:] >= d[:-1]).all())
    np.testing.assert_allclose(d.double().numpy(), ref, rtol=0, atol=tolerance(backend, D))


# ----------------------------------------------------------------------------
# CUDA (skipped without a device; n = 3000 is also marked slow)

CUDA_SIZES = [2, 3, 17, 300, pytest.param(3000, marks=pytest.mark.slow)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "tied", "duplicated", "constant"])
@pytest.mark.parametrize("n", CUDA_SIZES)
def test_cuda_matches_cpu_and_scipy(dtype, kind, n, rng):
    D = make_D(kind, n, dtype, rng)
    Dc = D.cuda()
    ref = scipy_deaths(D)
    cpu_deaths = ph.deaths(D, backend="torch")
    for b in EDGE_BACKENDS:
        e = ph.death_edges(Dc, backend=b)
        assert e.device == Dc.device and e.dtype == torch.long
        assert_spanning_tree(e, n)
        assert bool((e[:, 0] < e[:, 1]).all())
        d = ph.deaths(Dc, backend=b)
        assert d.device == Dc.device and d.dtype == dtype
        assert torch.equal(Dc[e[:, 0], e[:, 1]], d)
        np.testing.assert_allclose(d.double().cpu().numpy(), ref, rtol=0, atol=tolerance(b, D))
        if b in EXACT_BACKENDS:  # exact on both devices: bit-identical deaths
            assert torch.equal(d.cpu(), cpu_deaths)
        assert torch.equal(ph.death_edges(Dc, backend=b), e), "not deterministic on CUDA"
    if "ripser" in BACKENDS:
        d = ph.deaths(Dc, backend="ripser")
        assert d.device == Dc.device
        np.testing.assert_allclose(d.double().cpu().numpy(), ref, rtol=0, atol=tolerance("ripser", D))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "tied", "duplicated"])
@pytest.mark.parametrize("n", CUDA_SIZES)
def test_cuda_boruvka_kernel(dtype, kind, n, rng):
    D = make_D(kind, n, dtype, rng)
    e = torch_mst.boruvka_edges(D.cuda())
    assert e.is_cuda
    assert_spanning_tree(e, n)
    assert torch.equal(torch.sort(D.cuda()[e[:, 0], e[:, 1]]).values.cpu(), ph.deaths(D, backend="torch"))
    assert torch.equal(torch_mst.boruvka_edges(D.cuda()), e)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_cuda_gradient_stays_on_device(backend, rng):
    A = torch.from_numpy(rng.standard_normal((64, 40))).float()
    A[:, 3] = 0.0  # a dead neuron
    A = A.cuda().requires_grad_(True)
    T1 = tn.regularisers.t1(ph.deaths(tn.dissimilarity.abs_correlation(A), backend=backend))
    assert T1.is_cuda
    T1.backward()
    assert A.grad.is_cuda and torch.isfinite(A.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["boruvka_edges", "death_edges[torch]"])
def test_cuda_negative_zero_entries(name, rng):
    kernel = torch_mst.boruvka_edges if name == "boruvka_edges" else ph.death_edges

    def on_cuda(D):
        e = kernel(D.cuda())
        assert e.is_cuda
        return e.cpu()

    test_negative_zero_entries(on_cuda, rng)



@pytest.mark.cuda
def test_cuda_boruvka_under_deterministic_algorithms(rng):
    """Every reduction Boruvka uses is a minimum (order-independent); none may be one that
    torch.use_deterministic_algorithms(True) refuses on CUDA (index_reduce_ is)."""
    D = make_D("tied", 300, torch.float32, rng)
    expected = torch_mst.boruvka_edges(D.cuda())
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(torch_mst.boruvka_edges(D.cuda()), expected)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.cuda
def test_cuda_slightly_asymmetric_and_inconsistent_input(rng):
    D = rounding_asymmetric(make_D("tied", 150, torch.float32, rng), rng)
    upper = torch.triu(D) + torch.triu(D, 1).T
    d = ph.deaths(D.cuda())
    np.testing.assert_allclose(d.double().cpu().numpy(), scipy_deaths(upper), rtol=0, atol=1e-12)
    bad = torch.full((4, 4), float("inf"))
    bad.fill_diagonal_(0)
    with pytest.raises(ValueError, match="exactly symmetric matrix of finite weights"):
        torch_mst.boruvka_edges(bad.cuda())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 129, 300, pytest.param(3000, marks=pytest.mark.slow)])
def test_cuda_graph_replays_the_static_boruvka(kind, n, rng):
    cuda_graph.clear()
    D = make_D(kind, n, torch.float32, rng).cuda()
    first = cuda_graph.death_edges(D)  # captures, then replays
    assert first.is_cuda
    assert_spanning_tree(first, n)
    key = (torch.cuda.current_device(), n)
    graph = cuda_graph._graphs[key]
    assert graph is not None, "the capture failed and the backend fell back"
    assert torch.equal(first, boruvka_static.boruvka_edges_static(D.clone()))  # the eager kernels, same edges
    D2 = make_D(kind, n, torch.float32, rng).cuda()
    second = cuda_graph.death_edges(D2)
    assert cuda_graph._graphs[key] is graph  # replayed, not captured again
    assert torch.equal(first, boruvka_static.boruvka_edges_static(D.clone())), "the result aliases the graph's buffer"
    assert torch.equal(second, boruvka_static.boruvka_edges_static(D2.clone()))
    d = ph.deaths(D2, backend="torch-graph")
    np.testing.assert_allclose(d.double().cpu().numpy(), scipy_deaths(D2.cpu()), rtol=0, atol=1e-12)
    assert torch.equal(d.cpu(), ph.deaths(D2.cpu(), backend="torch"))


@pytest.mark.cuda
def test_cuda_graph_cache_keeps_the_latest_sizes(rng):
    cuda_graph.clear()
    dev = torch.cuda.current_device()
    for n in [10, 20, 30]:
        cuda_graph.death_edges(make_D("random", n, torch.float32, rng).cuda())
    assert list(cuda_graph._graphs) == [(dev, n) for n in [10, 20, 30][-cuda_graph.MAX_GRAPHS:]]
    cuda_graph.clear()
    assert not cuda_graph._graphs


@pytest.mark.cuda
def test_cuda_graph_capture_failure_falls_back_once(monkeypatch, rng):
    cuda_graph.clear()

    def refuse(n, device, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "_Captured", refuse)
    D = make_D("tied", 50, torch.float32, rng).cuda()
    with pytest.warns(RuntimeWarning, match="capture failed.*RuntimeError: operation not permitted"):
        e = cuda_graph.death_edges(D)
    assert torch.equal(e, torch_mst.boruvka_edges(D))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cuda_graph.death_edges(D), e)  # remembered: no second warning
    cuda_graph.clear()


@pytest.mark.cuda
def test_cuda_graph_float64_and_deterministic_mode(rng):
    D = make_D("tied", 200, torch.float64, rng).cuda()
    assert torch.equal(cuda_graph.death_edges(D), torch_mst.boruvka_edges(D))  # float64 is not captured
    cuda_graph.clear()
    D32 = D.float()
    expected = cuda_graph.death_edges(D32)
    cuda_graph.clear()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # how training runs
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a capture that fell back would warn
            assert torch.equal(cuda_graph.death_edges(D32), expected)
        assert cuda_graph._graphs[(torch.cuda.current_device(), 200)] is not None
    finally:
        torch.use_deterministic_algorithms(before)
        cuda_graph.clear()


@pytest.mark.cuda
def test_cuda_graph_failed_capture_restores_the_callers_stream(monkeypatch, rng):
    """A sync inside the capture invalidates it and capture_end raises before torch.cuda.graph
    restores the stream: the backend must put the caller's stream back and fall back."""
    cuda_graph.clear()
    real = boruvka_static.boruvka_edges_static

    def syncing(X):
        if torch.cuda.is_current_stream_capturing():
            X.sum().item()  # not permitted while capturing
        return real(X)

    monkeypatch.setattr(cuda_graph, "boruvka_edges_static", syncing)
    D = make_D("random", 60, torch.float32, rng).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with pytest.warns(RuntimeWarning, match="capture failed"):
            e = cuda_graph.death_edges(D)
        assert torch.cuda.current_stream() == stream
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.equal(e, torch_mst.boruvka_edges(D))
    # torch <= 2.11 left its allocator "capturing" after such a failure (pytorch#180395): memory
    # used on two streams was then never reclaimed, and empty_cache() broke later captures
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    active = torch.cuda.memory_stats()["active_bytes.all.current"]
    with torch.cuda.stream(s1):
        x = torch.empty(1 << 20, device="cuda")
        x.record_stream(s2)
        del x
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # an allocation processes the finished cross-stream frees
    assert torch.cuda.memory_stats()["active_bytes.all.current"] == active
    torch.cuda.empty_cache()
    cuda_graph.clear()


@pytest.mark.cuda
def test_cuda_graph_inside_the_callers_capture(rng):
    """Called while the caller captures its own graph (a captured training step), the static
    Boruvka becomes part of that graph: replaying it with new values gives their deaths."""
    cuda_graph.clear()
    n = 300
    static_D = make_D("random", n, torch.float32, rng).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ph.deaths(static_D, backend="torch-graph", check=False)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ph.deaths(static_D, backend="torch-graph", check=False)
    for kind in KINDS:
        D = make_D(kind, n, torch.float32, rng)
        static_D.copy_(D.cuda())
        graph.replay()
        np.testing.assert_allclose(out.double().cpu().numpy(), scipy_deaths(D), rtol=0, atol=1e-12)
    # a whole regulariser step: correlation, MST, T1, backward, captured as one graph
    A = torch.randn(64, n, device="cuda", requires_grad=True)
    with torch.cuda.stream(side):
        tn.regularisers.t1(ph.deaths(tn.dissimilarity.abs_correlation(A, check=False), backend="torch-graph",
                                     check=False)).backward()
    torch.cuda.current_stream().wait_stream(side)
    A.grad = None
    step = torch.cuda.CUDAGraph()
    with torch.cuda.graph(step):
        # check=False: validating A and D needs host syncs, which a capture does not allow
        A.grad = torch.autograd.grad(tn.regularisers.t1(ph.deaths(tn.dissimilarity.abs_correlation(A, check=False),
                                                                  backend="torch-graph", check=False)), A)[0]
    for _ in range(2):
        with torch.no_grad():
            A.copy_(torch.randn(64, n, device="cuda"))
        step.replay()
        B = A.detach().cpu().double().requires_grad_()
        expected = torch.autograd.grad(tn.regularisers.t1(ph.deaths(tn.dissimilarity.abs_correlation(B),
                                                                    backend="torch")), B)[0]
        torch.testing.assert_close(A.grad.cpu().double(), expected, rtol=1e-3, atol=1e-4)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        with pytest.raises(ValueError, match="inside a CUDA graph capture needs float32"):
            cuda_graph.death_edges(static_D.double())
        # the default check=True would sync: a clear error, and the capture stays valid
        with pytest.raises(ValueError, match="cannot be checked inside a CUDA graph capture"):
            ph.deaths(static_D, backend="torch-graph")
        with pytest.raises(ValueError, match="cannot be checked inside a CUDA graph capture"):
            tn.dissimilarity.abs_correlation(A.detach())
    cuda_graph.clear()


@pytest.mark.cuda
def test_cuda_graph_replays_from_two_streams_do_not_race(rng):
    """The graph's input buffer is shared: a replay on another stream must wait for the
    previous one, or it overwrites the input while it is read."""
    cuda_graph.clear()
    n = 2000
    Ds = [make_D(kind, n, torch.float32, rng).cuda() for kind in ["random", "tied", "random", "duplicated"]]
    expected = [boruvka_static.boruvka_edges_static(D.clone()) for D in Ds]
    torch.cuda.synchronize()  # the inputs are ready for the side streams
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got = []
    for i, D in enumerate(Ds):
        with torch.cuda.stream(streams[i % 2]):
            torch.cuda._sleep(1_000_000)  # keep the stream busy, so that replays would overlap
            got.append(cuda_graph.death_edges(D))
    torch.cuda.synchronize()
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    cuda_graph.clear()


class _FakeGraph:
    def __init__(self, key, released):
        self.key, self.released = key, released

    def release(self):
        self.released.append(self.key)


@pytest.fixture
def fresh_graph_cache(monkeypatch):
    from collections import OrderedDict

    monkeypatch.setattr(cuda_graph, "_graphs", OrderedDict())
    monkeypatch.setattr(cuda_graph, "_dropped", set())
    monkeypatch.setattr(cuda_graph, "_warned_recapture", False)


def test_graph_cache_keeps_the_latest_and_releases_the_rest(fresh_graph_cache, monkeypatch):
    released, captured = [], []

    def capture(key):
        captured.append(key)
        return _FakeGraph(key, released)

    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 2)
    for key in [(0, 10), (0, 20), (0, 10), (0, 30)]:  # n = 10 is used again before 30: 20 is the oldest
        assert cuda_graph._cached(key, lambda: capture(key)).key == key
    assert captured == [(0, 10), (0, 20), (0, 30)] and released == [(0, 20)]
    assert list(cuda_graph._graphs) == [(0, 10), (0, 30)]
    with pytest.warns(RuntimeWarning, match="raise toponeuro.persistence.cuda_graph.MAX_GRAPHS"):
        cuda_graph._cached((0, 20), lambda: capture((0, 20)))  # dropped, then wanted again: thrashing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_graph._cached((0, 10), lambda: capture((0, 10)))  # warned once per process
    cuda_graph.clear()
    assert not cuda_graph._graphs and not cuda_graph._dropped
    assert sorted(released) == [(0, 10), (0, 10), (0, 20), (0, 20), (0, 30)]


@pytest.mark.parametrize("max_graphs", [0, -1, 1])
def test_graph_cache_keeps_at_least_one(max_graphs, fresh_graph_cache, monkeypatch):
    released = []
    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", max_graphs)
    for key in [(0, 10), (0, 20)]:
        cuda_graph._cached(key, lambda: _FakeGraph(key, released))
    assert list(cuda_graph._graphs) == [(0, 20)] and released == [(0, 10)]


def test_graph_cache_remembers_a_failed_capture(fresh_graph_cache):
    calls = []

    def failing():
        calls.append(1)
        return None

    assert cuda_graph._cached((0, 10), failing) is None
    assert cuda_graph._cached((0, 10), failing) is None
    assert calls == [1]


def test_graph_cache_forgets_a_capture_that_ran_out_of_memory(fresh_graph_cache):
    """Out of memory is transient: the fallback runs this time and the next call captures."""
    answers = [cuda_graph._RETRY, _FakeGraph((0, 10), [])]

    def capture():
        return answers.pop(0)

    assert cuda_graph._cached((0, 10), capture) is None
    assert (0, 10) not in cuda_graph._graphs
    assert cuda_graph._cached((0, 10), capture).key == (0, 10)
    assert not answers


def _raised(inner: BaseException | None, outer: BaseException) -> BaseException:
    try:
        try:
            if inner is not None:
                raise inner
        finally:
            raise outer
    except BaseException as err:
        return err


@pytest.mark.parametrize("err, oom", [
    (_raised(None, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")), True),
    (_raised(None, RuntimeError("CUDA error: out of memory")), True),
    # an allocation inside the capture, then capture_end's own error on top of it
    (_raised(torch.cuda.OutOfMemoryError("Tried to allocate"), RuntimeError("CUDA error: operation failed due to a previous error during capture")), True),
    (_raised(RuntimeError("operation not permitted when stream is capturing"), RuntimeError("capture invalidated")), False),
    (_raised(None, ValueError("weights it cannot order")), False),
])
def test_out_of_memory_is_recognised_behind_capture_ends_error(err, oom):
    """Only out of memory is retried (:data:`cuda_graph._RETRY`); it may be the context of another error."""
    assert cuda_graph._ran_out_of_memory(err) is oom


def test_dense_step_rejects_an_asymmetry_its_component_weights_hide(monkeypatch):
    """C (lightest edges between components) can be symmetric while D is not: the dense
    step's endpoint search then misses, and that must raise, not return a non-tree."""
    monkeypatch.setattr(boruvka, "DENSE_MAX", 4)
    L = 0.95
    D = torch.tensor([[0, .01, .6, .6, .5, .5], [.01, 0, .6, .6, .5, .5], [.6, .6, 0, .01, .10, L],
                      [.6, .6, .01, 0, L, .10], [.5, .5, .15, L, 0, .01], [.5, .5, L, .10, .01, 0]])
    assert not torch.equal(D, D.T)
    with pytest.raises(ValueError, match="exactly symmetric matrix of finite weights"):
        torch_mst.boruvka_edges(D)


@pytest.mark.parametrize("tiny", [1e-46, 5e-324])
def test_giotto_ph_keeps_the_edges_of_float64_entries_below_float32s_range(tiny):
    """giotto-ph computes in float32, where these entries are 0: it reports no pair for them, and
    the zero-edge completion must see them as 0 too, or a tree edge goes missing."""
    if "giotto-ph" not in ph.available_backends():
        pytest.skip("giotto-ph is not installed")
    D = torch.tensor([[0, tiny, .5, .6], [tiny, 0, .3, .7], [.5, .3, 0, .4], [.6, .7, .4, 0]], dtype=torch.float64)
    e = ph.death_edges(D, backend="giotto-ph")
    assert_spanning_tree(e, 4)
    torch.testing.assert_close(ph.deaths(D, backend="giotto-ph"), ph.deaths(D, backend="torch"), rtol=0, atol=0)


_D4 = torch.tensor([[0., .1, .2, .3], [.1, 0., .4, .5], [.2, .4, 0., .6], [.3, .5, .6, 0.]])


def test_a_backend_that_returns_too_few_edges_is_refused(monkeypatch):
    """The deaths are gathered at the backend's edges: too few edges would give a silently wrong T1."""
    monkeypatch.setattr(ph.BACKENDS["torch"].load(), "death_edges", lambda X: torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match=r"backend 'torch' returned edges of shape \(1, 2\).*\(3, 2\)"):
        ph.deaths(_D4)


@pytest.mark.parametrize("edges, what", [
    ([[0, 1], [0, 1], [0, 1]], "leave 3 components"),    # n - 1 edges, but the same one
    ([[0, 1], [1, 2], [0, 2]], "leave 2 components"),    # a cycle: vertex 3 left out
    ([[0, 1], [1, 2], [2, 7]], "outside \\[0, 4\\)"),
])
def test_a_plugin_whose_edges_do_not_span_is_refused(monkeypatch, edges, what):
    """A plug-in backend (not one of the tree-by-construction kernels) is checked to span."""
    import sys
    import types

    from toponeuro.persistence import Backend

    plugin = types.ModuleType("fake_persistence_plugin")
    plugin.death_edges = lambda X: torch.tensor(edges)
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    monkeypatch.setitem(ph.BACKENDS, "fake", Backend("fake", plugin.__name__, ("torch",), True))
    with pytest.raises(RuntimeError, match=f"backend 'fake' returned .*{what}"):
        ph.deaths(_D4, backend="fake")
    plugin.death_edges = lambda X: torch.tensor([[0, 1], [0, 2], [0, 3]])  # a star: spans, accepted
    torch.testing.assert_close(ph.deaths(_D4, backend="fake"), torch.tensor([.1, .2, .3]))


# ----------------------------------------------------------------------------
# the boundary: what check=False still refuses, meta tensors, plug-ins, float32 backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D, what", [
    (torch.zeros(2, 2, 4, 4), "square"),  # a stack (B, n, n) is accepted: tests/test_persistence_batched.py
    (torch.zeros(3, 4), "square"),
    (torch.zeros(1, 1), "1 x 1"),
    (torch.zeros(0, 0), "0 x 0"),
    (torch.zeros(4, 4, dtype=torch.int64), "floating-point"),
], ids=["4-d", "rectangular", "1x1", "0x0", "int64"])
def test_check_false_still_refuses_a_wrong_shape_or_dtype(backend, D, what):
    """check=False skips the pass over the values, not the O(1) form check: without it
    a 1 x 1 matrix gave an empty result and a batched one a numba typing error."""
    with pytest.raises(ValueError, match=what):
        ph.deaths(D, backend=backend, check=False)


def test_check_false_accepts_an_array(rng):
    X = make_D("random", 6, torch.float64, rng).numpy()
    ref = ph.deaths(torch.from_numpy(X))
    assert torch.equal(ph.deaths(X, check=False), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_get_a_value_error(backend):
    M = torch.empty(10, 10, device="meta")
    with pytest.raises(ValueError, match="'meta' device.*check=False"):
        ph.deaths(M, backend=backend)
    if backend == "torch-graph":  # no data-dependent shapes: it runs on meta
        assert ph.deaths(M, backend=backend, check=False).shape == (9,)
    else:
        with pytest.raises(ValueError, match="'meta' device.*torch-graph"):
            ph.deaths(M, backend=backend, check=False)


def test_a_plugin_whose_module_does_not_import_is_not_available(monkeypatch):
    from toponeuro.persistence import Backend

    monkeypatch.setitem(ph.BACKENDS, "typo", Backend("typo", "toponeuro.persistence.no_such_module", ("torch",), True))
    assert "typo" not in ph.available_backends()
    with pytest.raises(ValueError, match="'typo' is not installed.*no_such_module"):
        ph.deaths(_D4, backend="typo")


@pytest.mark.parametrize("backend", sorted({"giotto-ph", "ripser"} & set(BACKENDS)))
def test_float32_backends_refuse_float64_beyond_float32_range(backend):
    """ripser dropped the death that float32 turns into inf and padded a zero in its place."""
    D = torch.tensor([[0, 1, 5e38], [1, 0, 6e38], [5e38, 6e38, 0]], dtype=torch.float64)
    assert ph.deaths(D, backend="torch").tolist() == [1.0, 5e38]  # exact backends need no float32
    with pytest.raises(ValueError, match=f"{backend}.*float32.*rescale"):
        ph.deaths(D, backend=backend)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_the_gradient_lands_on_the_upper_triangle(backend, rng):
    """As documented: each death reads D[i, j], i < j; the gradient of a symmetric
    parametrisation is the chain rule through both triangles (checked by central
    differences elsewhere), here the raw D leaf."""
    D = make_D("random", 8, torch.float64, rng).requires_grad_(True)
    (g,) = torch.autograd.grad(ph.deaths(D, backend=backend).sum(), D)
    e = ph.death_edges(D.detach(), backend=backend)
    expected = torch.zeros_like(g)
    expected[e[:, 0], e[:, 1]] = 1
    assert torch.equal(g, expected) and bool((e[:, 0] < e[:, 1]).all())
