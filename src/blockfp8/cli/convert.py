"""``blockfp8 convert IN_DIR OUT_DIR``: a bf16/fp16/fp32 safetensors checkpoint -> a block-FP8 checkpoint.

IN_DIR is a folder, or the id of a Hugging Face model already in the local Hugging Face cache (the command never
downloads: it resolves the id to the cached snapshot folder offline)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from rich.table import Table

from ..checkpoint import DEFAULT_SKIP, ConvertSummary, convert_checkpoint, parse_size
from .common import add_row, naming_path, plain, stdout_console

# owner/name, as on the Hugging Face Hub
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", metavar="IN_DIR",
                        help="folder of the bf16/fp16/fp32 checkpoint (*.safetensors, config.json, ...), or a "
                             "Hugging Face model id (owner/name) already in the local Hugging Face cache")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="folder to create for the block-FP8 checkpoint; every non-weight file of IN_DIR, "
                             "subfolders included, is copied there with its mode")
    parser.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                        help="keep matching layers in their original dtype (repeatable): a glob on a layer's "
                             "full name, on the name of a module containing it, or on one component of the name, "
                             "so 'mlp' skips every layer under an mlp module; a pattern that matches no layer is "
                             f"an error (always skipped: {', '.join(DEFAULT_SKIP)} and non-2-D tensors)")
    parser.add_argument("--ue8m0", action="store_true", help="round block scales up to powers of two")
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size, metavar="SIZE",
                        help="largest output file before sharding, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, found as huggingface_hub finds it (read at call time, so a changed
    environment counts): HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_snapshot(repo_id: str, cache: Path, revision: str = "main") -> Path | None:
    """The snapshot folder of model ``repo_id`` at ``revision`` in a Hugging Face hub cache, or None. The cache
    layout: ``models--OWNER--NAME/refs/REVISION`` holds a commit hash, ``snapshots/HASH/`` the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def resolve_input(spec: str) -> Path:
    """IN_DIR as a folder: the folder itself, or the cached snapshot of a Hugging Face model id."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"IN_DIR {spec} is a file; convert reads a checkpoint folder")
    if not _HUB_ID.fullmatch(spec):
        raise FileNotFoundError(f"IN_DIR {spec} does not exist")
    cache = hf_cache_dir()
    snapshot = cached_snapshot(spec, cache)
    if snapshot is None:
        raise FileNotFoundError(
            f"IN_DIR {spec} is not a folder, and no Hugging Face model {spec} is in the local cache {cache}; "
            f"convert needs a local folder or a model in that cache (it never downloads: fetch it first, e.g. "
            f"'hf download {spec}')")
    return snapshot


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing OUT_DIR without ``overwrite`` before any work (the library refuses it too, later)."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"OUT_DIR {out_dir} already exists; pass --overwrite to replace it")


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
    totals = Table(title=plain(f"blockfp8 convert -> {summary.out_dir}"), show_header=False)
    totals.add_column(style="bold")
    totals.add_column()
    add_row(totals, "layers converted to fp8", len(summary.converted))
    add_row(totals, "weights kept as they were", len(summary.skipped))
    add_row(totals, "other tensors copied", summary.copied)
    ratio = summary.bytes_after / summary.bytes_before if summary.bytes_before else 0.0
    add_row(totals, "tensor bytes before", format_bytes(summary.bytes_before))
    add_row(totals, "tensor bytes after", f"{format_bytes(summary.bytes_after)} ({ratio:.2f}x)")
    add_row(totals, "safetensors files", summary.shards)
    if summary.errors:
        errs = sorted(summary.errors.values())
        name, worst = summary.worst
        add_row(totals, "median relative error", f"{errs[len(errs) // 2]:.4f}")
        add_row(totals, "worst relative error", f"{worst:.4f} ({name})")
    add_row(totals, "files copied", _examples(summary.files_copied, 12) or "-")
    if summary.weights_copied:
        add_row(totals, "subfolder weights copied unconverted", _examples(summary.weights_copied, 12))
    for name, why in summary.left_out.items():
        add_row(totals, f"left out {name}", why)

    by_reason: dict[str, list[str]] = {}
    for layer, reason in summary.skipped.items():
        by_reason.setdefault(reason, []).append(layer)
    skipped = Table(title="kept in their original dtype")
    skipped.add_column("reason")
    skipped.add_column("count", justify="right")
    skipped.add_column("layers")
    for reason, layers in by_reason.items():
        add_row(skipped, reason, len(layers), _examples(layers))
    return totals, skipped


def run(args: argparse.Namespace) -> int:
    in_dir = resolve_input(args.in_dir)
    check_out_dir(args.out_dir, args.overwrite)
    # An I/O error without a file name (a full disk) happened while writing the output.
    with naming_path(args.out_dir):
        summary = convert_checkpoint(in_dir, args.out_dir, skip=args.skip, ue8m0=args.ue8m0,
                                     max_shard_bytes=args.max_shard_size, progress=not args.no_progress,
                                     overwrite=args.overwrite)
    out = stdout_console()
    for table in summary_tables(summary):
        out.print(table)
    return 0
