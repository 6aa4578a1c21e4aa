"""Where the benchmark ran: host, devices, versions, commit, load average."""

from __future__ import annotations

import os
import platform

import torch

from .. import __version__
from .._validation import _meminfo_bytes
from ..provenance import git_commit, git_dirty


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _memory_total() -> int | None:
    return _meminfo_bytes("MemTotal")


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "total_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }
    return {"name": _cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def _environment() -> dict:
    return {
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": _memory_total(),
            "torch_threads": torch.get_num_threads(),
        },
        "commit": git_commit(),
        "dirty": git_dirty(),
        "versions": {
            "toponeuro": __version__,
            "torch": torch.__version__,
            "numpy": _version("numpy"),
            "numba": _version("numba"),
            "giotto-ph": _version("giotto-ph"),
            "ripser": _version("ripser"),
            "triton": _version("triton"),
        },
    }
