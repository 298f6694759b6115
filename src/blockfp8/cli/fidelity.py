"""``blockfp8 fidelity``: block FP8 vs the original on a real pretrained model, offline (``testing.fidelity``)."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..testing.fidelity import DTYPES, MODEL_NAME, TOP_K, FidelityResult, measure_fidelity, require_extra
from .common import add_row, announce, plain, resolve_device, stdout_console, write_text

# Sentences embedded by the original model and its block-FP8 copy (README's command table: the CPU default's time).
GPU_SENTENCES, CPU_SENTENCES = 300, 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sentences", type=int, default=None,
                        help=f"number of generated sentences (default: {GPU_SENTENCES} on CUDA or with --full, "
                             f"{CPU_SENTENCES} on CPU)")
    parser.add_argument("--full", action="store_true", help=f"{GPU_SENTENCES} sentences even on CPU")
    parser.add_argument("--ue8m0", action="store_true", help="round weight scales to powers of two (UE8M0)")
    parser.add_argument("--backend", default=None, help="force a GEMM backend (default: the dispatcher chooses)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:INDEX] (default: cuda when available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of both models' activations (default float32)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result to this JSON file")


def _table(result: FidelityResult):
    scale = "UE8M0 (power-of-two)" if result.ue8m0 else "fp32"
    table = Table(title=plain(f"{result.model}: block-FP8 vs original ({result.dtype}, {result.device}, {scale} "
                              f"scales)"))
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
        add_row(table, *row)
    return table


def _quiet_loading() -> None:
    # transformers draws its own progress bar while loading weights, which would tear the rich status line.
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    require_extra()  # before anything else: without it, the install hint is all there is to say
    device = resolve_device(args.device)
    big = device.type == "cuda" or args.full
    sentences = args.sentences if args.sentences is not None else (GPU_SENTENCES if big else CPU_SENTENCES)
    small = not big and args.sentences is None
    announce(f"fidelity: {MODEL_NAME} and its block-FP8 copy embed {sentences} generated sentences on {device.type}"
             + (" (CPU-sized)" if small else ""),
             f"blockfp8 fidelity --full ({GPU_SENTENCES} sentences)" if small else None)
    console = stdout_console()
    _quiet_loading()
    with console.status(f"embedding {sentences} sentences with the original and the block-FP8 model"):
        result = measure_fidelity(sentences, backend=args.backend, ue8m0=args.ue8m0, device=device,
                                  dtype=DTYPES[args.dtype])
    console.print(_table(result))
    if args.json_path:
        write_text(args.json_path, json.dumps(result.to_dict(), indent=2))
    return 0
