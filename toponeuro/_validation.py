"""Input checks at the library boundary.

Every public function that takes activations or a dissimilarity matrix runs
its input through one of these, so that bad input fails early with a message
that names the problem and the fix, rather than surfacing later as a NaN.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["check_activations", "check_dissimilarity", "prepare_output_folder", "available_memory",
           "check_memory", "check_free_disk", "format_bytes", "describe_os_error"]

try:  # numba is optional: it makes the CPU scan of a matrix a single pass
    import numba
    from llvmlite import ir as _ir
    from numba import types as _nbtypes
    from numba.extending import intrinsic as _intrinsic
except Exception:  # pragma: no cover - exercised only where numba is missing
    numba = None


# ----------------------------------------------------------------------------
# CPU: min, max and max |D - D.T| of a float32/float64 matrix in one fused pass
#
# The matrix is cut into bands of _BAND_BYTES // itemsize rows. For band
# ``[b, b + h)`` the kernel
#   1. copies the column band ``D[b:, b:b+h]`` transposed into a small buffer
#      ``LT`` (h x n, in L2), with in-register transposes of square blocks
#      (:func:`_transpose_block`): every read is a contiguous row segment;
#   2. streams the row band ``D[b:b+h, b:]`` once against ``LT`` in one
#      vectorised loop: min and max of the entries, max |D[i, j] - D[j, i]|.
# Each entry is read from memory once (row band or column band) and no n x n
# temporary is made. The reductions run on the integer bit patterns of
# ``x + 0.0``: for a non-negative float (``-0.0 + 0.0`` is ``+0.0``) the bit
# order is the numeric order, a NaN or inf has bits >= those of inf, and any
# other entry with the sign bit set reads as a negative integer. So the
# integer reductions vectorise (float max does not, NaN semantics), no
# fast-math is needed, and the result is exact whenever every entry is
# finite and >= 0; otherwise the caller falls back to the exact torch path,
# which produces the precise error.

_VECTOR_BYTES = 64  # one 512-bit register: 16 float32 or 8 float64 (LLVM splits it where narrower)
_BAND_BYTES = 128  # band height in bytes: 32 float32 or 16 float64 rows (measured best, n = 2048 and 8192)

if numba is not None:

    @_intrinsic
    def _bits(typingctx, x):
        """The bit pattern of a float32/float64 as int32/int64 (a bitcast)."""
        if not isinstance(x, _nbtypes.Float):
            return None
        ity = _nbtypes.int32 if x.bitwidth == 32 else _nbtypes.int64

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _ir.IntType(x.bitwidth))

        return ity(x), codegen

    def _butterfly_transpose(builder, rows):
        """Transpose a w x w block held as w vectors with log2(w) rounds of shuffles.

        Round ``s`` swaps bit ``s`` of the row index with bit ``s`` of the
        column index, so after the rounds s = 1, 2, 4, ... row k holds column k.
        """
        w = len(rows)
        mask_t = _ir.VectorType(_ir.IntType(32), w)
        s = 1
        while s < w:
            out = list(rows)
            for i in range(w):
                if i & s:
                    continue
                a, b = rows[i], rows[i + s]
                lo = [k if not k & s else w + k - s for k in range(w)]
                hi = [k + s if not k & s else w + k for k in range(w)]
                out[i] = builder.shuffle_vector(a, b, _ir.Constant(mask_t, lo))
                out[i + s] = builder.shuffle_vector(a, b, _ir.Constant(mask_t, hi))
            rows = out
            s *= 2
        return rows

    @_intrinsic
    def _transpose_block(typingctx, src, sr, sc, dst, dr, dc):
        """``dst[dr + k, dc + r] = src[sr + r, sc + k]`` for ``r, k < w``, where
        ``w = _VECTOR_BYTES // itemsize``: w vector loads, shuffles, w vector
        stores. Both arrays 2-d C-contiguous of one float dtype; no bounds
        check (the caller keeps the block inside both arrays)."""
        ok = (
            isinstance(src, _nbtypes.Array) and isinstance(dst, _nbtypes.Array)
            and src.ndim == dst.ndim == 2 and src.layout == dst.layout == "C"
            and src.dtype == dst.dtype and isinstance(src.dtype, _nbtypes.Float)
        )
        if not ok:
            return None
        dtype = src.dtype

        def codegen(context, builder, sig, args):
            i64 = _ir.IntType(64)
            nbytes = dtype.bitwidth // 8
            w = _VECTOR_BYTES // nbytes
            vec = _ir.VectorType(context.get_data_type(dtype), w)
            s_arr = context.make_array(sig.args[0])(context, builder, args[0])
            d_arr = context.make_array(sig.args[3])(context, builder, args[3])

            def address(arr, row, col, r):
                stride = builder.extract_value(arr.strides, 0)
                at = builder.add(
                    builder.mul(builder.add(row, _ir.Constant(i64, r)), stride),
                    builder.mul(col, _ir.Constant(i64, nbytes)),
                )
                return builder.inttoptr(builder.add(builder.ptrtoint(arr.data, i64), at), vec.as_pointer())

            rows = [builder.load(address(s_arr, args[1], args[2], r), align=nbytes) for r in range(w)]
            for k, col in enumerate(_butterfly_transpose(builder, rows)):
                builder.store(col, address(d_arr, args[4], args[5], k), align=nbytes)
            return context.get_dummy_value()

        u = _nbtypes.uint64
        return _nbtypes.none(src, u, u, dst, u, u), codegen

    @numba.njit(cache=True, nogil=True)
    def _summary_kernel(D, LT, zero_f):
        """Bit patterns of (min, max, max |D[i, j] - D[j, i]|) over the entries ``x + 0.0``.

        D : (n, n) C-contiguous float32/float64, n >= 1.
        LT : (h, s) scratch of D's dtype, s >= n, h a multiple of the block width.
        zero_f : 0.0 of D's dtype (a float64 literal would widen float32 sums).
        Indices are unsigned so that numba emits no negative-index wraparound
        (which would turn the contiguous loads into gathers).
        """
        n = np.uint64(D.shape[0])
        H = np.uint64(LT.shape[0])
        W = np.uint64(_VECTOR_BYTES // D.itemsize)
        zero = np.uint64(0)
        lo = _bits(D[0, 0] + zero_f)
        hi = lo
        asym = lo ^ lo
        for b in range(zero, n, H):
            h = min(H, n - b)
            # 1. LT[i, j] = D[j, b + i] for j in [b, n), i < h
            j0 = b
            if h == H:
                while j0 + W <= n:
                    for k in range(zero, H, W):
                        _transpose_block(D, j0, b + k, LT, k, j0)
                    j0 += W
            for j in range(j0, n):
                for i in range(h):
                    LT[i, j] = D[j, b + i]
            # 2. the row band D[b:b+h, b:] against LT; the column band below
            #    the diagonal block is summarised from LT, so each entry once
            for i in range(h):
                r = b + i
                for j in range(b, b + h):
                    u = D[r, j] + zero_f
                    x = _bits(u)
                    lo = min(lo, x)
                    hi = max(hi, x)
                    asym = max(asym, _bits(abs(u - LT[i, j])))
                for j in range(b + h, n):
                    u = D[r, j] + zero_f
                    t = LT[i, j] + zero_f
                    x = _bits(u)
                    y = _bits(t)
                    lo = min(lo, min(x, y))
                    hi = max(hi, max(x, y))
                    asym = max(asym, _bits(abs(u - t)))
        return lo, hi, asym


def _fused_summary(X: np.ndarray) -> tuple[float, float, float] | None:
    """(min, max, max |X - X.T|) of a square C-contiguous float32/float64 array
    in one pass, exact; None when an entry is NaN, inf or negative (not -0.0)."""
    n = X.shape[0]
    width = _VECTOR_BYTES // X.itemsize
    band = _BAND_BYTES // X.itemsize
    s = -(-n // width) * width
    if (s // width) % 2 == 0:
        s += width  # an odd number of vectors per LT row: its rows fall in different cache sets
    LT = np.empty((band, s), dtype=X.dtype)
    lo, hi, asym = _summary_kernel(X, LT, X.dtype.type(0))
    ibits = np.int32 if X.dtype == np.float32 else np.int64
    inf_bits = int(np.array(np.inf, dtype=X.dtype).view(ibits))
    if lo < 0 or hi >= inf_bits:
        return None
    lo, hi, asym = np.array([lo, hi, asym], dtype=ibits).view(X.dtype).tolist()
    return lo, hi, asym


def _max_asymmetry(D: torch.Tensor) -> torch.Tensor:
    """max |D - D.T| over the upper triangle, in row blocks: no n x n temporary.

    D : (n, n), or (B, n, n) -> (B,) one maximum per member."""
    n = D.shape[-1]
    members = math.prod(D.shape[:-2])
    block = max(128, (1 << 26) // max(1, n * members))
    worst = D.new_zeros(D.shape[:-2])
    for i in range(0, n, block):
        j = min(i + block, n)
        worst = torch.maximum(worst, (D[..., i:j, i:] - D[..., i:, i:j].mT).abs().amax(dim=(-2, -1)))
    return worst


def _matrix_summary(D: torch.Tensor) -> tuple[float, float, float, bool]:
    """(min, max, max |D - D.T|, all finite) of a square floating matrix, one host sync.

    CPU float32/float64 with numba: one fused pass (:func:`_fused_summary`);
    it declines matrices with a NaN, inf or negative entry, which take the
    torch path below (where the caller then finds and names the bad entry).
    """
    if D.device.type == "cpu" and numba is not None and D.dtype in (torch.float32, torch.float64):
        # min, max and max |D - D.T| are the same for D.T: a transposed view needs no copy
        X = D.mT if (D.mT.is_contiguous() and not D.is_contiguous()) else D.contiguous()
        summary = _fused_summary(X.numpy())
        if summary is not None:
            return (*summary, True)
    lo, hi = D.aminmax()  # NaN propagates; inf shows as an extreme
    lo, hi, asym = torch.stack([lo, hi, _max_asymmetry(D)]).double().tolist()
    finite = all(math.isfinite(v) for v in (lo, hi, asym))
    return lo, hi, asym, finite


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:  # sparse and other layouts: torch's own error would not say what to do
            raise ValueError(f"{name} is a {x.layout} tensor; toponeuro works on dense (strided) tensors: "
                             "pass it as x.to_dense()")
        return x
    try:
        t = torch.as_tensor(x)
    except Exception as err:  # pragma: no cover - message path
        raise ValueError(f"{name} must be a tensor or array-like, got {type(x).__name__}") from err
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def refuse_beyond_float32(X: np.ndarray, backend: str) -> None:
    """For a backend that computes in float32: refuse a float64 ``X`` with entries
    float32 cannot hold (they would become inf there and vanish from the diagram)."""
    limit = float(np.finfo(np.float32).max)
    if X.dtype == np.float64 and X.size and float(X.max()) > limit:
        raise ValueError(
            f"backend {backend!r} computes in float32, and the dissimilarity matrix has entries above "
            f"float32's largest value ({limit:.3g}; max here {float(X.max()):.3g}): rescale the matrix or "
            "use backend='torch'"
        )


def _check_finite(t: torch.Tensor, name: str) -> None:
    # One reduction instead of an n x n boolean buffer: a sum is finite iff
    # every entry is (inf - inf gives NaN); the slower elementwise check only
    # runs to locate the culprit when the sum says there is one.
    total = t.detach().sum(dtype=torch.float64)
    if not torch.isfinite(total):
        bad = (~torch.isfinite(t.detach())).nonzero()
        if bad.numel():
            where = tuple(bad[0].tolist())
            raise ValueError(
                f"{name} contains NaN or inf (first at index {where}); "
                "check the inputs and the model for overflow before computing the regulariser"
            )
        raise ValueError(
            f"{name} is too large to sum in float64; rescale it before computing the regulariser"
        )


def prepare_output_folder(out, option: str = "--out") -> Path:
    """Create the folder ``out`` (with its parents) and check that a file can be written there.

    For commands that write their results at the end: a ValueError, naming
    ``option`` and the problem, now rather than after the work, when ``out``
    is a file, lies under one, or cannot be created or written.
    """
    if not str(out).strip():  # Path("") is the current folder: results would land among the user's files
        raise ValueError(f"{option} is empty; give a folder (it is created if missing)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file, not a folder; give a folder (it is created if missing)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{option} {out} lies under {blocking}, which is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"{option} {out}: cannot create or write the folder ({err.strerror or err}); "
                         f"give a writable folder") from err
    return out


def describe_os_error(err: OSError) -> str:
    """One line for an OSError met while writing results: what failed, on which path, and what to do."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full{where}: free some space and rerun (finished results are kept)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {err.strerror}; give a writable folder"
    return f"{err.strerror or err}{where}"


def format_bytes(n: float) -> str:
    """``n`` bytes as a short figure: ``512 B``, ``3.2 MiB``, ``10.0 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo_bytes(key: str) -> int | None:
    """The ``key`` line of /proc/meminfo in bytes (Linux), e.g. ``MemAvailable`` (free memory plus
    what the kernel can reclaim) or ``MemTotal``; None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _meminfo_available() -> int | None:
    return _meminfo_bytes("MemAvailable")


def available_memory(device) -> int | None:
    """Bytes that new allocations on ``device`` can take now; ``None`` when it cannot be told.

    CUDA: the free memory of the device (``torch.cuda.mem_get_info``). CPU:
    ``MemAvailable`` of ``/proc/meminfo``, else the available physical pages
    (``os.sysconf``), which count no reclaimable cache and so read low.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    available = _meminfo_available()
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_memory(needed: int, device, what: str, fix: str) -> None:
    """A ValueError when ``needed`` bytes exceed the memory available on ``device`` (:func:`available_memory`).

    ``what`` says what needs the memory, ``fix`` what to do instead; the
    message gives both figures. Nothing is refused when the free memory
    cannot be told.
    """
    available = available_memory(device)
    if available is not None and needed > available:
        raise ValueError(f"{what} needs about {format_bytes(needed)}, and {format_bytes(available)} is available "
                         f"on {torch.device(device)}: {fix}")


def check_free_disk(folder, needed: int, option: str = "--out") -> None:
    """A ValueError naming ``option`` when the disk of ``folder`` (which exists) has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"{option} {folder}: {format_bytes(free)} free on its disk, and the results need about "
                         f"{format_bytes(needed)}: free some space or give a folder on another disk")


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph on its current stream (no host sync allowed)."""
    if not t.is_cuda:
        return False
    with torch.cuda.device(t.device):
        return torch.cuda.is_current_stream_capturing()


def _refuse_inside_capture(t: torch.Tensor, name: str) -> None:
    """A check reads a result back to the host, which a CUDA graph capture does not allow:
    raise a ValueError that says so, instead of letting the sync invalidate the capture."""
    if capturing(t):
        raise ValueError(
            f"{name} cannot be checked inside a CUDA graph capture (the check reads a result back to "
            "the host, which a capture does not allow): pass check=False to the calls inside the "
            "capture, and check the inputs once before capturing"
        )


def check_activations(A, name: str = "activations", stack: bool = False) -> torch.Tensor:
    """Validate an activation matrix (or, with ``stack``, a stack of them).

    Parameters
    ----------
    A : (m, n) tensor
        Activations, batch first: ``m`` samples of ``n`` neurons. With
        ``stack=True`` also (B, m, n): B such matrices, each checked; an
        error names the member at fault.

    Returns
    -------
    torch.Tensor
        ``A`` itself (as a floating tensor), unchanged.
    """
    A = _as_tensor(A, name)
    if A.ndim != 2 and not (stack and A.ndim == 3):
        accepted = "a 2-d (m samples, n neurons) matrix" + (" or a stack (B, m, n) of them" if stack else "")
        raise ValueError(
            f"{name} must be {accepted}, batch first; got shape "
            f"{tuple(A.shape)}. Flatten the neuron dimensions with A.flatten({2 if stack else 1})."
        )
    if not A.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {A.dtype}")
    if A.ndim == 3 and A.shape[0] == 0:
        _refuse_inside_capture(A, name)
        return A
    m, n = A.shape[-2:]  # the members of a stack share m and n
    if m < 2:
        raise ValueError(
            f"{name} has {m} sample(s); correlations need at least 2 samples (use a larger batch)"
        )
    if n < 2:
        raise ValueError(f"{name} has {n} neuron(s); persistence needs at least 2 neurons")
    _refuse_inside_capture(A, name)
    if A.is_meta:
        raise ValueError(f"{name} is on the 'meta' device and has no values to check: pass check=False")
    if A.ndim == 3:
        _check_finite_members(A, name)  # every member in one reduction
    else:
        _check_finite(A, name)
    return A


def _member_name(name: str, b: int) -> str:
    return f"{name} [{b}] (member {b} of the stack)"


def _check_finite_members(A: torch.Tensor, name: str) -> None:
    """:func:`_check_finite` for each member of a stack (B, ...), in one reduction and one sync;
    the error names the first member with a NaN or inf."""
    if A.shape[0] == 0:
        return
    totals = A.detach().flatten(1).sum(dim=1, dtype=torch.float64)
    if not bool(torch.isfinite(totals).all()):
        b = int((~torch.isfinite(totals)).nonzero()[0])
        _check_finite(A[b], _member_name(name, b))


def check_dissimilarity(D, name: str = "dissimilarity matrix", symmetry_tol: float | None = None) -> torch.Tensor:
    """Validate a dissimilarity matrix: square, n >= 2, finite, symmetric, non-negative, zero diagonal.

    Parameters
    ----------
    D : (n, n) tensor
    symmetry_tol : float, optional
        Allowed ``max |D - D.T|`` relative to ``max(1, max |D|)``; by default
        100 machine epsilons of ``D``'s dtype, 4 for float16 and bfloat16
        (100 of bfloat16's would accept 0.78).

    Returns
    -------
    torch.Tensor
        ``D`` itself (as a floating tensor), unchanged.

    On CPU (float32/float64, with numba) the values are checked in one fused
    pass over the matrix; on GPU by a few reductions with one host sync.
    """
    D = _check_dissimilarity_form(D, name)
    _check_dissimilarity_values(D, name, symmetry_tol)
    return D


def _default_symmetry_tol(dtype: torch.dtype) -> float:
    """Rounding the two triangles differently stays within a few ulps; 100 are allowed for the
    wide dtypes (matmul accumulation), 4 for the 16-bit ones, whose epsilon is already coarse."""
    return (4 if dtype.itemsize < 4 else 100) * torch.finfo(dtype).eps


def _check_dissimilarity_form(D, name: str = "dissimilarity matrix", stack: bool = False) -> torch.Tensor:
    """The O(1) part of :func:`check_dissimilarity`: a floating square (n, n) tensor, n >= 2
    (with ``stack``, also a stack (B, n, n) of them, B >= 0).

    Whatever passes is safe to hand to an MST kernel (which may read any
    ``D[i, j]``, i, j < n) while :func:`_check_dissimilarity_values` runs.
    """
    D = _as_tensor(D, name)
    if D.ndim not in ((2, 3) if stack else (2,)) or D.shape[-1] != D.shape[-2]:
        accepted = "(n, n), or a stack (B, n, n) of such matrices" if stack else "(n, n)"
        raise ValueError(f"{name} must be square {accepted}; got shape {tuple(D.shape)}")
    if not D.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {D.dtype}")
    n = D.shape[-1]
    if n < 2:
        raise ValueError(f"{name} is {n} x {n}; persistence needs at least 2 points")
    return D


def _check_dissimilarity_values(D: torch.Tensor, name: str = "dissimilarity matrix",
                                symmetry_tol: float | None = None) -> float:
    """The O(n^2) part of :func:`check_dissimilarity`, for a ``D`` that passed
    :func:`_check_dissimilarity_form`: finite, >= 0, zero diagonal, symmetric.
    Returns ``max |D - D.T|`` (within the tolerance; 0 for an exactly symmetric D).

    A stack (B, n, n) is checked in one pass (:func:`_stack_summary`); the
    error names the first member at fault, and the largest asymmetry over
    the members is returned."""
    _refuse_inside_capture(D, name)
    if D.is_meta:
        raise ValueError(f"{name} is on the 'meta' device and has no values to check: pass check=False")
    if D.ndim == 3:
        return _check_stack_values(D, name, symmetry_tol)
    lo, hi, asym, finite = _matrix_summary(D.detach())
    if not finite:
        _check_finite(D, name)  # locates the NaN or inf and raises
    if lo < 0:
        raise ValueError(
            f"{name} has a negative entry ({lo:.3g}); dissimilarities must be >= 0"
        )
    diag = D.detach().diagonal()
    if bool((diag != 0).any()):
        k = int((diag != 0).nonzero()[0])
        raise ValueError(
            f"{name} has a non-zero diagonal (D[{k}, {k}] = {diag[k].item():.3g}); every neuron is at "
            "dissimilarity 0 from itself: set the diagonal to 0 (D.fill_diagonal_(0))"
        )
    if symmetry_tol is None:
        symmetry_tol = _default_symmetry_tol(D.dtype)
    if asym > symmetry_tol * max(1.0, hi):
        raise ValueError(
            f"{name} is not symmetric (max |D - D.T| = {asym:.3g}); "
            "symmetrise it, e.g. D = (D + D.T) / 2"
        )
    return asym


def _stack_summary(D: torch.Tensor) -> list[tuple[float, float, float, bool, bool]]:
    """Per member of a stack (B, n, n): (min, max, max |D - D.T|, all finite, zero diagonal),
    with one host sync (none more on CPU, where each member takes the fused pass)."""
    zero_diag = (D.diagonal(dim1=-2, dim2=-1) == 0).all(dim=-1)
    if D.device.type == "cpu" and numba is not None and D.dtype in (torch.float32, torch.float64):
        return [(*_matrix_summary(M), diag_ok) for M, diag_ok in zip(D, zero_diag.tolist())]
    stats = torch.stack([D.amin(dim=(-2, -1)), D.amax(dim=(-2, -1)), _max_asymmetry(D)], dim=1).double()
    rows = stats.tolist()
    return [(lo, hi, asym, all(math.isfinite(v) for v in (lo, hi, asym)), diag_ok)
            for (lo, hi, asym), diag_ok in zip(rows, zero_diag.tolist())]


def _check_stack_values(D: torch.Tensor, name: str, symmetry_tol: float | None) -> float:
    """:func:`_check_dissimilarity_values` for a stack (B, n, n): one pass over all members; the
    first member at fault is checked again alone, which raises its error under its index."""
    tol = _default_symmetry_tol(D.dtype) if symmetry_tol is None else symmetry_tol
    worst = 0.0
    for b, (lo, hi, asym, finite, diag_ok) in enumerate(_stack_summary(D.detach())):
        if not finite or lo < 0 or not diag_ok or asym > tol * max(1.0, hi):
            _check_dissimilarity_values(D[b], _member_name(name, b), symmetry_tol)
            raise AssertionError(f"member {b} failed the stack's check but passed alone")  # pragma: no cover
        worst = max(worst, asym)
    return worst
