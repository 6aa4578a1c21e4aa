"""TopologicalRegulariser: the pipeline as a module around a model.

References: the functional pipeline run by hand on activations computed layer
by layer, and scipy's minimum spanning tree for the deaths.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.csgraph import minimum_spanning_tree
from torch import nn

import toponeuro as tn
from toponeuro import dissimilarity, persistence, regularisers
from toponeuro.sampling import ImportanceSampler, IndexSampler, RandomSampler

FORMULAS = ("t1", "t2", "min_corr", "decov")
BATCH = 24


def _mlp(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(10, 16)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(16, 12)),
        ("relu2", nn.ReLU()),
        ("out", nn.Linear(12, 5)),
    ])).to(dtype)


def _inputs(dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 10, generator=g, dtype=dtype)


def _hand_activations(model, x) -> torch.Tensor:
    """(m, 16 + 12 + 5): relu1, relu2, logits, computed layer by layer."""
    with torch.no_grad():
        h1 = F.relu(model.fc1(x))
        h2 = F.relu(model.fc2(h1))
        return torch.cat([h1, h2, model.out(h2)], dim=1)


def _linear_weights(model):
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------
@pytest.mark.parametrize("formula", FORMULAS)
def test_gradient_reaches_every_linear_weight(formula):
    model = _mlp()
    with tn.TopologicalRegulariser(model, formula=formula) as reg:
        model(_inputs())
        reg().backward()
    for name, w in _linear_weights(model).items():
        assert w.grad is not None, name
        assert torch.isfinite(w.grad).all(), name
        assert w.grad.abs().sum() > 0, name


def test_gradient_reaches_every_weight_of_the_papers_mlp():
    torch.manual_seed(0)
    model = tn.models.build("mlp", in_shape=(1, 8, 8))
    x = torch.rand(32, 1, 8, 8)
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        model(x)
        reg().backward()
    for name, w in _linear_weights(model).items():
        assert w.grad is not None and w.grad.abs().sum() > 0, name


def test_gradient_matches_finite_differences_of_the_value():
    # d reg / d (one weight) by central differences, with the recorder in the loop
    model = _mlp()
    x = _inputs()
    reg = tn.TopologicalRegulariser(model, formula="t1")
    model(x)
    reg().backward()
    w = model.fc1.weight
    eps = 1e-6
    for idx in [(0, 0), (3, 7), (15, 9)]:
        with torch.no_grad():
            w[idx] += eps
        model(x)
        up = reg().item()
        with torch.no_grad():
            w[idx] -= 2 * eps
        model(x)
        down = reg().item()
        with torch.no_grad():
            w[idx] += eps
        assert w.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    reg.remove()


# --------------------------------------------------------------------------
# the value is the functional pipeline
# --------------------------------------------------------------------------
def _scipy_mst_weights(D: torch.Tensor) -> np.ndarray:
    d = D.detach().numpy().copy()
    tree = minimum_spanning_tree(d).toarray()
    return np.sort(tree[tree > 0])


def test_t1_value_is_the_functional_pipeline_and_scipys_mst():
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        model(x)
        value = reg()
        A = _hand_activations(model, x)
        torch.testing.assert_close(reg.activations().detach(), A, rtol=0, atol=0)
        D = dissimilarity.abs_correlation(A)
        by_hand = regularisers.t1(persistence.deaths(D))
        torch.testing.assert_close(value, by_hand, rtol=1e-12, atol=1e-12)
        # an independent check of the deaths: scipy's MST of the same matrix
        mst = _scipy_mst_weights(D)
        assert mst.shape == (A.shape[1] - 1,)
        np.testing.assert_allclose(reg.deaths().detach().numpy(), mst, rtol=1e-12, atol=1e-12)
        assert value.item() == pytest.approx(float(np.sum(1.0 - mst)), rel=1e-12)


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("dissim", ["abs_correlation", "sqrt_one_minus_rho2"])
def test_every_formula_is_the_functional_pipeline(formula, dissim):
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula=formula, dissimilarity=dissim, alpha=0.3) as reg:
        model(x)
        value = reg()
    A = _hand_activations(model, x)
    if formula in ("t1", "t2"):
        deaths = persistence.deaths(dissimilarity.DISSIMILARITIES[dissim](A))
        want = regularisers.t1(deaths) if formula == "t1" else regularisers.t2(deaths, alpha=0.3)
    else:
        want = regularisers.FORMULAS_ON_ACTIVATIONS[formula](A)
    torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


def test_value_uses_the_sampler():
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="t1", sampler=ImportanceSampler(0.5)) as reg:
        model(x)
        value = reg()
    A = _hand_activations(model, x)
    h1, h2, logits = A[:, :16], A[:, 16:28], A[:, 28:]
    keep = []
    for h in (h1, h2):  # the 8 and 6 largest mean |a|, ties to the lower index, in index order
        score = h.abs().mean(0).numpy()
        keep.append(h[:, np.sort(np.argsort(-score, kind="stable")[: h.shape[1] // 2])])
    As = torch.cat([*keep, logits], dim=1)
    assert As.shape[1] == 8 + 6 + 5
    want = regularisers.t1(persistence.deaths(dissimilarity.abs_correlation(As)))
    torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


def test_index_sampler_and_explicit_modules():
    model = _mlp()
    x = _inputs()
    sampler = IndexSampler({"fc2": [0, 3, 5, 11], "output": None})
    with tn.TopologicalRegulariser(model, formula="min_corr", modules=["fc2"], sampler=sampler) as reg:
        model(x)
        value = reg()
    with torch.no_grad():
        pre2 = model.fc2(F.relu(model.fc1(x)))
        A = torch.cat([pre2[:, [0, 3, 5, 11]], model(x)], dim=1)
    torch.testing.assert_close(value.detach(), regularisers.min_corr(A), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in persistence.available_backends()
                                     if persistence.BACKENDS[b].gives_edges])
def test_edge_backends_give_the_same_value_and_gradient(backend):
    results = []
    for b in ("torch", backend):
        model = _mlp()
        with tn.TopologicalRegulariser(model, formula="t2", backend=b) as reg:
            model(_inputs())
            value = reg()
            value.backward()
        results.append((value.detach(), model.fc1.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", [b for b in persistence.available_backends()
                                     if persistence.BACKENDS[b].gives_edges])
def test_the_named_backend_is_the_one_that_runs(backend, monkeypatch):
    """Every edge backend gives the same deaths, so equal values cannot show which one ran: spies can."""
    called = []
    for name in persistence.edge_backends():
        plugin = persistence.BACKENDS[name].load()
        # one matrix or a stack (the tree path hands death_edges a stack of one member)
        for entry in ("death_edges", "death_edges_stack"):
            if hasattr(plugin, entry):
                monkeypatch.setattr(plugin, entry,
                                    lambda X, f=getattr(plugin, entry), name=name: (called.append(name), f(X))[1])
    model = _mlp()
    with tn.TopologicalRegulariser(model, formula="t1", backend=backend) as reg:
        model(_inputs())
        reg()
    assert called == [backend]


def test_include_output_false_leaves_the_logits_out():
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="t1", include_output=False) as reg:
        model(x)
        A = reg.activations().detach()
        value = reg()
    torch.testing.assert_close(A, _hand_activations(model, x)[:, :28], rtol=0, atol=0)
    want = regularisers.t1(persistence.deaths(dissimilarity.abs_correlation(A)))
    torch.testing.assert_close(value.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("conv", ["flatten", "channel"])
def test_conv_neurons_through_the_regulariser(conv):
    """flatten: one neuron per channel and position; channel: the spatial mean per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 3, 3)), ("relu", nn.ReLU()), ("flat", nn.Flatten()), ("out", nn.Linear(3 * 4 * 4, 4)),
    ])).double()
    x = torch.randn(BATCH, 1, 6, 6, dtype=torch.float64)
    with tn.TopologicalRegulariser(model, formula="t1", conv=conv) as reg:
        model(x)
        A = reg.activations().detach()
    with torch.no_grad():
        h = F.relu(model.conv(x))  # (m, 3, 4, 4)
        hidden = h.flatten(1) if conv == "flatten" else h.mean(dim=(2, 3))
        want = torch.cat([hidden, model(x)], dim=1)
    assert A.shape == want.shape == (BATCH, (48 if conv == "flatten" else 3) + 4)
    torch.testing.assert_close(A, want, rtol=1e-12, atol=1e-12)


def test_callable_dissimilarity():
    model = _mlp()
    x = _inputs()

    def one_minus_rho2(A):
        """(m, n) -> (n, n): 1 - rho^2."""
        return 1.0 - dissimilarity.correlation(A) ** 2

    with tn.TopologicalRegulariser(model, formula="t1", dissimilarity=one_minus_rho2) as reg:
        model(x)
        value = reg()
    A = _hand_activations(model, x)
    want = regularisers.t1(persistence.deaths(one_minus_rho2(A)))
    torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda A: -dissimilarity.abs_correlation(A), "negative entry"),
    (lambda A: dissimilarity.abs_correlation(A) + torch.triu(torch.full((A.shape[1],) * 2, 0.5), 1),
     "not symmetric"),
    (lambda A: dissimilarity.abs_correlation(A) * float("nan"), "NaN or inf"),
])
def test_a_users_dissimilarity_is_checked(bad, match):
    """The built-ins are valid by construction; a user's function may not be."""
    model = _mlp()
    with tn.TopologicalRegulariser(model, formula="t1", dissimilarity=bad) as reg:
        model(_inputs())
        with pytest.raises(ValueError, match=match):
            reg()


@pytest.mark.parametrize("formula", ["l1", "l2"])
def test_weight_formulas_need_no_forward_pass(formula):
    model = _mlp()
    reg = tn.TopologicalRegulariser(model, formula=formula)
    want = sum((w.abs() if formula == "l1" else w * w).sum() for w in _linear_weights(model).values())
    torch.testing.assert_close(reg(), want, rtol=1e-12, atol=1e-12)
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match="weights"):
        reg.activations()


# --------------------------------------------------------------------------
# dead neurons
# --------------------------------------------------------------------------
@pytest.mark.parametrize("formula", FORMULAS)
def test_dead_layer_gives_finite_value_and_gradients(formula):
    model = _mlp()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)  # every relu2 unit is 0 on every input
        model.fc1.bias[:4] = -1e3   # and four relu1 units
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula=formula) as reg:
        out = model(x)
        A = reg.activations()
        assert (A[:, 16:28] == 0).all() and (A[:, :4] == 0).all()
        value = reg()
        (F.cross_entropy(out, torch.zeros(BATCH, dtype=torch.long)) + value).backward()
    assert torch.isfinite(value)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the live relu1 units still receive the regulariser's gradient
    assert model.fc1.weight.grad[4:].abs().sum() > 0


def test_dead_neurons_count_as_uncorrelated_in_t1():
    # a dead unit has rho = 0 with everyone: d = 1, so its MST edge adds 1 - 1 = 0 to T1
    model = _mlp()
    with torch.no_grad():
        model.fc1.bias[0] = -1e3
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        model(x)
        deaths = reg.deaths().detach()
    A = _hand_activations(model, x)
    D = dissimilarity.abs_correlation(A)
    assert (D[0, 1:] == 1).all()
    np.testing.assert_allclose(deaths.numpy(), _scipy_mst_weights(D), rtol=1e-12)


# --------------------------------------------------------------------------
# recording life cycle
# --------------------------------------------------------------------------
def test_no_recorded_forward_pass_raises():
    model = _mlp()
    reg = tn.TopologicalRegulariser(model)
    with pytest.raises(ValueError, match="forward pass"):
        reg()
    with torch.no_grad():
        model(_inputs())
    with pytest.raises(ValueError, match="forward pass"):
        reg()
    reg.remove()


def test_remove_and_with_block_remove_the_hooks():
    model = _mlp()
    reg = tn.TopologicalRegulariser(model)
    assert not _no_hooks_left(model)
    reg.remove()
    assert _no_hooks_left(model)
    model(_inputs())
    with pytest.raises(ValueError):
        reg()
    with tn.TopologicalRegulariser(model, formula="decov") as reg2:
        model(_inputs())
        assert torch.isfinite(reg2())
        assert not _no_hooks_left(model)
    assert _no_hooks_left(model)
    model(_inputs())
    with pytest.raises(ValueError):
        reg2()


def test_disabled_records_nothing():
    model = _mlp()
    with tn.TopologicalRegulariser(model) as reg:
        model(_inputs())
        reg.enabled = False
        assert not reg.enabled
        with pytest.raises(ValueError):  # disabling drops what was recorded
            reg()
        model(_inputs())
        with pytest.raises(ValueError):
            reg()
        reg.enabled = True
        model(_inputs())
        assert torch.isfinite(reg())


def test_random_sampler_inside_the_regulariser_is_reproducible():
    values = []
    for _ in range(2):
        model = _mlp()
        with tn.TopologicalRegulariser(model, formula="t1", sampler=RandomSampler(0.5, seed=4)) as reg:
            model(_inputs())
            values.append(reg().detach())
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------
def test_model_parameters_are_not_registered():
    model = _mlp()
    reg = tn.TopologicalRegulariser(model)
    assert list(reg.parameters()) == []
    assert reg.state_dict() == {}
    assert reg.model is model
    reg.remove()


@pytest.mark.parametrize("kwargs, match", [
    ({"formula": "t3"}, "unknown formula"),
    ({"backend": "gudhi"}, "unknown persistence backend"),
    ({"dissimilarity": "cosine"}, "unknown dissimilarity"),
    ({"sync": "everywhere"}, "sync"),
    ({"alpha": 1.5}, "alpha"),
    ({"sampler": "importance"}, "sampler"),
    ({"conv": "pixels"}, "conv"),
    ({"modules": ["fc9"]}, "no module named"),
])
def test_bad_configuration_raises(kwargs, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        tn.TopologicalRegulariser(model, **kwargs)
    assert _no_hooks_left(model)


@pytest.mark.skipif("ripser" not in persistence.available_backends(), reason="ripser.py not installed")
@pytest.mark.parametrize("formula", ["t1", "t2"])
def test_value_only_backend_is_refused_for_t1_t2(formula):
    with pytest.raises(ValueError, match="death edges"):
        tn.TopologicalRegulariser(_mlp(), formula=formula, backend="ripser")


@pytest.mark.skipif("ripser" not in persistence.available_backends(), reason="ripser.py not installed")
def test_value_only_backend_deaths_match_the_torch_backend():
    # ripser is fine where no gradient through deaths is needed
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="min_corr", backend="ripser") as reg:
        model(x)
        got = reg.deaths()
    D = dissimilarity.abs_correlation(_hand_activations(model, x))
    np.testing.assert_allclose(got.numpy(), _scipy_mst_weights(D), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("formula", FORMULAS)
def test_cuda_value_and_gradient_match_cpu(formula):
    results = []
    for device in ("cpu", "cuda"):
        model = _mlp().to(device)
        with tn.TopologicalRegulariser(model, formula=formula) as reg:
            model(_inputs().to(device))
            value = reg()
            value.backward()
        results.append((value.detach().cpu(), model.fc1.weight.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------
# autocast: the formulas are computed in float32
# --------------------------------------------------------------------------
def _pipeline(formula, A):
    """The value from activations, by the functional pipeline (no autocast here)."""
    if formula in ("t1", "t2"):
        deaths = persistence.deaths(dissimilarity.abs_correlation(A))
        return regularisers.t1(deaths) if formula == "t1" else regularisers.t2(deaths)
    return regularisers.FORMULAS_ON_ACTIVATIONS[formula](A)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("formula", FORMULAS)
def test_under_autocast_the_value_is_the_float32_pipeline_on_the_recorded_activations(formula, dtype, device):
    """Activations of a few tens: DeCov's squared covariances overflow float16 (inf, silently, before).
    On CUDA, autocast is what mixed-precision training uses."""
    model = _mlp(torch.float32).to(device)
    with torch.no_grad():
        model.fc1.weight.mul_(30)
    x = _inputs(torch.float32).to(device)
    with tn.TopologicalRegulariser(model, formula=formula) as reg:
        with torch.autocast(device, dtype=dtype):
            model(x)
            value = reg()
            A = reg.activations()
        assert A.dtype == dtype  # recorded as autocast computed them
        assert value.dtype == torch.float32 and torch.isfinite(value)
        want = _pipeline(formula, A.detach().float())
        torch.testing.assert_close(value.detach(), want, rtol=1e-6, atol=1e-6)
        value.backward()
    assert torch.isfinite(model.fc1.weight.grad).all() and model.fc1.weight.grad.abs().sum() > 0


def test_under_autocast_deaths_and_dissimilarity_are_float32():
    model = _mlp(torch.float32)
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(_inputs(torch.float32))
            D, deaths = reg.dissimilarity_matrix(), reg.deaths()
        A = reg.activations().detach().float()
    assert D.dtype == deaths.dtype == torch.float32
    torch.testing.assert_close(D.detach(), dissimilarity.abs_correlation(A), rtol=0, atol=0)
    np.testing.assert_allclose(deaths.detach().numpy(), _scipy_mst_weights(dissimilarity.abs_correlation(A)),
                               rtol=1e-6)


# --------------------------------------------------------------------------
# a no-grad pass between the training forward and reg() keeps the training pass
# --------------------------------------------------------------------------
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_no_grad_pass_before_reg_keeps_the_training_pass(context):
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        model(x)
        with context():
            model(torch.randn(7, 10, dtype=torch.float64))  # a teacher / pseudo-label pass
        value = reg()
    want = regularisers.t1(persistence.deaths(dissimilarity.abs_correlation(_hand_activations(model, x))))
    torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# samplers inside the regulariser
# --------------------------------------------------------------------------
def test_random_sampler_draws_once_per_recorded_pass():
    """reg.activations() / reg.deaths() for logging and reg() see the same neurons; the next pass draws anew,
    in the seed's sequence: the reference sampler draws once per pass."""
    model = _mlp()
    reference = RandomSampler(0.5, seed=4)
    with tn.TopologicalRegulariser(model, formula="t1", sampler=RandomSampler(0.5, seed=4)) as reg:
        for step in range(3):
            x = torch.randn(BATCH, 10, dtype=torch.float64)
            model(x)
            logged = reg.activations().detach()
            reg.deaths()
            value = reg()
            torch.testing.assert_close(reg.activations().detach(), logged, rtol=0, atol=0)
            A = _hand_activations(model, x)
            layers = OrderedDict([("relu1", A[:, :16]), ("relu2", A[:, 16:28]), ("output", A[:, 28:])])
            chosen = reference.select(layers, "output")
            want_A = torch.cat([A[:, :16][:, chosen["relu1"]], A[:, 16:28][:, chosen["relu2"]], A[:, 28:]], dim=1)
            torch.testing.assert_close(logged, want_A, rtol=0, atol=0)
            want = regularisers.t1(persistence.deaths(dissimilarity.abs_correlation(want_A)))
            torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


def test_a_sampler_that_keeps_one_neuron_is_named_in_the_error():
    model = _mlp()  # widths 16, 12, 5: p = 0.07 keeps floor(1.12) = 1, floor(0.84) = 0, floor(0.35) = 0
    with tn.TopologicalRegulariser(model, sampler=ImportanceSampler(0.07, keep_output=False)) as reg:
        model(_inputs())
        with pytest.warns(UserWarning, match="keeps 0 of"), pytest.raises(
                ValueError, match=r"ImportanceSampler\(p=0.07, keep_output=False\) chose 1 neuron.*raise p"):
            reg()


def test_a_hidden_layer_that_p_leaves_out_is_warned_about_and_left_out():
    model = _mlp()  # p = 0.07 keeps 1 of relu1's 16, none of relu2's 12, the 5 logits whole
    x = _inputs()
    with tn.TopologicalRegulariser(model, sampler=ImportanceSampler(0.07)) as reg:
        model(x)
        with pytest.warns(UserWarning, match="keeps 0 of the 12 neurons of layer 'relu2'.*1/12"):
            value = reg()
    A = _hand_activations(model, x)
    top = int(np.argmax(A[:, :16].abs().mean(0).numpy()))
    want_A = torch.cat([A[:, top:top + 1], A[:, 28:]], dim=1)
    want = regularisers.t1(persistence.deaths(dissimilarity.abs_correlation(want_A)))
    torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# copies of a regulariser, and of its model
# --------------------------------------------------------------------------
class _LightningStyle(nn.Module):
    """A module that holds the network and the regulariser as attributes."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.reg = tn.TopologicalRegulariser(self.net, formula="t1", sampler=RandomSampler(0.5, seed=2))

    def forward(self, x):
        return self.net(x)


def _t1_of(model, x, sampler):
    A = _hand_activations(model, x)
    layers = OrderedDict([("relu1", A[:, :16]), ("relu2", A[:, 16:28]), ("output", A[:, 28:])])
    return regularisers.t1(persistence.deaths(dissimilarity.abs_correlation(sampler(layers, "output"))))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "averaged_model"])
def test_a_module_holding_the_regulariser_copies_after_a_forward_and_the_copy_records(how):
    module = _LightningStyle()
    x = _inputs()
    module(x)
    value = module.reg().detach()
    if how == "deepcopy":
        clone = copy.deepcopy(module)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(module))
    else:
        clone = torch.optim.swa_utils.AveragedModel(module).module
    assert clone.reg.model is clone.net and clone.net is not module.net
    assert not clone.reg.recorder.has_pass
    with torch.no_grad():
        clone.net.fc1.weight.mul_(-2.0)
    x2 = torch.randn(BATCH + 4, 10, dtype=torch.float64)
    clone(x2)
    # the copy's sampler continues the original's sequence from where the copy was made
    sampler = copy.deepcopy(module.reg.sampler)
    torch.testing.assert_close(clone.reg().detach(), _t1_of(clone.net, x2, sampler), rtol=1e-12, atol=1e-12)
    # the original is untouched
    torch.testing.assert_close(module.reg().detach(), value, rtol=0, atol=0)


def test_a_model_with_a_regulariser_attached_pickles_with_inert_hooks():
    model = _mlp()
    x = _inputs()
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        model(x)
        value = reg().detach()
        buffer = io.BytesIO()
        torch.save(model, buffer)
        clone = pickle.loads(pickle.dumps(model))
        clone(torch.randn(5, 10, dtype=torch.float64))
        torch.testing.assert_close(reg().detach(), value, rtol=0, atol=0)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_after_the_with_block_the_error_says_the_hooks_were_removed():
    model = _mlp()
    with tn.TopologicalRegulariser(model, formula="t1") as reg:
        model(_inputs())
    with pytest.raises(ValueError, match="hooks were removed"):
        reg()


# -- unbounded formula x dissimilarity (T1 on euclidean wrecked training: 486 -> -1.6e7 on digits) --

def _relu_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("fc", nn.Linear(10, 8)), ("relu", nn.ReLU())])).double()


def test_t1_on_euclidean_is_unbounded_below_and_descent_runs_it_down():
    """The failure itself: scaling a ReLU layer by c scales the euclidean deaths by c, so
    T1 = (n - 1) - c * sum(d) has no lower bound, and gradient descent finds that."""
    model, x = _relu_layer(), _inputs()
    with pytest.warns(UserWarning, match="no lower bound"):
        reg = tn.TopologicalRegulariser(model, formula="t1", dissimilarity="euclidean", include_output=False,
                                        allow_unbounded=True)
    model(x)
    base = reg().item()
    deaths = reg.deaths().sum().item()
    for c in (10.0, 1e3):
        scaled = _relu_layer()
        with torch.no_grad():
            scaled.fc.weight.mul_(c), scaled.fc.bias.mul_(c)
        with pytest.warns(UserWarning, match="no lower bound"):
            reg_c = tn.TopologicalRegulariser(scaled, formula="t1", dissimilarity="euclidean",
                                              include_output=False, allow_unbounded=True)
        scaled(x)
        # hand computation: (n - 1) - c * sum of the unscaled deaths
        assert reg_c().item() == pytest.approx(7 - c * deaths, rel=1e-9)
        reg_c.remove()

    def descend(model, reg):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(30):
            opt.zero_grad()
            model(x)
            reg().backward()
            opt.step()
        model(x)
        return reg().item()

    assert descend(model, reg) < base - 50  # still falling: nothing stops it
    # the bounded default, T1 = sum |rho| over the tree, stays >= 0 under the same descent
    other = _relu_layer()
    assert descend(other, tn.TopologicalRegulariser(other, formula="t1", include_output=False)) >= 0.0


@pytest.mark.parametrize("formula,alpha", [("t1", 0.5), ("t2", 0.5), ("t2", 0.0)])
def test_unbounded_formula_on_euclidean_is_refused_at_construction(formula, alpha):
    with pytest.raises(ValueError, match="allow_unbounded=True"):
        tn.TopologicalRegulariser(_mlp(), formula=formula, dissimilarity="euclidean", alpha=alpha)
    with pytest.raises(ValueError, match="no lower bound"):  # what a front end calls before training
        tn.nn.check_bounded(formula, "euclidean", alpha)
    # the function itself, not only its name
    with pytest.raises(ValueError, match="no lower bound"):
        tn.TopologicalRegulariser(_mlp(), formula=formula, dissimilarity=dissimilarity.euclidean, alpha=alpha)


def test_bounded_combinations_on_euclidean_are_accepted_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tn.TopologicalRegulariser(_mlp(), formula="t2", dissimilarity="euclidean", alpha=1.0)  # a std: >= 0
        tn.TopologicalRegulariser(_mlp(), formula="min_corr", dissimilarity="euclidean")  # not on deaths
        for name in ("abs_correlation", "sqrt_one_minus_rho2", "one_minus_rho"):
            tn.TopologicalRegulariser(_mlp(), formula="t1", dissimilarity=name)


def test_training_with_t1_on_euclidean_stops_before_the_first_step():
    from toponeuro import training

    model = _mlp().float()
    params = [p.detach().clone() for p in model.parameters()]
    X, y = torch.rand(8, 1, 2, 5), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match="allow_unbounded"):
        training.fit(nn.Sequential(nn.Flatten(), model), (X, y), (X, y), method="t1", weight=1e-2,
                     dissimilarity="euclidean", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
