"""The regulariser under DistributedDataParallel: two CPU processes, gloo, loopback.

One module-scoped fixture starts two worker processes (spawn), which run every
scenario in one process group and save what they saw to files; the tests
compare those with single-process references computed here, in the parent,
without a process group.

Scenarios, for each formula and each ``sync`` mode, with identical weights
(the parent saves one state dict that both ranks load) and a 16-sample batch
split 8 + 8 across the two ranks:

* ``global``: the value on each rank equals the single-process value on the
  whole batch, the same on both ranks; after ``backward()`` through DDP, with
  ``loss = CE(mean over the local slice) + lam * reg()``, every parameter
  gradient equals the single-process gradient of
  ``CE(mean over the whole batch) + lam * reg`` on the whole batch.
* ``local``: the value equals the single-process value on the rank's slice;
  DDP's gradients are the mean over ranks of the per-slice gradients.
* a second problem where a ReLU unit is dead (constant 0) on rank 1's slice
  only and another unit is dead on both slices: values and gradients stay
  finite and still equal the references.
* unequal batch sizes across ranks with ``sync="global"`` raise ValueError.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import OrderedDict
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toponeuro as tn
from toponeuro import dissimilarity, persistence, regularisers
from toponeuro.distributed import gather_batch, is_distributed
from toponeuro.sampling import ImportanceSampler

WORLD_SIZE = 2
BATCH = 16
SLICE = BATCH // WORLD_SIZE
IN_FEATURES = 6
NUM_CLASSES = 4
LAM = 0.5
FORMULAS = ("t1", "t2", "min_corr", "decov")
SYNCS = ("global", "local")
PROBLEMS = ("plain", "dead")
IMPORTANCE_P = 0.5
TIMEOUT_S = 240  # the whole two-process run; the process group times out earlier
DTYPE = torch.float64


# --------------------------------------------------------------------------
# the problem: a small float64 MLP and a batch, built in the parent
# --------------------------------------------------------------------------
def _mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(IN_FEATURES, 8)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(8, 7)),
        ("relu2", nn.ReLU()),
        ("out", nn.Linear(7, NUM_CLASSES)),
    ])).to(DTYPE)


def _problem(name: str) -> dict:
    """state dict, inputs (16, 6) and labels (16,) of one problem.

    ``"dead"``: ``relu1`` unit 0 is ``relu(x[:, 0])`` and ``x[:, 0] < 0`` on
    rank 1's slice only, so the unit is constant 0 there; ``relu1`` unit 1 is
    ``relu(x[:, 1])`` with ``x[:, 1] < 0`` everywhere: dead on both slices.
    """
    torch.manual_seed(1234 if name == "plain" else 4321)
    model = _mlp()
    x = torch.randn(BATCH, IN_FEATURES, dtype=DTYPE)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    if name == "dead":
        with torch.no_grad():
            for unit in (0, 1):
                model.fc1.weight[unit].zero_()
                model.fc1.weight[unit, unit] = 1.0
                model.fc1.bias[unit] = 0.0
            x[:SLICE, 0] = torch.linspace(-1.0, 2.0, SLICE, dtype=DTYPE)  # mixed signs on rank 0
            x[SLICE:, 0] = -x[SLICE:, 0].abs() - 0.1                     # negative on rank 1
            x[:, 1] = -x[:, 1].abs() - 0.1                               # negative everywhere
    return {"state": model.state_dict(), "x": x, "y": y}


def _load(problem: dict) -> nn.Sequential:
    model = _mlp()
    model.load_state_dict(problem["state"])
    return model


def _key(problem: str, formula: str, sync: str) -> str:
    return f"{problem}/{formula}/{sync}"


# --------------------------------------------------------------------------
# the worker: one rank of the process group
# --------------------------------------------------------------------------
def _worker(rank: int, port: int, problems_path: str, out_dir: str) -> None:
    try:
        _run_rank(rank, port, problems_path, out_dir)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_rank(rank: int, port: int, problems_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    problems = torch.load(problems_path, weights_only=True)
    rows = slice(rank * SLICE, (rank + 1) * SLICE)
    results: dict = {"is_distributed": torch.tensor(is_distributed())}
    for pname in PROBLEMS:
        x, y = problems[pname]["x"][rows], problems[pname]["y"][rows]
        for formula in FORMULAS:
            for sync in SYNCS:
                model = _load(problems[pname])
                reg = tn.TopologicalRegulariser(model, formula=formula, sync=sync)
                ddp = DDP(model)
                out = ddp(x)
                value = reg()
                activations = reg.activations()
                loss = F.cross_entropy(out, y) + LAM * value
                loss.backward()
                results[_key(pname, formula, sync)] = {
                    "value": value.detach(),
                    "activations": activations.detach(),
                    "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                }
                reg.remove()
    # the importance sampler reads the values: under "global" it must choose on the global batch
    x, y = problems["plain"]["x"][rows], problems["plain"]["y"][rows]
    for sync in SYNCS:
        model = _load(problems["plain"])
        reg = tn.TopologicalRegulariser(model, formula="t1", sync=sync, sampler=ImportanceSampler(IMPORTANCE_P))
        ddp = DDP(model)
        out = ddp(x)
        value = reg()
        activations = reg.activations()
        (F.cross_entropy(out, y) + LAM * value).backward()
        results[f"importance/t1/{sync}"] = {
            "value": value.detach(),
            "activations": activations.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
        reg.remove()
    # the regulariser may also be built around the DDP wrapper itself
    x, y = problems["plain"]["x"][rows], problems["plain"]["y"][rows]
    model = _load(problems["plain"])
    ddp = DDP(model)
    with tn.TopologicalRegulariser(ddp, formula="t1", sync="global") as reg:
        out = ddp(x)
        value = reg()
        (F.cross_entropy(out, y) + LAM * value).backward()
    results["wrapper/t1/global"] = {
        "value": value.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }
    # unequal batch sizes with sync="global": every rank must refuse
    A = torch.randn(SLICE - rank, 3, dtype=DTYPE)
    try:
        gather_batch(A, "global")
        results["unequal_error"] = ""
    except ValueError as err:
        results["unequal_error"] = str(err)
    dist.barrier()  # no rank tears the group down while another still talks
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _run_workers(problems_path: str, out_dir: str, port: int) -> list[str]:
    """Start the ranks, wait (bounded), and return their error reports (empty: success)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, problems_path, out_dir)) for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one rank failed: do not wait for the other's timeout
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = []
    for r, p in enumerate(procs):
        err_path = os.path.join(out_dir, f"rank{r}.err")
        if os.path.exists(err_path):
            with open(err_path) as f:
                errors.append(f"rank {r}:\n{f.read()}")
        elif p.exitcode != 0:
            errors.append(f"rank {r} exited with code {p.exitcode}")
    return errors


def _spawn_workers(tmp: str, free_port) -> list[dict]:
    problems_path = os.path.join(tmp, "problems.pt")
    torch.save({name: _problem(name) for name in PROBLEMS}, problems_path)
    for attempt in range(3):
        out_dir = os.path.join(tmp, f"attempt{attempt}")
        os.makedirs(out_dir)
        # the free port is released before the ranks bind it; another process
        # may take it in between, which is the one failure worth a retry
        errors = _run_workers(problems_path, out_dir, free_port())
        if not any("address already in use" in e.lower() for e in errors):
            break
    if errors:
        pytest.fail("distributed workers failed:\n" + "\n".join(errors))
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, free_port) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    return _spawn_workers(str(tmp_path_factory.mktemp("ddp")), free_port)


# --------------------------------------------------------------------------
# single-process references (no process group here)
# --------------------------------------------------------------------------
def _reference(pname: str, formula: str, rows=slice(None), lam: float = LAM, sampler=None) -> dict:
    problem = _problem(pname)
    model = _load(problem)
    x, y = problem["x"][rows], problem["y"][rows]
    with tn.TopologicalRegulariser(model, formula=formula, sync="local", sampler=sampler) as reg:
        out = model(x)
        value = reg()
        activations = reg.activations().detach()
        (F.cross_entropy(out, y) + lam * value).backward()
    return {
        "value": value.detach(),
        "activations": activations,
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }


def _slice_rows(rank: int) -> slice:
    return slice(rank * SLICE, (rank + 1) * SLICE)


def _assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"{what}, parameter {name}: {m}")


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_workers_ran_inside_a_process_group(ranks):
    assert all(bool(r["is_distributed"]) for r in ranks)


@pytest.mark.parametrize("pname", PROBLEMS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_global_value_is_the_whole_batch_value_on_every_rank(ranks, pname, formula):
    ref = _reference(pname, formula)
    key = _key(pname, formula, "global")
    for rank, res in enumerate(ranks):
        r = res[key]
        # the activations each rank sees are the whole batch, in rank order
        assert r["activations"].shape == ref["activations"].shape
        torch.testing.assert_close(r["activations"], ref["activations"], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(r["value"], ref["value"], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"rank {rank}: {m}")
    # every rank computes the same value from the same gathered matrix
    assert torch.equal(ranks[0][key]["value"], ranks[1][key]["value"])


@pytest.mark.parametrize("pname", PROBLEMS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_global_ddp_gradients_are_the_whole_batch_gradients(ranks, pname, formula):
    ref = _reference(pname, formula)
    # the regulariser's share of the gradient is far above the tolerance, so a
    # wrong world-size factor (or a per-rank regulariser) cannot pass
    task_only = _reference(pname, formula, lam=0.0)
    diff = max((ref["grads"][n] - task_only["grads"][n]).abs().max().item() for n in ref["grads"])
    assert diff > 1e-4
    for rank, res in enumerate(ranks):
        _assert_grads_close(res[_key(pname, formula, "global")]["grads"], ref["grads"],
                            f"{pname}/{formula}/global rank {rank}")


@pytest.mark.parametrize("pname", PROBLEMS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_local_value_is_the_slice_value(ranks, pname, formula):
    whole = _reference(pname, formula)["value"]
    key = _key(pname, formula, "local")
    for rank, res in enumerate(ranks):
        ref = _reference(pname, formula, rows=_slice_rows(rank))
        torch.testing.assert_close(res[key]["activations"], ref["activations"], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(res[key]["value"], ref["value"], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"rank {rank}: {m}")
        # and it is not the global value: the two modes differ
        assert not torch.allclose(ref["value"], whole, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pname", PROBLEMS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_local_ddp_gradients_are_the_mean_of_slice_gradients(ranks, pname, formula):
    slices = [_reference(pname, formula, rows=_slice_rows(r))["grads"] for r in range(WORLD_SIZE)]
    want = {n: sum(g[n] for g in slices) / WORLD_SIZE for n in slices[0]}
    for rank, res in enumerate(ranks):
        _assert_grads_close(res[_key(pname, formula, "local")]["grads"], want,
                            f"{pname}/{formula}/local rank {rank}")


def test_importance_sampler_chooses_on_the_global_batch(ranks):
    """Each rank's slice ranks the neurons differently; under "global" every rank must use the
    neurons chosen on the whole batch, or the gathered columns mix different neurons."""
    problem = _problem("plain")
    model = _load(problem)
    with torch.no_grad():
        h = model.relu1(model.fc1(problem["x"]))
    sampler = ImportanceSampler(IMPORTANCE_P)
    whole = sampler.select({"relu1": h}, None)["relu1"].tolist()
    per_slice = [sampler.select({"relu1": h[_slice_rows(r)]}, None)["relu1"].tolist() for r in range(WORLD_SIZE)]
    assert any(c != whole for c in per_slice)  # otherwise this test could not fail
    ref = _reference("plain", "t1", sampler=ImportanceSampler(IMPORTANCE_P))
    for rank, res in enumerate(ranks):
        r = res["importance/t1/global"]
        torch.testing.assert_close(r["activations"], ref["activations"], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(r["value"], ref["value"], rtol=1e-10, atol=1e-12)
        _assert_grads_close(r["grads"], ref["grads"], f"importance/t1/global rank {rank}")
        local = _reference("plain", "t1", rows=_slice_rows(rank), sampler=ImportanceSampler(IMPORTANCE_P))
        torch.testing.assert_close(res["importance/t1/local"]["value"], local["value"], rtol=1e-10, atol=1e-12)


def test_dead_problem_has_the_dead_units_it_claims():
    problem = _problem("dead")
    model = _load(problem)
    with torch.no_grad():
        h = model.relu1(model.fc1(problem["x"]))
    rank0, rank1 = h[:SLICE], h[SLICE:]
    assert rank0[:, 0].unique().numel() > 1      # unit 0 alive on rank 0
    assert (rank1[:, 0] == 0).all()              # ... dead on rank 1 only
    assert (h[:, 1] == 0).all()                  # unit 1 dead on both slices


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("sync", SYNCS)
def test_dead_neuron_gives_finite_values_and_gradients(ranks, formula, sync):
    for rank, res in enumerate(ranks):
        r = res[_key("dead", formula, sync)]
        assert torch.isfinite(r["value"]).all(), f"rank {rank}"
        for name, g in r["grads"].items():
            assert torch.isfinite(g).all(), f"rank {rank}, {name}"


def test_regulariser_around_the_ddp_wrapper_gives_the_whole_batch_gradient(ranks):
    ref = _reference("plain", "t1")
    for rank, res in enumerate(ranks):
        torch.testing.assert_close(res["wrapper/t1/global"]["value"], ref["value"], rtol=1e-10, atol=1e-12)
        _assert_grads_close(res["wrapper/t1/global"]["grads"], ref["grads"], f"wrapper rank {rank}")


def test_unequal_batch_sizes_raise_on_every_rank(ranks):
    for rank, res in enumerate(ranks):
        assert "same batch size" in res["unequal_error"], f"rank {rank}: {res['unequal_error']!r}"


# --------------------------------------------------------------------------
# without a process group: both modes are the plain single-process value
# --------------------------------------------------------------------------
@pytest.mark.parametrize("formula", FORMULAS)
def test_without_process_group_both_modes_are_the_plain_value(formula):
    assert not is_distributed()
    problem = _problem("plain")
    model = _load(problem)
    x = problem["x"]
    regs = {sync: tn.TopologicalRegulariser(model, formula=formula, sync=sync) for sync in SYNCS}
    model(x)
    # independent reference: the layers by hand, then the functional pipeline
    with torch.no_grad():
        h1 = model.relu1(model.fc1(x))
        h2 = model.relu2(model.fc2(h1))
        A = torch.cat([h1, h2, model.out(h2)], dim=1)
    if formula in ("t1", "t2"):
        deaths = persistence.deaths(dissimilarity.abs_correlation(A))
        plain = regularisers.t1(deaths) if formula == "t1" else regularisers.t2(deaths, alpha=0.5)
    else:
        plain = regularisers.FORMULAS_ON_ACTIVATIONS[formula](A)
    for sync, reg in regs.items():
        torch.testing.assert_close(reg.activations().detach(), A, rtol=0, atol=0)
        torch.testing.assert_close(reg().detach(), plain, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"sync={sync}: {m}")
        reg.remove()


def test_gather_batch_without_process_group_returns_its_input():
    A = torch.randn(5, 3, requires_grad=True)
    for sync in SYNCS:
        assert gather_batch(A, sync) is A


def test_gather_batch_rejects_unknown_sync():
    with pytest.raises(ValueError, match="sync"):
        gather_batch(torch.randn(4, 3), "everywhere")
    with pytest.raises(ValueError, match="sync"):
        tn.TopologicalRegulariser(_mlp(), sync="everywhere")
