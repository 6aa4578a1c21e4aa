"""Reproducible experiments: TOML configs, a resumable runner, and reports with statistics.

::

    toponeuro experiment run mnist-quick --jobs 2        # a shipped config, or a path
    toponeuro experiment report mnist-quick              # data/results/mnist-quick/report.md

In Python::

    from toponeuro import experiments
    cfg = experiments.load_config("mnist-quick")
    experiments.run_experiment(cfg, jobs=2)
    experiments.write_report("mnist-quick")

See :mod:`~toponeuro.experiments.config` (the TOML layout and how the dropout
baseline appears), :mod:`~toponeuro.experiments.runner` (results that lose
nothing) and :mod:`~toponeuro.experiments.report` (the report and its steps).
The report is built from :mod:`~toponeuro.experiments.selection` (loading
``runs.csv``, pooling checks, dropped weights, the selection rule),
:mod:`~toponeuro.experiments.statistics` (ranks, Friedman, Nemenyi, effect
sizes, the paper's claims), :mod:`~toponeuro.experiments.figures` (the plots)
and :mod:`~toponeuro.experiments.report_sections` (the markdown sections).
"""

from .config import ExperimentConfig, RunSpec, load_config, parse_config, shipped_configs
from .report import write_report
from .runner import COLUMNS, DEFAULT_OUT, ExperimentLockedError, RunSummary, read_rows, run_experiment

__all__ = [
    "ExperimentConfig", "RunSpec", "load_config", "parse_config", "shipped_configs",
    "run_experiment", "RunSummary", "ExperimentLockedError", "read_rows", "COLUMNS", "DEFAULT_OUT",
    "write_report",
]
