"""Tile sweep and exactness check of the Triton Boruvka on a GPU (device sessions only).

Times triton_boruvka_edges for a few (rows, cols, warps) tiles on the bench's matrices
(1 - |rho| of seeded standard normal activations, m = 256, float32) and checks every result
against the compiled Prim's edges on the CPU (same tie order: equal edges, bit for bit).
"""
import os
import statistics
import sys
import time

import torch

from toponeuro.bench import benchmark_matrix
from toponeuro.persistence import boruvka_triton as bt, canonical_order, torch_mst

TILES = [(4, 512, 4), (1, 1024, 4), (2, 512, 4), (2, 1024, 4), (4, 1024, 8)]
ns = [int(a) for a in sys.argv[1:]] or [2048, 8192, 32768]
DRY = os.environ.get("TRITON_INTERPRET") == "1"  # a dry run of this script on CPU, under Triton's interpreter
dev = torch.device("cpu" if DRY else "cuda")
if DRY:
    TILES = TILES[:2]


def timed(fn, reps=15):
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, 0.0
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out), min(out)


for n in ns:
    _, D = benchmark_matrix(n, 256, 0, device=dev)
    ref = canonical_order(D.cpu(), torch_mst.prim_edges(D.cpu()))
    comp = torch.arange(n, dtype=torch.int32, device=dev)
    keys = torch.empty(n, dtype=torch.int64, device=dev)
    print(f"n = {n}: one full pass reads {4 * n * n / 1e9:.3f} GB", flush=True)
    for rows, cols, warps in TILES:
        e = bt.triton_boruvka_edges(D, rows, cols, warps).cpu()  # in canonical order already
        same = torch.equal(e, ref)
        med, lo = timed(lambda: bt.triton_boruvka_edges(D, rows, cols, warps))
        k = bt._kernels(DRY)[0]
        grid = ((n + rows - 1) // rows,)

        def full_pass():  # the first round's pass: no vertex knows its edge yet
            keys.fill_(bt._NO_EDGE)
            k[grid](D, comp, keys, n, n, BLOCK_R=rows, BLOCK_C=cols, num_warps=warps)
        pmed, _ = timed(full_pass)
        print(f"  tile {rows:>2} x {cols:>4}, {warps} warps: MST {med:7.3f} ms (min {lo:7.3f}), one full pass "
              f"{pmed:7.3f} ms = {4 * n * n / pmed / 1e9:6.2f} TB/s, edges equal Prim's: {same}", flush=True)
    del D
    if not DRY:
        torch.cuda.empty_cache()
