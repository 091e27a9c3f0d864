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


class Parser(argparse.ArgumentParser):
    """Every `headwise` parser and subparser (`add_subparsers` builds its own type): no
    abbreviated flags, so `--max-token 5` is an error rather than `--max-tokens 5`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # the innermost subcommand's default wins, so after parsing this names the parser
        # whose usage line an unknown flag should be reported with
        self.set_defaults(_usage_parser=self)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        usage_parser = vars(ns).pop("_usage_parser", self)
        if extras:
            usage_parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="headwise", description="LLM serving with a head-aware KV cache")
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
