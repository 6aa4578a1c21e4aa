"""The protocol-fidelity options reach the model, the loss and the data, and every row records them.

Initialisation (Glorot uniform with zero bias, or PyTorch's default), L1/L2
over the biases too, the reference code's pixel scale, the commit of every
row, and ``runs.csv`` files written before these columns existed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from toponeuro import cli, data, models, training
from toponeuro.experiments import config as cfgmod
from toponeuro.experiments import runner, runs_csv

from test_experiments import TINY  # one network (mlp), methods none and l2 at weight 0.1, seed 0, digits

PAPER_OPTIONS = """
[model]
init = "glorot"
"""


def tiny(extra: str = "", **replace) -> cfgmod.ExperimentConfig:
    text = TINY
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return cfgmod.parse_config(text + extra)


class RecordingFit:
    """Stands in for training.fit: records the model's initial state, the data and the keywords."""

    def __init__(self):
        self.received = []

    def __call__(self, model, train, val, test=None, *, method, weight, seed, on_epoch=None, **kw):
        self.received.append({"method": method, "weight": weight, "seed": seed, "train": train,
                              "state": {k: v.detach().clone() for k, v in model.state_dict().items()}, **kw})
        on_epoch({"epoch": 1, "train_loss": 1.0, "train_reg": 0.0, "val_loss": 0.5, "val_accuracy": 0.8,
                  "lr": 0.01, "seconds": 0.1})
        return training.FitResult(val_accuracy=0.8, val_loss=0.4, test_accuracy=0.79, test_loss=0.45,
                                  best_epoch=1, epochs=1, seconds=0.1, seconds_per_epoch=0.1,
                                  stopped_early=False, diverged=False, device="cpu", history=[])


def rows_of(directory):
    with open(Path(directory) / "runs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# -- initialisation -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "mlp-deep", "cnn"])
def test_glorot_init_draws_uniform_weights_within_the_glorot_bound_and_zero_biases(name):
    torch.manual_seed(0)
    model = models.build(name, init="glorot")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers
    for layer in layers:
        w = layer.weight.detach()
        # fans by hand: a Linear (out, in); a convolution (out, in, kh, kw) multiplies both by kh * kw
        area = w[0, 0].numel() if w.ndim == 4 else 1
        fan_out, fan_in = w.shape[0] * area, w.shape[1] * area
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert float(w.abs().max()) <= bound
        # uniform on [-a, a]: the extremes come close to the bound and the variance is a^2 / 3
        assert float(w.abs().max()) > 0.9 * bound
        assert float(w.var()) == pytest.approx(bound ** 2 / 3, rel=0.25 if w.numel() < 2000 else 0.05)
        assert torch.count_nonzero(layer.bias) == 0


def test_torch_init_is_left_as_pytorch_draws_it_and_bad_names_are_refused():
    torch.manual_seed(3)
    default = models.build("mlp")
    torch.manual_seed(3)
    explicit = models.build("mlp", init="torch")
    for a, b in zip(default.parameters(), explicit.parameters()):
        assert torch.equal(a, b)
    assert torch.count_nonzero(default.fc1.bias) > 0  # PyTorch's default bias is not zero
    with pytest.raises(ValueError, match="unknown init 'keras'.*torch, glorot"):
        models.build("mlp", init="keras")


def test_every_method_of_a_seed_starts_from_the_one_saved_initialisation(tmp_path, monkeypatch):
    fake = RecordingFit()
    monkeypatch.setattr(training, "fit", fake)
    cfg = tiny(PAPER_OPTIONS, **{'methods = ["none", "l2"]': 'methods = ["none", "l2", "l1"]'})
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    saved = torch.load(tmp_path / "tiny" / "init" / "mlp_glorot_s0.pt", weights_only=True)
    assert len(fake.received) == 3
    for call in fake.received:
        assert call["state"].keys() == saved.keys()
        for key in saved:
            assert torch.equal(call["state"][key], saved[key])
    assert torch.count_nonzero(saved["fc1.bias"]) == 0

    # the saved file, not the generator, decides: a changed file is what the next run starts from
    saved = {k: v + 1.0 for k, v in saved.items()}
    torch.save(saved, tmp_path / "tiny" / "init" / "mlp_glorot_s0.pt")
    spec = next(r for r in cfg.runs() if r.method == "l1")
    model = runner.initial_weights(cfg, spec, tmp_path / "tiny" / "init")
    assert torch.equal(model.fc1.bias.detach(), torch.ones_like(model.fc1.bias))


# -- L1 / L2 over the biases --------------------------------------------------------------------

@pytest.mark.parametrize("formula", ["l1", "l2"])
def test_weight_penalty_with_and_without_biases_by_hand(formula):
    torch.manual_seed(1)
    model = models.build("mlp-deep", in_shape=(1, 8, 8))
    power = 1 if formula == "l1" else 2
    weights = sum(float((p.detach().double().abs() ** power).sum()) for n, p in model.named_parameters()
                  if n.endswith("weight"))
    biases = sum(float((p.detach().double().abs() ** power).sum()) for n, p in model.named_parameters()
                 if n.endswith("bias"))
    assert biases > 0
    with_bias = training.make_regulariser(model, formula, include_bias=True)
    without = training.make_regulariser(model, formula, include_bias=False)
    assert float(with_bias().detach()) == pytest.approx(weights + biases, rel=1e-5)
    assert float(without().detach()) == pytest.approx(weights, rel=1e-5)
    # the gradient reaches the biases only when they count
    with_bias().backward()
    assert torch.count_nonzero(model.fc1.bias.grad) > 0
    model.zero_grad()
    without().backward()
    assert model.fc1.bias.grad is None or torch.count_nonzero(model.fc1.bias.grad) == 0
    with pytest.raises(ValueError, match="include_bias must be true or false"):
        training.make_regulariser(model, formula, include_bias="yes")


def test_fit_with_include_bias_penalises_the_biases():
    """One plain SGD step with L2: the biases move by an extra ``-lr * weight * 2 b`` only with include_bias."""
    X, y = data.load("digits", "train")
    train = (X[:64], y[:64])
    lr, weight = 0.1, 0.5
    config = training.TrainConfig(batch_size=64, max_epochs=1, momentum=0.0, nesterov=False, lr=lr)

    def one_step(method, include_bias=False):
        torch.manual_seed(0)
        model = models.build("mlp", in_shape=(1, 8, 8))  # PyTorch's default: non-zero biases
        before = model.out.bias.detach().clone()
        training.fit(model, train, train, method=method, weight=weight, include_bias=include_bias,
                     config=config, progress=False)
        return before, model.out.bias.detach()

    b0, plain = one_step("none")
    _, with_bias = one_step("l2", include_bias=True)
    _, without = one_step("l2", include_bias=False)
    assert torch.count_nonzero(b0) > 0
    # the cross-entropy gradient is the same in the three runs (same start, same batch)
    assert torch.allclose(with_bias - plain, -lr * weight * 2 * b0, atol=1e-6)
    assert torch.allclose(without, plain, atol=1e-7)


def test_the_config_s_include_bias_reaches_fit(tmp_path, monkeypatch):
    fake = RecordingFit()
    monkeypatch.setattr(training, "fit", fake)
    cfg = tiny("\n[regulariser]\ninclude_bias = true\n")
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    assert [c["include_bias"] for c in fake.received] == [True, True]
    rows = rows_of(tmp_path / "tiny")
    assert [r["include_bias"] for r in rows] == ["true", "true"]


# -- pixel scale --------------------------------------------------------------------------------

def test_the_reference_code_s_pixel_scale_divides_by_255_once_more():
    X, y = data.load("mnist", "test")
    Xb, yb = data.load("mnist", "test", pixel_scale="1/255^2")
    assert torch.equal(y, yb)
    # by hand: the raw bytes are integers 0..255; one division gives k / 255, two give k / 255^2
    raw_once = (X * 255).round()
    assert torch.allclose(X * 255, raw_once, atol=1e-4) and float(raw_once.max()) == 255.0
    assert torch.allclose(Xb, (raw_once / 255.0) / 255.0, rtol=1e-6, atol=0)
    assert float(Xb.max()) == pytest.approx(1 / 255)
    with pytest.raises(ValueError, match="unknown pixel_scale '255'.*1/255, 1/255\\^2"):
        data.load("digits", "train", pixel_scale="255")


def test_the_config_s_pixel_scale_reaches_the_data_the_run_trains_on(tmp_path, monkeypatch):
    fake = RecordingFit()
    monkeypatch.setattr(training, "fit", fake)
    runner._DATA_CACHE.clear()
    cfg = tiny(**{'dataset = "digits"': 'dataset = "digits"\npixel_scale = "1/255^2"'})
    runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False)
    X, _ = data.load("digits", "train")
    for call in fake.received:
        assert torch.allclose(call["train"][0], X / 255.0)
    assert {r["pixel_scale"] for r in rows_of(tmp_path / "tiny")} == {"1/255^2"}
    runner._DATA_CACHE.clear()


# -- config parsing -----------------------------------------------------------------------------

def test_config_defaults_describe_what_old_configs_ran():
    cfg = tiny()
    assert (cfg.init, cfg.regulariser.include_bias, cfg.pixel_scale) == ("torch", False, "1/255")
    assert (cfg.report.drop_unconverged, cfg.report.max_weight) == (False, ())


def test_the_paper_config_uses_the_authors_choices():
    cfg = cfgmod.load_config("mnist-paper")
    assert (cfg.init, cfg.regulariser.include_bias, cfg.pixel_scale) == ("glorot", True, "1/255")
    assert cfg.report.drop_unconverged and cfg.report.max_weight_dict == {"l1": 5.0, "l2": 10.0}


@pytest.mark.parametrize("extra, message", [
    ('\n[model]\ninit = "he"\n', "model.init: unknown initialisation 'he'"),
    ('\n[model]\nseed = 1\n', "model.seed: unknown key"),
    ('\n[regulariser]\ninclude_bias = "yes"\n', "regulariser.include_bias: must be true or false"),
    ('\n[report]\ndrop_unconverged = 1\n', "report.drop_unconverged: must be true or false"),
    ('\n[report]\nmax_weight = { l3 = 1 }\n', "report.max_weight.l3: unknown weighted method"),
    ('\n[report]\nmax_weight = { l1 = -1 }\n', "report.max_weight.l1: must be a finite number >= 0"),
    ('\n[report]\nmax_weight = 5\n', "report.max_weight: must be a table"),
])
def test_bad_fidelity_options_name_the_key(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(extra)


def test_a_bad_pixel_scale_names_the_key():
    with pytest.raises(ValueError, match=r"experiment.pixel_scale: unknown scale '1/256'"):
        tiny(**{'dataset = "digits"': 'dataset = "digits"\npixel_scale = "1/256"'})


# -- rows: options and commit -------------------------------------------------------------------

def test_rows_record_the_options_and_the_commit_given(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "fit", RecordingFit())
    monkeypatch.setenv("TOPONEURO_COMMIT", "fromenv")
    runner.run_experiment(tiny(PAPER_OPTIONS), out_root=tmp_path, device="cpu", progress=False, commit="abc1234")
    rows = rows_of(tmp_path / "tiny")
    assert len(rows) == 2
    for row in rows:
        assert (row["init"], row["include_bias"], row["pixel_scale"], row["commit"]) == \
            ("glorot", "false", "1/255", "abc1234")
    with pytest.raises(ValueError, match="commit must be a non-empty word"):
        runner.run_experiment(tiny(), out_root=tmp_path, device="cpu", progress=False, commit="a b")


def test_rows_take_the_commit_from_the_environment_and_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "fit", RecordingFit())
    monkeypatch.setenv("TOPONEURO_COMMIT", "fromenv")
    runner.run_experiment(tiny(), out_root=tmp_path / "a", device="cpu", progress=False)
    assert {r["commit"] for r in rows_of(tmp_path / "a" / "tiny")} == {"fromenv"}
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    assert cli.main(["experiment", "run", str(config), "--out", str(tmp_path / "b"), "--device", "cpu",
                     "--no-progress", "--commit", "fromcli"]) == 0
    assert {r["commit"] for r in rows_of(tmp_path / "b" / "tiny")} == {"fromcli"}


# -- runs.csv of the previous version -----------------------------------------------------------

def _write_legacy_runs(directory: Path, rows: list[dict]) -> None:
    legacy = [c for c in runner.COLUMNS if c not in runner.LEGACY_DEFAULTS]
    # the first version had neither the three fidelity columns nor the engine column
    assert len(legacy) == len(runner.COLUMNS) - 4
    directory.mkdir(parents=True)
    with open(directory / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=legacy, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in legacy})


def _legacy_row(cfg, spec) -> dict:
    sizes = runner._split_sizes(cfg)
    row = {"run_id": spec.run_id, "dataset": spec.dataset, "network": spec.network, "method": spec.method,
           "weight": repr(spec.weight), "seed": str(spec.seed), "val_accuracy": "0.7", "test_accuracy": "0.69",
           "val_loss": "0.5", "test_loss": "0.5", "best_epoch": "2", "epochs": "2", "stopped_early": "false",
           "diverged": "false", "seconds": "1.0", "seconds_per_epoch": "0.5", "device": "cpu",
           "torch_version": torch.__version__, "commit": "old1234", "finished_at": "2026-01-01T00:00:00+00:00"}
    row.update({k: runs_csv.format_cell(v) for k, v in runner._protocol(cfg, spec, sizes).items()})
    return row


def test_old_rows_load_with_the_values_of_what_they_ran_and_resume(tmp_path, monkeypatch):
    cfg = tiny()
    done = cfg.runs()[0]
    directory = tmp_path / "tiny"
    _write_legacy_runs(directory, [_legacy_row(cfg, done)])
    rows = runner.read_rows(directory / "runs.csv")
    assert [(r["init"], r["include_bias"], r["pixel_scale"]) for r in rows] == [("torch", "false", "1/255")]
    from toponeuro.experiments import report

    frame = report.load_runs(directory)
    assert frame.loc[0, "init"] == "torch"

    fake = RecordingFit()
    monkeypatch.setattr(training, "fit", fake)
    summary = runner.run_experiment(cfg, out_root=tmp_path, device="cpu", progress=False, commit="new5678")
    assert (summary.already_done, summary.finished) == (1, 1)
    assert [c["method"] for c in fake.received] == ["l2"]  # the old run is not redone
    with open(directory / "runs.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == runner.COLUMNS  # rewritten with this version's columns
    rows = rows_of(directory)
    assert [(r["method"], r["commit"], r["init"]) for r in rows] == [("none", "old1234", "torch"),
                                                                     ("l2", "new5678", "torch")]
    assert rows[0]["val_accuracy"] == "0.7" and rows[0]["finished_at"] == "2026-01-01T00:00:00+00:00"


def test_old_rows_are_not_mixed_with_runs_of_the_authors_options(tmp_path, monkeypatch):
    old = tiny()
    _write_legacy_runs(tmp_path / "tiny", [_legacy_row(old, old.runs()[0])])
    monkeypatch.setattr(training, "fit", RecordingFit())
    with pytest.raises(ValueError, match="init: torch there vs glorot in the config"):
        runner.run_experiment(tiny(PAPER_OPTIONS), out_root=tmp_path, device="cpu", progress=False)
