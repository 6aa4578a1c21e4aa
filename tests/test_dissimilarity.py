"""Dissimilarities between neurons, checked against NumPy / SciPy computations.

References are computed in float64 NumPy on the same numbers the library sees
(``A.double()``): ``np.corrcoef`` for the correlation-based ones (constant
columns set to ``rho = 0`` by hand, as the spec defines) and
``scipy.spatial.distance.cdist`` for the Euclidean one. Gradients are checked
against central finite differences (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import toponeuro as tn
from toponeuro import dissimilarity as dis

NAMES = ["abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho", "euclidean"]
CORRELATION_NAMES = ["abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho"]
DTYPES = [torch.float32, torch.float64]


# ----------------------------------------------------------------------------
# NumPy references


def np_correlation(A: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of A: (m, n) -> (n, n); constant columns rho = 0."""
    A = np.asarray(A, dtype=np.float64)
    constant = A.max(0) == A.min(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.corrcoef(A, rowvar=False)
    R[constant, :] = 0.0
    R[:, constant] = 0.0
    np.fill_diagonal(R, 1.0)
    return np.clip(R, -1.0, 1.0)


def np_dissimilarity(name: str, A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if name == "euclidean":
        return cdist(A.T, A.T, metric="euclidean")
    R = np_correlation(A)
    if name == "abs_correlation":
        return 1.0 - np.abs(R)
    if name == "sqrt_one_minus_rho2":
        return np.sqrt(np.clip(1.0 - R * R, 0.0, None))
    if name == "one_minus_rho":
        return 1.0 - R
    raise KeyError(name)


def tolerance(name: str, dtype: torch.dtype, A: torch.Tensor) -> float:
    """Absolute tolerance for comparing the library (in ``dtype``) with the float64 reference."""
    if dtype == torch.float64:
        base = 1e-10 if name != "sqrt_one_minus_rho2" else 1e-7
    else:
        # sqrt(1 - rho^2) has an infinite slope at |rho| = 1: a rounding error e
        # in rho becomes sqrt(2 e) (m = 2 samples always give |rho| = 1)
        base = 2e-5 if name != "sqrt_one_minus_rho2" else 1e-3
    if name == "euclidean":  # distances scale with the activations
        return base * max(1.0, float(A.abs().max()) ** 2 * A.shape[0]) ** 0.5
    return base


def random_activations(gen: torch.Generator, m: int, n: int, dtype, kind: str) -> torch.Tensor:
    """Activations of n neurons on m samples; ``kind`` picks the distribution."""
    if kind == "gaussian":
        return torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "relu":  # ReLU outputs with varied scales and offsets, some columns partly dead
        Z = torch.randn(m, n, generator=gen, dtype=torch.float64)
        scale = torch.rand(n, generator=gen, dtype=torch.float64) * 5 + 0.1
        shift = torch.randn(n, generator=gen, dtype=torch.float64)
        return torch.relu(Z * scale + shift).to(dtype)
    if kind == "correlated":  # a few latent factors: strong positive and negative correlations
        F = torch.randn(m, 3, generator=gen, dtype=torch.float64)
        W = torch.randn(3, n, generator=gen, dtype=torch.float64)
        return (F @ W + 0.1 * torch.randn(m, n, generator=gen, dtype=torch.float64)).to(dtype)
    raise KeyError(kind)


def with_constant_columns(A: torch.Tensor, cols, values) -> torch.Tensor:
    A = A.clone()
    for c, v in zip(cols, values):
        A[:, c] = v
    return A


# ----------------------------------------------------------------------------
# values against NumPy


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gaussian", "relu", "correlated"])
@pytest.mark.parametrize("m,n", [(2, 2), (5, 3), (64, 17), (256, 40)])
def test_matches_numpy(name, dtype, kind, m, n, torch_gen):
    A = random_activations(torch_gen, m, n, dtype, kind)
    D = dis.get(name)(A)
    ref = np_dissimilarity(name, A.double().numpy())
    assert D.shape == (n, n)
    np.testing.assert_allclose(D.double().numpy(), ref, rtol=0, atol=tolerance(name, dtype, A))
    if name == "sqrt_one_minus_rho2":
        # the square root amplifies the rounding of rho near |rho| = 1; its square does not
        atol = 1e-10 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(D.double().numpy() ** 2, ref**2, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_correlation_matches_corrcoef(dtype, torch_gen):
    A = random_activations(torch_gen, 50, 12, dtype, "correlated")
    C = dis.correlation(A)
    np.testing.assert_allclose(
        C.double().numpy(), np.corrcoef(A.double().numpy(), rowvar=False), rtol=0,
        atol=1e-12 if dtype == torch.float64 else 1e-6,
    )
    assert torch.equal(C.diagonal(), torch.ones(12, dtype=dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_computed_two_neurons(name, dtype):
    # x = (0, 1, 2), y = (2, 0, 1): centred (-1, 0, 1), (1, -1, 0) -> rho = -1 / 2
    # Euclidean: ||x - y|| = ||(-2, 1, 1)|| = sqrt(6)
    A = torch.tensor([[0.0, 2.0], [1.0, 0.0], [2.0, 1.0]], dtype=dtype)
    expected = {
        "abs_correlation": 1 - 0.5,
        "sqrt_one_minus_rho2": np.sqrt(1 - 0.25),
        "one_minus_rho": 1 + 0.5,
        "euclidean": np.sqrt(6.0),
    }[name]
    D = dis.get(name)(A)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert D[0, 1].item() == pytest.approx(expected, abs=tol)
    assert D[1, 0].item() == pytest.approx(expected, abs=tol)


# ----------------------------------------------------------------------------
# structure: diagonal, symmetry, dtype, device, range


RANGES = {"abs_correlation": (0, 1), "sqrt_one_minus_rho2": (0, 1), "one_minus_rho": (0, 2), "euclidean": (0, np.inf)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("constant", [False, True])
def test_structure(name, dtype, constant, torch_gen):
    A = random_activations(torch_gen, 33, 21, dtype, "relu")
    if constant:
        # 3.3: the float mean of 33 copies is not exactly 3.3, so centring alone leaves noise
        A = with_constant_columns(A, [0, 7, 20], [0.0, 3.3, 0.0])
    D = dis.get(name)(A)
    assert D.dtype == dtype
    assert D.device == A.device
    assert D.shape == (21, 21)
    assert torch.equal(D.diagonal(), torch.zeros(21, dtype=dtype))
    assert torch.equal(D, D.T), "not exactly symmetric"
    assert torch.isfinite(D).all()
    lo, hi = RANGES[name]
    assert (D >= lo).all() and (D <= hi).all()


@pytest.mark.parametrize("name", NAMES)
def test_does_not_modify_input(name, torch_gen):
    A = with_constant_columns(random_activations(torch_gen, 10, 5, torch.float32, "gaussian"), [2], [1.0])
    before = A.clone()
    dis.get(name)(A)
    assert torch.equal(A, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_and_negated_neurons(dtype, torch_gen):
    A = random_activations(torch_gen, 64, 6, dtype, "gaussian")
    A[:, 3] = A[:, 1]  # a duplicate: rho = 1
    A[:, 5] = -2.0 * A[:, 0] + 1.0  # an affine negation: rho = -1
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    D = dis.abs_correlation(A)
    assert D[1, 3].item() == pytest.approx(0.0, abs=tol)
    assert D[0, 5].item() == pytest.approx(0.0, abs=tol)
    O = dis.one_minus_rho(A)
    assert O[1, 3].item() == pytest.approx(0.0, abs=tol)
    assert O[0, 5].item() == pytest.approx(2.0, abs=tol)
    assert dis.euclidean(A)[1, 3].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_euclidean_of_half_precision_activations(dtype):
    """cdist has no float16/bfloat16 CPU kernel: computed in float32, returned in A's dtype."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(32, 6, generator=g).to(dtype)
    D = dis.euclidean(A)
    assert D.dtype == dtype
    ref = cdist(A.double().numpy().T, A.double().numpy().T)
    np.testing.assert_allclose(D.double().numpy(), ref, rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_euclidean_near_duplicates(dtype):
    """Small distances keep their precision (no |a|^2 + |b|^2 - 2 a.b cancellation)."""
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(64, 4, generator=g, dtype=torch.float64) * 3 + 5).to(dtype)
    A[:, 3] = A[:, 1] + 1e-3  # true distance 8e-3
    D = dis.euclidean(A)
    ref = cdist(A.double().numpy().T, A.double().numpy().T)
    assert D[1, 3].item() == pytest.approx(ref[1, 3], rel=1e-3)


# ----------------------------------------------------------------------------
# constant neurons (dead ReLUs): rho = 0, no NaN in value or gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, 3.0, -1e-3, 1e6, 0.1, 1 / 3, 1e6 + 0.1])
def test_constant_neuron_is_uncorrelated(dtype, value, torch_gen):
    A = with_constant_columns(random_activations(torch_gen, 20, 6, dtype, "relu"), [2], [value])
    C = dis.correlation(A)
    off = torch.ones(6, dtype=torch.bool)
    off[2] = False
    assert torch.equal(C[2, off], torch.zeros(5, dtype=dtype))
    assert torch.equal(C[off, 2], torch.zeros(5, dtype=dtype))
    assert C[2, 2].item() == 1.0
    for name, d in [("abs_correlation", 1.0), ("sqrt_one_minus_rho2", 1.0), ("one_minus_rho", 1.0)]:
        D = dis.get(name)(A)
        assert torch.equal(D[2, off], torch.full((5,), d, dtype=dtype)), name
        assert D[2, 2].item() == 0.0
    # the other entries are unaffected by the constant neuron
    keep = torch.tensor([0, 1, 3, 4, 5])
    np.testing.assert_allclose(
        dis.abs_correlation(A)[keep][:, keep].double().numpy(),
        np_dissimilarity("abs_correlation", A[:, keep].double().numpy()),
        atol=1e-10 if dtype == torch.float64 else 2e-5,
    )


@pytest.mark.parametrize("name", sorted(dis.DISSIMILARITIES))
def test_unchecked_forward_and_backward_read_nothing_back(name, dispatched_ops, torch_gen):
    """Without the input check, a dissimilarity and its gradient never read a value back to
    the host: no sync per call on a GPU, and they can be captured in a CUDA graph. A dead
    neuron is present, so the constant-column path is the one exercised."""
    A = torch.randn(32, 9, generator=torch_gen)
    A[:, 4] = 0.0
    A.requires_grad_()
    ops = dispatched_ops(lambda: dis.DISSIMILARITIES[name](A, check=False).sum().backward(), grad=True)
    names = {op for op, _ in ops}
    assert "mm" in names or "_cdist_forward" in names  # the recorder saw the computation
    assert not names & {"_local_scalar_dense", "is_nonzero", "item", "nonzero"}
    assert torch.isfinite(A.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_neurons_constant(dtype):
    A = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=dtype)
    D = dis.abs_correlation(A)
    assert torch.equal(D, 1.0 - torch.eye(3, dtype=dtype))
    E = dis.euclidean(A)
    np.testing.assert_allclose(E.double().numpy(), cdist(A.double().numpy().T, A.double().numpy().T), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "giotto-ph"])
def test_gradient_finite_with_constant_columns(name, dtype, backend, torch_gen):
    A = random_activations(torch_gen, 32, 12, dtype, "relu")
    A = with_constant_columns(A, [0, 5, 11], [0.0, 0.0, 1.5])
    A[:, 8] = A[:, 3]  # a duplicate too: |rho| = 1, d = 0 (sqrt and euclidean kinks)
    nonconst = torch.tensor([1, 2, 3, 4, 6, 7, 8, 9, 10])

    A1 = A.clone().requires_grad_(True)
    D = dis.get(name)(A1)
    assert torch.isfinite(D).all()
    D.sum().backward()
    assert A1.grad is not None and torch.isfinite(A1.grad).all(), "NaN/inf in the gradient of sum(D)"

    A2 = A.clone().requires_grad_(True)
    T1 = tn.regularisers.t1(tn.persistence.deaths(dis.get(name)(A2), backend=backend))
    assert torch.isfinite(T1)
    T1.backward()
    assert torch.isfinite(A2.grad).all(), "NaN/inf in the gradient of T1"
    assert A2.grad[:, nonconst].abs().sum() > 0, "no gradient reaches the live neurons"


@pytest.mark.parametrize("name", CORRELATION_NAMES)
def test_constant_column_does_not_change_gradient(name, torch_gen):
    """The gradient of sum(D) w.r.t. the live neurons is the same with or without a dead one
    (the dead neuron's row is the constant 1 and so contributes nothing)."""
    A = random_activations(torch_gen, 24, 5, torch.float64, "gaussian")
    live = A.clone().requires_grad_(True)
    dis.get(name)(live).sum().backward()
    with_dead = torch.cat([A, torch.zeros(24, 1, dtype=torch.float64)], dim=1).requires_grad_(True)
    dis.get(name)(with_dead).sum().backward()
    np.testing.assert_allclose(with_dead.grad[:, :5].numpy(), live.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_finite_differences(name, torch_gen):
    A = random_activations(torch_gen, 7, 4, torch.float64, "gaussian").requires_grad_(True)
    assert torch.autograd.gradcheck(lambda X: dis.get(name)(X), (A,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_with_a_constant_neuron_present(name, torch_gen):
    # finite differences in the live columns only: perturbing the dead column would revive it
    live = random_activations(torch_gen, 7, 3, torch.float64, "gaussian").requires_grad_(True)
    dead = torch.full((7, 1), 0.25, dtype=torch.float64)

    def f(X):
        return dis.get(name)(torch.cat([X[:, :1], dead, X[:, 1:]], dim=1))

    assert torch.autograd.gradcheck(f, (live,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# lookup


@pytest.mark.parametrize("name", NAMES)
def test_get_by_name(name):
    assert dis.get(name) is getattr(dis, name)
    assert dis.DISSIMILARITIES[name] is getattr(dis, name)


def test_registry_lists_exactly_the_four():
    assert sorted(dis.DISSIMILARITIES) == sorted(NAMES)


def test_get_passes_callables_through():
    def mine(A):
        return dis.euclidean(A)

    assert dis.get(mine) is mine


@pytest.mark.parametrize("bad", ["pearson", "", "Abs_Correlation"])
def test_get_unknown_name(bad):
    with pytest.raises(ValueError, match=r"unknown dissimilarity.*abs_correlation.*euclidean"):
        dis.get(bad)


# ----------------------------------------------------------------------------
# scale: correlation() rescales each column by its max |entry| before the norm,
# so tiny or huge activations neither underflow nor overflow in float32


@pytest.mark.parametrize(
    "scale",
    [1e-8, 1e-3, 1e3, 1e8, 1e-22, 1e-25, 1e20],
)
def test_correlation_is_scale_invariant_float32(scale):
    """rho(x, s x) = 1 for any float32-representable s (the Pearson correlation is scale-invariant)."""
    x = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0, 4.0, 7.0, 6.0])
    y = torch.tensor([1.0, 0.0, 2.0, 2.0, 1.0, 5.0, 3.0, 4.0])
    A = torch.stack([x, y, x * scale], dim=1)
    assert (A[:, 2].amax() > A[:, 2].amin()) and torch.isfinite(A).all()
    D = dis.abs_correlation(A)
    assert torch.isfinite(D).all()
    assert D[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert D[1, 2].item() == pytest.approx(D[0, 1].item(), abs=1e-6)


# ----------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_same_device_and_values(name, dtype, torch_gen):
    A = with_constant_columns(random_activations(torch_gen, 40, 30, dtype, "relu"), [4], [0.0])
    ref = np_dissimilarity(name, A.double().numpy())
    Ac = A.cuda().requires_grad_(True)
    D = dis.get(name)(Ac)
    assert D.device == Ac.device and D.dtype == dtype
    assert torch.equal(D, D.T)
    assert torch.equal(D.diagonal(), torch.zeros(30, dtype=dtype, device=D.device))
    np.testing.assert_allclose(
        D.detach().double().cpu().numpy(), ref, atol=tolerance(name, dtype, A),
    )
    D.sum().backward()
    assert torch.isfinite(Ac.grad).all()


@pytest.mark.parametrize("name", ["abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho", "euclidean"])
def test_autocast_does_not_lower_the_precision(name):
    """Under torch.autocast the correlation's matmul would run in bfloat16 (1 - |rho| to 3 digits):
    the result inside autocast equals the one outside, bit for bit, in A's dtype."""
    A = torch.randn(64, 20, generator=torch.Generator().manual_seed(3))
    outside = dis.DISSIMILARITIES[name](A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dis.DISSIMILARITIES[name](A)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)
