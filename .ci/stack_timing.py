"""A stack of matrices in one call against a loop of single calls (CPU by default, CUDA with --device cuda).

Times, on B seeded standard normal activations (m, n) in float32:
  deaths    ph.deaths(D) of the stack D (B, n, n)  vs  [ph.deaths(D[b]) for b]
  pipeline  ph.deaths(abs_correlation(A)) of A (B, m, n)  vs  the same per member
and checks that both give the same numbers bit for bit. Prints the median of --repeats runs, in ms.

    PYTHONPATH=$PWD python .ci/stack_timing.py --B 16 --n 1024 --m 128 --repeats 7 [--threads 2]
"""
import argparse
import statistics
import time

import torch

from toponeuro import dissimilarity as ds
from toponeuro import persistence as ph


def median_ms(fn, repeats: int, sync) -> float:
    fn()  # warm up (compilation, caches)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (also the numba threads of a stack)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    A = torch.randn(a.B, a.m, a.n, generator=torch.Generator().manual_seed(0)).to(dev)
    D = ds.abs_correlation(A)
    stacked = ph.deaths(D, backend=a.backend)
    assert all(torch.equal(stacked[b], ph.deaths(D[b], backend=a.backend)) for b in range(a.B)), "members differ"
    cases = {
        "deaths": (lambda: ph.deaths(D, backend=a.backend),
                   lambda: [ph.deaths(M, backend=a.backend) for M in D]),
        "pipeline": (lambda: ph.deaths(ds.abs_correlation(A), backend=a.backend),
                     lambda: [ph.deaths(ds.abs_correlation(x), backend=a.backend) for x in A]),
    }
    print(f"B = {a.B}, n = {a.n}, m = {a.m}, {dev}, backend {a.backend!r}, torch threads {torch.get_num_threads()}, "
          f"median of {a.repeats}")
    for name, (stack, loop) in cases.items():
        s, l_ = median_ms(stack, a.repeats, sync), median_ms(loop, a.repeats, sync)
        print(f"{name:9s} stack {s:8.2f} ms   loop {l_:8.2f} ms   loop / stack {l_ / s:5.2f}x")


if __name__ == "__main__":
    main()
