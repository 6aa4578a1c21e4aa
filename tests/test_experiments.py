"""Tests for toponeuro.experiments: configs, the resumable runner, the report's statistics."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import queue
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from toponeuro import cli, models, training
from toponeuro.experiments import config as cfgmod
from toponeuro.experiments import report, runner

TINY = """
[experiment]
name = "tiny"
dataset = "digits"

[grid]
networks = ["mlp"]
methods = ["none", "l2"]
weights = [0.1]
seeds = [0]

[training]
max_epochs = 2
"""


def tiny(**replace) -> cfgmod.ExperimentConfig:
    text = TINY
    for old, new in replace.items():
        text = text.replace(old, new)
    return cfgmod.parse_config(text)


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, needle", [
    (("[training]", "[trainng]"), r"\[trainng\]: unknown section"),
    (('name = "tiny"', 'nam = "tiny"'), r"experiment\.nam: unknown key"),
    (('name = "tiny"', ''), r"experiment\.name: missing"),
    (('dataset = "digits"', 'dataset = "cifar10"'), r"experiment\.dataset: unknown dataset 'cifar10'"),
    (('methods = ["none", "l2"]', 'methods = ["none", "foo"]'), r"grid\.methods: unknown method 'foo'; choose from none, t1"),
    (('methods = ["none", "l2"]', 'methods = ["dropout"]'), r"grid\.methods: unknown method 'dropout'.*mlp-dropout"),
    (('methods = ["none", "l2"]', 'methods = "l2"'), r"grid\.methods: must be a non-empty list"),
    (('networks = ["mlp"]', 'networks = ["resnet"]'), r"grid\.networks: unknown network 'resnet'"),
    (('weights = [0.1]', 'weights = [-0.1]'), r"grid\.weights"),
    (('weights = [0.1]', 'weights = ["big"]'), r"grid\.weights"),
    (('weights = [0.1]', 'weights = [0.1, 0.1]'), r"grid\.weights: duplicate"),
    (('seeds = [0]', 'seeds = [1.5]'), r"grid\.seeds"),
    (('seeds = [0]', ''), r"grid\.seeds: missing"),
    (("max_epochs = 2", "max_epochs = 2.5"), r"training\.max_epochs: must be an integer"),
    (("max_epochs = 2", 'lr = "fast"'), r"training\.lr: must be a number"),
    (("max_epochs = 2", "batch_size = 1"), r"training\.batch_size"),
    (("max_epochs = 2", "nesterov = 1"), r"training\.nesterov"),
    (("max_epochs = 2", "epochs = 2"), r"training\.epochs: unknown key"),
    (('dataset = "digits"', 'dataset = "digits"\nlimit = -5'), r"experiment\.limit"),
    (("[training]", '[regulariser]\nsampler = { kind = "bogus" }\n[training]'), r"regulariser\.sampler\.kind"),
    (("[training]", '[regulariser]\nsampler = { kind = "importance" }\n[training]'), r"regulariser\.sampler\.p: missing"),
    (("[training]", '[regulariser]\nsampler = { kind = "random", p = 2 }\n[training]'), r"regulariser\.sampler\.p"),
    (("[training]", '[regulariser]\nbackend = "nope"\n[training]'), r"regulariser\.backend: unknown backend 'nope'"),
    (("[training]", '[regulariser]\nalpha = 3\n[training]'), r"regulariser\.alpha"),
    (("[training]", '[regulariser.networks.resnet]\nalpha = 0.1\n[training]'), r"regulariser\.networks\.resnet"),
    (("[training]", '[regulariser.networks.mlp]\nfoo = 1\n[training]'), r"regulariser\.networks\.mlp\.foo"),
    (("[grid]", "[grid\n"), r"not valid TOML"),
    (('name = "tiny"', 'name = "ti\\u0000ny"'), r"experiment\.name: must be a plain folder name \(no control"),
    (('name = "tiny"', 'name = "ti\\nny"'), r"experiment\.name: must be a plain folder name \(no control"),
])
def test_bad_configs_name_the_key(edit, needle):
    old, new = edit
    assert old in TINY
    with pytest.raises(ValueError, match=needle):
        cfgmod.parse_config(TINY.replace(old, new, 1))


def test_the_cnn_sampling_pair_differs_only_in_the_sampler():
    """fashion-cnn-every-neuron against fashion-cnn-sampled: one comparison, so one difference."""
    every, sampled = cfgmod.load_config("fashion-cnn-every-neuron"), cfgmod.load_config("fashion-cnn-sampled")
    assert every.regulariser_for("cnn").sampler_dict == {"kind": "all"}
    assert sampled.regulariser_for("cnn").sampler_dict == {"kind": "importance", "p": 0.005}
    same = ("dataset", "networks", "methods", "weights", "seeds", "training", "pixel_scale", "init", "report", "limit")
    assert all(getattr(every, k) == getattr(sampled, k) for k in same)
    assert dataclasses.replace(every.regulariser, sampler=sampled.regulariser.sampler) == sampled.regulariser
    paper = cfgmod.load_config("mnist-paper").training
    assert (every.training.max_epochs, every.training.patience) == (paper.max_epochs, paper.patience) == (1200, 20)


def test_shipped_configs_load_and_mnist_paper_is_the_papers_protocol():
    shipped = cfgmod.shipped_configs()
    assert {"mnist-paper", "mnist-quick", "fashion-mnist"} <= set(shipped)
    paper = cfgmod.load_config("mnist-paper")
    assert paper.dataset == "mnist" and paper.limit is None
    assert paper.networks == ("mlp", "mlp-dropout", "mlp-deep")
    assert set(paper.methods) == {"none", "t1", "t2", "l1", "l2", "min_corr", "decov"}
    assert paper.weights == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 100.0)
    t = paper.training
    assert (t.lr, t.momentum, t.nesterov, t.lr_decay, t.lr_decay_steps, t.batch_size, t.max_epochs, t.patience) == (
        0.01, 0.9, True, 0.95, 3520, 256, 1200, 20)
    assert paper.regulariser.sampler_dict == {"kind": "all"}
    # 3 networks x (1 none + 6 methods x 10 weights) x seeds
    assert len(paper.runs()) == 3 * (1 + 6 * 10) * len(paper.seeds)
    assert len({r.key for r in paper.runs()}) == len(paper.runs())
    fashion = cfgmod.load_config("fashion-mnist")
    assert "cnn" in fashion.networks
    assert fashion.regulariser_for("cnn").sampler_dict["kind"] == "importance"
    assert fashion.regulariser_for("cnn").sampler_dict["p"] < 0.1
    assert fashion.regulariser_for("mlp").sampler_dict == {"kind": "all"}
    quick = cfgmod.load_config(shipped["mnist-quick"])  # by path too
    assert quick.name == "mnist-quick" and quick.limit is not None


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="mnist-quick"):
        cfgmod.load_config("no-such-config")


def test_none_runs_once_per_seed_with_weight_zero():
    cfg = tiny(**{'weights = [0.1]': "weights = [0.1, 1, 10]", "seeds = [0]": "seeds = [0, 1]"})
    runs = cfg.runs()
    assert [(r.method, r.weight, r.seed) for r in runs] == [
        ("none", 0.0, 0), ("l2", 0.1, 0), ("l2", 1.0, 0), ("l2", 10.0, 0),
        ("none", 0.0, 1), ("l2", 0.1, 1), ("l2", 1.0, 1), ("l2", 10.0, 1)]


# -- runner with a stand-in for fit -------------------------------------------------------------

class FakeFit:
    """Counts calls; writes two epochs of curve; optionally interrupts at call number ``stop_at``.

    ``device(method, weight, seed)`` gives the device the result reports (default ``"cpu"``).
    ``received`` records, per call, the model and every other keyword argument it was given.
    """

    def __init__(self, stop_at=None, device=None):
        self.calls = []
        self.received = []
        self.stop_at = stop_at
        self.device = device or (lambda method, weight, seed: "cpu")

    def __call__(self, model, train, val, test=None, *, method, weight, seed, on_epoch=None, **kw):
        self.calls.append((method, weight, seed))
        self.received.append({"model": model, "train": train, **kw})
        for epoch in (1, 2):
            on_epoch({"epoch": epoch, "train_loss": 1.0, "train_reg": 0.0, "val_loss": 0.5,
                      "val_accuracy": 0.8, "lr": 0.01, "seconds": 0.1})
            if self.stop_at == len(self.calls) and epoch == 1:
                raise KeyboardInterrupt  # killed half-way through this run
        acc = 0.5 + weight / 10
        return training.FitResult(val_accuracy=acc, val_loss=0.4, test_accuracy=acc - 0.01, test_loss=0.45,
                                  best_epoch=2, epochs=2, seconds=0.2, seconds_per_epoch=0.1,
                                  stopped_early=False, diverged=False, device=self.device(method, weight, seed),
                                  history=[])


def rows_of(directory):
    with open(Path(directory) / "runs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_resume_after_a_kill_does_not_duplicate_or_redo(tmp_path, monkeypatch):
    cfg = tiny()
    fake = FakeFit(stop_at=2)
    monkeypatch.setattr(training, "fit", fake)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    directory = tmp_path / "tiny"
    assert len(rows_of(directory)) == 1  # the first run finished and was written before the kill
    # the killed run left neither a row nor a curve (not even a half one, nor its temporary file)
    assert sorted(p.name for p in (directory / "curves").iterdir()) == ["digits_mlp_none_w0_s0.csv"]

    fake2 = FakeFit()
    monkeypatch.setattr(training, "fit", fake2)
    summary = runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    assert fake2.calls == [("l2", 0.1, 0)]  # only the killed run is redone
    assert (summary.already_done, summary.finished, summary.pending) == (1, 1, 0)
    rows = rows_of(directory)
    assert sorted((r["method"], r["weight"]) for r in rows) == [("l2", "0.1"), ("none", "0.0")]
    curve = (directory / "curves" / "digits_mlp_l2_w0.1_s0.csv").read_text().splitlines()
    assert curve[0].split(",") == list(runner.CURVE_COLUMNS) and len(curve) == 3  # rewritten whole

    fake3 = FakeFit()
    monkeypatch.setattr(training, "fit", fake3)
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    assert fake3.calls == [] and len(rows_of(directory)) == 2


def test_rows_carry_every_required_column(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "fit", FakeFit())
    runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    rows = rows_of(tmp_path / "tiny")
    required = ["dataset", "network", "method", "weight", "seed", "val_accuracy", "test_accuracy", "val_loss",
                "best_epoch", "epochs", "seconds", "device", "torch_version", "commit"]
    for row in rows:
        for col in required:
            assert row[col] != "", col
        assert row["device"] == "cpu" and row["dataset"] == "digits"
        assert row["train_size"] == "1149"  # digits' in-order 80/20 split of 1437
    assert (tmp_path / "tiny" / "config.toml").read_text() == tiny().text


def test_regulariser_settings_of_the_config_reach_fit(tmp_path, monkeypatch):
    """backend, dissimilarity, alpha and sampler (a random one seeded with the run's seed; a per-network override)."""
    from toponeuro import sampling

    cfg = tiny(**{
        'networks = ["mlp"]': 'networks = ["mlp", "mlp-deep"]',
        "seeds = [0]": "seeds = [0, 3]",
        "[training]": '[regulariser]\nbackend = "numba"\ndissimilarity = "euclidean"\nalpha = 0.2\n'
                      'sampler = { kind = "random", p = 0.5 }\n'
                      '[regulariser.networks.mlp-deep]\nsampler = { kind = "importance", p = 0.01 }\n'
                      'alpha = 0.7\n[training]',
    })
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    assert len(fake.calls) == 2 * 2 * 2  # (none, l2) x 2 networks x 2 seeds
    samplers = []
    for (method, weight, seed), kw in zip(fake.calls, fake.received):
        deep = kw["model"].fc1.out_features == models.HIDDEN_WIDTHS["mlp-deep"][0]  # 300, the mlp's is 450
        assert (kw["backend"], kw["dissimilarity"]) == ("numba", "euclidean")
        assert kw["alpha"] == (0.7 if deep else 0.2)
        assert kw["config"] == cfg.training and kw["train"][0].shape[0] == 1149
        sampler = kw["sampler"]
        if deep:
            assert type(sampler) is sampling.ImportanceSampler and sampler.p == 0.01
        else:
            assert type(sampler) is sampling.RandomSampler and sampler.p == 0.5 and sampler.seed == seed
        samplers.append(sampler)
    assert len({id(s) for s in samplers}) == len(samplers)  # a fresh sampler per run
    assert sorted(s.seed for s in samplers if isinstance(s, sampling.RandomSampler)) == [0, 0, 3, 3]
    # the rows record the same settings
    rows = rows_of(tmp_path / "tiny")
    assert {(r["network"], r["backend"], r["dissimilarity"], r["alpha"], r["sampler"]) for r in rows} == {
        ("mlp", "numba", "euclidean", "0.2", "random(p=0.5)"),
        ("mlp-deep", "numba", "euclidean", "0.7", "importance(p=0.01)")}


def test_the_all_sampler_reaches_fit_as_none(tmp_path, monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    assert [kw["sampler"] for kw in fake.received] == [None, None]
    assert {(kw["backend"], kw["dissimilarity"], kw["alpha"]) for kw in fake.received} == {
        ("torch", "abs_correlation", 0.5)}


def test_limit_runs_and_a_torn_row_are_handled(tmp_path, monkeypatch):
    cfg = tiny(**{"seeds = [0]": "seeds = [0, 1]"})
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    s = runner.run_experiment(cfg, out_root=tmp_path, device="cpu", limit_runs=1, progress=False)
    assert (s.finished, s.pending, len(fake.calls)) == (1, 3, 1)
    runs_csv = tmp_path / "tiny" / "runs.csv"
    with open(runs_csv, "a") as fh:
        fh.write("digits_mlp_l2_w0.1_s0,digits,mlp,l2,0.1,0,0.9")  # a row torn by a kill mid-write
    assert len(runner.read_rows(runs_csv)) == 1
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    rows = runner.read_rows(runs_csv)
    assert len(rows) == 4 and len({runner.row_key(r) for r in rows}) == 4
    assert len(fake.calls) == 4


def test_a_different_protocol_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "fit", FakeFit())
    runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="max_epochs: 2 there vs 5 in the config"):
        runner.run_experiment(tiny(**{"max_epochs = 2": "max_epochs = 5"}), out_root=tmp_path, device="cpu",
                              progress=False)


def test_a_failing_run_is_logged_and_stays_pending(tmp_path, monkeypatch):
    def broken(*args, method, **kw):
        if method == "l2":
            raise RuntimeError("boom")
        return FakeFit()(*args, method=method, **kw)

    monkeypatch.setattr(training, "fit", broken)
    s = runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    assert s.failed == ["digits_mlp_l2_w0.1_s0"] and s.pending == 1
    assert "boom" in (tmp_path / "tiny" / "errors.log").read_text()


def test_real_runs_are_reproducible(tmp_path):
    """Same config and seed on the same device -> the same row."""
    cfg = tiny(**{'methods = ["none", "l2"]': 'methods = ["t1"]', "weights = [0.1]": "weights = [0.01]",
                  "[experiment]": "[experiment]\nlimit = 600"})
    for out in ("a", "b"):
        runner.run_experiment(cfg, out_root=tmp_path / out, device="cpu", threads=1, progress=False)
    a, b = rows_of(tmp_path / "a" / "tiny"), rows_of(tmp_path / "b" / "tiny")
    for col in ("val_accuracy", "test_accuracy", "val_loss", "test_loss", "best_epoch", "epochs"):
        assert a[0][col] == b[0][col], col
    curve_a = (tmp_path / "a" / "tiny" / "curves" / "digits_mlp_t1_w0.01_s0.csv").read_text().splitlines()
    assert len(curve_a) == 1 + 2


# -- one folder, one writer: the lock, duplicate rows, curves under a temporary name ------------

SPAWN_TIMEOUT_S = 120


def _blocking_fit(in_fit, release):
    """A stand-in for fit that says it is training, then waits for ``release``."""
    fake = FakeFit()

    def fit(*args, **kw):
        in_fit.set()
        if not release.wait(SPAWN_TIMEOUT_S):
            raise TimeoutError("the test never released this run")
        return fake(*args, **kw)

    return fit


def _run_in_child(out_root, text, in_fit, release, results):
    """One `experiment run` process (spawn): reports ("ok", finished) or ("locked", message)."""
    import torch

    from toponeuro import training as training_mod
    from toponeuro.experiments import config as config_mod
    from toponeuro.experiments import runner as runner_mod

    torch.set_num_threads(1)
    training_mod.fit = _blocking_fit(in_fit, release)
    try:
        s = runner_mod.run_experiment(config_mod.parse_config(text), out_root=out_root, device="cpu",
                                      progress=False, threads=1)
        results.put(("ok", s.finished))
    except runner_mod.ExperimentLockedError as err:
        results.put(("locked", str(err)))
    except BaseException as err:  # reported, so that the parent fails with it rather than a timeout
        results.put(("error", repr(err)))


def _stop(procs):
    for p in procs:
        if p.pid is None:  # never started
            continue
        p.join(30)
        if p.is_alive():
            p.terminate()
            p.join(10)


def test_two_processes_on_one_folder_one_runs_the_other_is_refused(tmp_path):
    """Two `run` processes started together on one folder: one trains both runs, the other fails at once."""
    ctx = multiprocessing.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    events = [ctx.Event(), ctx.Event()]
    procs = [ctx.Process(target=_run_in_child, args=(str(tmp_path), TINY, ev, release, results))
             for ev in events]
    for p in procs:
        p.start()
    try:
        # the winner waits inside its first run until released, so the loser is refused while it holds the lock
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        first = None
        while first is None:
            try:
                first = results.get(timeout=0.5)
            except queue.Empty:
                if all(ev.is_set() for ev in events):
                    pytest.fail("both processes are training the same runs of one folder")
                if time.monotonic() > deadline:
                    pytest.fail(f"no process reported within {SPAWN_TIMEOUT_S} s")
        assert first[0] == "locked", first
        release.set()
        second = results.get(timeout=SPAWN_TIMEOUT_S)
    finally:
        release.set()
        _stop(procs)
    assert second == ("ok", 2)
    assert sum(ev.is_set() for ev in events) == 1  # the refused process never trained
    directory = tmp_path / "tiny"
    assert str(directory) in first[1] and "another `toponeuro experiment run`" in first[1]
    rows = rows_of(directory)
    assert sorted(r["run_id"] for r in rows) == ["digits_mlp_l2_w0.1_s0", "digits_mlp_none_w0_s0"]
    assert [p.exitcode for p in procs] == [0, 0]


def test_cli_refuses_a_locked_folder_cleanly(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    argv = ["experiment", "run", str(config), "--out", str(tmp_path), "--device", "cpu", "--no-progress",
            "--engine", "single"]  # the fake fit is the single engine's
    with runner.experiment_lock(tmp_path / "tiny") as lock_path:
        # flock locks belong to an open file: a second open in this same process is refused too
        assert f"pid {os.getpid()}" in lock_path.read_text()
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("toponeuro experiment: error: experiment folder ") and "Traceback" not in err
    assert str(tmp_path / "tiny") in err and "another `toponeuro experiment run`" in err
    assert f"pid {os.getpid()}" in err  # names the process that holds it
    assert fake.calls == [] and not (tmp_path / "tiny" / "runs.csv").exists()
    # released: the next run goes ahead
    assert cli.main(argv) == 0
    assert len(rows_of(tmp_path / "tiny")) == 2 and len(fake.calls) == 2


def _rank_child(rank, port, out_root, text, release, results):
    """One rank of a two-rank torchrun-style job (gloo), the runs faked."""
    import torch
    import torch.distributed as dist

    from toponeuro import training as training_mod
    from toponeuro.experiments import config as config_mod
    from toponeuro.experiments import runner as runner_mod

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    training_mod.fit = FakeFit()
    cfg = config_mod.parse_config(text)
    try:
        try:
            runner_mod.run_experiment(cfg, out_root=out_root, device="cpu", progress=False, threads=1)
            results.put((rank, "first", "ran"))
        except runner_mod.ExperimentLockedError as err:
            results.put((rank, "first", str(err)))
        release.wait(SPAWN_TIMEOUT_S)
        s = runner_mod.run_experiment(cfg, out_root=out_root, device="cpu", progress=False, threads=1)
        results.put((rank, "second", s.finished))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:
        results.put((rank, "error", repr(err)))


def test_ranks_of_one_torchrun_job_share_the_lock_and_all_refuse_a_locked_folder(tmp_path, free_port):
    """Only rank 0 locks; every rank learns whether it got the lock, so none trains or hangs alone."""
    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = multiprocessing.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_rank_child, args=(r, port, str(tmp_path), TINY, release, results))
             for r in range(2)]
    try:
        with runner.experiment_lock(tmp_path / "tiny"):  # another `run` holds the folder
            for p in procs:
                p.start()
            first = dict(r[::2] for r in (results.get(timeout=SPAWN_TIMEOUT_S) for _ in range(2)))
        release.set()
        second = [results.get(timeout=SPAWN_TIMEOUT_S) for _ in range(2)]
    finally:
        release.set()
        _stop(procs)
    assert set(first) == {0, 1}
    assert "another `toponeuro experiment run`" in first[0] and str(tmp_path / "tiny") in first[0]
    assert first[1].startswith("rank 0 could not lock the folder")
    # unlocked: the two ranks of one job run together (rank 1 does not lock rank 0 out)
    assert sorted(second) == [(0, "second", 2), (1, "second", 2)]
    rows = rows_of(tmp_path / "tiny")
    assert len(rows) == 2 and len({r["run_id"] for r in rows}) == 2


def test_duplicated_rows_read_once_and_are_not_appended_again(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "fit", FakeFit())
    runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    runs_csv = tmp_path / "tiny" / "runs.csv"
    first = runner.read_rows(runs_csv)
    # a second copy of the l2 row with another accuracy, as two processes without the lock wrote them
    dup = {**next(r for r in first if r["method"] == "l2"), "val_accuracy": 0.123, "test_accuracy": 0.1}
    runner.append_row(runs_csv, dup)
    assert len(rows_of(tmp_path / "tiny")) == 3  # the file holds it ...
    rows = runner.read_rows(runs_csv)  # ... the reader keeps the first row of the key
    assert len(rows) == 2 and rows == first
    runs = report.load_runs(tmp_path / "tiny")
    assert len(runs) == 2
    assert runs.loc[runs["method"] == "l2", "val_accuracy"].tolist() == [pytest.approx(0.51)]  # the first
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    s = runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    assert fake.calls == [] and s.already_done == 2 and len(rows_of(tmp_path / "tiny")) == 3


def test_a_key_written_meanwhile_by_another_process_is_not_appended_twice(tmp_path, monkeypatch, capsys):
    fake = FakeFit()
    runs_csv = tmp_path / "tiny" / "runs.csv"

    def racing_fit(*args, method, **kw):
        result = fake(*args, method=method, **kw)
        if method == "l2":  # a process that ignores the lock finishes the same run first
            other = next(r for r in runner.read_rows(runs_csv))
            runner.append_row(runs_csv, {**other, "run_id": "digits_mlp_l2_w0.1_s0", "method": "l2",
                                         "weight": 0.1, "val_accuracy": 0.7})
        return result

    monkeypatch.setattr(training, "fit", racing_fit)
    s = runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    assert (s.finished, s.already_done, s.pending) == (1, 1, 0)
    rows = rows_of(tmp_path / "tiny")
    assert [(r["method"], r["val_accuracy"]) for r in rows] == [("none", "0.5"), ("l2", "0.7")]
    assert "already has a row" in capsys.readouterr().out


def test_curves_are_written_under_a_temporary_name_and_renamed_when_complete(tmp_path, monkeypatch):
    curves = tmp_path / "tiny" / "curves"
    seen = []
    fake = FakeFit()

    def watching_fit(*args, on_epoch, **kw):
        def spy(record):
            on_epoch(record)
            seen.append(sorted(p.name for p in curves.iterdir()))
        return fake(*args, on_epoch=spy, **kw)

    monkeypatch.setattr(training, "fit", watching_fit)
    # a temporary curve of a writer that is gone (a killed run), and one of a live process (this one)
    curves.mkdir(parents=True)
    dead_pid = 2 ** 22 + 12345  # above Linux's pid_max: no such process
    dead = curves / f".digits_mlp_l2_w0.1_s0.csv.{dead_pid}.abc_12.tmp"
    live = curves / f".digits_mlp_l2_w0.1_s0.csv.{os.getpid()}.xyz_34.tmp"
    dead.write_text("epoch\n1\n")
    live.write_text("epoch\n1\n")
    runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False)
    assert not dead.exists() and live.exists()
    # while the first run trains, its curve grows under a temporary name only
    assert len(seen) == 4
    for names in seen[:2]:
        assert "digits_mlp_none_w0_s0.csv" not in names
        assert any(n.startswith(f".digits_mlp_none_w0_s0.csv.{os.getpid()}.") and n.endswith(".tmp")
                   for n in names)
    after = sorted(p.name for p in curves.iterdir())
    assert after == sorted([live.name, "digits_mlp_l2_w0.1_s0.csv", "digits_mlp_none_w0_s0.csv"])
    lines = (curves / "digits_mlp_none_w0_s0.csv").read_text().splitlines()
    assert lines[0].split(",") == list(runner.CURVE_COLUMNS) and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]


@pytest.mark.slow
def test_jobs_in_spawned_workers_give_the_same_rows_as_one_process(tmp_path):
    cfg = tiny(**{'methods = ["none", "l2"]': 'methods = ["none", "t2"]'})
    runner.run_experiment(cfg, out_root=tmp_path / "one", device="cpu", jobs=1, progress=False)
    s = runner.run_experiment(cfg, out_root=tmp_path / "two", device="cpu", jobs=2, progress=False)
    assert s.finished == 2 and not s.failed
    key = lambda r: (r["method"], r["weight"])  # noqa: E731
    one = sorted(rows_of(tmp_path / "one" / "tiny"), key=key)
    two = sorted(rows_of(tmp_path / "two" / "tiny"), key=key)
    for r1, r2 in zip(one, two):
        assert (r1["val_loss"], r1["test_accuracy"]) == (r2["val_loss"], r2["test_accuracy"])


# -- report -------------------------------------------------------------------------------------

def hand_runs(rows):
    return pd.DataFrame(rows, columns=["dataset", "network", "method", "weight", "seed", "val_accuracy",
                                       "test_accuracy"])


def test_selection_rule_against_a_hand_made_table():
    runs = hand_runs([
        ("mnist", "mlp", "t1", 1e-3, 0, 0.90, 0.91),
        ("mnist", "mlp", "t1", 1e-2, 0, 0.95, 0.80),  # best validation, tied with 0.1 ...
        ("mnist", "mlp", "t1", 0.1, 0, 0.95, 0.99),  # ... the smaller weight (1e-2) wins
        ("mnist", "mlp", "t1", 1e-3, 1, 0.97, 0.93),
        ("mnist", "mlp", "t1", 1e-2, 1, 0.96, 0.99),
        ("mnist", "mlp", "l1", 5.0, 0, 0.50, 0.40),
        ("mnist", "mlp", "l1", 1e-6, 0, 0.60, 0.30),
        ("mnist", "mlp", "none", 0.0, 0, 0.70, 0.72),
        ("mnist", "mlp-deep", "t1", 1e-3, 0, 0.10, 0.20),
        ("mnist", "mlp-deep", "t1", 1e-2, 0, float("nan"), float("nan")),  # a NaN is never chosen
    ])
    sel = report.select_weights(runs)
    got = {(r.network, r.method, r.seed): (r.weight, r.test_accuracy) for r in sel.itertuples()}
    assert got == {
        ("mlp", "t1", 0): (1e-2, 0.80),
        ("mlp", "t1", 1): (1e-3, 0.93),
        ("mlp", "l1", 0): (1e-6, 0.30),
        ("mlp", "none", 0): (0.0, 0.72),
        ("mlp-deep", "t1", 0): (1e-3, 0.20),
    }
    table = report.accuracy_table(sel)
    assert table.loc[("mlp", "t1"), "mean"] == pytest.approx((0.80 + 0.93) / 2)
    assert table.loc[("mlp", "t1"), "std"] == pytest.approx(np.std([0.80, 0.93], ddof=1))
    assert table.loc[("mlp", "t1"), "n"] == 2


def test_pooled_selection_takes_one_weight_per_network_and_method():
    runs = hand_runs([
        ("mnist", "mlp", "t1", 1e-3, 0, 0.90, 0.91),
        ("mnist", "mlp", "t1", 1e-3, 1, 0.97, 0.93),  # mean validation 0.935
        ("mnist", "mlp", "t1", 1e-2, 0, 0.95, 0.80),
        ("mnist", "mlp", "t1", 1e-2, 1, 0.96, 0.99),  # mean validation 0.955: chosen for both seeds
        ("mnist", "mlp", "l1", 0.1, 0, 0.50, 0.40),
        ("mnist", "mlp", "l1", 0.1, 1, 0.70, 0.41),  # mean 0.60 ...
        ("mnist", "mlp", "l1", 1.0, 0, 0.60, 0.30),
        ("mnist", "mlp", "l1", 1.0, 1, 0.60, 0.31),  # ... tied: the smaller weight, 0.1
    ])
    pooled = report.select_weights_pooled(runs)
    got = [(r.method, r.weight, r.seed, r.test_accuracy) for r in pooled.itertuples()]
    assert got == [("l1", 0.1, 0, 0.40), ("l1", 0.1, 1, 0.41), ("t1", 1e-2, 0, 0.80), ("t1", 1e-2, 1, 0.99)]
    per_seed = report.select_weights(runs)  # for contrast: seed 1 of t1 picks 1e-3 there
    assert per_seed.loc[(per_seed["method"] == "t1"), "weight"].tolist() == [1e-2, 1e-3]


def _two_seed_experiment(tmp_path, monkeypatch, device):
    """A hand-made runs.csv: mlp, none and l2 at weights 0.1 and 1, seeds 0 and 1, devices from ``device``."""
    cfg = tiny(**{"weights = [0.1]": "weights = [0.1, 1.0]", "seeds = [0]": "seeds = [0, 1]"})
    monkeypatch.setattr(training, "fit", FakeFit(device=device))
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    directory = tmp_path / "tiny"
    return directory, report.write_report(directory, allow_mixed=True).read_text()


def test_report_names_the_blocks_whose_methods_ran_on_different_devices(tmp_path, monkeypatch):
    # seed 1: none and l2 w=0.1 on the CPU, l2 w=1 (the selected one: FakeFit's accuracy grows with weight) on CUDA
    directory, text = _two_seed_experiment(
        tmp_path, monkeypatch, lambda method, weight, seed: "cuda:0" if (seed, weight) == (1, 1.0) else "cpu")
    runs = report.load_runs(directory)
    assert report.mixed_device_blocks(runs, report.select_weights(runs)) == [
        {"network": "mlp", "seed": 1, "runs": {"cpu": 2, "cuda:0": 1}, "selected": {"cpu": ["none"], "cuda:0": ["l2"]},
         "split": ["l2"]}]
    assert "**Mixed devices.** In 1 of 2 blocks the methods were trained on different devices" in text
    assert "| `mlp`, seed 1 | `cpu`: 2, `cuda:0`: 1 | `cpu`: none; `cuda:0`: L2 | L2 |" in text
    assert "seed 0 |" not in text


@pytest.mark.parametrize("device, line", [
    (lambda method, weight, seed: "cuda:0" if seed == 1 else "cpu",
     "Devices: every block (network, seed) was trained on a single device."),
    (lambda method, weight, seed: "cpu", None),
])
def test_report_has_no_mixed_device_note_when_every_block_used_one_device(tmp_path, monkeypatch, device, line):
    directory, text = _two_seed_experiment(tmp_path, monkeypatch, device)
    runs = report.load_runs(directory)
    assert report.mixed_device_blocks(runs, report.select_weights(runs)) == []
    assert "Mixed devices" not in text and "trained on different devices" not in text
    assert (line in text) if line else ("Devices: every block" not in text)


def test_report_states_its_selection_and_block_choices_as_deviations(tmp_path, monkeypatch):
    # seed 0 prefers l2 weight 1, seed 1 weight 0.1: the per-seed choices differ
    def fit(*args, method, weight, seed, **kw):
        result = FakeFit()(*args, method=method, weight=weight, seed=seed, **kw)
        if seed == 1 and weight == 0.1:
            result.val_accuracy, result.test_accuracy = 0.7, 0.65
        return result

    cfg = tiny(**{"weights = [0.1]": "weights = [0.1, 1.0]", "seeds = [0]": "seeds = [0, 1]"})
    monkeypatch.setattr(training, "fit", fit)
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    text = report.write_report(tmp_path / "tiny").read_text()
    assert "A choice that differs from the paper's protocol." in text
    assert "Here 1 of 1 (network, method) pairs with a weight pick different weights for different seeds" in text
    # per seed: l2 tests 0.59 (seed 0, w=1) and 0.65 (seed 1, w=0.1), mean 0.62; pooled (mean val 0.6 at w=1
    # against 0.605 at w=0.1 -> w=0.1): 0.50 and 0.65, mean 0.575; the change is 4.50 points
    assert "changes a mean test accuracy by at most 4.50 points" in text
    assert "A choice that differs from Demšar (2006)." in text and "the critical difference is optimistic" in text
    assert "(2 blocks from 1 network(s))" in text


# test accuracy of the weight that validation selects (weight 1), per block (seed) and method
THREE_METHODS = {
    0: {"none": 0.90, "l1": 0.92, "l2": 0.91},
    1: {"none": 0.89, "l1": 0.93, "l2": 0.94},
    2: {"none": 0.88, "l1": 0.90, "l2": 0.87},
    3: {"none": 0.91, "l1": 0.95, "l2": 0.93},
}


def test_report_runs_friedman_nemenyi_and_draws_the_critical_difference_diagram(tmp_path, monkeypatch):
    """3 methods x 4 complete blocks: the statistics section is written from the hand-made accuracies."""
    def fit(*args, method, weight, seed, **kw):
        result = FakeFit()(*args, method=method, weight=weight, seed=seed, **kw)
        if weight == 0.1:  # worse on validation: selection must drop it, whatever its test accuracy
            result.val_accuracy, result.test_accuracy = 0.5, 0.99
        else:
            result.val_accuracy, result.test_accuracy = 0.8, THREE_METHODS[seed][method]
        return result

    cfg = tiny(**{'methods = ["none", "l2"]': 'methods = ["none", "l1", "l2"]',
                  "weights = [0.1]": "weights = [0.1, 1.0]", "seeds = [0]": "seeds = [0, 1, 2, 3]"})
    monkeypatch.setattr(training, "fit", fit)
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    directory = tmp_path / "tiny"
    text = report.write_report(directory).read_text()

    methods = ["none", "l1", "l2"]
    columns = [[THREE_METHODS[seed][m] for seed in sorted(THREE_METHODS)] for m in methods]
    expected = scipy.stats.friedmanchisquare(*columns)
    # by hand: ranks per block (1 = best) none 3,3,2,3 ; l1 1,2,1,1 ; l2 2,1,3,2 -> sums 11, 5, 8
    n, k = 4, 3
    R = np.array([11, 5, 8])
    chi2 = 12 / (n * k * (k + 1)) * (R ** 2).sum() - 3 * n * (k + 1)
    assert chi2 == pytest.approx(4.5) and expected.statistic == pytest.approx(chi2)
    assert (f"**Friedman test** (scipy.stats.friedmanchisquare): chi² = {chi2:.4f}, "
            f"p = {expected.pvalue:.4g} → equal performance is not rejected at 0.05.") in text
    assert "4 blocks, 3 methods (none, L1, L2)" in text
    for label, rank in (("none", 11 / 4), ("L1", 5 / 4), ("L2", 8 / 4)):
        assert f"| {label} | {rank:.2f} |" in text
    # Demšar (2006), Table 5a: q_0.05 = 2.343 for k = 3; CD = q sqrt(k (k + 1) / (6 N))
    cd = 2.343 * math.sqrt(k * (k + 1) / (6 * n))
    assert f"critical difference of average ranks at alpha = 0.05: CD = {cd:.2f} " in text
    # Nemenyi p of none vs L1 by hand: z = |R_i - R_j| / N / sqrt(k (k + 1) / (6 N)), studentized range at z sqrt 2
    z = abs(R[0] - R[1]) / n / math.sqrt(k * (k + 1) / (6 * n))
    p_none_l1 = scipy.stats.studentized_range.sf(z * math.sqrt(2), k, np.inf)
    row = next(line for line in text.splitlines() if line.startswith("| none | 1 | "))
    assert float(row.split("|")[3]) == pytest.approx(p_none_l1, rel=2e-3)
    assert "![critical difference diagram](critical_difference.png)" in text
    png = (directory / "critical_difference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


# -- pool workers and the parent ------------------------------------------------------------------

_POOL_PARENT = """
import multiprocessing, os, sys, time
from pathlib import Path
from toponeuro.experiments import runner


def hold(folder):
    Path(folder, str(os.getpid())).touch()  # this worker runs a task: its initializer has run
    time.sleep(600)


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(2, initializer=runner._init_worker, initargs=(1, os.getpid()))
    results = [pool.apply_async(hold, (sys.argv[1],)) for _ in range(2)]
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead and not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_pool_workers_end_when_their_parent_is_killed(tmp_path):
    """A `run` killed with SIGKILL (no cleanup of its own) leaves no worker training on."""
    import signal
    import subprocess
    import sys

    script, started = tmp_path / "parent.py", tmp_path / "started"
    script.write_text(_POOL_PARENT)
    started.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(started)],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name) for p in started.iterdir()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "pool workers kept running after their parent was killed"
    finally:
        parent.kill()
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def test_pool_workers_ignore_ctrl_c_so_the_parent_alone_reports_it():
    import signal

    previous = signal.getsignal(signal.SIGINT)
    try:
        threads = torch.get_num_threads()
        runner._init_worker(threads)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert torch.get_num_threads() == threads
    finally:
        signal.signal(signal.SIGINT, previous)


def _edit_cell(path: Path, run_id: str, column: str, value: str) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row["run_id"] == run_id:
            row[column] = value
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=runner.COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("column, value", [("val_accuracy", "0.8x"), ("test_accuracy", ""), ("epochs", "two"),
                                           ("lr", "1e-2e")])
def test_a_non_numeric_cell_is_refused_naming_its_run_and_column(column, value, tmp_path, monkeypatch):
    directory, _ = _two_seed_experiment(tmp_path, monkeypatch, lambda method, weight, seed: "cpu")
    run_id = "digits_mlp_l2_w1_s1"
    _edit_cell(directory / "runs.csv", run_id, column, value)
    with pytest.raises(ValueError, match=rf"tiny: run {run_id}, column {column}: '{value}' is not a number"):
        report.load_runs(directory)


def test_nan_cells_of_a_diverged_run_are_numbers_not_errors(tmp_path, monkeypatch):
    directory, _ = _two_seed_experiment(tmp_path, monkeypatch, lambda method, weight, seed: "cpu")
    _edit_cell(directory / "runs.csv", "digits_mlp_l2_w1_s1", "val_loss", "nan")
    runs = report.load_runs(directory)
    by_id = runs.set_index("run_id")
    assert math.isnan(by_id.loc["digits_mlp_l2_w1_s1", "val_loss"])
    assert by_id.loc["digits_mlp_l2_w1_s0", "val_loss"] == 0.4  # FakeFit's
    assert sorted(runs["seed"].unique()) == [0, 1] and len(runs) == 6


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_ctrl_c_with_jobs_gives_one_line_exit_130_and_no_worker_left(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the parent and its pool workers."""
    import signal
    import subprocess
    import sys

    config = tmp_path / "long.toml"
    config.write_text(TINY.replace("weights = [0.1]", "weights = [0.1, 1.0]")
                      .replace("max_epochs = 2", "max_epochs = 1000\npatience = 1000"))
    parent = subprocess.Popen(
        [sys.executable, "-m", "toponeuro", "experiment", "run", str(config), "--out", str(tmp_path / "out"),
         "--device", "cpu", "--jobs", "2", "--no-progress"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    curves = tmp_path / "out" / "tiny" / "curves"
    deadline = time.monotonic() + 300
    training_now = []
    while len(training_now) < 2 and time.monotonic() < deadline:  # both workers past their first epoch
        time.sleep(0.2)
        training_now = [p for p in curves.glob(".*.tmp") if len(p.read_text().splitlines()) > 1] \
            if curves.is_dir() else []
    assert len(training_now) == 2
    workers = [int(runner._CURVE_TMP.match(p.name)["pid"]) for p in training_now]
    os.killpg(parent.pid, signal.SIGINT)
    _out, err = parent.communicate(timeout=120)
    assert parent.returncode == 130
    assert err == ("toponeuro experiment: interrupted; the rows of the finished runs are kept, rerun the same "
                   "command to do the rest\n")
    deadline = time.monotonic() + 60
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def test_friedman_matches_scipy_and_the_textbook_formula():
    # test accuracy of the selected weight per block (network, seed) x method, no ties within a block
    acc = {
        ("mlp", 0): {"none": 0.95, "t1": 0.97, "l2": 0.96},
        ("mlp", 1): {"none": 0.94, "t1": 0.96, "l2": 0.97},
        ("mlp-deep", 0): {"none": 0.93, "t1": 0.95, "l2": 0.94},
        ("mlp-deep", 1): {"none": 0.92, "t1": 0.98, "l2": 0.91},
        ("mlp-deep", 2): {"none": 0.90, "t1": 0.99, "l2": 0.96},
    }
    rows = []
    for (net, seed), by_method in acc.items():
        for method, a in by_method.items():
            rows.append(("mnist", net, method, 0.0 if method == "none" else 1e-3, seed, a, a))
            if method != "none":  # a worse weight that selection must drop
                rows.append(("mnist", net, method, 1.0, seed, a - 0.2, 0.99))
    matrix = report.block_matrix(report.select_weights(hand_runs(rows)), ["none", "t1", "l2"])
    fr = report.friedman(matrix)
    cols = [[acc[b][m] for b in acc] for m in ("none", "t1", "l2")]
    assert fr["statistic"] == pytest.approx(scipy.stats.friedmanchisquare(*cols).statistic, rel=1e-12)
    assert fr["pvalue"] == pytest.approx(scipy.stats.friedmanchisquare(*cols).pvalue, rel=1e-12)
    # by hand: ranks (1 = best) per block: none 3,3,3,2,3 ; t1 1,2,1,1,1 ; l2 2,1,2,3,2
    R = np.array([14, 6, 10])
    n, k = 5, 3
    chi2 = 12 / (n * k * (k + 1)) * (R ** 2).sum() - 3 * n * (k + 1)
    assert fr["statistic"] == pytest.approx(chi2)
    ranks = report.average_ranks(matrix)
    np.testing.assert_allclose(ranks[["none", "t1", "l2"]].to_numpy(), R / n)
    p = report.nemenyi(matrix)
    assert p.shape == (3, 3) and np.allclose(p.to_numpy(), p.to_numpy().T)
    # Nemenyi by hand: z = |R_i - R_j| / sqrt(k (k + 1) / (6 n)) -> studentized range with q = z sqrt 2
    z = abs(R[0] - R[1]) / n / math.sqrt(k * (k + 1) / (6 * n))
    expected = scipy.stats.studentized_range.sf(z * math.sqrt(2), k, np.inf)
    assert p.loc["none", "t1"] == pytest.approx(expected, rel=1e-3)


def test_claims_are_judged_from_the_numbers():
    methods = ["none", "t1", "t2", "l1", "l2", "min_corr", "decov"]
    # 30 blocks; order of accuracy (best first): t1, t2, decov, none, l1, l2, min_corr
    order = ["t1", "t2", "decov", "none", "l1", "l2", "min_corr"]
    rng = np.random.default_rng(0)
    rows = []
    for b in range(30):
        base = 0.9 + 0.01 * rng.random()
        for i, m in enumerate(order):
            rows.append([base - 0.001 * i])
    matrix = pd.DataFrame(np.array(rows).reshape(30, 7), columns=order)[methods]
    fr = report.friedman(matrix)
    ranks = report.average_ranks(matrix)
    p = report.nemenyi(matrix)
    assert fr["pvalue"] < 1e-6
    c1, c2 = report.claims(matrix, ranks, p, fr["pvalue"])
    assert c1["conclusion"].startswith("holds") and len(c1["pairs"]) == 8
    assert all(pair["verdict"] == "holds (significant)" for pair in c2["pairs"])
    # reverse: MinCorr best
    rev = matrix.copy()
    rev["min_corr"] = matrix.max(axis=1) + 0.01
    r = report.average_ranks(rev)
    c1, c2 = report.claims(rev, r, report.nemenyi(rev), report.friedman(rev)["pvalue"])
    assert c2["conclusion"].startswith("contradicted")
    # a missing method cannot be judged
    c1, _ = report.claims(matrix.drop(columns=["t2"]), ranks.drop("t2"), None, math.nan)
    assert "cannot be tested" in c1["conclusion"]


def test_critical_difference_matches_demsar_table():
    # Demsar (2006), Table 5a: q_0.05 for k = 7 is 2.949
    assert report.critical_difference(7, 1) == pytest.approx(2.949 * math.sqrt(7 * 8 / 6), rel=1e-3)


def test_experiment_end_to_end_through_the_cli(tmp_path):
    """A two-run mnist-quick-style experiment: run, then report."""
    config = tmp_path / "quick.toml"
    config.write_text(cfgmod.load_config("mnist-quick").text
                      .replace('name = "mnist-quick"', 'name = "quick-ci"')
                      .replace("limit = 12000", "limit = 512\nval_limit = 500\ntest_limit = 500")
                      .replace('methods = ["none", "t1", "t2", "l1", "l2", "min_corr", "decov"]',
                               'methods = ["none", "t1"]')
                      .replace("weights = [1e-5, 1e-4, 1e-3]", "weights = [1e-3]")
                      .replace("seeds = [0, 1, 2]", "seeds = [0]")
                      .replace("max_epochs = 4", "max_epochs = 1"))
    out = tmp_path / "results"
    assert cli.main(["experiment", "run", str(config), "--out", str(out), "--device", "cpu",
                     "--no-progress"]) == 0
    directory = out / "quick-ci"
    rows = rows_of(directory)
    assert len(rows) == 2
    assert {r["method"] for r in rows} == {"none", "t1"}
    assert all(r["train_size"] == "512" and r["test_size"] == "500" and r["epochs"] == "1" for r in rows)
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert len(list((directory / "curves").glob("*.csv"))) == 2
    # a rerun has nothing to do
    assert cli.main(["experiment", "run", str(config), "--out", str(out), "--device", "cpu",
                     "--no-progress"]) == 0
    assert len(rows_of(directory)) == 2
    assert cli.main(["experiment", "report", "quick-ci", "--out", str(out)]) == 0
    text = (directory / "report.md").read_text()
    assert "Test accuracy (%)" in text and "epoch cap | 1 | 1200 | **differs**" in text
    assert "255 twice" in text
    assert (directory / "accuracy_vs_weight.png").stat().st_size > 1000
    assert (directory / "selected.csv").is_file()


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace('methods = ["none", "l2"]', 'methods = ["foo"]'))
    assert cli.main(["experiment", "run", str(bad), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "grid.methods: unknown method 'foo'" in capsys.readouterr().err


def test_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="runs.csv"):
        report.write_report(tmp_path / "nothing")


# -- the batched engine, checkpoints and shards --------------------------------------------------

from toponeuro import ensemble  # noqa: E402
from toponeuro.experiments import engine as engine_mod  # noqa: E402
from toponeuro.experiments import shards  # noqa: E402

# T1 weights small enough that float32 rounding stays small (see toponeuro.ensemble)
BATCHED = TINY.replace('methods = ["none", "l2"]', 'methods = ["none", "l2", "t1"]').replace(
    "weights = [0.1]", "weights = [1e-4, 1e-5]")

_MEASURED = ("val_accuracy", "test_accuracy", "val_loss", "test_loss")
_VOLATILE = ("seconds", "seconds_per_epoch", "finished_at", "engine") + _MEASURED


def test_the_batched_engine_writes_the_single_engines_rows_and_curves(tmp_path):
    config = cfgmod.parse_config(BATCHED)
    one = runner.run_experiment(config, out_root=tmp_path / "single", device="cpu", progress=False)
    many = runner.run_experiment(config, out_root=tmp_path / "batched", device="cpu", progress=False,
                                 engine="batched")
    assert one.finished == many.finished == 5 and not many.failed
    rows_single = {r["run_id"]: r for r in rows_of(tmp_path / "single" / "tiny")}
    rows_batched = {r["run_id"]: r for r in rows_of(tmp_path / "batched" / "tiny")}
    assert rows_single.keys() == rows_batched.keys()
    for run_id, a in rows_single.items():
        b = rows_batched[run_id]
        assert list(a) == list(b) == list(runner.COLUMNS)
        assert (a["engine"], b["engine"]) == ("single", "batched")
        assert {k: v for k, v in a.items() if k not in _VOLATILE} == {k: v for k, v in b.items()
                                                                      if k not in _VOLATILE}
        for k in _MEASURED:  # the same run up to rounding (see toponeuro.ensemble)
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-3), (run_id, k)
        curve_a = (tmp_path / "single" / "tiny" / "curves" / f"{run_id}.csv").read_text().splitlines()
        curve_b = (tmp_path / "batched" / "tiny" / "curves" / f"{run_id}.csv").read_text().splitlines()
        assert curve_a[0] == curve_b[0] and len(curve_a) == len(curve_b) == 1 + int(a["epochs"])
    assert not list((tmp_path / "batched" / "tiny" / "checkpoints").glob("*.pt"))  # done: removed


def test_a_batched_run_killed_mid_stack_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    config = cfgmod.parse_config(BATCHED.replace('methods = ["none", "l2", "t1"]', 'methods = ["none", "l2"]')
                                 .replace("seeds = [0]", "seeds = [0, 1]"))
    reference = runner.run_experiment(config, out_root=tmp_path / "ref", device="cpu", progress=False,
                                      engine="batched")
    assert reference.finished == 6
    epochs_trained = []
    real_train_epoch = ensemble.StackTrainer.train_epoch

    def train_epoch(self, *args, **kwargs):
        if self.epoch == 1 and "killed" not in epochs_trained and "resumed" not in epochs_trained:
            epochs_trained.append("killed")
            raise KeyboardInterrupt  # the session ends after the checkpoint of epoch 1
        epochs_trained.append(self.epoch + 1)
        return real_train_epoch(self, *args, **kwargs)

    monkeypatch.setattr(ensemble.StackTrainer, "train_epoch", train_epoch)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(config, out_root=tmp_path / "cut", device="cpu", progress=False, engine="batched",
                              checkpoint_every=0)
    directory = tmp_path / "cut" / "tiny"
    assert len(list((directory / "checkpoints").glob("*.pt"))) == 1 and not (directory / "runs.csv").exists()
    saved = torch.load(next((directory / "checkpoints").glob("*.pt")), weights_only=True)
    assert saved["state"]["epoch"] == 1 and len(saved["state"]["members"]) == 6
    epochs_trained.clear()
    epochs_trained.append("resumed")
    summary = runner.run_experiment(config, out_root=tmp_path / "cut", device="cpu", progress=False,
                                    engine="batched", checkpoint_every=0)
    assert summary.finished == 6 and not summary.failed
    assert epochs_trained[1] == 2  # went on at epoch 2
    assert not list((directory / "checkpoints").iterdir())
    ref_rows = {r["run_id"]: r for r in rows_of(tmp_path / "ref" / "tiny")}
    for row in rows_of(directory):
        expected = ref_rows[row["run_id"]]
        # the same numbers as the uninterrupted run, exactly (the state was saved and restored whole)
        assert {k: v for k, v in row.items() if k not in ("seconds", "seconds_per_epoch", "finished_at")} == {
            k: v for k, v in expected.items() if k not in ("seconds", "seconds_per_epoch", "finished_at")}
        assert (directory / "curves" / f"{row['run_id']}.csv").read_text().count("\n") == 1 + int(row["epochs"])


def test_the_cnn_falls_back_to_the_single_engine(tmp_path, monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    config = tiny(**{'networks = ["mlp"]': 'networks = ["cnn"]'})
    s = runner.run_experiment(config, out_root=tmp_path, device="cpu", progress=False, engine="batched")
    assert s.finished == 2 and len(fake.calls) == 2
    assert {r["engine"] for r in rows_of(tmp_path / "tiny")} == {"single"}
    assert engine_mod.stack_groups(config.runs(), 4) == ([], config.runs())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000])
def test_shards_partition_the_grid_exactly(n):
    runs = cfgmod.load_config("mnist-paper").runs()
    parts = [shards.shard_runs(runs, (i, n)) for i in range(1, n + 1)]
    flat = [r for part in parts for r in part]
    assert sorted(flat, key=runs.index) == runs and len(set(flat)) == len(runs)  # disjoint, complete
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert shards.shard_runs(runs, None) == runs


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ValueError, match="shard"):
        shards.parse_shard(text)


def test_shards_write_their_own_files_and_the_report_merges_them(tmp_path, monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    config = tiny(**{'methods = ["none", "l2"]': 'methods = ["none", "l2", "l1"]', "weights = [0.1]":
                     "weights = [0.1, 0.2]", "seeds = [0]": "seeds = [0, 1]"})
    assert len(config.runs()) == 10
    for i in (1, 2, 3):
        s = runner.run_experiment(config, out_root=tmp_path, device="cpu", progress=False, shard=f"{i}/3",
                                  engine="single")
        assert s.finished == len(shards.shard_runs(config.runs(), (i, 3)))
    directory = tmp_path / "tiny"
    assert not (directory / "runs.csv").exists()
    files = shards.rows_files(directory)
    assert [p.name for p in files] == [f"runs.shard-{i}-of-3.csv" for i in (1, 2, 3)]
    # every run once, in the file of its shard
    for i, path in enumerate(files, start=1):
        ids = {r["run_id"] for r in runner.read_rows(path)}
        assert ids == {r.run_id for r in shards.shard_runs(config.runs(), (i, 3))}
    runs = report.load_runs(directory)
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in config.runs())
    # all done whatever the split: unsharded and other splits have nothing left
    assert runner.pending_runs(config, directory)[1] == []
    assert runner.run_experiment(config, out_root=tmp_path, device="cpu", progress=False, shard="2/5").finished == 0
    assert cli.main(["experiment", "report", str(directory)]) == 0
    assert (directory / "report.md").is_file()


def test_a_runs_csv_without_the_engine_column_is_upgraded_and_read(tmp_path, monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    config = tiny()
    runner.run_experiment(config, out_root=tmp_path, device="cpu", progress=False, limit_runs=1)
    path = tmp_path / "tiny" / "runs.csv"
    old = [{k: v for k, v in r.items() if k != "engine"} for r in rows_of(tmp_path / "tiny")]
    with open(path, "w", newline="") as fh:  # as an earlier version wrote it
        writer = csv.DictWriter(fh, fieldnames=runner.COLUMNS_BEFORE_ENGINE, lineterminator="\n")
        writer.writeheader()
        writer.writerows(old)
    assert report.load_runs(tmp_path / "tiny")["engine"].tolist() == ["single"]
    assert runner.pending_runs(config, tmp_path / "tiny")[0][0].run_id == old[0]["run_id"]
    s = runner.run_experiment(config, out_root=tmp_path, device="cpu", progress=False)
    assert s.finished == 1 and s.already_done == 1
    rows = rows_of(tmp_path / "tiny")
    assert [r["engine"] for r in rows] == ["single", "single"]
    assert {k: v for k, v in rows[0].items() if k != "engine"} == old[0]


def test_bench_engine_writes_its_figures_and_keeps_earlier_ones(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "bench"
    argv = ["bench-engine", str(config), "--device", "cpu", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == 2 and results["epochs"] == 1 and results["device"] == "cpu"
    single, batched = results["engines"]["single"], results["engines"]["batched"]
    assert single["runs"] == batched["runs"] == 2 and batched["stacks"] == [2]
    assert single["run_epochs_per_second"] == pytest.approx(2 / single["seconds"])
    # none and l2 train the same runs in both engines: equal accuracies up to rounding
    assert results["test_accuracy_mean_abs_difference"] < 0.01
    assert (out / "throughput.png").stat().st_size > 1000
    assert cli.main(argv) == 2 and "--force" in capsys.readouterr().err  # never overwritten silently
    assert cli.main(argv + ["--force", "--methods", "t2"]) == 2  # nothing left to time: refused with the reason
    assert "no run left to time" in capsys.readouterr().err


def test_bench_engine_estimates_the_whole_grid_from_epochs_per_run(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "bench"
    argv = ["bench-engine", str(config), "--device", "cpu", "--epochs", "1", "--out", str(out), "--no-progress",
            "--engine", "batched", "--force"]
    assert cli.main(argv + ["--epochs-per-run", "40"]) == 0
    results = json.loads((out / "results.json").read_text())
    g = results["grid_estimate"]
    runs = len(cfgmod.load_config(config).runs())
    assert g["grid_runs"] == runs and g["run_epochs"] == runs * 40
    assert g["seconds"]["batched"] == pytest.approx(runs * 40 / results["engines"]["batched"]["run_epochs_per_second"])
    assert "the whole grid of tiny" in capsys.readouterr().out
    # from a results folder: the median of its runs' epochs (7, 9, 30 -> 9)
    folder = tmp_path / "done"
    folder.mkdir()
    fields = ["run_id", "dataset", "network", "method", "weight", "seed", "epochs"]
    rows = [dict(zip(fields, [f"r{k}", "digits", "mlp", "none", 0.0, k, e])) for k, e in enumerate([7, 30, 9])]
    with open(folder / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    assert cli.main(argv + ["--epochs-from", str(folder)]) == 0
    g = json.loads((out / "results.json").read_text())["grid_estimate"]
    assert g["epochs_per_run"] == 9 and str(folder / "runs.csv") in g["epochs_source"]
    for bad, why in [(["--epochs-per-run", "-3"], "positive"), (["--epochs-from", str(tmp_path / "none")], "no ")]:
        assert cli.main(argv + bad) == 2 and why in capsys.readouterr().err


def test_auto_is_single_under_torchrun_and_batched_there_is_refused(tmp_path, monkeypatch):
    from toponeuro import distributed

    fake = FakeFit()
    monkeypatch.setattr(training, "fit", fake)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as in a torchrun job (rank 0)
    monkeypatch.setattr(distributed, "setup", lambda dev: dev)
    with pytest.raises(ValueError, match="--engine single"):
        runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False, engine="batched")
    s = runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False, engine="auto")
    assert s.finished == 2 and len(fake.calls) == 2
    assert {r["engine"] for r in rows_of(tmp_path / "tiny")} == {"single"}
