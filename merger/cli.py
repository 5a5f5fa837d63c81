"""The `d2lora` entry point (SPEC §3): thin, one function per command.

Commands live beside the code they drive and register themselves here through
`COMMAND_MODULES`: each module has `add_parser(subparsers)` that sets `func`.
A user error (merger.errors.D2LoraError) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from merger.errors import D2LoraError

COMMAND_MODULES = (
    "merger.commands",
    "merger.export_cli",
    "merger.train.cli",
    "service.cli",
    "service.demo",
)
EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2lora", description="Merge, verify, train and serve D²-LoRA adapters.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not name.startswith(err.name or "?"):  # a missing dependency inside it is a real error
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except D2LoraError as err:
        print(f"d2lora {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"d2lora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
