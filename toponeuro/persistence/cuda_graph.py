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
  recent ones are kept. A size captured again after it was dropped warns
  once (raise :data:`MAX_GRAPHS` if a job cycles through more sizes).
  :func:`clear` frees them all.
* Memory: a kept graph holds its input buffer (one copy of ``D``) and its
  working buffers (about 0.8 x ``D`` more from n of about 4096, relatively
  more below) in its private pool, between calls. The ``"torch"`` backend
  keeps to one copy instead.
* Calls from several threads or streams take turns: a lock orders the host
  side, and each replay waits on the stream where the previous one's result
  was copied out, so no replay overwrites an input still being read.
* Inside a CUDA graph capture of the caller's (a captured training step),
  the static Boruvka runs eagerly on a copy of ``D`` and so becomes part of
  the caller's graph (float32, n <= 65536 only: anything else raises a
  ValueError, as its syncs would break the capture).
* float32 with 2 <= n <= 65536 only: float64 orders weights by rank
  (``torch.unique``, a sync) and larger n does not fit the packed keys; those,
  and CUDA graphs that fail to capture, run the ``"torch"`` backend's Boruvka
  (which can raise on a bad matrix with ``check=False``). A failed capture is
  remembered for its size, except one that ran out of memory: the next call
  tries again.
* On the CPU the static Boruvka runs eagerly (the same kernels, one by one):
  a way to test it, slower than the ``"torch"`` backend's Prim.
* With ``check=False``, a matrix that would fail the check gives unspecified
  edges from the captured or eager static Boruvka, never an index out of
  range or a hang.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch

from .._validation import capturing
from .boruvka import _PACKED_MAX_N, boruvka_edges
from .boruvka_static import boruvka_edges_static

__all__ = ["death_edges", "clear", "MAX_GRAPHS"]

MAX_GRAPHS = 2  # captured sizes kept (each holds about 1.8 x D of device memory); at least 1 is kept

_graphs: OrderedDict = OrderedDict()  # (device index, n) -> _Captured, or None if capture failed
_dropped: set = set()  # keys whose graph was dropped for a newer size (not by clear())
_warned_recapture = False
_lock = threading.Lock()  # one call at a time on the host: the buffers are shared


class _Captured:
    """A captured static Boruvka: ``X`` in, ``edges`` out, by ``graph.replay()``."""

    def __init__(self, n: int, device: torch.device, pool):
        self.device = device
        self.X = torch.zeros((n, n), dtype=torch.float32, device=device)
        self.done = torch.cuda.Event()  # recorded where the last result was copied out
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # load every kernel once before capture (X is refilled per call)
            boruvka_edges_static(self.X)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # stream=: the class-wide default capture stream belongs to whichever device captured
        # first, so a capture on another device would record nothing. thread_local: a CUDA call
        # from another thread (a DataLoader's pinning thread) does not break the capture
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            self.edges = boruvka_edges_static(self.X)

    def __call__(self, D: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self.done)  # the previous call, maybe on another stream, is done with X and edges
        self.X.copy_(D)
        self.graph.replay()  # on the current stream, after the copy
        edges = self.edges.clone()  # the next replay overwrites the buffer
        self.done.record(stream)
        return edges

    def release(self) -> None:
        """Wait for the last replay, so that the graph and its buffers can go."""
        torch.cuda.synchronize(self.device)


def _cached(key: tuple, capture):
    """The graph for ``key`` (``capture()`` on a miss), keeping the latest :data:`MAX_GRAPHS`.

    ``capture`` returns the graph, None when capture failed (remembered, so
    that the fallback does not retry per call), or :data:`_RETRY` when it ran
    out of memory (not remembered: a later call tries again).
    """
    global _warned_recapture
    if key in _graphs:
        _graphs.move_to_end(key)
        return _graphs[key]
    if key in _dropped and not _warned_recapture:
        _warned_recapture = True
        warnings.warn(f"toponeuro: torch-graph captures n={key[1]} again after dropping it for newer sizes; "
                      f"this job uses more than MAX_GRAPHS={MAX_GRAPHS} sizes, each capture costs tens of ms: "
                      f"raise toponeuro.persistence.cuda_graph.MAX_GRAPHS (each kept graph holds about 1.8 x D)",
                      RuntimeWarning, stacklevel=4)
    while _graphs and len(_graphs) >= max(1, MAX_GRAPHS):
        old, graph = _graphs.popitem(last=False)
        _dropped.add(old)
        if graph is not None:
            graph.release()
    graph = capture()
    if graph is _RETRY:
        return None
    _graphs[key] = graph
    return graph


_RETRY = object()  # _capture's answer when it ran out of memory: fall back this time, try again later


def _end_failed_capture(index: int, pool) -> None:
    """Undo what a capture that failed at its end left in torch's caching allocator.

    Up to torch 2.11, ``CUDAGraph.capture_end`` raises before it tells the
    allocator that the capture is over (fixed upstream in pytorch#180395), so
    the allocator would go on believing a capture is underway: it stops
    recycling memory used across streams, ``empty_cache()`` frees nothing
    (torch 2.8 to 2.11) or raises an internal assert that breaks every later
    capture (torch 2.2 to 2.7), and the capture's private pool leaks. These
    are the calls ``torch.cuda.use_mem_pool`` makes on exit.
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end is None or release is None:  # pragma: no cover - a torch without these bindings
        return
    try:
        end(index, pool)
    except Exception:  # "not currently recording": torch ended it already, or capture never began
        return
    release(index, pool)  # CUDAGraph.reset() releases the pool only after a capture that ended


def _capture(n: int, index: int):
    """Capture the static Boruvka at ``n`` on device ``index``.

    Returns the graph; None (and a warning) if torch or the driver refuses;
    :data:`_RETRY` (and a warning) if the device ran out of memory.
    """
    previous = torch.cuda.current_stream(index)
    pool = None
    try:
        # inference_mode(False): buffers made under inference mode could not be refilled outside it
        with torch.cuda.device(index), torch.inference_mode(False):
            pool = torch.cuda.graph_pool_handle()  # ours, so that a failed capture can be ended
            return _Captured(n, torch.device("cuda", index), pool)
    except Exception as err:
        # a capture that fails at its end leaves the capture stream current: restore the caller's
        torch.cuda.set_stream(previous)
        if pool is not None:
            _end_failed_capture(index, pool)
        # capture_end's error replaces the one that broke the capture (an .item() inside, say)
        cause = f"; after {type(err.__context__).__name__}: {err.__context__}" if err.__context__ else ""
        oom = _ran_out_of_memory(err)
        warnings.warn(f"toponeuro: CUDA graph capture failed at n={n} ({type(err).__name__}: {err}{cause}); "
                      f"the torch-graph backend runs the torch backend's Boruvka "
                      f"{'this time (out of memory: a later call tries again)' if oom else 'at this size'}",
                      RuntimeWarning, stacklevel=4)
        return _RETRY if oom else None


def _ran_out_of_memory(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised during or from, is CUDA running out of memory.

    An allocation that fails inside a capture surfaces as the cause (``__context__``)
    of capture_end's own error; the CUDA runtime's form is a RuntimeError
    "CUDA error: out of memory".
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def clear() -> None:
    """Drop every captured graph and its buffers (device memory returns to torch's cache)."""
    with _lock:
        while _graphs:
            _, graph = _graphs.popitem()
            if graph is not None:
                graph.release()
        _dropped.clear()


def death_edges(D: torch.Tensor) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1, 2) death edges on D's device (unordered)."""
    n = D.shape[0]
    X = D.detach()
    if n < 2:
        return torch.empty((0, 2), dtype=torch.long, device=D.device)
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    if capturing(X):  # the caller's graph: no graph of ours inside
        if n > _PACKED_MAX_N or X.dtype != torch.float32:
            raise ValueError(f"torch-graph inside a CUDA graph capture needs float32 and n <= "
                             f"{_PACKED_MAX_N}, got {X.dtype} at n={n}: convert D with .float() "
                             f"or call it outside the capture")
        return boruvka_edges_static(X.clone())
    if n > _PACKED_MAX_N or (X.is_cuda and X.dtype != torch.float32):
        return boruvka_edges(X)
    if not X.is_cuda:
        return boruvka_edges_static(X.clone())
    with _lock, torch.cuda.device(X.device):  # replay launches on the current device's stream
        key = (torch.cuda.current_device(), n)
        graph = _cached(key, lambda: _capture(n, key[0]))
        return graph(X) if graph is not None else boruvka_edges(X)
