"""The `headwise` command line: one subcommand per module, each with `add_parser`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, subcommand) in help order; each module defines add_parser(subparsers)
_COMMANDS = [
    "headwise.clients.commands.serve",
    "headwise.clients.commands.generate",
    "headwise.clients.commands.plan",
    "headwise.clients.commands.profile",
    "headwise.clients.commands.eval",
    "headwise.clients.commands.bench",
]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwise", description="LLM serving with a head-aware KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from headwise.engine.errors import ModelLoadError

    try:
        if hasattr(args, "tensor_parallel_size") and _torchrun_worker(args):
            return 0
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError, KeyError, ModelLoadError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"headwise {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _torchrun_worker(args) -> bool:
    """Under torchrun every rank runs the same command; ranks > 0 serve rank 0's engine as
    tensor-parallel workers instead. False on rank 0 and outside torchrun."""
    from headwise.engine.distributed import ParallelEnv

    env = ParallelEnv.from_env()
    if env is None or env.rank == 0:
        return False
    from headwise.clients.engine_args import engine_config_from_args
    from headwise.engine.tp_workers import worker_main

    worker_main(engine_config_from_args(args), None, env)
    return True


if __name__ == "__main__":
    sys.exit(main())
