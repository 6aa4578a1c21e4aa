"""Regulariser formulas against hand computations, NumPy re-implementations and dense autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from toponeuro import regularisers as R

DTYPES = [torch.float32, torch.float64]


def tol(dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


# ----------------------------------------------------------------------------
# NumPy re-implementations


def np_t1(d):
    return float(np.sum(1.0 - np.asarray(d, dtype=np.float64)))


def np_t2(d, alpha=0.5):
    d = np.asarray(d, dtype=np.float64)
    return float(alpha * np.std(d, ddof=0) - (1 - alpha) * np.mean(d))


def np_min_corr(A):
    A = np.asarray(A, dtype=np.float64)
    live = A.max(0) != A.min(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.corrcoef(A, rowvar=False)
    vals = [abs(C[k, l]) for k in range(A.shape[1]) for l in range(A.shape[1])
            if k != l and live[k] and live[l] and C[k, l] != 0]
    return float(np.mean(vals)) if vals else 0.0


def np_decov(A):
    A = np.asarray(A, dtype=np.float64)
    C = np.cov(A, rowvar=False, bias=True)  # divide by m
    return float(0.5 * (np.sum(C**2) - np.sum(np.diag(C) ** 2)))


# ----------------------------------------------------------------------------
# T1


@pytest.mark.parametrize("dtype", DTYPES)
def test_t1_hand(dtype):
    d = torch.tensor([0.1, 0.25, 0.5], dtype=dtype)
    # (1 - 0.1) + (1 - 0.25) + (1 - 0.5) = 0.9 + 0.75 + 0.5
    assert R.t1(d).item() == pytest.approx(2.15, abs=tol(dtype))
    assert R.t1(torch.tensor([1.0, 1.0], dtype=dtype)).item() == 0.0
    assert R.t1(torch.tensor([0.0], dtype=dtype)).item() == 1.0


@pytest.mark.parametrize("n", [1, 2, 9, 299])
def test_t1_numpy_and_gradient(n, rng):
    d = torch.from_numpy(rng.random(n)).requires_grad_(True)
    v = R.t1(d)
    assert v.ndim == 0
    assert v.item() == pytest.approx(np_t1(d.detach().numpy()), abs=1e-10)
    v.backward()
    assert torch.equal(d.grad, -torch.ones(n, dtype=torch.float64))


# ----------------------------------------------------------------------------
# T2


@pytest.mark.parametrize("dtype", DTYPES)
def test_t2_hand(dtype):
    # deaths 0.2, 0.4, 0.6: mean 0.4, population variance (0.04 + 0 + 0.04) / 3
    d = torch.tensor([0.2, 0.4, 0.6], dtype=dtype)
    std = math.sqrt(0.08 / 3)
    assert R.t2(d).item() == pytest.approx(0.5 * std - 0.5 * 0.4, abs=tol(dtype))
    assert R.t2(d, alpha=0.25).item() == pytest.approx(0.25 * std - 0.75 * 0.4, abs=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_t2_uses_the_population_std(dtype):
    # deaths 0 and 1: population std 1/2 (the sample std would be 1/sqrt(2)), mean 1/2
    d = torch.tensor([0.0, 1.0], dtype=dtype)
    assert R.t2(d).item() == pytest.approx(0.0, abs=tol(dtype))  # 0.5 * 0.5 - 0.5 * 0.5
    assert R.t2(d, alpha=1.0).item() == pytest.approx(0.5, abs=tol(dtype))
    assert R.t2(d, alpha=0.0).item() == pytest.approx(-0.5, abs=tol(dtype))
    assert R.t2(d, alpha=0.8).item() == pytest.approx(0.8 * 0.5 - 0.2 * 0.5, abs=tol(dtype))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [2, 9, 299])
def test_t2_numpy(alpha, n, rng):
    d = torch.from_numpy(rng.random(n))
    assert R.t2(d, alpha=alpha).item() == pytest.approx(np_t2(d.numpy(), alpha), abs=1e-12)
    if alpha == 0.5:
        assert R.t2(d).item() == pytest.approx(np_t2(d.numpy(), 0.5), abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_t2_gradcheck(alpha, rng):
    d = torch.from_numpy(rng.random(6)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: R.t2(x, alpha=alpha), (d,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 4])
def test_t2_at_zero_std_has_a_finite_gradient(dtype, alpha, n):
    d = torch.full((n,), 0.3, dtype=dtype, requires_grad=True)
    v = R.t2(d, alpha=alpha)
    assert v.item() == pytest.approx(-(1 - alpha) * 0.3, abs=tol(dtype))
    v.backward()
    assert torch.isfinite(d.grad).all()
    # the std term contributes gradient 0 there; the mean term -(1 - alpha) / n per death
    np.testing.assert_allclose(d.grad.double().numpy(), np.full(n, -(1 - alpha) / n), atol=tol(dtype))


# ----------------------------------------------------------------------------
# MinCorr


def test_min_corr_hand():
    # x = (1, 2, 3, 4), y = 2x (rho = 1), z = (1, -1, 1, -1):
    # centred x = (-1.5, -0.5, 0.5, 1.5), x.z = -2, |x| = sqrt(5), |z| = 2 -> rho(x, z) = -1/sqrt(5) = rho(y, z)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    A = torch.stack([x, 2 * x, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)], dim=1)
    expected = (1 + 2 / math.sqrt(5)) / 3
    assert R.min_corr(A).item() == pytest.approx(expected, abs=1e-12)
    # a constant neuron (dead ReLU) is left out of the mean, wherever it sits
    for value in [0.0, 7.0]:
        with_dead = torch.cat([A[:, :1], torch.full((4, 1), value, dtype=torch.float64), A[:, 1:]], dim=1)
        assert R.min_corr(with_dead).item() == pytest.approx(expected, abs=1e-12)


def test_min_corr_leaves_out_zero_correlations():
    # u and v are exactly uncorrelated, w = u: the pairs (u, v), (v, w) are left out, only |rho(u, w)| = 1 counts
    u = torch.tensor([1.0, 1.0, -1.0, -1.0])
    v = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert R.min_corr(torch.stack([u, v, u], dim=1)).item() == pytest.approx(1.0, abs=1e-6)
    # no pair left: 0, with a finite gradient
    A = torch.stack([u, v], dim=1).requires_grad_(True)
    val = R.min_corr(A)
    assert val.item() == 0.0
    val.backward()
    assert torch.isfinite(A.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_dead", [0, 1, 3])
def test_min_corr_numpy(dtype, n_dead, rng):
    A = np.maximum(rng.standard_normal((40, 9)) @ rng.standard_normal((9, 9)), 0.0)
    A[:, rng.choice(9, n_dead, replace=False)] = 0.0
    At = torch.from_numpy(A).to(dtype).requires_grad_(True)
    v = R.min_corr(At)
    assert v.item() == pytest.approx(np_min_corr(At.detach().double().numpy()), abs=1e-12 if dtype == torch.float64 else 1e-6)
    v.backward()
    assert torch.isfinite(At.grad).all()


def test_min_corr_all_constant_is_zero():
    A = torch.ones(5, 3, requires_grad=True)
    v = R.min_corr(A)
    assert v.item() == 0.0
    v.backward()
    assert torch.isfinite(A.grad).all()


def test_min_corr_gradcheck(rng):
    A = torch.from_numpy(rng.standard_normal((8, 4))).requires_grad_(True)
    assert torch.autograd.gradcheck(R.min_corr, (A,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# DeCov


@pytest.mark.parametrize("dtype", DTYPES)
def test_decov_hand(dtype):
    # A = [[1, 2], [3, 0]]: centred [[-1, 1], [1, -1]], C = Ac^T Ac / 2 = [[1, -1], [-1, 1]]
    # ||C||_F^2 = 4, ||diag C||^2 = 2 -> 0.5 * (4 - 2) = 1
    A = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=dtype)
    assert R.decov(A).item() == pytest.approx(1.0, abs=tol(dtype))
    # three samples x = (0, 1, 2), y = (0, 0, 3): centred x = (-1, 0, 1), y = (-1, -1, 2),
    # cov(x, y) = (1 + 0 + 2) / 3 = 1, two off-diagonal entries -> 0.5 * (1^2 + 1^2) = 1
    B = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 3.0]], dtype=dtype)
    assert R.decov(B).item() == pytest.approx(1.0, abs=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 2), (16, 5), (128, 30)])
def test_decov_numpy(dtype, shape, rng):
    A = torch.from_numpy(rng.standard_normal(shape) * 2 + 1).to(dtype)
    ref = np_decov(A.double().numpy())
    assert R.decov(A).item() == pytest.approx(ref, rel=1e-10 if dtype == torch.float64 else 1e-5, abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decov_of_half_precision_activations_is_finite_and_in_float32(dtype, rng):
    """Activations of about 70 make the sums of squared covariances overflow float16 (inf - inf
    would be NaN), although the value itself fits."""
    A = torch.relu(torch.from_numpy(rng.standard_normal((256, 50)) * 16)).to(dtype)
    assert float(A.max()) > 40
    value = R.decov(A)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(np_decov(A.double().numpy()), rel=1e-4)


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decov_and_min_corr_inside_autocast_are_computed_in_float32(autocast_dtype, input_dtype, rng):
    """Autocast recasts matrix products to 16 bits: the covariance of activations of about 70 overflowed
    float16 to a silent inf, and every value came back in 16 bits."""
    A = torch.relu(torch.from_numpy(rng.standard_normal((256, 50)) * 16)).to(input_dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        values = {"decov": R.decov(A), "min_corr": R.min_corr(A)}
    ref = {"decov": np_decov(A.double().numpy()), "min_corr": np_min_corr(A.double().numpy())}
    for name, value in values.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert value.item() == pytest.approx(ref[name], rel=1e-5), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_min_corr_of_half_precision_activations_is_in_float32(dtype, rng):
    A = np.maximum(rng.standard_normal((64, 12)) @ rng.standard_normal((12, 30)), 0.0)
    At = torch.from_numpy(A).to(dtype).requires_grad_(True)
    value = R.min_corr(At)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(np_min_corr(At.detach().double().numpy()), rel=1e-5)
    value.backward()
    assert At.grad.dtype == dtype and torch.isfinite(At.grad).all()


def test_decov_keeps_its_precision_when_one_neuron_dwarfs_the_others(rng):
    """||C||^2 - ||diag C||^2 would subtract two numbers of about 1e16 to get one of about 1e8."""
    from fractions import Fraction

    A = torch.from_numpy(rng.standard_normal((12, 8)))
    A[:, 0] *= 1e4
    X = [[Fraction(v) for v in row] for row in A.tolist()]  # exact arithmetic on the same floats
    m, n = len(X), len(X[0])
    mean = [sum(r[k] for r in X) / m for k in range(n)]
    cov = [[sum((r[k] - mean[k]) * (r[l] - mean[l]) for r in X) / m for l in range(n)] for k in range(n)]
    exact = sum(cov[k][l] ** 2 for k in range(n) for l in range(n) if k != l) / 2
    assert R.decov(A).item() == pytest.approx(float(exact), rel=1e-12)


def test_decov_uncorrelated_is_zero_and_gradcheck(rng):
    u = torch.tensor([1.0, 1.0, -1.0, -1.0])
    v = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert R.decov(torch.stack([u, v, torch.zeros(4)], dim=1)).item() == 0.0
    A = torch.from_numpy(rng.standard_normal((6, 4))).requires_grad_(True)
    assert torch.autograd.gradcheck(R.decov, (A,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# MinCorr and DeCov: the two-product forms against the dense formulas under autograd


def dense_min_corr(A):
    """MinCorr as torch ops on the full correlation matrix: autograd differentiates every step."""
    Ac = A - A.mean(0)
    norm = Ac.norm(dim=0)
    live = A.max(0).values != A.min(0).values
    Z = torch.where(live, Ac / torch.where(live, norm, torch.ones_like(norm)), torch.zeros_like(Ac))
    C = (Z.T @ Z).clamp(-1.0, 1.0)
    used = ~torch.eye(C.shape[0], dtype=torch.bool) & (C.detach() != 0)
    return torch.where(used, C.abs(), torch.zeros_like(C)).sum() / used.sum().clamp(min=1)


def dense_decov(A):
    Ac = A - A.mean(0)
    C = Ac.T @ Ac / A.shape[0]
    off = C * (1 - torch.eye(C.shape[0], dtype=C.dtype))
    return 0.5 * (off * off).sum()


def activation_cases(rng):
    """Random, dead-neuron, duplicated (rho = 1 and -1) and tied activations, float64 (m = 24, n = 7)."""
    base = rng.standard_normal((24, 7))
    dead = np.maximum(base, 0.0)
    dead[:, [1, 4]] = 0.0
    dup = base.copy()
    dup[:, 3], dup[:, 5] = dup[:, 0], -2.0 * dup[:, 0]
    # tied values; redrawn until no pair is uncorrelated to rounding: whether such a pair is left out
    # of MinCorr's mean hangs on the last bit of its product, in either formulation
    while True:
        tied = rng.integers(0, 3, size=(24, 7)).astype(float)
        rho = np.corrcoef(tied, rowvar=False)
        if np.all(np.isfinite(rho)) and np.abs(rho).min() > 1e-9:
            break
    return {"random": base, "dead": dead, "duplicated": dup, "tied": tied}


@pytest.mark.parametrize("formula", ["min_corr", "decov"])
@pytest.mark.parametrize("case", ["random", "dead", "duplicated", "tied"])
@pytest.mark.parametrize("numba_pass", [True, False])
def test_baseline_value_and_gradient_against_dense_autograd(formula, case, numba_pass, rng, monkeypatch):
    if not numba_pass:  # the torch ops every device without numba takes
        monkeypatch.setattr(R.numba_host, "runs_dense_baseline", lambda C: False)
    A = torch.from_numpy(activation_cases(rng)[case])
    ours, ref = A.clone().requires_grad_(True), A.clone().requires_grad_(True)
    value = getattr(R, formula)(ours)
    expected = (dense_min_corr if formula == "min_corr" else dense_decov)(ref)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    value.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("formula", ["min_corr", "decov"])
def test_baseline_gradient_against_central_differences(formula, rng):
    A = torch.from_numpy(np.maximum(rng.standard_normal((16, 6)), 0.0) + rng.standard_normal((16, 6)) * 0.1)
    A.requires_grad_(True)
    assert torch.autograd.gradcheck(getattr(R, formula), (A,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("formula", ["min_corr", "decov"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_baseline_of_a_stack_is_each_members(formula, dtype, rng):
    """The batched engine calls the unchecked forms on (B, m, n) stacks."""
    fn = R._min_corr if formula == "min_corr" else R._decov
    S = torch.from_numpy(np.maximum(rng.standard_normal((3, 20, 9)), 0.0)).to(dtype)
    S[1, :, 2] = 0.0  # a dead neuron in one member only
    S.requires_grad_(True)
    values = fn(S)
    assert values.shape == (3,)
    values.sum().backward()
    for b in range(3):
        Ab = S[b].detach().clone().requires_grad_(True)
        vb = fn(Ab)
        vb.backward()
        torch.testing.assert_close(values[b], vb, rtol=tol(dtype), atol=tol(dtype))
        torch.testing.assert_close(S.grad[b], Ab.grad, rtol=tol(dtype) * 10, atol=tol(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("formula", ["min_corr", "decov"])
def test_baseline_on_cuda_equals_cpu(formula, rng):
    """On CUDA the product's triangle is mirrored by Triton and the pass is torch ops."""
    fn = R._min_corr if formula == "min_corr" else R._decov
    S = torch.from_numpy(np.maximum(rng.standard_normal((4, 64, 300)), 0.0)).float()
    S[2, :, 7] = 0.0
    values = {}
    for device in ("cpu", "cuda"):
        X = S.to(device).requires_grad_(True)
        v = fn(X)
        v.sum().backward()
        values[device] = (v.detach().cpu(), X.grad.cpu())
    torch.testing.assert_close(values["cuda"][0], values["cpu"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values["cuda"][1], values["cpu"][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("formula", ["min_corr", "decov"])
def test_baseline_gpu_route_in_the_triton_interpreter(formula, rng, monkeypatch):
    """The CUDA route on CPU tensors: panels of the triangle, Triton's mirror (interpreted), the torch pass."""
    from toponeuro import tree_deaths as td
    from toponeuro.persistence import boruvka_triton, mirror_triton

    if not (boruvka_triton.HAVE_TRITON and boruvka_triton._interpreting()):
        pytest.skip("needs Triton and its interpreter (TRITON_INTERPRET=1)")
    fn = R._min_corr if formula == "min_corr" else R._decov
    S = torch.from_numpy(np.maximum(rng.standard_normal((2, 30, 40)), 0.0)).float()
    S[1, :, 5] = 0.0
    X = S.clone().requires_grad_(True)
    expected = fn(X)
    expected.sum().backward()
    mirrored = []
    mirror = mirror_triton.mirror_upper_
    monkeypatch.setattr(td, "_on_gpu", lambda C: True)
    monkeypatch.setattr(td, "_gpu_panel_rows", lambda n: 16)  # several panels
    monkeypatch.setattr(mirror_triton, "mirror_upper_", lambda C: mirrored.append(C.shape) or mirror(C))
    monkeypatch.setattr(R.numba_host, "runs_dense_baseline", lambda C: False)
    Y = S.clone().requires_grad_(True)
    value = fn(Y)
    value.sum().backward()
    assert mirrored == [(2, 40, 40)]
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(Y.grad, X.grad, rtol=1e-5, atol=1e-7)


def test_second_derivatives_min_corr_exact_decov_refused(rng):
    """MinCorr's backward is Z G with G locally constant, so it differentiates again (against central
    differences of the gradient); DeCov's kept O depends on the activations, so a double backward raises."""
    A = torch.from_numpy(rng.standard_normal((10, 5))).requires_grad_(True)
    assert torch.autograd.gradgradcheck(R.min_corr, (A,), eps=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(R.decov(A), A, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|does not require grad"):
        g.sum().backward()


def test_min_corr_clamped_pairs_pass_no_gradient(rng):
    """A product just above 1 (rounding on duplicated neurons) is clamped: it counts as |rho| = 1
    and, as torch.clamp's gradient, passes none."""
    C = torch.tensor([[1.0, 1.0 + 1e-7, 0.3], [1.0 + 1e-7, 1.0, -0.2], [0.3, -0.2, 1.0]], dtype=torch.float32)
    G = C.clone()
    total, count = R.numba_host.mean_abs_sign_(G)
    assert count.item() == 6 and total.item() == pytest.approx(2 * (1.0 + 0.3 + 0.2), abs=1e-6)
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, -1.0, 0.0]])
    assert torch.equal(G, expected)


# ----------------------------------------------------------------------------
# L1 and L2


def hand_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
        model[0].bias.copy_(torch.tensor([3.0, -1.0]))
        model[2].weight.copy_(torch.tensor([[-1.5, 2.0]]))
        model[2].bias.copy_(torch.tensor([-4.0]))
    return model


def test_l1_l2_hand():
    model = hand_model()
    # weights: |1| + |-2| + |0.5| + |0| + |-1.5| + |2| = 7; squares 1 + 4 + 0.25 + 0 + 2.25 + 4 = 11.5
    # biases:  |3| + |-1| + |-4| = 8;                   squares 9 + 1 + 16 = 26
    assert R.l1(model).item() == pytest.approx(7.0)
    assert R.l2(model).item() == pytest.approx(11.5)
    assert R.l1(model, include_bias=True).item() == pytest.approx(15.0)
    assert R.l2(model, include_bias=True).item() == pytest.approx(37.5)


def test_l1_l2_gradients():
    model = hand_model()
    R.l1(model).backward()
    assert torch.equal(model[0].weight.grad, torch.sign(model[0].weight.detach()))
    assert model[0].bias.grad is None  # biases are left alone by default
    model.zero_grad(set_to_none=True)
    R.l2(model, include_bias=True).backward()
    for p in model.parameters():
        assert torch.allclose(p.grad, 2 * p.detach())


def test_l1_l2_skip_frozen_parameters():
    model = hand_model()
    model[0].requires_grad_(False)
    assert R.l1(model).item() == pytest.approx(3.5)  # |-1.5| + |2|
    assert R.l2(model, include_bias=True).item() == pytest.approx(6.25 + 16.0)


def test_l1_l2_numpy_with_convolutions(rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    weights = [model[0].weight, model[3].weight]
    biases = [model[0].bias, model[3].bias]
    np_l1 = sum(np.abs(p.detach().double().numpy()).sum() for p in weights)
    np_l2 = sum((p.detach().double().numpy() ** 2).sum() for p in weights)
    np_b1 = sum(np.abs(p.detach().double().numpy()).sum() for p in biases)
    np_b2 = sum((p.detach().double().numpy() ** 2).sum() for p in biases)
    assert R.l1(model).item() == pytest.approx(np_l1, rel=1e-5)
    assert R.l2(model).item() == pytest.approx(np_l2, rel=1e-5)
    assert R.l1(model, include_bias=True).item() == pytest.approx(np_l1 + np_b1, rel=1e-5)
    assert R.l2(model, include_bias=True).item() == pytest.approx(np_l2 + np_b2, rel=1e-5)


def test_l1_l2_model_without_weights():
    with pytest.raises(ValueError, match="no trainable weights"):
        R.l1(nn.ReLU())
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable weights"):
        R.l2(frozen)


# ----------------------------------------------------------------------------
# registries


def test_formula_registries():
    assert R.FORMULAS_ON_DEATHS == {"t1": R.t1, "t2": R.t2}
    assert R.FORMULAS_ON_ACTIVATIONS == {"min_corr": R.min_corr, "decov": R.decov}
