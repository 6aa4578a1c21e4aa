"""``toponeuro experiment``: run, report and list experiments.

::

    toponeuro experiment list
    toponeuro experiment run CONFIG [--jobs N] [--device cpu|cuda|auto] [--limit-runs K] [--out DIR]
                                    [--commit HASH] [--report [--allow-mixed]]
                                    [--engine auto|batched|single] [--shard I/N] [--checkpoint-minutes M]
    toponeuro experiment report EXPERIMENT [--out DIR] [--allow-mixed]

``CONFIG`` is a TOML path or the name of a shipped config (``mnist-quick``,
``mnist-paper``, ``fashion-mnist``). ``EXPERIMENT`` is an experiment folder
or a name under ``--out`` (default ``data/results``).
"""

from __future__ import annotations

import argparse
import sys

from .runner import DEFAULT_OUT


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("run", help="run the pending runs of an experiment config",
                       description="Run every run of CONFIG that has no row in <out>/<name>/runs.csv yet.")
    p.add_argument("config", help="a TOML file, or the name of a shipped config (see `experiment list`)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once on the device (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")
    p.add_argument("--limit-runs", type=int, default=None, metavar="K",
                   help="run at most K of the pending runs (grid order: whole seeds first)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPU cores // jobs)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="train even when the regulariser's estimated memory exceeds what the device has free")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results root (default {DEFAULT_OUT})")
    p.add_argument("--dry-run", action="store_true", help="only say how many runs are done and pending")
    p.add_argument("--report", action="store_true", help="write report.md when the runs are done")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--commit", default=None,
                   help="the code's commit to record in every row (default: $TOPONEURO_COMMIT, else git)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="with --report: pool rows from different commits or devices in one report")
    p.add_argument("--engine", choices=("auto", "batched", "single"), default="auto",
                   help="batched: the MLP runs trained many at once as stacked weights (the CNN's runs on the "
                        "single engine; --jobs applies to those); single: one model per run; auto (default): "
                        "batched, but single under torchrun")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the I-th of N disjoint parts of the grid (1 <= I <= N), rows in "
                        "runs.shard-I-of-N.csv; `experiment report` merges the shards")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M",
                   help="batched engine: save each stack's state every M minutes (default 5; 0: every epoch)")
    p.add_argument("--stack-size", type=int, default=128, metavar="K",
                   help="batched engine: at most K runs per stack (default 128)")

    r = sub.add_parser("report", help="write report.md for an experiment",
                       description="Select weights by validation accuracy and write report.md with statistics.")
    r.add_argument("experiment", help="an experiment folder, or an experiment name under --out")
    r.add_argument("--out", default=str(DEFAULT_OUT), help=f"results root (default {DEFAULT_OUT})")
    r.add_argument("--allow-mixed", action="store_true",
                   help="pool rows from different commits or devices (refused by default); the report says so")

    sub.add_parser("list", help="list the shipped configs")


def run(args) -> int:
    from .._validation import describe_os_error
    from . import config as config_mod
    from . import preflight

    try:
        if args.action == "list":
            for name, path in sorted(config_mod.shipped_configs().items()):
                cfg = config_mod.load_config(path)
                print(f"{name:16s} {len(cfg.runs()):5d} runs  {cfg.description}")
            return 0
        if args.action == "report":
            from .report import write_report

            path = write_report(args.experiment, out_root=args.out, allow_mixed=args.allow_mixed)
            print(f"wrote {path}")
            return 0
        from . import runner

        for option, value, least in (("--jobs", args.jobs, 1), ("--limit-runs", args.limit_runs, 0),
                                     ("--threads", args.threads, 1)):
            if value is not None and value < least:
                raise ValueError(f"{option} must be at least {least}, got {value}")
        cfg = config_mod.load_config(args.config)
        directory = runner.experiment_dir(cfg, args.out)
        from .shards import parse_shard

        shard = parse_shard(args.shard)
        if args.checkpoint_minutes < 0:
            raise ValueError(f"--checkpoint-minutes must be >= 0, got {args.checkpoint_minutes}")
        done, pending = runner.pending_runs(cfg, directory, shard)
        if args.dry_run:
            part = f" (shard {shard[0]}/{shard[1]})" if shard else ""
            print(f"{cfg.name}{part}: {len(done) + len(pending)} runs in the grid, {len(done)} done, "
                  f"{len(pending)} pending; results in {directory}")
            return 0
        # everything the config implies, checked before the first run rather than failing in every run
        todo = pending if args.limit_runs is None else pending[: args.limit_runs]
        preflight.check_experiment(cfg, todo, out_root=args.out, device=args.device, jobs=args.jobs,
                                   memory_check=not args.no_memory_check,
                                   stack_size=None if args.engine == "single" else args.stack_size)
        summary = runner.run_experiment(cfg, out_root=args.out, device=args.device, jobs=args.jobs,
                                        limit_runs=args.limit_runs, threads=args.threads,
                                        progress=not args.no_progress, commit=args.commit,
                                        engine=args.engine, shard=shard,
                                        checkpoint_every=60.0 * args.checkpoint_minutes,
                                        stack_size=args.stack_size)
        print(f"{cfg.name}: {summary.finished} runs finished now, {summary.already_done} were done before, "
              f"{len(summary.failed)} failed, {summary.pending} pending; rows in {summary.directory / 'runs.csv'}")
        if summary.failed:
            print(f"failed runs (tracebacks in {summary.directory / 'errors.log'}): {', '.join(summary.failed)}",
                  file=sys.stderr)
        if args.report and summary.pending == 0:
            from .report import write_report

            print(f"wrote {write_report(summary.directory, allow_mixed=args.allow_mixed)}")
        return 1 if summary.failed else 0
    except ValueError as err:
        for line in str(err).splitlines():  # the preflight check gives one line per problem
            print(f"toponeuro experiment: error: {line}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk that fills up, a folder removed under a run
        print(f"toponeuro experiment: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("toponeuro experiment: interrupted; the rows of the finished runs are kept, rerun the same "
              "command to do the rest", file=sys.stderr)
        return 130
