"""``blockfp8 convert IN_DIR OUT_DIR``: a bf16/fp16/fp32 safetensors checkpoint -> a block-FP8 checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..checkpoint import DEFAULT_SKIP, ConvertSummary, convert_checkpoint, parse_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", type=Path, metavar="IN_DIR",
                        help="folder of the bf16/fp16/fp32 checkpoint (*.safetensors, config.json, ...)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to create for the block-FP8 checkpoint")
    parser.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                        help="glob on a layer name or its last component to keep in its original dtype "
                             f"(repeatable; always skipped: {', '.join(DEFAULT_SKIP)} and non-2-D tensors)")
    parser.add_argument("--ue8m0", action="store_true", help="round block scales up to powers of two")
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size, metavar="SIZE",
                        help="largest output file before sharding, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_bytes(n: int) -> str:
    """Bytes in decimal units (the units of --max-shard-size), e.g. ``1.28 MB``."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _examples(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def summary_tables(summary: ConvertSummary):
    """Two rich tables: totals (sizes, errors), then the skipped layers grouped by reason."""
    totals = Table(title=f"blockfp8 convert -> {summary.out_dir}", show_header=False)
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row("layers converted to fp8", str(len(summary.converted)))
    totals.add_row("weights kept as they were", str(len(summary.skipped)))
    totals.add_row("other tensors copied", str(summary.copied))
    ratio = summary.bytes_after / summary.bytes_before if summary.bytes_before else 0.0
    totals.add_row("tensor bytes before", format_bytes(summary.bytes_before))
    totals.add_row("tensor bytes after", f"{format_bytes(summary.bytes_after)} ({ratio:.2f}x)")
    totals.add_row("safetensors files", str(summary.shards))
    if summary.errors:
        errs = sorted(summary.errors.values())
        name, worst = summary.worst
        totals.add_row("median relative error", f"{errs[len(errs) // 2]:.4f}")
        totals.add_row("worst relative error", f"{worst:.4f} ({name})")
    totals.add_row("files copied", ", ".join(summary.files_copied) or "-")

    by_reason: dict[str, list[str]] = {}
    for layer, reason in summary.skipped.items():
        by_reason.setdefault(reason, []).append(layer)
    skipped = Table(title="kept in their original dtype")
    skipped.add_column("reason")
    skipped.add_column("count", justify="right")
    skipped.add_column("layers")
    for reason, layers in by_reason.items():
        skipped.add_row(reason, str(len(layers)), _examples(layers))
    return totals, skipped


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    if args.out_dir.exists() and not args.overwrite:
        err.print(f"[red]error:[/] {args.out_dir} already exists; pass --overwrite to replace it", soft_wrap=True)
        return 2
    try:
        summary = convert_checkpoint(args.in_dir, args.out_dir, skip=args.skip, ue8m0=args.ue8m0,
                                     max_shard_bytes=args.max_shard_size, progress=not args.no_progress,
                                     overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/] {e}", soft_wrap=True)
        return 1
    out = Console()
    for table in summary_tables(summary):
        out.print(table)
    return 0
