"""The checks before the first run of `toponeuro experiment run` (toponeuro/experiments/preflight.py).

Each config here could only fail at run time, in every run of its grid: the
check must refuse it before any run trains, in one line naming the key.
"""

from __future__ import annotations

import csv
import errno
import re
from collections import namedtuple
from pathlib import Path

import pytest

from toponeuro import _validation, cli, models, persistence, sampling, training
from toponeuro.experiments import config as cfgmod
from toponeuro.experiments import preflight, runner

from test_experiments import TINY as EXPERIMENTS_TINY

# test_experiments' tiny grid, with T1 in place of L2: a formula that needs edges and a matrix
TINY = EXPERIMENTS_TINY.replace('methods = ["none", "l2"]', 'methods = ["none", "t1"]')


def tiny(*edits, append: str = "") -> cfgmod.ExperimentConfig:
    text = TINY
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    return cfgmod.parse_config(text + append)


def refusal(config, tmp_path, **kw) -> list[str]:
    with pytest.raises(ValueError) as err:
        preflight.check_experiment(config, out_root=kw.pop("out_root", tmp_path / "out"), **{"device": "cpu", **kw})
    return str(err.value).splitlines()


@pytest.fixture
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        raise AssertionError("a run trained despite a config that cannot work")

    monkeypatch.setattr(training, "fit", fit)


def test_a_good_config_passes_and_gives_the_device(tmp_path):
    assert preflight.check_experiment(tiny(), out_root=tmp_path / "out", device="cpu").type == "cpu"
    assert (tmp_path / "out" / "tiny").is_dir()


# -- backends -------------------------------------------------------------------------------------

@pytest.mark.parametrize("methods", ['["t1"]', '["none", "t2"]', '["l2", "t1", "t2"]'])
def test_a_value_only_backend_is_refused_for_t1_and_t2(methods, tmp_path):
    cfg = tiny(('methods = ["none", "t1"]', f"methods = {methods}"), append='[regulariser]\nbackend = "ripser"\n')
    [line] = refusal(cfg, tmp_path)
    assert line.startswith("regulariser.backend = 'ripser' gives death values only")
    assert "'torch'" in line
    # the names of T1/T2 in the grid, and nothing else
    assert re.search(r"trains (t1|t2|t1, t2):", line)


@pytest.mark.parametrize("methods", ['["none"]', '["none", "l2", "decov", "min_corr"]'])
def test_a_value_only_backend_is_fine_where_no_formula_needs_edges(methods, tmp_path):
    cfg = tiny(('methods = ["none", "t1"]', f"methods = {methods}"), append='[regulariser]\nbackend = "ripser"\n')
    preflight.check_experiment(cfg, out_root=tmp_path, device="cpu")


@pytest.mark.parametrize("methods, refused", [('["t1"]', ["t1"]), ('["none", "t1", "t2"]', ["t1", "t2"]),
                                               ('["none", "l2", "decov"]', [])])
def test_t1_and_t2_on_an_unbounded_dissimilarity_are_refused(methods, refused, tmp_path):
    cfg = tiny(('methods = ["none", "t1"]', f"methods = {methods}"),
               append='[regulariser]\ndissimilarity = "euclidean"\n')
    if not refused:  # no formula on deaths: the dissimilarity is never used
        preflight.check_experiment(cfg, out_root=tmp_path, device="cpu")
        return
    lines = refusal(cfg, tmp_path)
    assert [line.split("(mlp, ")[1].split(")")[0] for line in lines] == refused
    for line, method in zip(lines, refused):
        assert line.startswith("regulariser.dissimilarity = 'euclidean' (mlp, ")
        assert f"{method.upper()} on the unbounded dissimilarity 'euclidean' has no lower bound" in line


def test_a_per_network_backend_is_named_by_its_own_key(tmp_path):
    cfg = tiny(('networks = ["mlp"]', 'networks = ["mlp", "cnn"]'),
               append='[regulariser.networks.cnn]\nbackend = "ripser"\n')
    [line] = refusal(cfg, tmp_path)
    assert line.startswith("regulariser.networks.cnn.backend = 'ripser'") and "cnn trains t1" in line


def test_a_backend_not_installed_is_refused(tmp_path, monkeypatch):
    fake = persistence.Backend("fake-mst", "toponeuro.persistence.fake_mst", ("no_such_module_for_toponeuro",), True)
    monkeypatch.setitem(persistence.BACKENDS, "fake-mst", fake)
    cfg = tiny(append='[regulariser]\nbackend = "fake-mst"\n')
    [line] = refusal(cfg, tmp_path)
    assert line.startswith("regulariser.backend = 'fake-mst': ") and "not installed" in line


# -- sizes, device, output folder -----------------------------------------------------------------

@pytest.mark.parametrize("limit", [1, 2, 255])
def test_fewer_training_images_than_a_batch_are_refused(limit, tmp_path):
    cfg = tiny(('dataset = "digits"', f'dataset = "digits"\nlimit = {limit}'))
    [line] = refusal(cfg, tmp_path)
    assert line == (f"experiment.limit = {limit} leaves {limit} training images, fewer than training.batch_size "
                    "= 256: raise experiment.limit or lower training.batch_size")


def test_a_batch_larger_than_the_dataset_is_refused_naming_the_batch_size(tmp_path):
    [line] = refusal(tiny(("max_epochs = 2", "max_epochs = 2\nbatch_size = 2048")), tmp_path)
    assert line.startswith("training.batch_size = 2048 is larger than the 1149 training images of digits")


def test_a_limit_of_exactly_one_batch_passes(tmp_path):
    preflight.check_experiment(tiny(('dataset = "digits"', 'dataset = "digits"\nlimit = 256')),
                               out_root=tmp_path, device="cpu")


@pytest.mark.parametrize("device", ["mps", "meta", "xpu", "bogus", "cuda:99"])
def test_an_unusable_device_is_refused(device, tmp_path, monkeypatch):
    if device == "cuda:99":
        monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    [line] = refusal(tiny(), tmp_path, device=device)
    assert line.startswith("--device: ") and repr(device) in line


def test_every_problem_is_listed_at_once(tmp_path):
    cfg = tiny(('dataset = "digits"', 'dataset = "digits"\nlimit = 1'), append='[regulariser]\nbackend = "ripser"\n')
    (tmp_path / "afile").write_text("")
    lines = refusal(cfg, tmp_path, device="mps", out_root=tmp_path / "afile")
    assert [line.split(" ")[0] for line in lines] == ["--device:", "regulariser.backend", "experiment.limit", "--out"]


def test_out_that_is_a_file_or_under_one_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    [line] = refusal(tiny(), tmp_path, out_root=afile)
    assert line.startswith(f"--out {afile} is a file")
    [line] = refusal(tiny(), tmp_path, out_root=afile / "below")
    assert line.startswith(f"--out {afile / 'below'} lies under {afile}")


def test_an_experiment_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "tiny").write_text("not a folder")
    [line] = refusal(tiny(), tmp_path, out_root=tmp_path)
    assert line.startswith(f"--out {tmp_path}: {tmp_path / 'tiny'} (experiment.name 'tiny') is a file")


def test_an_unwritable_out_is_refused(tmp_path):
    [line] = refusal(tiny(), tmp_path, out_root="/proc/toponeuro-results")
    assert line.startswith("--out /proc/toponeuro-results: cannot create or write the folder")


def test_a_full_disk_is_refused_with_both_figures(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(_validation.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100, 100))
    [line] = refusal(tiny(), tmp_path)
    # two runs, each a row (1 KiB) and two epochs of curve (200 B each): 2 x 1424 B = 2.8 KiB
    assert line == (f"--out {tmp_path / 'out' / 'tiny'}: 100 B free on its disk, and the results need about 2.8 KiB: "
                    "free some space or give a folder on another disk")


# -- memory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("network, dataset, sampler, widths, output", [
    ("mlp", "digits", None, (450, 350, 200), 10),
    ("mlp-deep", "mnist", None, None, 10),
    ("mlp", "mnist", sampling.ImportanceSampler(0.01), (450, 350, 200), 10),
    ("cnn", "digits", None, (16 * 8 * 8, 32 * 4 * 4, 128), 10),
    ("cnn", "mnist", sampling.RandomSampler(0.1, seed=3), (16 * 28 * 28, 32 * 14 * 14, 128), 10),
])
def test_recorded_neurons_against_the_layer_widths(network, dataset, sampler, widths, output):
    if widths is None:  # read the widths off the network itself
        model = models.build(network, in_shape=(1, 28, 28), num_classes=10)
        widths = [m.out_features for m in model.modules() if hasattr(m, "out_features")][:-1]
    p = 1.0 if sampler is None else sampler.p
    expected = sum(sampling.fraction_count(p, w) for w in widths) + output
    assert preflight.recorded_neurons(network, dataset, sampler) == expected


def test_recorded_neurons_leaves_the_global_random_state_alone():
    import torch

    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    preflight.recorded_neurons("mlp-dropout", "digits")
    assert torch.equal(torch.rand(3), before)


def test_memory_beyond_what_is_free_is_refused_naming_the_sampler_key(tmp_path, monkeypatch):
    # cnn on digits records 1674 neurons: 7 float32 1674 x 1674 matrices are 74.8 MiB, x 2 jobs 149.7 MiB
    monkeypatch.setattr(_validation, "available_memory", lambda device: 100 * 2**20)
    cfg = tiny(('networks = ["mlp"]', 'networks = ["mlp", "cnn"]'),
               append='[regulariser.networks.cnn]\nsampler = { kind = "all" }\nalpha = 0.3\n')
    preflight.check_experiment(cfg, out_root=tmp_path, device="cpu", jobs=1)  # one run at a time fits
    [line] = refusal(cfg, tmp_path, jobs=2)
    assert line.startswith("regulariser.sampler (cnn, all): the regulariser on 1674 neurons")
    assert "74.8 MiB x 2 runs at once) needs about 149.7 MiB, and 100.0 MiB is available on cpu" in line
    assert "lower --jobs" in line and "--no-memory-check" in line
    preflight.check_experiment(cfg, out_root=tmp_path, device="cpu", jobs=2, memory_check=False)


def test_the_batched_engine_counts_a_stack_of_regularisers_at_once(tmp_path, monkeypatch):
    cfg = tiny(("seeds = [0]", "seeds = [0, 1, 2]"))  # three regularised runs of one network
    runs = [r for r in cfg.runs() if r.method in preflight.ACTIVATION_METHODS and r.weight > 0]
    n = preflight.recorded_neurons("mlp", cfg.dataset, cfg.regulariser_for("mlp").build_sampler(0))
    one = preflight.regulariser_memory(n)
    # room for exactly two regularisers: the single engine (one job) fits, a stack of all of them does not
    monkeypatch.setattr(_validation, "available_memory", lambda device: 2 * one)
    assert len(runs) > 2
    preflight.check_experiment(cfg, out_root=tmp_path, device="cpu", jobs=1)
    preflight.check_experiment(cfg, out_root=tmp_path, device="cpu", stack_size=2)
    with pytest.raises(ValueError) as err:
        preflight.check_experiment(cfg, out_root=tmp_path, device="cpu", stack_size=128)
    assert f"x {len(runs)} runs at once" in str(err.value) and "lower --stack-size" in str(err.value)


def test_a_per_network_sampler_is_named_by_its_own_key(tmp_path, monkeypatch):
    monkeypatch.setattr(_validation, "available_memory", lambda device: 2**20)
    cfg = tiny(append='[regulariser.networks.mlp]\nsampler = { kind = "random", p = 0.5 }\n')
    [line] = refusal(cfg, tmp_path)
    n = 225 + 175 + 100 + 10
    assert line.startswith(f"regulariser.networks.mlp.sampler (mlp, random(p=0.5)): the regulariser on {n} neurons")


def test_weight_penalties_alone_need_no_matrix(tmp_path, monkeypatch):
    monkeypatch.setattr(_validation, "available_memory", lambda device: 0)
    cfg = tiny(('methods = ["none", "t1"]', 'methods = ["none", "l1", "l2"]'))
    preflight.check_experiment(cfg, out_root=tmp_path, device="cpu")


def test_available_memory_on_cpu_is_within_the_machine(monkeypatch):
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free = _validation.available_memory("cpu")
    assert 0 < free <= total
    # without /proc/meminfo: the available physical pages, which never exceed MemAvailable by much
    monkeypatch.setattr(_validation, "_meminfo_available", lambda: None)
    assert 0 < _validation.available_memory("cpu") <= total


# -- through the command line ---------------------------------------------------------------------

def _single_engine() -> list[str]:
    """``--engine single`` where `experiment run` has an engine choice: the fake fits here are the
    single engine's (a batched engine trains its stacks without calling training.fit)."""
    import argparse
    import contextlib
    import io

    from toponeuro.experiments import cli as experiment_cli

    parser = argparse.ArgumentParser()
    experiment_cli.configure_parser(parser)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(["run", "config", "--engine", "single"])
    except SystemExit:
        return []
    return ["--engine", "single"]


SINGLE = _single_engine()


def write_config(tmp_path, *edits, append="") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny(*edits, append=append).text)
    return path


@pytest.mark.parametrize("edits, append, options, needle", [
    ((), '[regulariser]\nbackend = "ripser"\n', [], "regulariser.backend = 'ripser' gives death values only"),
    ((('dataset = "digits"', 'dataset = "digits"\nlimit = 1'),), "", [], "experiment.limit = 1 leaves 1"),
    ((), "", ["--device", "mps"], "--device: device 'mps' is not supported"),
])
def test_experiment_run_refuses_before_the_first_run(edits, append, options, needle, tmp_path, capsys,
                                                     no_training):
    config = write_config(tmp_path, *edits, append=append)
    args = ["experiment", "run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(args + (options or ["--device", "cpu"])) == 2
    err = capsys.readouterr().err
    assert err == f"toponeuro experiment: error: {needle}" + err.split(needle, 1)[1]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "tiny" / "runs.csv").exists()


@pytest.mark.parametrize("out", ["afile", "afile/below", "/proc/toponeuro-results"])
def test_experiment_run_out_unusable_is_one_line(out, tmp_path, capsys, no_training):
    (tmp_path / "afile").write_text("")
    out = out if out.startswith("/") else str(tmp_path / out)
    assert cli.main(["experiment", "run", str(write_config(tmp_path)), "--out", out, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"toponeuro experiment: error: --out {out}") and len(err.strip().splitlines()) == 1


def _fake_fit(fail_at: int, error: BaseException):
    calls = []

    def fit(model, train, val, test=None, *, method="none", weight=0.0, on_epoch=None, **kw):
        calls.append(method)
        if len(calls) == fail_at:
            raise error
        return training.FitResult(val_accuracy=0.5, val_loss=1.0, test_accuracy=0.5, test_loss=1.0, best_epoch=1,
                                  epochs=1, seconds=0.1, seconds_per_epoch=0.1, stopped_early=False,
                                  diverged=False, device="cpu", history=[])

    return fit, calls


def rows_of(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_ctrl_c_in_experiment_run_keeps_the_rows_and_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    fit, calls = _fake_fit(2, KeyboardInterrupt())
    monkeypatch.setattr(training, "fit", fit)
    out = tmp_path / "out"
    assert cli.main(["experiment", "run", str(write_config(tmp_path)), "--out", str(out), "--device", "cpu",
                     "--no-progress", *SINGLE]) == 130
    captured = capsys.readouterr()
    assert captured.err == ("toponeuro experiment: interrupted; the rows of the finished runs are kept, rerun the "
                            "same command to do the rest\n")
    assert [r["method"] for r in rows_of(out / "tiny" / "runs.csv")] == ["none"] and calls == ["none", "t1"]


def test_a_full_disk_while_writing_a_row_is_one_line(tmp_path, capsys, monkeypatch):
    fit, _ = _fake_fit(0, None)
    monkeypatch.setattr(training, "fit", fit)

    def full(path, row):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runner, "append_row", full)
    out = tmp_path / "out"
    assert cli.main(["experiment", "run", str(write_config(tmp_path)), "--out", str(out), "--device", "cpu",
                     "--no-progress", *SINGLE]) == 1
    err = capsys.readouterr().err
    assert err == (f"toponeuro experiment: error: the disk is full ({out / 'tiny' / 'runs.csv'}): free some space "
                   "and rerun (finished results are kept)\n")


def test_no_memory_check_lets_the_grid_run(tmp_path, capsys, monkeypatch):
    fit, calls = _fake_fit(0, None)
    monkeypatch.setattr(training, "fit", fit)
    monkeypatch.setattr(_validation, "available_memory", lambda device: 0)
    args = ["experiment", "run", str(write_config(tmp_path)), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress", *SINGLE]
    assert cli.main(args) == 2 and calls == []
    assert "regulariser.sampler (mlp, all): the regulariser on 1010 neurons" in capsys.readouterr().err
    assert cli.main(args + ["--no-memory-check"]) == 0 and calls == ["none", "t1"]


@pytest.mark.parametrize("options, line", [
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--limit-runs", "-1"], "--limit-runs must be at least 0, got -1"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--out", ""], "--out is empty; give a folder (it is created if missing)"),
])
def test_experiment_run_options_are_named_in_their_refusal(options, line, tmp_path, capsys, monkeypatch,
                                                           no_training):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    args = ["experiment", "run", str(config), "--device", "cpu", "--no-progress"]
    assert cli.main(args + (["--out", str(tmp_path / "out")] if "--out" not in options else []) + options) == 2
    assert capsys.readouterr().err == f"toponeuro experiment: error: {line}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]  # nothing written anywhere


def test_a_config_that_is_not_text_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "binary.toml"
    head = b"[experiment]\nname = \""
    path.write_bytes(head + b"\xff\"\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a UTF-8 text file \(byte {len(head)}\)"):
        cfgmod.load_config(path)


@pytest.mark.cuda
def test_available_memory_on_cuda_is_the_free_memory_of_that_device():
    import torch

    for index in range(torch.cuda.device_count()):
        free = _validation.available_memory(f"cuda:{index}")
        total = torch.cuda.get_device_properties(index).total_memory
        assert 0 < free <= total
        # a block held meanwhile reads as less free memory (the allocator takes whole 2 MiB pages or more)
        held = torch.empty(256 * 2**20, dtype=torch.uint8, device=f"cuda:{index}")
        assert _validation.available_memory(f"cuda:{index}") <= free - 255 * 2**20
        del held
