"""Shared fixtures and markers for the toponeuro test suite.

* ``@pytest.mark.cuda``: the test needs a CUDA device; it is skipped (not
  failed) where ``torch.cuda.is_available()`` is false.
* ``@pytest.mark.slow``: a larger case; deselect with ``-m "not slow"``.
* ``rng`` / ``torch_gen``: generators seeded per test, so every test sees the
  same numbers on every run and in any order.
* Without CUDA, ``TRITON_INTERPRET=1`` (unless set): Triton kernels run in
  Triton's interpreter on CPU tensors.
* ``free_port``: a function returning a TCP port free on the loopback now, for
  process groups and torchrun.
"""

from __future__ import annotations

import os
import socket
import sys
import zlib

import numpy as np
import pytest
import torch

HAVE_CUDA = torch.cuda.is_available()

if not HAVE_CUDA and "triton" not in sys.modules:
    # Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors
    # (tests/test_persistence_triton.py). Triton reads this when it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAVE_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


def _seed_of(request) -> int:
    # a stable seed per test id (hash() of a str is salted per process)
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator seeded from the test's id."""
    return np.random.default_rng(_seed_of(request))


@pytest.fixture
def torch_gen(request) -> torch.Generator:
    """A CPU torch generator seeded from the test's id."""
    return torch.Generator().manual_seed(_seed_of(request))


@pytest.fixture
def dispatched_ops():
    """``record(fn, grad=False)``: the ``(aten operator name, reduce argument or None)`` of every
    operator that ``fn()`` dispatches, in order, a backward included when ``grad`` (a host read
    shows as ``_local_scalar_dense``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def record(fn, grad: bool = False) -> list[tuple[str, str | None]]:
        seen = []

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                reduce = kwargs.get("reduce", next((a for a in args if isinstance(a, str)), None))
                seen.append((func.overloadpacket.__name__, reduce))
                return func(*args, **kwargs)

        with torch.set_grad_enabled(grad), Recorder():
            fn()
        return seen

    return record


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """Call it for a TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    return _free_loopback_port
