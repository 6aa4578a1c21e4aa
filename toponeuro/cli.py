"""The ``toponeuro`` command line: one subcommand per job.

Each subcommand lives in its own module, which provides
``configure_parser(parser)`` and ``run(args) -> int``; it is imported only
when its subcommand runs, so ``toponeuro --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("toponeuro.training_cli", "train a paper network without and with the regulariser, side by side"),
    "gradcheck": ("toponeuro.gradcheck.cli", "compare autograd gradients with finite differences"),
    "bench": ("toponeuro.bench.cli", "time the persistence backends and the regulariser"),
    "experiment": ("toponeuro.experiments.cli", "run and report experiments from TOML configs"),
    "bench-engine": ("toponeuro.experiments.throughput", "run-epochs per second of the batched engine against the single one"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toponeuro", description="Decorrelating neurons using persistence.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # argument definitions are loaded lazily in main(), see below
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # prints help or the error and exits
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f"toponeuro {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.configure_parser(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
