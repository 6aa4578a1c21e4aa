"""What the benchmark times: its input matrix (:func:`benchmark_matrix`) and the cases at one size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import persistence
from .._validation import check_dissimilarity
from ..dissimilarity import abs_correlation
from ..nn import TopologicalRegulariser
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
#: the dense baselines on activations, timed beside T1 (they run no persistence backend)
BASELINE_SERIES = ("min_corr", "decov")
#: what can be timed (``--cases``): each persistence backend alone; the input check, alone and
#: with the torch backend; T1, MinCorr and DeCov through the regulariser beside the correlation
#: and one matrix product;
#: one training step of the ``mlp`` without and with T1 (once per device: it does not depend on n)
CASE_KINDS = ("mst", "check", "regulariser", "step")
PER_N_KINDS = ("mst", "check", "regulariser")  # the kinds timed at every n


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


def regulariser_on_activations(backend: str = "torch", formula: str = "t1"
                               ) -> tuple[nn.Module, TopologicalRegulariser]:
    """``(model, reg)``: a model whose one recorded module passes its input through, and the
    :class:`~toponeuro.TopologicalRegulariser` on it.

    ``model(A)`` makes ``reg`` record exactly ``A: (m, n)``, so ``reg()`` is
    whatever the regulariser computes at run time from recorded activations
    (checks, dissimilarity, persistence, formula): a change to it shows in
    the timings without touching the benchmark.
    """
    model = nn.Sequential(nn.Identity())
    return model, TopologicalRegulariser(model, formula=formula, backend=backend, modules=["0"],
                                         include_output=False)


def _regulariser_forward_backward(A0: torch.Tensor, model: nn.Module, reg: TopologicalRegulariser) -> torch.Tensor:
    """The forward and backward of ``reg`` (see :func:`regulariser_on_activations`) on a leaf copy of ``A0``."""
    A = A0.detach().requires_grad_()
    model(A)
    reg().backward()
    return A.grad


def standardised(A: torch.Tensor) -> torch.Tensor:
    """``Z: (m, n)``, each column of ``A: (m, n)`` centred and divided by its population standard
    deviation (constant columns left at 0), so that ``Z^T Z / m`` is the correlation matrix."""
    Z = A - A.mean(0)
    return Z / Z.square().mean(0).sqrt().clamp_min(torch.finfo(A.dtype).tiny)


def _correlation_forward_backward(A0: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    A = A0.detach().requires_grad_()
    D = abs_correlation(A)
    D.backward(upstream)
    return A.grad


def _boruvka(D: torch.Tensor) -> torch.Tensor:
    return persistence.canonical_order(D, torch_mst.boruvka_edges(D))


def check_case_kinds(kinds) -> list[str]:
    """``kinds`` (None: all of :data:`CASE_KINDS`) as a list; a ValueError naming the choices for an unknown one."""
    if kinds is None:
        return list(CASE_KINDS)
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in CASE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown case kind(s) {', '.join(map(repr, unknown)) or '(none given)'} in --cases; "
                         f"choose from {', '.join(CASE_KINDS)}")
    return kinds


def _cases_for(device: torch.device, backends: list[str], inputs: dict, kinds=CASE_KINDS) -> list[_Case]:
    """The cases of ``kinds`` (see :data:`CASE_KINDS`) at one n on one device; ``inputs["A"], inputs["D"]``
    are read when a case is made."""
    cases = []

    def mst(name):
        D = inputs["D"]
        if persistence.BACKENDS[name].gives_edges:
            return lambda: persistence.death_edges(D, backend=name, check=False)
        return lambda: persistence.deaths(D, backend=name, check=False)

    for name in backends if "mst" in kinds else ():
        if name in HOST_ONLY_BACKENDS and device.type != "cpu":
            continue
        call = "death_edges" if persistence.BACKENDS[name].gives_edges else "deaths"
        cases.append(_single("mst", name, f"{call}(D, {name!r}, check=False)", lambda name=name: mst(name)))
        if name == "torch" and device.type == "cpu" and torch_mst.HAVE_NUMBA:
            cases.append(_single("mst", BORUVKA, "canonical_order(D, boruvka_edges(D))",
                                 lambda: lambda D=inputs["D"]: _boruvka(D)))
    if "check" in kinds:
        cases.append(_single("check", "check", "check_dissimilarity(D)",
                             lambda: lambda D=inputs["D"]: check_dissimilarity(D)))
    if "torch" in backends and "check" in kinds:
        cases.append(_single("mst+check", "torch+check", "death_edges(D, 'torch')",
                             lambda: lambda D=inputs["D"]: persistence.death_edges(D, backend="torch")))
    t1_series = [(series, b) for series, b in REGULARISER_SERIES.items()
                 if b in backends and (b == "torch" or device.type == "cuda")]
    if t1_series and "regulariser" in kinds:
        def regulariser_calls():
            A, upstream = inputs["A"], torch.ones_like(inputs["D"])  # a dense upstream gradient
            Z = standardised(A)  # outside the timed call: the product alone is the yardstick
            regs = [regulariser_on_activations(b) for _, b in t1_series]
            return [lambda mr=mr: _regulariser_forward_backward(A, *mr) for mr in regs] + [
                lambda: _correlation_forward_backward(A, upstream), lambda: Z.mT @ Z]

        # timed in alternation, so that their ratios see the same load
        cases.append(_Case([("regulariser", series, f"TopologicalRegulariser(formula='t1', backend={b!r}) "
                                                    "forward+backward from recorded A (m, n)")
                            for series, b in t1_series]
                           + [("correlation", "correlation", "abs_correlation(A) forward+backward"),
                              ("matmul", "matmul", "Z^T Z, Z: (m, n) standardised A (one matrix product)")],
                           regulariser_calls))

        def baseline_calls():
            A = inputs["A"]
            regs = [regulariser_on_activations(formula=f) for f in BASELINE_SERIES]
            return [lambda mr=mr: _regulariser_forward_backward(A, *mr) for mr in regs]

        # a case of their own: their fresh (n, n) buffers (whose first touch the kernel pays for) would
        # slow the calls they alternate with, and T1's figures must stay comparable with earlier results;
        # their ratios are to the correlation and the product timed in the case above, at the same n
        cases.append(_Case([("regulariser", f, f"TopologicalRegulariser(formula={f!r}) forward+backward "
                                               "from recorded A (m, n)") for f in BASELINE_SERIES],
                           baseline_calls))
    return cases


def _backends_of(case: _Case) -> list[str]:
    return [REGULARISER_SERIES.get(series, series) for _, series, _ in case.members]
