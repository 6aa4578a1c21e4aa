"""``toponeuro bench``: time the persistence backends, the regulariser and a training step.

For every device and every ``n`` the benchmark builds one matrix
``D = 1 - |rho|`` from seeded random activations ``A: (m, n)`` and times, on
that same matrix:

* ``mst``: each persistence backend alone (``death_edges(D, check=False)``;
  ``deaths`` for ripser.py, which gives values only). The external backends
  (giotto-ph, ripser.py) run on the host, so they are timed on ``cpu`` only;
  on CPU the torch backend's Boruvka path (what CUDA tensors and CPUs
  without numba use) is timed too, as ``torch-boruvka``;
* ``check``: the input validation ``check_dissimilarity(D)`` and
  ``mst+check``: the public default call ``death_edges(D)``, which runs it;
* ``regulariser``: T1 forward and backward through
  :class:`TopologicalRegulariser` itself, on a model that records exactly
  ``A`` (so a cheaper regulariser shows here without edits), the same for
  the dense baselines MinCorr and DeCov (series ``min_corr``, ``decov``), against
  ``correlation``: the forward and backward of ``abs_correlation(A)`` alone
  (with a dense upstream gradient), and against ``matmul``: one product
  ``Z^T Z`` of the standardised activations ``Z: (m, n)``, the least any
  correlation-based regulariser costs. All are timed in alternation,
  so that their ratios (``ratio`` and ``t1_vs_matmul`` in the summary) see
  the same machine load.

* ``step``: one SGD step (forward, cross-entropy, backward, optimiser step) of
  the paper's ``mlp`` at batch 256 on seeded random images and labels:
  ``none`` (cross-entropy alone), ``t1`` (plus ``1e-4 * T1`` through
  :class:`TopologicalRegulariser` on every ReLU output and the logits, as
  ``toponeuro train`` records) and ``t1-dense`` (the same with
  ``tree_gradient=False``), timed in alternation, each on its own model.
  It does not depend on n: it is timed once per device (float32, whatever
  ``--dtype``), recorded under ``"steps"`` in ``results.json`` and
  summarised under ``summary["step"]`` (``ratio``: T1 over none, target
  <= 2x on a CPU; ``dense_ratio``), printed, and drawn as points in the
  time panel at n = 1010, the neurons T1 sees in the step.

``--cases`` selects the kinds timed (``mst``, ``check``, ``regulariser``,
``step``; default all), e.g. the regulariser alone up to n = 16384 on a CPU.

Every ``mst`` result is checked, outside the timed calls, against the exact
deaths of the same matrix (the CPU ``torch`` backend): ``deaths_equal_reference``
(bit for bit, as the sorted deaths of every minimum spanning tree agree) and
``max_abs_deaths_error`` per case, and a line of the printed table.

Each case runs once to warm up, then ``--repeats`` times; the median, min and
max are recorded (CUDA timings are bracketed by ``torch.cuda.synchronize``).
A case whose time, extrapolated from the smaller ``n`` of the same series, would
exceed ``--max-seconds-per-case`` is skipped and recorded as skipped. Peak
memory beyond the inputs is recorded per case: ``torch.cuda.max_memory_allocated``
on CUDA, the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) on Linux CPUs.

Outputs, in ``--out`` (default ``runs/bench/cpu``, or ``runs/bench/<gpu name>``
when CUDA is benchmarked: a git-ignored scratch folder, never the committed
results under ``data/bench``): ``results.json`` (host, devices, versions, date,
commit and ``dirty``, every timing) and ``timings.png`` (time against n,
log-log, the training steps as points; regulariser cost ratios against n).
A table is printed. The folder is created, and checked to be writable,
before anything is timed; a request that cannot be met (an unknown backend name, a requested device that is not
available, an ``--out`` that is a file, or one whose ``results.json`` is
complete or tracked by git, without ``--force``) exits with status 2 before
timing and writes nothing. ``results.json`` is rewritten atomically (a temporary file in
the same folder, then ``os.replace``) after every finished case, with
``"complete": false`` until the last one, so a Ctrl-C, a SIGTERM (what
``timeout`` sends) or even a SIGKILL keeps the cases measured so far; an
interrupted run also records ``"interrupted"`` (the signal) and exits 130
(SIGINT) or 143 (SIGTERM). The plot (about a second) is drawn at the end, or
on an interruption. ``"dirty"`` says whether the repository had uncommitted
changes to tracked files (untracked files are ignored), None when unknown::

    python -m toponeuro bench                       # the full default run
    python -m toponeuro bench --quick               # n = 256 1024 2048, 3 repeats
    python -m toponeuro bench --n 1024 4096 --backends torch giotto-ph --devices cpu
    python -m toponeuro bench --cases regulariser --n 1024 2048 4096 8192 16384 --devices cpu
    python -m toponeuro bench --cases step --devices cpu --repeats 11

The package, one idea a module (the public names are re-exported here):
``cases`` (the input matrix and what is timed), ``timing`` (timed rounds,
peak memory, operator counts, extrapolation), ``exactness`` (MST results
against the exact deaths), ``environment`` (host, versions, commit),
``step`` (the training-step case), ``runner`` (:func:`run_benchmark`), ``recording`` (a run into a folder,
saved as it goes), ``results`` (summary, default folder and its guard,
atomic writes), ``table``, ``plots`` and ``cli``.
"""

from __future__ import annotations

from .cases import (BORUVKA, CASE_KINDS, DEFAULT_N, OP_COUNTED_SERIES, QUICK_N, REGULARISER_SERIES, benchmark_matrix,
                    regulariser_on_activations, standardised)
from .cli import configure_parser, run
from .plots import plot_results
from .recording import Recording, prepare_run, record_benchmark
from .results import check_output_folder, default_out_dir, write_results
from .runner import run_benchmark
from .step import STEP_SERIES, TARGET_STEP_RATIO, mlp_step, step_calls, step_inputs, summarise_steps
from .table import format_table
from .timing import SPIN_UP_S, count_torch_ops, extrapolate_seconds, spin_up, time_call, time_calls

__all__ = [
    "DEFAULT_N",
    "QUICK_N",
    "BORUVKA",
    "OP_COUNTED_SERIES",
    "REGULARISER_SERIES",
    "CASE_KINDS",
    "STEP_SERIES",
    "TARGET_STEP_RATIO",
    "mlp_step",
    "step_calls",
    "step_inputs",
    "summarise_steps",
    "SPIN_UP_S",
    "benchmark_matrix",
    "regulariser_on_activations",
    "standardised",
    "spin_up",
    "time_call",
    "time_calls",
    "count_torch_ops",
    "extrapolate_seconds",
    "run_benchmark",
    "default_out_dir",
    "check_output_folder",
    "prepare_run",
    "record_benchmark",
    "Recording",
    "write_results",
    "format_table",
    "plot_results",
    "configure_parser",
    "run",
]
