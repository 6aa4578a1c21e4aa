"""``toponeuro bench``: end-to-end runs at tiny sizes, failure reporting, the skip logic.

No timing assertions: the tests check what is recorded and written, not how
fast anything is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree

from toponeuro import bench, persistence
from toponeuro.cli import main as cli_main
from toponeuro.persistence import Backend

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli_main(["bench", "--n", "16", "32", "--m", "8", "--repeats", "1", "--devices", "cpu",
                     "--out", str(out), "--no-progress"])
    return code, out


def test_cli_end_to_end_writes_json_and_png(tiny_run):
    code, out = tiny_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("date", "config", "host", "versions", "devices", "backends", "cases", "summary",
                "load_average_start", "load_average_end"):
        assert key in results, key
    assert results["config"]["n"] == [16, 32]
    assert results["config"]["repeats"] == 1
    assert results["versions"]["torch"] == torch.__version__
    assert results["commit"]  # the source the numbers came from (or "unknown")
    assert results["dirty"] in (True, False, None)  # uncommitted changes beside it (None: unknown)
    assert results["complete"] is True and "interrupted" not in results
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "timings.png"]  # no temporary files left
    assert results["devices"]["cpu"]["available"]
    assert results["devices"]["cpu"]["name"]
    assert (out / "timings.png").read_bytes()[:8] == PNG_MAGIC


def test_every_backend_and_extra_is_timed_at_every_n(tiny_run):
    _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    installed = persistence.available_backends()
    assert sorted(k for k, v in results["backends"].items() if v["available"]) == sorted(installed)
    expected = set(installed) | {"check", "torch+check", "t1", "min_corr", "decov", "correlation", "matmul"}
    if persistence.torch_mst.HAVE_NUMBA:
        expected.add(bench.BORUVKA)
    for n in (16, 32):
        got = {c["series"] for c in results["cases"] if c["n"] == n and c["device"] == "cpu"}
        assert got == expected, n
    for c in results["cases"]:
        assert c["status"] == "ok", c
        assert c["repeats"] == len(c["times_s"]) == 1
        assert c["min_s"] <= c["median_s"] <= c["max_s"]
    # the regulariser ratio is the quotient of the two recorded medians
    reg = results["summary"]["regulariser"]
    assert [(r["series"], r["n"]) for r in reg] == [("t1", 16), ("t1", 32), ("decov", 16), ("decov", 32),
                                                   ("min_corr", 16), ("min_corr", 32)]
    for r in reg:
        timed = next(c for c in results["cases"] if c["series"] == r["series"] and c["n"] == r["n"])
        corr = next(c for c in results["cases"] if c["series"] == "correlation" and c["n"] == r["n"])
        assert r["ratio"] == pytest.approx(timed["median_s"] / corr["median_s"])
    if "giotto-ph" in installed:
        speedups = {(s["series"], s["n"]) for s in results["summary"]["speedup_vs_giotto_ph"]}
        assert {("torch", 16), ("torch", 32), ("torch+check", 16)} <= speedups


def test_t1_is_reported_against_one_matrix_product(tiny_run):
    _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    reg = results["summary"]["regulariser"]
    for r in reg:  # both ratios are quotients of the medians timed in the same interleaved rounds
        median = {c["series"]: c["median_s"] for c in results["cases"] if c["n"] == r["n"]}
        assert r["matmul_s"] == median["matmul"]
        assert r["t1_vs_matmul"] == pytest.approx(median[r["series"]] / median["matmul"])
        assert r["ratio"] == pytest.approx(median[r["series"]] / median["correlation"])  # the old ratio is kept
    table = bench.format_table(results)
    assert "/matmul" in table and "matmul ms" in table
    for series in ("t1", "min_corr", "decov"):
        row = next(line.split() for line in table.splitlines() if line.split()[:2] == [series, "32"])
        r = next(r for r in reg if (r["series"], r["n"]) == (series, 32))
        assert row[-1] == f"{r['t1_vs_matmul']:.1f}"


def test_the_matmul_case_is_z_transpose_z_of_the_standardised_activations():
    A, D = bench.benchmark_matrix(12, m=9, seed=3, dtype=torch.float64)
    (case,) = [c for c in bench.cases._cases_for(torch.device("cpu"), ["torch"], {"A": A, "D": D})
               if any(kind == "matmul" for kind, _, _ in c.members)]
    kinds = [kind for kind, _, _ in case.members]
    calls = case.make()
    ZtZ = calls[kinds.index("matmul")]()
    # reference: NumPy's Pearson correlation, times m (Z^T Z / m is the correlation of population-standardised Z)
    np.testing.assert_allclose(ZtZ.numpy(), 9 * np.corrcoef(A.numpy().T), atol=1e-12)


def test_t1_is_timed_through_the_regulariser_module(monkeypatch):
    # a cheaper regulariser must show in the bench without editing it: T1 (and the baselines) are
    # timed through TopologicalRegulariser.forward on the recorded activations, and their gradient
    # reaches them
    import toponeuro.nn

    calls = []
    forward = toponeuro.nn.TopologicalRegulariser.forward

    def counted(self):
        value = forward(self)
        calls.append((self.formula, self.backend, tuple(self.activations().shape), self.activations().requires_grad))
        return value

    monkeypatch.setattr(toponeuro.nn.TopologicalRegulariser, "forward", counted)
    bench.run_benchmark([16], m=8, repeats=2, backends=["torch"], devices=["cpu"], progress=False,
                        cases=["regulariser"])  # the training step's T1 goes through it too
    assert set(calls) == {(f, "torch", (8, 16), True) for f in ("t1", "min_corr", "decov")}
    assert len(calls) == 9  # each: one warm-up and two timed calls


def test_cases_are_selectable(tmp_path, capsys):
    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["torch", "giotto-ph"], devices=["cpu"],
                                  progress=False, cases=["regulariser"])
    assert {c["kind"] for c in results["cases"]} == {"regulariser", "correlation", "matmul"}
    assert results["config"]["cases"] == ["regulariser"]
    assert [r["n"] for r in results["summary"]["regulariser"] if r["series"] == "t1"] == [16, 32]
    results = bench.run_benchmark([16], m=8, repeats=1, backends=["torch"], devices=["cpu"], progress=False,
                                  cases=["mst", "check"])
    assert {c["kind"] for c in results["cases"]} == {"mst", "check", "mst+check"}
    with pytest.raises(ValueError, match="unknown case.*'timing'.*regulariser"):
        bench.run_benchmark([16], devices=["cpu"], progress=False, cases=["timing"])
    out = tmp_path / "sel"
    assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu", "--cases", "regulariser",
                     "--out", str(out)]) == 0
    assert "/matmul" in capsys.readouterr().out
    assert cli_main(["bench", *TINY, "--devices", "cpu", "--cases", "nonsense", "--out", str(out / "x")]) == 2
    _one_line_error(capsys, "'nonsense'", "mst", "check", "regulariser")
    assert not (out / "x").exists()


def test_torch_ops_recorded_for_the_torch_series(tiny_run):
    _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    for c in results["cases"]:
        assert ("torch_ops" in c) == (c["series"] in bench.OP_COUNTED_SERIES), c["series"]
    if persistence.torch_mst.HAVE_NUMBA:
        boruvka = [c["torch_ops"] for c in results["cases"] if c["series"] == bench.BORUVKA]
        prim = [c["torch_ops"] for c in results["cases"] if c["series"] == "torch"]
        # the host Prim is one numba call (plus the canonical order); Boruvka is rounds of torch ops
        assert min(boruvka) > 2 * max(prim)


def test_count_torch_ops_by_hand():
    x = torch.arange(6.0).reshape(2, 3)
    assert bench.count_torch_ops(lambda: (x + 1).sum()) == 2  # add, sum
    assert bench.count_torch_ops(lambda: x.T.unsqueeze(0)[0, 1:]) == 0  # views launch nothing
    assert bench.count_torch_ops(lambda: x.mT.contiguous()) == 1  # the copy


def test_benchmark_matrix_is_seeded_and_is_one_minus_abs_rho():
    A, D = bench.benchmark_matrix(20, 10, seed=3)
    A2, D2 = bench.benchmark_matrix(20, 10, seed=3)
    assert torch.equal(A, A2) and torch.equal(D, D2)
    assert not torch.equal(A, bench.benchmark_matrix(20, 10, seed=4)[0])
    # against NumPy's Pearson correlation
    import numpy as np

    rho = np.corrcoef(A.double().numpy(), rowvar=False)
    np.testing.assert_allclose(D.numpy(), 1 - np.abs(rho), atol=1e-5)


def _register(monkeypatch, name, module, requires, gives_edges=True):
    backends = dict(persistence.BACKENDS)
    backends[name] = Backend(name, module, requires, gives_edges)
    monkeypatch.setattr(persistence, "BACKENDS", backends)


def test_backend_that_fails_to_import_is_reported_not_crashed(monkeypatch, tmp_path):
    _register(monkeypatch, "missing", "toponeuro_missing_plugin", ("toponeuro_no_such_requirement",))
    # its requirement imports, its own module does not
    _register(monkeypatch, "broken", "toponeuro.persistence.no_such_module", ("json",))
    results = bench.run_benchmark([16], m=8, repeats=1, backends=["torch", "missing", "broken"],
                                  devices=["cpu"], progress=False)
    assert results["backends"]["torch"]["available"]
    for name in ("missing", "broken"):
        assert not results["backends"][name]["available"]
        assert results["backends"][name]["error"]
    assert "toponeuro_no_such_requirement" in results["backends"]["missing"]["error"]
    assert {c["series"] for c in results["cases"]} >= {"torch", "t1"}
    assert not any(c["series"] in ("missing", "broken") for c in results["cases"])
    text = bench.format_table(results)
    assert "not benchmarked: missing" in text and "not benchmarked: broken" in text


def test_backend_that_raises_at_run_time_is_recorded_as_error(monkeypatch, tmp_path):
    (tmp_path / "toponeuro_raising_plugin.py").write_text(
        "def death_edges(D):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _register(monkeypatch, "raising", "toponeuro_raising_plugin", ("toponeuro_raising_plugin",))
    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["raising", "torch"], devices=["cpu"],
                                  progress=False)
    errors = [c for c in results["cases"] if c["series"] == "raising"]
    assert [c["status"] for c in errors] == ["error", "error"]
    assert "boom" in errors[0]["error"]
    assert all(c["status"] == "ok" for c in results["cases"] if c["series"] == "torch")
    bench.plot_results(results, tmp_path / "t.png")  # errors leave gaps, not a crash
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC


def test_every_mst_case_is_checked_against_the_exact_deaths(monkeypatch, tmp_path):
    """A plug-in that returns a spanning tree that is not minimal (a star) is timed, and flagged;
    the error is checked against SciPy's MST of the same matrix."""
    (tmp_path / "toponeuro_star_plugin.py").write_text(
        "import torch\n"
        "def death_edges(D):\n"
        "    n = D.shape[0]\n"
        "    return torch.stack([torch.zeros(n - 1, dtype=torch.long), torch.arange(1, n)], 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _register(monkeypatch, "star", "toponeuro_star_plugin", ("toponeuro_star_plugin",))
    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["torch", "star", "ripser"], devices=["cpu"],
                                  progress=False)
    checked = {(c["series"], c["n"]): c for c in results["cases"] if "deaths_equal_reference" in c}
    assert set(checked) == {(s, n) for s in ("torch", bench.BORUVKA, "star", "ripser") for n in (16, 32)}
    for n in (16, 32):
        _, D = bench.benchmark_matrix(n, 8, 0)
        X = D.double().numpy()
        mst = np.sort(minimum_spanning_tree(X).data)
        star = np.sort(X[0, 1:])
        assert checked[("star", n)]["deaths_equal_reference"] is False
        assert checked[("star", n)]["max_abs_deaths_error"] == pytest.approx(np.abs(star - mst).max(), rel=1e-6)
        for series in ("torch", bench.BORUVKA, "ripser"):
            assert checked[(series, n)]["deaths_equal_reference"] is True
            assert checked[(series, n)]["max_abs_deaths_error"] == 0
    assert "6 of 8 MST cases equal bit for bit; cpu star n=16" in bench.format_table(results)


def test_cases_over_the_budget_are_skipped_and_recorded(monkeypatch):
    # pretend every case would take far too long once there is a smaller n to extrapolate from
    monkeypatch.setattr(bench.runner, "extrapolate_seconds", lambda history, n: None if not history else 1e9)
    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["torch"], devices=["cpu"],
                                  max_seconds_per_case=5.0, progress=False)
    by_n = {n: [c for c in results["cases"] if c["n"] == n] for n in (16, 32)}
    assert all(c["status"] == "ok" for c in by_n[16])
    assert by_n[32] and all(c["status"] == "skipped" for c in by_n[32])
    assert all("max-seconds-per-case" in c["reason"] for c in by_n[32])
    assert results["summary"]["regulariser"] == [r for r in results["summary"]["regulariser"] if r["n"] == 16]
    assert "skipped" in bench.format_table(results)


def test_extrapolation_by_hand():
    assert bench.extrapolate_seconds([], 100) is None
    assert bench.extrapolate_seconds([(100, 1.0)], 200) == pytest.approx(4.0)  # exponent 2
    assert bench.extrapolate_seconds([(100, 1.0), (200, 8.0)], 400) == pytest.approx(64.0)  # exponent 3
    # exponents are clamped to [2, 3]
    assert bench.extrapolate_seconds([(100, 1.0), (200, 2.0)], 400) == pytest.approx(8.0)
    assert bench.extrapolate_seconds([(100, 1.0), (200, 100.0)], 400) == pytest.approx(800.0)


def test_time_call_counts_warmup_and_stops_at_the_budget():
    calls = []
    times, _ = bench.time_call(lambda: calls.append(1), torch.device("cpu"), repeats=4, warmup=True)
    assert len(calls) == 5 and len(times) == 4
    calls.clear()
    times, _ = bench.time_call(lambda: calls.append(1), torch.device("cpu"), repeats=4, warmup=False,
                               budget_s=0.0)
    assert len(calls) == 1 and len(times) == 1


def test_time_calls_interleaves_rounds():
    order = []
    out = bench.time_calls([lambda: order.append("a"), lambda: order.append("b")], torch.device("cpu"),
                           repeats=3, warmup=True)
    assert order == ["a", "b"] * 4
    assert [len(times) for times, _ in out] == [3, 3]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_temporary():
    size = 64 * 2**20  # bytes
    _, peak = bench.time_call(lambda: torch.ones(size // 4), torch.device("cpu"), repeats=1, warmup=False)
    assert peak is not None and peak >= 0.9 * size


def test_bad_arguments_raise_value_error_and_exit_2(tmp_path, capsys):
    with pytest.raises(ValueError, match="sizes >= 2"):
        bench.run_benchmark([1, 16], devices=["cpu"], progress=False)
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark([16], repeats=0, devices=["cpu"], progress=False)
    with pytest.raises(ValueError, match="device"):
        bench.run_benchmark([16], devices=["tpu"], progress=False)
    assert cli_main(["bench", "--n", "1", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "sizes >= 2" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report when CUDA is absent")
def test_missing_cuda_is_reported_not_crashed():
    results = bench.run_benchmark([16], m=8, repeats=1, backends=["torch"], devices=["cpu", "cuda"],
                                  progress=False)
    assert not results["devices"]["cuda"]["available"]
    assert {c["device"] for c in results["cases"]} == {"cpu"}


@pytest.mark.cuda
def test_cuda_run_records_gpu_and_memory(tmp_path):
    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["torch"], devices=["cuda"],
                                  progress=False)
    assert results["devices"]["cuda"]["name"]
    cases = [c for c in results["cases"] if c["device"] == "cuda"]
    assert cases and all(c["status"] == "ok" for c in cases)
    assert all(c["peak_extra_bytes"] is not None for c in cases)
    assert {c["series"] for c in cases} == {"torch", "check", "torch+check", "t1", "correlation", "matmul"}


@pytest.mark.cuda
def test_cuda_run_times_the_graph_backend_and_its_regulariser():
    results = bench.run_benchmark([16, 200], m=8, repeats=2, backends=["torch", "torch-graph"], devices=["cuda"],
                                  progress=False)
    cases = [c for c in results["cases"] if c["device"] == "cuda"]
    assert all(c["status"] == "ok" for c in cases), [c.get("error") for c in cases]
    assert {"torch-graph", "t1-graph", "t1"} <= {c["series"] for c in cases}
    assert all(c["torch_ops"] > 0 for c in cases if c["series"] == "torch-graph")
    assert all(c["graph_held_bytes"] > 0 for c in cases if c["series"] in ("torch-graph", "t1-graph"))
    reg = results["summary"]["regulariser"]
    assert {(r["series"], r["n"]) for r in reg} == {(s, n) for s in ("t1", "t1-graph") for n in (16, 200)}


def test_graph_backend_on_cpu_times_its_mst_not_its_regulariser():
    results = bench.run_benchmark([16, 40], m=8, repeats=1, backends=["torch", "torch-graph"], devices=["cpu"],
                                  progress=False)
    series = {c["series"] for c in results["cases"]}
    assert "torch-graph" in series and "t1-graph" not in series
    counted = {c["n"]: c["torch_ops"] for c in results["cases"] if c["series"] == "torch-graph"}
    assert set(counted) == {16, 40} and all(k > 0 for k in counted.values())
    assert [r["series"] for r in results["summary"]["regulariser"] if r["series"].startswith("t1")] == ["t1", "t1"]
    assert "torch-graph x giotto" not in bench.format_table(results)  # no giotto-ph in this run


def test_threads_option_is_recorded_and_restored():
    before = torch.get_num_threads()
    results = bench.run_benchmark([16], m=8, repeats=1, backends=["torch"], devices=["cpu"], progress=False,
                                  threads=1)
    assert results["config"]["torch_threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        bench.run_benchmark([16], devices=["cpu"], progress=False, threads=0)


# ---------------------------------------------------------------- refusing bad requests before timing

TINY = ["--n", "16", "--m", "8", "--repeats", "1", "--no-progress"]


@pytest.fixture
def no_timing(monkeypatch):
    """Fail the test if anything gets timed."""
    def fail(*args, **kwargs):
        raise AssertionError("a case was timed before the request was refused")

    monkeypatch.setattr(bench.runner, "time_calls", fail)


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toponeuro bench: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_out_that_is_a_file_exits_2_before_timing(tmp_path, capsys, no_timing):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, fragment in ((afile, "is a file"), (afile / "sub", "lies under")):
        code = cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu", "--out", str(out)])
        assert code == 2
        _one_line_error(capsys, str(out), fragment)
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unknown_backend_exits_2_naming_the_known_ones_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                            no_timing):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/bench/cpu, would be made here
    for argv in (["--backends", "torch", "giotto"], ["--backends", "giotto", "--out", "given"]):
        assert cli_main(["bench", *TINY, "--devices", "cpu", *argv]) == 2
        _one_line_error(capsys, "'giotto'", *persistence.BACKENDS)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown backend.*'nonsense'"):
        bench.run_benchmark([16], m=8, repeats=1, backends=["torch", "nonsense"], devices=["cpu"], progress=False)


def test_unavailable_device_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, no_timing):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: missing on every machine
    monkeypatch.chdir(tmp_path)
    for devices in ([missing], ["cpu", missing]):
        # without --out, a run that fell back to the CPU would have written runs/bench/cpu
        assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", *devices]) == 2
        _one_line_error(capsys, missing, "not available")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="none of the requested devices"):
        bench.run_benchmark([16], m=8, repeats=1, backends=["torch"], devices=[missing], progress=False)


# ---------------------------------------------------------------- where the results go


def test_default_out_is_a_scratch_folder_not_the_committed_results(tmp_path, monkeypatch):
    # run from a checkout, `toponeuro bench` used to rewrite data/bench/cpu, the committed results
    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu"]) == 0
    written = json.loads((tmp_path / "runs" / "bench" / "cpu" / "results.json").read_text())
    assert written["complete"] is True and (tmp_path / "runs" / "bench" / "cpu" / "timings.png").exists()
    assert not (tmp_path / "data").exists()
    assert bench.default_out_dir(["cpu"]) == Path("runs/bench/cpu")


def _complete_results(folder: Path, complete: bool = True) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"complete": complete, "cases": [{"series": "kept"}]})
    (folder / "results.json").write_text(text)
    (folder / "timings.png").write_bytes(PNG_MAGIC)
    return text


def test_complete_results_are_not_overwritten_without_force(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    kept = _complete_results(out)
    real = bench.runner.time_calls
    monkeypatch.setattr(bench.runner, "time_calls", lambda *a, **k: pytest.fail("timed before refusing"))
    assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu", "--out", str(out)]) == 2
    _one_line_error(capsys, str(out), "--force", "--out")
    assert (out / "results.json").read_text() == kept and (out / "timings.png").read_bytes() == PNG_MAGIC
    with pytest.raises(ValueError, match="--force"):
        bench.check_output_folder(out)
    monkeypatch.setattr(bench.runner, "time_calls", real)
    assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "results.json").read_text())["cases"][0]["series"] != "kept"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_interrupted_run_is_overwritten_but_not_committed_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    out = tmp_path / "interrupted"
    _complete_results(out, complete=False)  # an interrupted scratch run: rerunning replaces it
    bench.check_output_folder(out)
    assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["complete"] is True
    # a results.json tracked by git is refused even when incomplete (committed partial results)
    repo = tmp_path / "repo"
    kept = _complete_results(repo / "data" / "bench" / "cpu", complete=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "data"], ["commit", "-qm", "results"]):
        subprocess.run(git + args, check=True, capture_output=True)
    committed = repo / "data" / "bench" / "cpu"
    with pytest.raises(ValueError, match="committed"):
        bench.check_output_folder(committed)
    assert cli_main(["bench", *TINY, "--backends", "torch", "--devices", "cpu", "--out", str(committed)]) == 2
    _one_line_error(capsys, "--force", "--out")
    assert (committed / "results.json").read_text() == kept
    bench.check_output_folder(committed, force=True)


# ---------------------------------------------------------------- saving as the run goes


def test_results_are_handed_over_after_every_case_and_complete_only_at_the_end():
    seen = []

    def on_case(results):
        seen.append((len(results["cases"]), results["complete"], len(results["summary"]["regulariser"])))

    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["torch"], devices=["cpu"], progress=False,
                                  on_case=on_case)
    assert results["complete"] is True
    counts = [k for k, _, _ in seen]
    per_n = len(bench.cases._cases_for(torch.device("cpu"), ["torch"], {}))
    assert len(seen) == 2 * per_n + 1  # one call per case, and one for the training steps (once per device)
    assert counts == sorted(counts) and counts[-1] == len(results["cases"])
    assert all(complete is False for _, complete, _ in seen)
    # the summary follows the cases: the regulariser ratios (T1, MinCorr, DeCov) appear once their case has finished
    assert seen[per_n - 1][2] == 3 and seen[-1][2] == 6


def test_write_results_is_atomic(tmp_path):
    path = tmp_path / "results.json"
    bench.write_results({"cases": [1]}, path)
    with pytest.raises(TypeError):
        bench.write_results({"cases": [object()]}, path)  # fails halfway through json.dump
    assert json.loads(path.read_text()) == {"cases": [1]}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def _interrupt_second_case(monkeypatch, interrupt):
    """Time the first case for real; ``interrupt()`` in place of the second."""
    real = bench.time_calls
    calls = []

    def time_calls(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            interrupt()
            raise AssertionError("the interrupt did not stop the run")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.runner, "time_calls", time_calls)


def _check_partial(out, signame):
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["interrupted"] == signame
    assert [(c["series"], c["n"], c["status"]) for c in results["cases"]] == [("torch", 16, "ok")]
    assert results["cases"][0]["repeats"] == len(results["cases"][0]["times_s"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "timings.png"]


def _bench_interrupted_at_the_second_case(tmp_path, monkeypatch, interrupt) -> tuple[int, Path]:
    _interrupt_second_case(monkeypatch, interrupt)
    out = tmp_path / "out"
    code = cli_main(["bench", *TINY, "--n", "16", "32", "--backends", "torch", "--devices", "cpu",
                     "--out", str(out)])
    return code, out


def test_ctrl_c_keeps_the_finished_cases(tmp_path, monkeypatch, capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    code, out = _bench_interrupted_at_the_second_case(tmp_path, monkeypatch, ctrl_c)
    assert code == 130
    _check_partial(out, "SIGINT")
    assert '"complete": false' in capsys.readouterr().err


def test_sigterm_keeps_the_finished_cases_and_the_handler_is_restored(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)

    def sigterm():
        # with the default handler SIGTERM would end pytest itself: make sure the run installed its own
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the handler raises here
            time.sleep(0.01)

    code, out = _bench_interrupted_at_the_second_case(tmp_path, monkeypatch, sigterm)
    assert code == 143
    _check_partial(out, "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_timeout_on_a_real_process_keeps_the_finished_cases(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-m", "toponeuro", "bench", "--n", "16", "32", "64", "--m", "8",
                             "--repeats", "100000", "--max-seconds-per-case", "600", "--backends", "torch",
                             "--devices", "cpu", "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "results.json").exists():  # the first case has finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what `timeout` sends
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["interrupted"] == "SIGTERM"
    assert results["cases"] and all(c["status"] == "ok" and c["n"] == 16 for c in results["cases"])


def test_spin_up_runs_only_on_a_gpu_and_before_each_sizes_cases(monkeypatch):
    def no_randn(*args, **kwargs):
        raise AssertionError("spin_up made GPU work on the CPU")

    monkeypatch.setattr(bench.timing.torch, "randn", no_randn)
    bench.spin_up(torch.device("cpu"), seconds=10.0)  # returns at once: no work, no wait
    monkeypatch.undo()
    devices = []
    monkeypatch.setattr(bench.runner, "spin_up", lambda device, seconds=bench.SPIN_UP_S: devices.append(device.type))
    results = bench.run_benchmark([16, 32], m=8, repeats=1, backends=["torch"], devices=["cpu"], progress=False)
    assert devices == ["cpu", "cpu", "cpu"]  # once per size and device, before that size's cases; once before the steps
    assert results["config"]["gpu_spin_up_s"] == bench.SPIN_UP_S


@pytest.mark.cuda
def test_cuda_spin_up_keeps_the_gpu_busy_for_the_time_asked():
    start = time.perf_counter()
    bench.spin_up(torch.device("cuda"), seconds=0.05)
    assert time.perf_counter() - start >= 0.05


# ---------------------------------------------------------------- the training-step case


def _reference_sgd_step(with_t1: bool) -> list[torch.Tensor]:
    """The parameters after one step of the bench's step, computed by hand: a fresh ``mlp`` with the same
    initial weights, T1 as the sum of |rho| over scipy's minimum spanning tree of 1 - |rho| of every ReLU
    output and the logits together, and the first update of SGD with Nesterov momentum written out."""
    from toponeuro import models
    from toponeuro.training import TrainConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build("mlp", in_shape=(1, 28, 28)).double()
    X, y = bench.step_inputs(0)
    recorded = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: recorded.append(out))
             for mod in model.modules() if isinstance(mod, torch.nn.ReLU)]
    logits = model(X.double())
    for h in hooks:
        h.remove()
    loss = torch.nn.functional.cross_entropy(logits, y)
    if with_t1:
        A = torch.cat(recorded + [logits], dim=1)
        assert A.shape == (256, 450 + 350 + 200 + 10)
        Z = A - A.mean(0)
        rho = (Z.T @ Z) / (Z.norm(dim=0)[:, None] * Z.norm(dim=0)[None, :])
        D = 1 - rho.abs()
        tree = minimum_spanning_tree(D.detach().numpy()).tocoo()
        assert tree.nnz == A.shape[1] - 1
        loss = loss + 1e-4 * (1 - D[torch.as_tensor(tree.row), torch.as_tensor(tree.col)]).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    c = TrainConfig()
    assert c.nesterov  # first step: the momentum buffer is the gradient, the update g + momentum * g
    return [(p - c.lr * (1 + c.momentum) * g).float() for p, g in zip(model.parameters(), grads)]


@pytest.mark.parametrize("series", ["none", "t1", "t1-dense"])
def test_the_step_is_one_sgd_step_of_the_mlp_with_its_regulariser(series):
    model, reg, step = bench.mlp_step(0, "cpu", bench.STEP_SERIES[series])
    assert (reg is None) == (series == "none")
    if reg is not None:
        assert reg.tree_gradient == (series == "t1")
    step()
    if reg is not None:
        assert reg.activations().shape == (256, bench.step.STEP_NEURONS)  # every ReLU output and the logits
    expected = _reference_sgd_step(with_t1=series != "none")
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    if series == "t1":  # T1 moves the weights by more than the tolerance above: the check sees it
        without = _reference_sgd_step(with_t1=False)
        assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(expected, without))


def test_the_step_case_records_three_series_once_per_device_and_their_ratios():
    results = bench.run_benchmark([16, 32], m=8, repeats=2, backends=["torch"], devices=["cpu"], progress=False,
                                  cases=["step"])
    assert results["cases"] == [] and results["config"]["cases"] == ["step"]
    steps = results["steps"]
    assert [(s["kind"], s["series"], s["device"]) for s in steps] == [
        ("step", "none", "cpu"), ("step", "t1", "cpu"), ("step", "t1-dense", "cpu")]  # not per n
    for s in steps:
        assert s["status"] == "ok" and s["model"] == "mlp" and s["batch"] == 256 and s["weight"] == 1e-4
        assert s["neurons"] == 450 + 350 + 200 + 10
        assert s["repeats"] == len(s["times_s"]) == 2
        assert s["min_s"] <= s["median_s"] <= s["max_s"]
    median = {s["series"]: s["median_s"] for s in steps}
    (summary,) = results["summary"]["step"]
    assert summary["device"] == "cpu" and summary["target_ratio"] == 2.0
    assert (summary["without_s"], summary["t1_s"], summary["t1_dense_s"]) == (
        median["none"], median["t1"], median["t1-dense"])
    assert summary["ratio"] == pytest.approx(median["t1"] / median["none"])
    assert summary["dense_ratio"] == pytest.approx(median["t1-dense"] / median["none"])
    line = next(x for x in bench.format_table(results).splitlines() if x.startswith("cpu: mlp step: "))
    assert f"ms with T1, ratio {summary['ratio']:.2f}" in line and f"ratio {summary['dense_ratio']:.2f}" in line


def test_the_steps_are_timed_in_interleaved_rounds(monkeypatch):
    order = []
    real = bench.step.step_calls

    def traced(seed, device):
        return [lambda f=f, k=k: (order.append(k), f())[1] for k, f in enumerate(real(seed, device))]

    monkeypatch.setattr(bench.runner, "step_calls", traced)
    bench.run_benchmark([16], repeats=2, devices=["cpu"], progress=False, cases=["step"])
    assert order == [0, 1, 2] * 3  # one warm-up round, then two timed rounds


def test_a_failing_step_is_recorded_as_an_error(monkeypatch):
    def broken(seed, device):
        raise RuntimeError("no step today")

    monkeypatch.setattr(bench.runner, "step_calls", broken)
    results = bench.run_benchmark([16], repeats=1, devices=["cpu"], progress=False, cases=["step"])
    assert [s["status"] for s in results["steps"]] == ["error"] * 3
    assert results["summary"]["step"] == []
    assert "error: cpu mlp step none: RuntimeError: no step today" in bench.format_table(results)


def test_cases_step_from_the_cli_round_trips_through_results_json(tmp_path, capsys):
    out = tmp_path / "step"
    assert cli_main(["bench", *TINY, "--devices", "cpu", "--cases", "step", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["config"]["cases"] == ["step"]
    assert results["cases"] == [] and [s["series"] for s in results["steps"]] == list(bench.STEP_SERIES)
    assert results["summary"]["step"] == bench.results._summarise([], results["steps"])["step"]
    assert bench.format_table(results) in printed and "cpu: mlp step: " in printed
    assert (out / "timings.png").read_bytes()[:8] == PNG_MAGIC
