"""Bad input raises ValueError with a message that names the problem (never a silent NaN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import toponeuro as tn
from toponeuro import persistence as ph
from toponeuro import regularisers as R
from toponeuro._validation import check_activations, check_dissimilarity

DISSIMILARITY_NAMES = ["abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho", "euclidean"]

# every public function that takes activations
ACTIVATION_FUNCTIONS = [pytest.param(check_activations, id="check_activations")] + [
    pytest.param(tn.dissimilarity.get(name), id=name) for name in DISSIMILARITY_NAMES
] + [
    pytest.param(tn.dissimilarity.correlation, id="correlation"),
    pytest.param(R.min_corr, id="min_corr"),
    pytest.param(R.decov, id="decov"),
]


def _d_functions():
    fns = [pytest.param(check_dissimilarity, id="check_dissimilarity")]
    for b in ph.available_backends():
        fns.append(pytest.param(lambda D, b=b: ph.deaths(D, backend=b), id=f"deaths[{b}]"))
        if ph.BACKENDS[b].gives_edges:
            fns.append(pytest.param(lambda D, b=b: ph.death_edges(D, backend=b), id=f"death_edges[{b}]"))
    return fns


D_FUNCTIONS = _d_functions()


def good_A(m=10, n=4, dtype=torch.float32):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=dtype)


def good_D(n=5, dtype=torch.float32):
    D = tn.dissimilarity.abs_correlation(good_A(20, n, torch.float64)).to(dtype)
    assert torch.equal(D, D.T)
    return D


# ----------------------------------------------------------------------------
# activations


@pytest.mark.parametrize("fn", ACTIVATION_FUNCTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activations_non_finite(fn, bad, dtype):
    A = good_A(dtype=dtype)
    A[3, 2] = bad
    with pytest.raises(ValueError, match=r"activations contains NaN or inf \(first at index \(3, 2\)\)"):
        fn(A)


@pytest.mark.parametrize("fn", ACTIVATION_FUNCTIONS)
@pytest.mark.parametrize("m", [0, 1])
def test_activations_too_few_samples(fn, m):
    with pytest.raises(ValueError, match=rf"has {m} sample\(s\).*at least 2 samples"):
        fn(torch.ones(m, 4))


@pytest.mark.parametrize("fn", ACTIVATION_FUNCTIONS)
@pytest.mark.parametrize("n", [0, 1])
def test_activations_too_few_neurons(fn, n):
    with pytest.raises(ValueError, match=rf"has {n} neuron\(s\).*at least 2 neurons"):
        fn(torch.randn(8, n))


@pytest.mark.parametrize("fn", ACTIVATION_FUNCTIONS)
@pytest.mark.parametrize("shape", [(10,), (4, 3, 5), (2, 3, 4, 4), ()])
def test_activations_wrong_rank(fn, shape):
    if len(shape) == 3 and fn in (*tn.dissimilarity.DISSIMILARITIES.values(), tn.dissimilarity.correlation):
        assert fn(torch.randn(shape)).shape == (4, 5, 5)  # a stack: tests/test_persistence_batched.py
        return
    with pytest.raises(ValueError, match=r"2-d \(m samples, n neurons\).*batch first.*flatten"):
        fn(torch.randn(shape))


@pytest.mark.parametrize("fn", ACTIVATION_FUNCTIONS)
def test_activations_integer_tensor(fn):
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.ones(5, 3, dtype=torch.int64))


def test_activations_too_large_to_sum():
    A = torch.full((4, 3), 1e308, dtype=torch.float64)
    A[0, 0] = 0.0
    with pytest.raises(ValueError, match="too large"):
        check_activations(A)


def test_good_activations_pass_unchanged():
    A = good_A()
    assert check_activations(A) is A
    # array-likes are accepted and converted
    out = check_activations(np.arange(6.0).reshape(3, 2))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 2)


# ----------------------------------------------------------------------------
# dissimilarity matrices


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("fn", D_FUNCTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_D_non_finite(fn, bad, dtype):
    D = good_D(dtype=dtype)
    D[1, 3] = D[3, 1] = bad
    with pytest.raises(ValueError, match=r"dissimilarity matrix contains NaN or inf \(first at index \(1, 3\)\)"):
        fn(D)


@pytest.mark.parametrize("fn", D_FUNCTIONS)
@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (5,), (2, 3, 3), ()])
def test_D_not_square(fn, shape):
    if len(shape) == 3 and fn is not check_dissimilarity:  # a stack of 3 x 3 (random: not symmetric)
        with pytest.raises(ValueError, match=r"member 0 of the stack"):
            fn(torch.rand(shape))
        return
    with pytest.raises(ValueError, match=rf"must be square \(n, n\)(, or a stack .*)?; got shape {re_shape(shape)}"):
        fn(torch.rand(shape))


@pytest.mark.parametrize("fn", D_FUNCTIONS)
@pytest.mark.parametrize("n", [0, 1])
def test_D_too_small(fn, n):
    with pytest.raises(ValueError, match=r"at least 2 points"):
        fn(torch.zeros(n, n))


@pytest.mark.parametrize("fn", D_FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_D_asymmetric(fn, dtype):
    D = good_D(dtype=dtype)
    D[0, 2] += 0.01
    with pytest.raises(ValueError, match=r"not symmetric.*D = \(D \+ D\.T\) / 2"):
        fn(D)


@pytest.mark.parametrize("fn", D_FUNCTIONS)
def test_D_negative(fn):
    D = good_D()
    D[1, 2] = D[2, 1] = -0.25
    with pytest.raises(ValueError, match=r"negative entry \(-0\.25\).*>= 0"):
        fn(D)


@pytest.mark.parametrize("fn", D_FUNCTIONS)
@pytest.mark.parametrize("value", [0.5, 1e-7, 1e-30])
def test_D_nonzero_diagonal(fn, value):
    # giotto-ph and ripser.py would read a diagonal as vertex birth times: rejected for every backend
    D = good_D(dtype=torch.float64)
    D[2, 2] = value
    with pytest.raises(ValueError, match=r"non-zero diagonal \(D\[2, 2\] = .*fill_diagonal_\(0\)"):
        fn(D)


@pytest.mark.parametrize("fn", D_FUNCTIONS)
def test_D_integer_tensor(fn):
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.ones(3, 3, dtype=torch.int32) - torch.eye(3, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_D_rounding_level_asymmetry_is_accepted(dtype):
    D = good_D(dtype=dtype)
    eps = torch.finfo(dtype).eps
    D[0, 2] = D[0, 2] + 4 * eps  # a few ulps, as from an unsymmetrised matmul
    assert D[0, 2] != D[2, 0]
    assert check_dissimilarity(D) is D
    ph.deaths(D)  # and the backends run on it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_D_allows_a_few_ulps_of_asymmetry_not_more(dtype):
    """100 epsilons of bfloat16 are 0.78: a clearly asymmetric matrix would pass."""
    D = good_D(dtype=torch.float32)
    D[0, 2] = D[2, 0] = 0.5
    D = D.to(dtype)
    D[0, 2] = 0.5 + torch.finfo(dtype).eps  # two ulps at 0.5
    assert D[0, 2] != D[2, 0]
    assert check_dissimilarity(D) is D
    D[0, 2] = 0.5 + 10 * torch.finfo(dtype).eps  # ten epsilons (at 0.5: five ulps or more)
    with pytest.raises(ValueError, match="not symmetric"):
        check_dissimilarity(D)


def test_D_with_grad_is_validated_without_breaking_autograd():
    D = good_D(dtype=torch.float64).requires_grad_(True)
    ph.deaths(D).sum().backward()
    assert D.grad is not None


# ----------------------------------------------------------------------------
# backends


def test_available_backends_here():
    got = ph.available_backends()
    assert {"torch", "giotto-ph", "ripser"} <= set(got)
    assert all(isinstance(b, str) for b in got)
    assert got == [b for b in ph.BACKENDS if b in got]  # registry order


@pytest.mark.parametrize("call", ["deaths", "death_edges"])
@pytest.mark.parametrize("name", ["nope", "Torch", "gph", ""])
def test_unknown_backend(call, name):
    with pytest.raises(ValueError, match=rf"unknown persistence backend '{name}'.*'torch'.*'giotto-ph'.*'ripser'"):
        getattr(ph, call)(good_D(), backend=name)


@pytest.mark.parametrize("call", ["deaths", "death_edges"])
def test_registered_but_not_installed_backend(call, monkeypatch):
    fake = ph.Backend("fake-mst", "toponeuro.persistence.fake_mst", ("no_such_module_for_toponeuro_tests",), True)
    monkeypatch.setitem(ph.BACKENDS, "fake-mst", fake)
    assert "fake-mst" not in ph.available_backends()
    with pytest.raises(ValueError, match=r"'fake-mst' is not installed.*no_such_module_for_toponeuro_tests.*available here.*'torch'"):
        getattr(ph, call)(good_D(), backend="fake-mst")


def test_installed_backends_still_work_with_a_broken_one_registered(monkeypatch):
    fake = ph.Backend("fake-mst", "toponeuro.persistence.fake_mst", ("no_such_module_for_toponeuro_tests",), True)
    monkeypatch.setitem(ph.BACKENDS, "fake-mst", fake)
    D = good_D()
    assert torch.equal(ph.deaths(D, backend="torch"), ph.deaths(D))


def test_death_edges_with_a_value_only_backend():
    with pytest.raises(ValueError, match=r"'ripser' gives death values only.*'torch'.*'giotto-ph'"):
        ph.death_edges(good_D(), backend="ripser")


# ----------------------------------------------------------------------------
# formula arguments


@pytest.mark.parametrize("fn", [R.t1, R.t2])
@pytest.mark.parametrize(
    "deaths,match",
    [
        (torch.tensor([0.1, float("nan")]), "NaN or inf"),
        (torch.tensor([0.1, float("inf")]), "NaN or inf"),
        (torch.zeros(0), "empty"),
        (torch.zeros(2, 2), "1-d tensor"),
        (torch.tensor(0.5), "1-d tensor"),
        ([0.1, 0.2], "1-d tensor"),
    ],
)
def test_bad_deaths(fn, deaths, match):
    with pytest.raises(ValueError, match=match):
        fn(deaths)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_t2_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        R.t2(torch.tensor([0.1, 0.2]), alpha=alpha)


# ----------------------------------------------------------------------------
# the fused CPU pass over D (min, max, max |D - D.T| at once) and its fallback

from toponeuro import _validation as V  # noqa: E402

needs_fused = pytest.mark.skipif(V.numba is None, reason="the fused CPU pass needs numba")


def _reference_summary(X: np.ndarray) -> tuple[float, float, float]:
    return float(X.min()), float(X.max()), float(np.abs(X - X.T).max())


def _symmetric(rng, n, dtype):
    X = rng.random((n, n)).astype(dtype)
    X = (X + X.T) / 2
    np.fill_diagonal(X, 0)
    return X


# sizes around the band (32 float32 / 16 float64 rows) and block (16 / 8) widths:
# ragged last band, ragged block tail, a single partial band, exact multiples
FUSED_SIZES = {np.float32: [2, 3, 15, 16, 17, 32, 37, 64, 70, 129], np.float64: [2, 7, 8, 9, 16, 21, 33, 45]}


@needs_fused
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_summary_matches_numpy_on_random_matrices(dtype, rng):
    for n in FUSED_SIZES[dtype]:
        X = rng.random((n, n)).astype(dtype) * rng.choice([1e-3, 1.0, 1e3])
        assert V._fused_summary(X) == _reference_summary(X), n  # asymmetric everywhere
        S = _symmetric(rng, n, dtype)
        assert V._fused_summary(S) == _reference_summary(S) and _reference_summary(S)[2] == 0.0, n


@needs_fused
@pytest.mark.parametrize("dtype,n", [(np.float32, 37), (np.float32, 70), (np.float64, 21), (np.float64, 45)])
def test_fused_summary_finds_one_asymmetric_entry_anywhere(dtype, n, rng):
    # every position: diagonal block, row band, column band, ragged last band and block tail
    S = _symmetric(rng, n, dtype) * dtype(0.5)
    for i in range(n):
        for j in range(n):
            X = S.copy()
            X[i, j] = dtype(0.75) + dtype(0.001) * dtype((i * n + j) % 97)  # also the unique maximum
            got = V._fused_summary(X)
            assert got == _reference_summary(X), (i, j)
            if i != j:
                assert got[2] == float(abs(X[i, j] - X[j, i])) > 0, (i, j)


@needs_fused
@pytest.mark.parametrize("dtype,n", [(np.float32, 37), (np.float64, 21)])
def test_fused_summary_finds_the_minimum_anywhere(dtype, n, rng):
    S = _symmetric(rng, n, dtype) + dtype(1)  # no zeros: the planted one is the minimum
    for i in range(n):
        for j in range(n):
            X = S.copy()
            X[i, j] = dtype(0.5)
            assert V._fused_summary(X) == _reference_summary(X), (i, j)


@needs_fused
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1e-30, -0.5, -np.finfo(np.float64).tiny])
def test_fused_summary_declines_bad_entries_anywhere(dtype, bad, rng):
    n = 37 if dtype == np.float32 else 21
    S = _symmetric(rng, n, dtype)
    for i in range(n):
        for j in range(n):
            X = S.copy()
            X[i, j] = dtype(bad)  # -tiny underflows to -0.0 in float32: that one is fine
            got = V._fused_summary(X)
            if X[i, j] == 0:
                assert got == _reference_summary(X), (i, j)
            else:
                assert got is None, (i, j)
    X = S.copy()
    X[3, 1] = np.copysign(np.array(np.nan, dtype=dtype), -1)
    assert np.signbit(X[3, 1]) and V._fused_summary(X) is None


@needs_fused
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_summary_reads_negative_zero_as_zero(dtype, rng):
    n = 40
    X = _symmetric(rng, n, dtype)
    np.fill_diagonal(X, -0.0)
    X[5, 33] = X[33, 5] = -0.0
    X[6, 7] = -0.0  # X[7, 6] stays positive: asymmetric by X[7, 6]
    assert np.signbit(X[5, 33]) and np.signbit(X[0, 0])
    assert V._fused_summary(X) == _reference_summary(X)
    assert V._fused_summary(X)[0] == 0.0
    # and the public check accepts -0.0 (as 0), on the diagonal too
    Y = torch.from_numpy(_symmetric(rng, n, dtype))
    Y.fill_diagonal_(-0.0)
    Y[5, 33] = Y[33, 5] = -0.0
    assert check_dissimilarity(Y) is Y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_matrix_summary_same_for_every_layout(dtype, layout, rng):
    A = torch.from_numpy(rng.random((90, 90))).to(dtype)
    if layout == "transposed":
        D = A.T  # column-major: summarised as its contiguous transpose, no copy
    elif layout == "strided":
        D = A[::2, 1::2]
    else:
        D = A[:45, :45].clone()
    lo, hi, asym, finite = V._matrix_summary(D)
    assert finite and (lo, hi, asym) == _reference_summary(D.contiguous().numpy())


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_check_non_contiguous_D(layout):
    G = good_D(64, torch.float64)
    D = G.T if layout == "transposed" else torch.stack([G, G], dim=-1)[..., 0]
    assert not D.is_contiguous()
    assert check_dissimilarity(D) is D
    D[2, 9] += 0.01
    with pytest.raises(ValueError, match=r"not symmetric \(max \|D - D\.T\| = 0\.01\)"):
        check_dissimilarity(D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_check_half_precision_D(dtype):
    D = good_D(40, torch.float32).to(dtype)
    assert check_dissimilarity(D) is D
    D[3, 30] += 5  # beyond 100 eps of bfloat16 (0.78) times max |D|
    with pytest.raises(ValueError, match="not symmetric"):
        check_dissimilarity(D)
    D[3, 30] = D[30, 3] = float("nan")
    with pytest.raises(ValueError, match=r"contains NaN or inf \(first at index \(3, 30\)\)"):
        check_dissimilarity(D)


# positions for the larger matrices below: diagonal block, row band, column band, ragged corner
BAD_POSITIONS = [(1, 3), (2, 400), (400, 2), (598, 597), (597, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", BAD_POSITIONS)
def test_large_D_errors_at_every_position(dtype, where):
    i, j = where
    G = good_D(599, dtype)
    cases = [
        (float("nan"), rf"contains NaN or inf \(first at index \({min(i, j)}, {max(i, j)}\)\)"),
        (float("inf"), r"contains NaN or inf"),
        (-0.25, r"negative entry \(-0\.25\)"),
    ]
    for value, match in cases:
        D = G.clone()
        D[i, j] = D[j, i] = value
        with pytest.raises(ValueError, match=match):
            check_dissimilarity(D)
    D = G.clone()
    D[i, j] += 0.01
    with pytest.raises(ValueError, match=r"not symmetric"):
        check_dissimilarity(D)


# ----------------------------------------------------------------------------
# death_edges / deaths: the check overlapped with the MST (CPU, >= 2 threads)


@pytest.fixture
def set_threads():
    """``set_threads(k)`` sets torch's thread count for the rest of the test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _record_backend_threads(monkeypatch):
    import threading

    seen = []
    real = ph._backend_edges

    def spy(D, b):
        seen.append(threading.current_thread().name)
        return real(D, b)

    monkeypatch.setattr(ph, "_backend_edges", spy)
    return seen


def _mst_reference_deaths(D: torch.Tensor) -> np.ndarray:
    from scipy.sparse.csgraph import minimum_spanning_tree

    X = D.double().numpy().copy()
    X[X == 0] = 1e-300  # scipy reads 0 as "no edge"; off the diagonal there are none here
    np.fill_diagonal(X, 0)
    T = minimum_spanning_tree(X).toarray()
    return np.sort(T[T != 0])


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlapped_check_gives_the_unchecked_edges(backend, dtype, set_threads, monkeypatch):
    set_threads(2)
    if backend not in ph.available_backends():
        pytest.skip(f"{backend} not installed")
    seen = _record_backend_threads(monkeypatch)
    D = good_D(ph._OVERLAP_MIN_N + 21, dtype)
    edges = ph.death_edges(D, backend=backend)
    assert seen and seen[-1].startswith("toponeuro-mst")  # it did run in the worker
    assert torch.equal(edges, ph.death_edges(D, backend=backend, check=False))
    d = ph.deaths(D, backend=backend)
    assert seen[-1].startswith("toponeuro-mst")
    assert torch.equal(d, D[edges[:, 0], edges[:, 1]])
    np.testing.assert_allclose(d.double().numpy(), _mst_reference_deaths(D), rtol=0, atol=0)


@pytest.mark.parametrize("call", ["death_edges", "deaths"])
def test_no_overlap_with_one_thread_small_n_or_other_backends(call, set_threads, monkeypatch):
    set_threads(1)
    seen = _record_backend_threads(monkeypatch)
    getattr(ph, call)(good_D(ph._OVERLAP_MIN_N + 1))
    set_threads(2)
    getattr(ph, call)(good_D(ph._OVERLAP_MIN_N - 1))
    getattr(ph, call)(good_D(ph._OVERLAP_MIN_N + 1), backend="giotto-ph")
    getattr(ph, call)(good_D(ph._OVERLAP_MIN_N + 1), check=False)
    assert seen and not any(name.startswith("toponeuro-mst") for name in seen)


@pytest.mark.parametrize("call", ["death_edges", "deaths"])
@pytest.mark.parametrize("threads", [1, 2])
def test_overlapped_and_serial_checks_raise_the_same_errors(call, threads, set_threads, monkeypatch):
    set_threads(threads)
    seen = _record_backend_threads(monkeypatch)
    n = ph._OVERLAP_MIN_N + 37
    G = good_D(n)
    cases = []
    D = G.clone(); D[5, 300] = D[300, 5] = float("nan")
    cases.append((D, r"contains NaN or inf \(first at index \(5, 300\)\)"))
    D = G.clone(); D[n - 1, 2] = D[2, n - 1] = float("-inf")
    cases.append((D, rf"contains NaN or inf \(first at index \(2, {n - 1}\)\)"))
    D = G.clone(); D[7, 8] = D[8, 7] = -0.25
    cases.append((D, r"negative entry \(-0\.25\)"))
    D = G.clone(); D[9, 9] = 0.5
    cases.append((D, r"non-zero diagonal \(D\[9, 9\] = 0\.5"))
    D = G.clone(); D[0, n - 2] += 0.01
    cases.append((D, r"not symmetric"))
    D = torch.full((n, n), float("nan"))
    cases.append((D, r"contains NaN or inf \(first at index \(0, 0\)\)"))
    for D, match in cases:
        with pytest.raises(ValueError, match=match):
            getattr(ph, call)(D)
    assert len(seen) == (len(cases) if threads == 2 else 0)  # the MST ran (and was discarded) only when overlapped
    with pytest.raises(ValueError, match=r"must be square"):
        getattr(ph, call)(torch.rand(n, n + 1))  # the form is checked before any kernel sees D
    assert len(seen) == (len(cases) if threads == 2 else 0)
    assert torch.equal(ph.death_edges(G), ph.death_edges(G, check=False))  # and it still works after


def test_overlapped_backend_error_propagates(set_threads, monkeypatch):
    set_threads(2)
    def broken(D, b):
        raise RuntimeError("backend failed")

    monkeypatch.setattr(ph, "_backend_edges", broken)
    G = good_D(ph._OVERLAP_MIN_N + 3)
    with pytest.raises(RuntimeError, match="backend failed"):
        ph.death_edges(G)
    G[4, 4] = 1.0  # both fail: the check's message wins
    with pytest.raises(ValueError, match="non-zero diagonal"):
        ph.death_edges(G)


def test_no_worker_at_shutdown_falls_back_to_check_then_mst(set_threads, monkeypatch):
    """After the interpreter starts shutting down, a pool refuses new work
    (RuntimeError): the call then checks and computes in turn, same result."""
    set_threads(2)

    class Refusing:
        def submit(self, *args):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    G = good_D(ph._OVERLAP_MIN_N + 3)
    expected = ph.death_edges(G, check=False)
    monkeypatch.setattr(ph, "_mst_worker", lambda: Refusing())
    assert torch.equal(ph.death_edges(G), expected)
    G[4, 4] = 1.0
    with pytest.raises(ValueError, match="non-zero diagonal"):
        ph.death_edges(G)


def test_overlapped_check_keeps_autograd(set_threads):
    set_threads(2)
    D = good_D(ph._OVERLAP_MIN_N + 5, torch.float64).requires_grad_(True)
    ph.deaths(D).sum().backward()
    e = ph.death_edges(D.detach(), check=False)
    expected = torch.zeros_like(D)
    expected[e[:, 0], e[:, 1]] = 1
    assert torch.equal(D.grad, expected)


@pytest.mark.slow
def test_check_16384_float32():
    n = 16384
    A = torch.randn(64, n, generator=torch.Generator().manual_seed(1))
    D = tn.dissimilarity.abs_correlation(A)
    assert check_dissimilarity(D) is D
    D[n - 1, 3] += 0.01
    with pytest.raises(ValueError, match="not symmetric"):
        check_dissimilarity(D)


def test_meta_activations_are_refused_with_the_way_round():
    with pytest.raises(ValueError, match="'meta' device and has no values to check: pass check=False"):
        tn.dissimilarity.abs_correlation(torch.empty(5, 4, device="meta"))
    with pytest.raises(ValueError, match="'meta' device and has no values to check: pass check=False"):
        tn.dissimilarity.abs_correlation(torch.empty(2, 5, 4, device="meta"))  # a stack too


@pytest.mark.parametrize("p", [True, False])
def test_a_boolean_is_not_a_fraction(p):
    with pytest.raises(ValueError, match="p must be a fraction"):
        tn.sampling.RandomSampler(p)
    with pytest.raises(ValueError, match="p must be a fraction"):
        tn.sampling.ImportanceSampler(p)


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_output_folder_is_refused(out):
    from toponeuro._validation import prepare_output_folder

    with pytest.raises(ValueError, match="--out is empty"):
        prepare_output_folder(out)
