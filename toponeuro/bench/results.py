"""The results: their summary (ratios), where they are written by default, and writing them atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .._io import replace_atomically
from ..provenance import git_tracked
from .cases import REFERENCE_BACKEND, TARGET_REGULARISER_RATIO
from .step import summarise_steps


#: where a run writes without ``--out``: a scratch folder (git-ignored), never the committed
#: results under data/bench, which are refreshed on purpose with ``--out`` (and ``--force``)
SCRATCH_ROOT = Path("runs/bench")


def default_out_dir(devices: list[str]) -> Path:
    """``runs/bench/cpu``, or ``runs/bench/<gpu name>`` when a CUDA device is benchmarked.

    ``devices`` are the devices that will run (all available); a CUDA device
    that is not there is passed over.
    """
    for d in devices:
        if d.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(d).index
            if index is not None and index >= torch.cuda.device_count():
                continue
            name = torch.cuda.get_device_name(torch.device(d))
            return SCRATCH_ROOT / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return SCRATCH_ROOT / "cpu"


def check_output_folder(out, force: bool = False) -> None:
    """Refuse to run into a folder whose ``results.json`` would be lost.

    A ValueError when ``out/results.json`` exists and is complete (a finished
    run) or tracked by git (committed results, complete or not), unless
    ``force``. An interrupted scratch run (``"complete": false``, untracked)
    is overwritten: rerunning it is what it is for.
    """
    path = Path(out) / "results.json"
    if force or not path.is_file():
        return
    why = None
    if git_tracked(path):
        why = "holds committed results (tracked by git)"
    else:
        try:
            complete = json.loads(path.read_text()).get("complete") is True
        except (OSError, ValueError, AttributeError):
            complete = False  # unreadable or not a results dict: not a finished run's
        if complete:
            why = "holds the results of a complete run"
    if why is not None:
        raise ValueError(f"--out {Path(out)} {why} ({path.name}); pass --force to overwrite them, "
                         f"or choose another folder with --out")


def _median(cases: list[dict], device: str, series: str, n: int) -> float | None:
    for c in cases:
        if c["device"] == device and c["series"] == series and c["n"] == n and c["status"] == "ok":
            return c["median_s"]
    return None


def _summarise(cases: list[dict], steps: list[dict] = ()) -> dict:
    """Ratios to giotto-ph (same run, same n), the regulariser's cost ratios (to the correlation, to one
    matmul) and the training step's (with T1 to without, per device; see :func:`summarise_steps`)."""
    ratios, reg = [], []
    keys = sorted({(c["device"], c["series"], c["n"]) for c in cases if c["kind"] in ("mst", "mst+check")})
    for device, series, n in keys:
        ref = _median(cases, "cpu", REFERENCE_BACKEND, n)
        t = _median(cases, device, series, n)
        if ref is not None and t is not None and series != REFERENCE_BACKEND:
            ratios.append({"device": device, "series": series, "n": n, "speedup_vs_giotto_ph": ref / t})
    for device, series, n in sorted({(c["device"], c["series"], c["n"]) for c in cases if c["kind"] == "regulariser"},
                                    key=lambda k: (k[0], k[1] != "t1", k[1], k[2])):
        t1 = _median(cases, device, series, n)
        corr = _median(cases, device, "correlation", n)
        matmul = _median(cases, device, "matmul", n)
        if t1 is not None and corr is not None:
            # ratio: the series (T1, or a baseline) against the correlation's forward+backward;
            # t1_vs_matmul: against one product Z^T Z of the same activations, the least any
            # correlation-based regulariser costs (the keys keep T1's name, the first series, for
            # the results committed before the baselines were timed too)
            reg.append({"device": device, "series": series, "n": n, "t1_forward_backward_s": t1,
                        "correlation_forward_backward_s": corr, "ratio": t1 / corr,
                        "target_ratio": TARGET_REGULARISER_RATIO, "matmul_s": matmul,
                        "t1_vs_matmul": None if matmul is None else t1 / matmul})
    return {"speedup_vs_giotto_ph": ratios, "regulariser": reg, "step": summarise_steps(list(steps))}


def write_results(results: dict, path: Path) -> None:
    """``results`` as indented JSON to ``path``, atomically (see :func:`toponeuro._io.replace_atomically`)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")

    replace_atomically(path, write)
