"""`toponeuro train`, the main job, end to end at a small size."""

import json
import subprocess
import sys

import pytest
import torch

from toponeuro import cli, dissimilarity, training_cli
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
    real_fit = training_cli.fit

    def recording_fit(model, train, val, test=None, **kw):
        fits.append({"model": model, "train_shape": tuple(train[0].shape), "test_rows": len(test[1]), **kw})
        return real_fit(model, train, val, test, **kw)

    regularisers = []
    real_init = TopologicalRegulariser.__init__

    def recording_init(self, *args, **kw):
        real_init(self, *args, **kw)
        regularisers.append((self.formula, self.dissimilarity, self.backend))

    monkeypatch.setattr(training_cli, "fit", recording_fit)
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

    monkeypatch.setattr(training_cli, "fit", no_training)
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
