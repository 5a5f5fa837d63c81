"""The `d2lora` entry point (SPEC §3): the command table.

This side may see both packages: the merger's commands (merge, verify, models, train) are parsers and
functions in merger/, the service's (serve, demo) in service/.  A user error (merger.errors.D2LoraError)
prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from merger import commands as merger_commands
from merger import export_cli, mkl
from merger.errors import D2LoraError
from merger.train import cli as train_commands
from service import demo, serve

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Each adds its sub-commands to `d2lora`, in `d2lora --help` order.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    merger_commands.add_parser,  # merge, verify, models
    export_cli.add_parser,  # export
    train_commands.add_parser,  # train
    serve.add_parser,  # serve
    demo.add_parser,  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2lora", description="Merge, verify, train and serve D²-LoRA adapters.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in COMMANDS:
        add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    mkl.prefer_avx2_kernels()  # before any matmul: MKL reads it once (merger.mkl)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except D2LoraError as err:
        print(f"d2lora {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"d2lora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
