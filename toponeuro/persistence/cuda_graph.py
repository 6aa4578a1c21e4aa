"""torch-graph backend: the static-shape Boruvka, captured once per size in a CUDA graph.

Below n of about 16k the torch backend's time on a GPU goes to launching
some two hundred small kernels and to its per-round host syncs, not to
reading the matrix. :func:`.boruvka_static.boruvka_edges_static` has no sync
and no data-dependent shape, so its few hundred kernels can be recorded in a
CUDA graph and replayed with one launch. A call copies ``D`` into the
graph's input buffer, replays, and copies the edges out: no host sync, and
nothing leaves the device.

* The first call at each ``(device, n)`` captures the graph (a warm-up run,
  then the capture: tens of milliseconds); the :data:`MAX_GRAPHS` most
  recent ones are kept. :func:`clear` frees them.
* Memory: a kept graph holds its input buffer (one copy of ``D``) and its
  working buffers (at most about 0.8 x ``D`` more) in its private pool,
  between calls. The ``"torch"`` backend keeps to one copy instead.
* float32 with 2 <= n <= 65536 only: float64 orders weights by rank
  (``torch.unique``, a sync) and larger n does not fit the packed keys; those,
  and CUDA graphs that fail to capture, run the ``"torch"`` backend's Boruvka.
* On the CPU the static Boruvka runs eagerly (the same kernels, one by one):
  a way to test it, slower than the ``"torch"`` backend's Prim.
* With ``check=False``, a matrix that would fail the check gives unspecified
  edges, never an error or a hang (the ``"torch"`` backend raises instead).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch

from .boruvka import _PACKED_MAX_N, boruvka_edges
from .boruvka_static import boruvka_edges_static

__all__ = ["death_edges", "clear", "MAX_GRAPHS"]

MAX_GRAPHS = 2  # captured sizes kept (each holds about 1.8 x D of device memory)

_graphs: OrderedDict = OrderedDict()  # (device index, n) -> _Captured, or None if capture failed
_lock = threading.Lock()  # one replay at a time: the buffers are shared


class _Captured:
    """A captured static Boruvka: ``X`` in, ``edges`` out, by ``graph.replay()``."""

    def __init__(self, n: int, device: torch.device):
        self.X = torch.zeros((n, n), dtype=torch.float32, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # load every kernel once before capture (X is refilled per call)
            boruvka_edges_static(self.X)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # stream=: the class-wide default capture stream belongs to whichever device captured
        # first, so a capture on another device would record nothing. thread_local: a CUDA call
        # from another thread (a DataLoader's pinning thread) does not break the capture
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.edges = boruvka_edges_static(self.X)

    def __call__(self, D: torch.Tensor) -> torch.Tensor:
        self.X.copy_(D)
        self.graph.replay()
        return self.edges.clone()  # the next replay overwrites the buffer


def _captured(n: int, device: torch.device) -> _Captured | None:
    key = (device.index if device.index is not None else torch.cuda.current_device(), n)
    if key in _graphs:
        _graphs.move_to_end(key)
        return _graphs[key]
    while len(_graphs) >= MAX_GRAPHS:
        _drop(*_graphs.popitem(last=False))
    try:
        # inference_mode(False): buffers made under inference mode could not be refilled outside it
        with torch.cuda.device(key[0]), torch.inference_mode(False):
            graph = _Captured(n, torch.device("cuda", key[0]))
    except Exception as err:  # a capture torch or the driver refuses: fall back, once per size
        warnings.warn(f"toponeuro: CUDA graph capture failed at n={n} ({type(err).__name__}: {err}); "
                      f"the torch-graph backend runs the torch backend's Boruvka at this size", RuntimeWarning,
                      stacklevel=3)
        graph = None
    _graphs[key] = graph
    return graph


def _drop(key, graph) -> None:
    if graph is not None:  # let its last replay finish before its graph and buffers go
        torch.cuda.synchronize(key[0])


def clear() -> None:
    """Drop every captured graph and its buffers (device memory returns to torch's cache)."""
    with _lock:
        while _graphs:
            _drop(*_graphs.popitem())


def death_edges(D: torch.Tensor) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1, 2) death edges on D's device (unordered)."""
    n = D.shape[0]
    X = D.detach()
    if n < 2:
        return torch.empty((0, 2), dtype=torch.long, device=D.device)
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    if n > _PACKED_MAX_N or (X.is_cuda and X.dtype != torch.float32):
        return boruvka_edges(X)
    if not X.is_cuda:
        return boruvka_edges_static(X.clone())
    with _lock, torch.cuda.device(X.device):  # replay launches on the current device's stream
        graph = _captured(n, X.device)
        return graph(X) if graph is not None else boruvka_edges(X)
