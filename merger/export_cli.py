"""`d2lora export`: argument parsing only (merger.export does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from merger.export import EXPORT_FORMATS, export


def run_export(args: argparse.Namespace) -> int:
    result = export(args.base, args.adapter, args.out, format=args.format)
    print(f"exported {result.modules} modules of rank ≤ {result.rank} as {args.format} into {result.out_dir}")
    return 0


def add_parser(subparsers) -> None:
    formats = "; ".join(f"{name}: {cls.help}" for name, cls in EXPORT_FORMATS.items())
    p = subparsers.add_parser("export", help="write an adapter in another format that serves the same weights")
    p.add_argument("--format", required=True, choices=tuple(EXPORT_FORMATS), help=formats)
    p.add_argument("--base", required=True, type=Path, help="base model folder (safetensors)")
    p.add_argument("--adapter", required=True, type=Path, help="adapter folder, .tar.gz or .zip")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.set_defaults(func=run_export)
