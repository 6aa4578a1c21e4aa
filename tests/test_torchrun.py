"""`toponeuro train` under torchrun (2 CPU processes, gloo, loopback) gives the single-process run."""

import json
import shutil
import subprocess
import sys

import pytest

from toponeuro import cli


@pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux", reason="needs torchrun")
def test_train_under_torchrun_matches_single_process(tmp_path, free_port):
    args = ["train", "--limit", "768", "--epochs", "1", "--device", "cpu", "--no-progress", "--weight", "0.01"]
    single = tmp_path / "single"
    assert cli.main(args + ["--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "toponeuro", *args, "--out", str(ddp)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads((single / "summary.json").read_text())
    b = json.loads((ddp / "summary.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for method in ("none", "t1"):
        ra, rb = a["runs"][method], b["runs"][method]
        # same global batches, same regulariser on the global batch: the same training,
        # up to the order of floating-point sums (DDP averages two half-batch means)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
        assert rb["history"][0]["train_reg"] == pytest.approx(ra["history"][0]["train_reg"], rel=1e-3)
        assert rb["held_out"]["t1"] == pytest.approx(ra["held_out"]["t1"], rel=1e-3)
