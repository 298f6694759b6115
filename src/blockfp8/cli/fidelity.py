"""``blockfp8 fidelity``: block FP8 vs the original on a real pretrained model, offline (``testing.fidelity``)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from ..testing.fidelity import DTYPES, TOP_K, FidelityResult, measure_fidelity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sentences", type=int, default=300, help="number of generated sentences (default 300)")
    parser.add_argument("--ue8m0", action="store_true", help="round weight scales to powers of two (UE8M0)")
    parser.add_argument("--backend", default=None, help="force a GEMM backend (default: the dispatcher chooses)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of both models' activations (default float32)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result to this JSON file")


def _table(result: FidelityResult):
    scale = "UE8M0 (power-of-two)" if result.ue8m0 else "fp32"
    table = Table(title=f"{result.model}: block-FP8 vs original ({result.dtype}, {result.device}, {scale} scales)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("sentences", f"{result.n_sentences}"),
        ("linear layers converted", f"{result.converted} (skipped {result.skipped})"),
        ("GEMM backend", ", ".join(result.backends)),
        ("cosine(original, fp8) mean", f"{result.cosine_mean:.6f}"),
        ("cosine(original, fp8) min", f"{result.cosine_min:.6f}"),
        ("top-1 neighbour agreement", f"{result.top1_agreement:.4f}"),
        ("top-1 changes: largest original gap", f"{result.top1_flip_max_margin:.2e}"),
        (f"top-{TOP_K} neighbour overlap", f"{result.top5_overlap:.4f}"),
        ("Spearman of pairwise similarities", f"{result.spearman:.6f}"),
        ("weight rel. error mean", f"{result.weight_error_mean:.4f}"),
        ("weight rel. error worst", f"{result.weight_error_worst:.4f} ({result.weight_error_worst_layer})"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _quiet_loading() -> None:
    # transformers draws its own progress bar while loading weights, which would tear the rich status line.
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    console = Console()
    _quiet_loading()
    with console.status(f"embedding {args.sentences} sentences with the original and the block-FP8 model"):
        result = measure_fidelity(args.sentences, backend=args.backend, ue8m0=args.ue8m0, device=args.device,
                                  dtype=DTYPES[args.dtype])
    console.print(_table(result))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0
