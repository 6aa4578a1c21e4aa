"""`toponeuro train`, the main job, end to end at a small size."""

import json
import subprocess
import sys

import pytest
import torch

from toponeuro import cli, comparison, dissimilarity
from toponeuro.nn import TopologicalRegulariser
from toponeuro.training_cli import held_out_statistics


def test_train_limit_2000_one_epoch_writes_figure_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--limit", "2000", "--epochs", "1", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "mean |rho|" in printed and "T1 (held-out batch)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"none", "t1"}
    for run in summary["runs"].values():
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["epochs"] == 1
        held = run["held_out"]
        # T1 is the sum of (1 - death) over the n - 1 death edges
        assert len(held["deaths"]) == held["neurons"] - 1
        assert held["t1"] == pytest.approx(sum(1 - d for d in held["deaths"]), rel=1e-5)
    assert summary["runs"]["t1"]["weight"] == 1e-4 and summary["runs"]["none"]["weight"] == 0.0
    png = (out / "persistence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_non_default_dataset_model_formula_dissimilarity_and_backend(tmp_path, capsys, monkeypatch):
    """digits, cnn, t2, 1 - rho, numba: each choice reaches the training and the regulariser."""
    fits = []
    real_fit = comparison.fit

    def recording_fit(model, train, val, test=None, **kw):
        fits.append({"model": model, "train_shape": tuple(train[0].shape), "test_rows": len(test[1]), **kw})
        return real_fit(model, train, val, test, **kw)

    regularisers = []
    real_init = TopologicalRegulariser.__init__

    def recording_init(self, *args, **kw):
        real_init(self, *args, **kw)
        regularisers.append((self.formula, self.dissimilarity, self.backend))

    monkeypatch.setattr(comparison, "fit", recording_fit)
    monkeypatch.setattr(TopologicalRegulariser, "__init__", recording_init)
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", "digits", "--model", "cnn", "--formula", "t2", "--dissimilarity",
                   "one_minus_rho", "--backend", "numba", "--weight", "1e-3", "--limit", "512", "--epochs", "1",
                   "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "cnn on digits (512 training images)" in capsys.readouterr().out
    # two runs: none, then t2; both a cnn on 8x8 digits images (the first 512 training images, the whole test split)
    assert [f["method"] for f in fits] == ["none", "t2"]
    for f in fits:
        assert [type(m).__name__ for m in f["model"].children()][:2] == ["Conv2d", "ReLU"]
        assert f["train_shape"] == (512, 1, 8, 8) and f["test_rows"] == 360
        assert (f["dissimilarity"], f["backend"]) == ("one_minus_rho", "numba")
    assert (fits[0]["weight"], fits[1]["weight"]) == (0.0, 1e-3)
    # regularisers built: the held-out T1 after each run (paper dissimilarity), and the t2 one in between
    assert regularisers == [("t1", dissimilarity.abs_correlation, "numba"),
                            ("t2", dissimilarity.one_minus_rho, "numba"),
                            ("t1", dissimilarity.abs_correlation, "numba")]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dataset"], summary["model"], summary["formula"], summary["dissimilarity"]) == (
        "digits", "cnn", "t2", "one_minus_rho")
    assert set(summary["runs"]) == {"none", "t2"}
    # the cnn's neurons on an 8x8 image: relu1 16 x 8 x 8, relu2 (after the first pooling) 32 x 4 x 4,
    # relu3 128, and 10 logits
    for run in summary["runs"].values():
        assert run["held_out"]["neurons"] == 16 * 8 * 8 + 32 * 4 * 4 + 128 + 10
    # T2 = alpha std - (1 - alpha) mean of deaths in [0, 2]: within [-2, 1], unlike T1 (a sum over 1673 deaths)
    assert summary["runs"]["none"]["history"][0]["train_reg"] == 0.0
    assert -2.0 <= summary["runs"]["t2"]["history"][0]["train_reg"] <= 1.0


def test_held_out_statistics_against_direct_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    X = torch.randn(40, 6)
    stats = held_out_statistics(model, X, "torch")
    with torch.no_grad():
        h = torch.relu(X @ model[0].weight.T + model[0].bias)
        A = torch.cat([h, h @ model[2].weight.T + model[2].bias], 1).double()
    rho = torch.corrcoef(A.T).nan_to_num(0.0)  # dead units: rho := 0
    rho.fill_diagonal_(1.0)
    n = A.shape[1]
    assert stats["neurons"] == n
    assert stats["mean_abs_rho"] == pytest.approx(float((rho.abs().sum() - n) / (n * (n - 1))), rel=1e-4)
    from scipy.sparse.csgraph import minimum_spanning_tree

    d = (1 - rho.abs()).numpy() + 1.0
    d[range(n), range(n)] = 0
    mst = minimum_spanning_tree(d).data - 1.0
    assert stats["t1"] == pytest.approx(float((1 - mst).sum()), rel=1e-4)


@pytest.mark.parametrize("options, match", [
    (["--backend", "nope"], "unknown persistence backend"),
    (["--backend", "ripser"], "gives death values only"),  # before the baseline trains, not after
    (["--limit", "10"], "--limit 10 is smaller than --batch-size"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--weight", "-1"], "--weight must be a finite number"),
    (["--device", "bogus"], "unknown device"),
])
def test_train_rejects_bad_options_with_one_line_and_exit_2(options, match, tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained despite a bad option")

    monkeypatch.setattr(comparison, "fit", no_training)
    assert cli.main(["train", *options, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("toponeuro train: error: ") and match in err and "Traceback" not in err


def test_train_out_that_is_a_file_exits_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["train", "--dataset", "digits", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_python_dash_m_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "toponeuro", "train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--formula" in res.stdout


# -- reliability: every refusal up front, nothing finished lost ------------------------------------

@pytest.mark.parametrize("options, match", [
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--patience", "0"], "--patience must be a positive integer"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--dataset", "digits", "--batch-size", "2000"], "larger than the 1149 training images"),
    # T1 on euclidean wrecked the second run (regulariser 486 -> -1.6e7, test 9.7 %); refused before the first
    (["--dataset", "digits", "--dissimilarity", "euclidean"], "T1 on the unbounded dissimilarity 'euclidean'"),
    (["--dataset", "digits", "--dissimilarity", "euclidean", "--formula", "t2"], "T2 on the unbounded"),
])
def test_train_refuses_unusable_devices_and_sizes_before_training(options, match, tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained despite a bad option")

    monkeypatch.setattr(comparison, "fit", no_training)
    assert cli.main(["train", *options, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("toponeuro train: error: ") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value, match", [
    ("bogus", "KIND: unknown sampler 'bogus'"),
    ("importance", "P: missing"),
    ("random:0", r"P: must be a fraction in \(0, 1\]"),
    ("importance:1.5", r"P: must be a fraction in \(0, 1\]"),
    ("all:0.5", "takes no p"),
    ("importance:x", "must be a number"),
])
def test_bad_sampler_option_is_an_argparse_error(value, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--sampler", value])
    assert exit_.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def _fake_fit(interrupt_at: int, error: BaseException):
    """A fit that trains nothing and raises ``error`` in call ``interrupt_at`` (1-based)."""
    from toponeuro.training import FitResult

    calls = []

    def fake(model, train, val, test=None, **kw):
        calls.append(kw)
        if len(calls) == interrupt_at:
            raise error
        return FitResult(val_accuracy=0.5, val_loss=1.0, test_accuracy=0.5, test_loss=1.0, best_epoch=1,
                         epochs=1, seconds=0.1, seconds_per_epoch=0.1, stopped_early=False, diverged=False,
                         device="cpu", history=[])

    return fake, calls


@pytest.mark.parametrize("error, rc, line", [
    (KeyboardInterrupt(), 130, "toponeuro train: interrupted; the finished run (none) kept in"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 9999999999 bytes"), 1, "toponeuro train: error: out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 1,
     "toponeuro train: error: out of memory"),
])
def test_an_interrupt_in_the_second_run_keeps_the_first(error, rc, line, tmp_path, capsys, monkeypatch):
    fake, calls = _fake_fit(2, error)
    monkeypatch.setattr(comparison, "fit", fake)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--out", str(out),
                     "--no-progress"]) == rc
    err = capsys.readouterr().err
    assert err.startswith(line) and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert len(calls) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and list(summary["runs"]) == ["none"]
    assert summary["runs"]["none"]["test_accuracy"] == 0.5
    # the held-out statistics of the finished run came with it
    assert len(summary["runs"]["none"]["held_out"]["deaths"]) == summary["runs"]["none"]["held_out"]["neurons"] - 1
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_an_interrupt_in_the_first_run_writes_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    fake, _ = _fake_fit(1, KeyboardInterrupt())
    monkeypatch.setattr(comparison, "fit", fake)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--device", "cpu", "--out", str(out), "--no-progress"]) == 130
    assert "no run had finished, nothing written" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_a_real_ctrl_c_in_a_subprocess_exits_130_with_one_line(tmp_path):
    """SIGINT to a real `toponeuro train` while its first run trains: one line on stderr, exit 130."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "toponeuro", "train", "--dataset", "digits", "--epochs", "50",
                             "--device", "cpu", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    # wait for the progress bar of the first run (training has started), then press Ctrl-C
    seen = ""
    while "none" not in seen:
        ch = proc.stderr.read(1)
        assert ch, f"train ended before training: {seen}"
        seen += ch
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130
    assert "Traceback" not in rest and "toponeuro train: interrupted; no run had finished" in rest


@pytest.mark.parametrize("sampler, expected", [("importance:0.05", "importance(p=0.05)"),
                                               ("random:0.5", "random(p=0.5)")])
def test_sampler_option_reaches_fit_and_the_held_out_statistics(sampler, expected, tmp_path, monkeypatch):
    from toponeuro import sampling

    fake, calls = _fake_fit(0, None)
    monkeypatch.setattr(comparison, "fit", fake)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--sampler", sampler, "--device", "cpu", "--out", str(out),
                     "--no-progress"]) == 0
    kind, p = sampler.split(":")
    cls = sampling.ImportanceSampler if kind == "importance" else sampling.RandomSampler
    assert all(isinstance(c["sampler"], cls) and c["sampler"].p == float(p) for c in calls)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampler"] == expected and summary["complete"] is True
    # the mlp's hidden layers 450, 350, 200 keep floor(p * width) each; the 10 logits are kept whole
    n = sum(sampling.fraction_count(float(p), w) for w in (450, 350, 200)) + 10
    assert summary["neurons"] == n
    assert all(run["held_out"]["neurons"] == n for run in summary["runs"].values())


def test_memory_beyond_what_is_free_is_refused_with_the_figure_unless_overridden(tmp_path, capsys, monkeypatch):
    from toponeuro import _validation

    fake, calls = _fake_fit(0, None)
    monkeypatch.setattr(comparison, "fit", fake)
    monkeypatch.setattr(_validation, "available_memory", lambda device: 1 << 20)  # 1 MiB free
    args = ["train", "--dataset", "digits", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    # the digits mlp: 450 + 350 + 200 + 10 = 1010 neurons, 7 float32 1010 x 1010 matrices = 27.2 MiB
    assert "the regulariser on 1010 neurons" in err and "27.2 MiB" in err and "1.0 MiB is available" in err
    assert "--no-memory-check" in err and len(err.strip().splitlines()) == 1 and calls == []
    assert cli.main(args + ["--no-memory-check"]) == 0 and len(calls) == 2


def test_all_neurons_of_a_large_network_are_announced(tmp_path, capsys, monkeypatch):
    fake, _ = _fake_fit(0, None)
    monkeypatch.setattr(comparison, "fit", fake)
    monkeypatch.setattr(comparison, "held_out_statistics",
                        lambda *a, **k: {"mean_abs_rho": 0.1, "t1": 1.0, "neurons": 2, "deaths": [0.5]})
    assert cli.main(["train", "--model", "cnn", "--device", "cpu", "--out", str(tmp_path / "run"),
                     "--no-memory-check", "--limit", "256", "--no-progress"]) == 0
    assert "sees all 18954 neurons of cnn" in capsys.readouterr().err


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake, calls = _fake_fit(0, None)
    monkeypatch.setattr(comparison, "fit", fake)
    assert cli.main(["train", "--dataset", "digits", "--out", "", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("toponeuro train: error: --out is empty; give a folder "
                                       "(it is created if missing)\n")
    assert calls == [] and list(tmp_path.iterdir()) == []
