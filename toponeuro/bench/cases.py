"""What the benchmark times: its input matrix (:func:`benchmark_matrix`) and the cases at one size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import persistence, regularisers
from .._validation import check_dissimilarity
from ..dissimilarity import abs_correlation
from ..persistence import torch_mst


DEFAULT_N = [256, 1024, 2048, 4096, 8192]
QUICK_N = [256, 1024, 2048]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BORUVKA = "torch-boruvka"  # the torch backend's CUDA algorithm, timed on CPU
HOST_ONLY_BACKENDS = {"giotto-ph", "ripser"}  # they copy the matrix to the host
REFERENCE_BACKEND = "giotto-ph"
TARGET_REGULARISER_RATIO = 3.0
# torch dispatches per call are recorded for these (not for torch+check, whose MST may run
# in a worker thread that a dispatch mode does not see)
OP_COUNTED_SERIES = {"torch", BORUVKA, "torch-graph"}
# T1 series -> the backend its MST runs on; torch-graph's only on CUDA (on the CPU it is a test path)
REGULARISER_SERIES = {"t1": "torch", "t1-graph": "torch-graph"}


# ---------------------------------------------------------------- inputs


def benchmark_matrix(n: int, m: int, seed: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu"):
    """The benchmark's input at size ``n``.

    Returns ``(A, D)`` on ``device``: ``A: (m, n)`` standard normal activations,
    drawn on the CPU from a generator seeded by ``(seed, n)`` (the same on
    every machine), and ``D = abs_correlation(A): (n, n)`` computed on ``device``.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    A = torch.randn(m, n, generator=gen, dtype=dtype).to(device)
    return A, abs_correlation(A).contiguous()


@dataclass
class _Case:
    """One or more calls timed together (interleaved), each recorded as its own line."""

    members: list[tuple[str, str, str]]  # (kind, series, call in words) per timed call
    make: Callable[[], list[Callable[[], object]]]  # builds the calls (and inputs) when their turn comes


def _single(kind: str, series: str, call: str, make: Callable[[], Callable[[], object]]) -> _Case:
    return _Case([(kind, series, call)], lambda: [make()])


def _t1_forward_backward(A0: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    A = A0.detach().requires_grad_()
    D = abs_correlation(A)
    deaths = persistence.deaths(D, backend=backend, check=False)
    regularisers.t1(deaths).backward()
    return A.grad


def _correlation_forward_backward(A0: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    A = A0.detach().requires_grad_()
    D = abs_correlation(A)
    D.backward(upstream)
    return A.grad


def _boruvka(D: torch.Tensor) -> torch.Tensor:
    return persistence.canonical_order(D, torch_mst.boruvka_edges(D))


def _cases_for(device: torch.device, backends: list[str], inputs: dict) -> list[_Case]:
    """The cases at one n on one device; ``inputs["A"], inputs["D"]`` are read when a case is made."""
    cases = []

    def mst(name):
        D = inputs["D"]
        if persistence.BACKENDS[name].gives_edges:
            return lambda: persistence.death_edges(D, backend=name, check=False)
        return lambda: persistence.deaths(D, backend=name, check=False)

    for name in backends:
        if name in HOST_ONLY_BACKENDS and device.type != "cpu":
            continue
        call = "death_edges" if persistence.BACKENDS[name].gives_edges else "deaths"
        cases.append(_single("mst", name, f"{call}(D, {name!r}, check=False)", lambda name=name: mst(name)))
        if name == "torch" and device.type == "cpu" and torch_mst.HAVE_NUMBA:
            cases.append(_single("mst", BORUVKA, "canonical_order(D, boruvka_edges(D))",
                                 lambda: lambda D=inputs["D"]: _boruvka(D)))
    cases.append(_single("check", "check", "check_dissimilarity(D)",
                         lambda: lambda D=inputs["D"]: check_dissimilarity(D)))
    if "torch" in backends:
        cases.append(_single("mst+check", "torch+check", "death_edges(D, 'torch')",
                             lambda: lambda D=inputs["D"]: persistence.death_edges(D, backend="torch")))
    t1_series = [(series, b) for series, b in REGULARISER_SERIES.items()
                 if b in backends and (b == "torch" or device.type == "cuda")]
    if t1_series:
        def regulariser_calls():
            A, upstream = inputs["A"], torch.ones_like(inputs["D"])  # a dense upstream gradient
            return [lambda b=b: _t1_forward_backward(A, b) for _, b in t1_series] + [
                lambda: _correlation_forward_backward(A, upstream)]

        # timed in alternation, so that their ratio sees the same load
        cases.append(_Case([("regulariser", series, f"T1 forward+backward from A (correlation, MST by {b!r}, gather)")
                            for series, b in t1_series]
                           + [("correlation", "correlation", "abs_correlation(A) forward+backward")],
                           regulariser_calls))
    return cases


def _backends_of(case: _Case) -> list[str]:
    return [REGULARISER_SERIES.get(series, series) for _, series, _ in case.members]
