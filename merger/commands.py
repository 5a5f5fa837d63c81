"""The merger's commands of the `d2lora` CLI: `merge`, `verify` and `models`, as parsers and the functions they run.

The entry point that assembles every command (merger's and the service's) is service/cli.py; nothing here
imports the service.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from merger.demo import default_cache_dir
from merger.dtypes import OutputDtype
from merger.merge import DEFAULT_MAX_SHARD_BYTES, merge
from merger.train.cli import add_demo_parsers

DTYPE_CHOICES = get_args(OutputDtype)


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def _size(text: str) -> int:
    """'2GB', '500MB', '4096' -> a positive number of bytes."""
    try:
        size = _parse_size(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB or 4096") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def run_merge(args: argparse.Namespace) -> int:
    result = merge(args.base, args.adapter, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    print(
        f"merged {result.fused_modules} modules into {result.out_dir} "
        f"({result.tensors} tensors, {result.bytes_written / 1e6:.1f} MB, {result.seconds:.2f} s)"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from merger.verify import verify  # imports transformers: only when asked

    report = verify(args.base, args.adapter, merged_dir=args.merged, dtype=args.dtype)
    if args.json:
        report.write_json(args.json)
    print(report.summary())
    return 0 if report.passed else 1


def run_models_demo(args: argparse.Namespace) -> int:
    from merger.demo import build_demo_model

    print(build_demo_model(args.cache_dir))
    return 0


def _add_merge(subparsers) -> None:
    p = subparsers.add_parser("merge", help="fuse an adapter into a standalone checkpoint")
    p.add_argument("--base", required=True, type=Path, help="base model folder (safetensors)")
    p.add_argument("--adapter", required=True, type=Path, help="adapter folder, .tar.gz or .zip")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 2GB (default)")
    p.set_defaults(func=run_merge)


def _add_verify(subparsers) -> None:
    p = subparsers.add_parser("verify", help="prove merged == unmerged on a probe set")
    p.add_argument("--base", required=True, type=Path)
    p.add_argument("--adapter", required=True, type=Path)
    p.add_argument("--merged", type=Path, help="merged folder (default: merge into a temporary folder)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.set_defaults(func=run_verify)


def _add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="prepare models")
    sub = p.add_subparsers(dest="models_command", required=True)
    demo = sub.add_parser("demo", help="convert SmolLM2-135M-Instruct (GGUF) into a safetensors checkpoint")
    demo.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: $D2LORA_CACHE_DIR")
    demo.set_defaults(func=run_models_demo)
    add_demo_parsers(sub, default_cache_dir())


def add_parser(subparsers) -> None:
    _add_merge(subparsers)
    _add_verify(subparsers)
    _add_models(subparsers)
