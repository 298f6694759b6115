"""The ``blockfp8`` command line. Each subcommand lives in its own module of this package exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one-line help; the module is blockfp8.cli.<name with "-" as "_">
COMMANDS = {
    "demo": "quantize a small decoder, run it, show backends, speed and fidelity",
    "check": "which backend is correct on which shapes, on this device",
    "explain": "show the dispatcher's choice and every backend's verdict for one shape",
    "bench": "per-shape GEMM speed against peers and the hardware ceilings",
    "bench-e2e": "decode-step time (TPOT) of a DeepSeek-V3-shaped decoder stack",
    "bench-hf": "generate() tokens/s of a transformers model: bf16 vs transformers' FP8 vs blockfp8",
    "tune": "measure the fastest backend and launch config per shape on this GPU, kept for the dispatcher",
    "convert": "bf16/fp16/fp32 safetensors checkpoint -> block-FP8 checkpoint",
    "fidelity": "block-FP8 vs original on a real pretrained model (offline)",
    "reliability": "which bad inputs raise what (the table of docs/reliability.md)",
    "tp-demo": "tensor-parallel decode demo (run under torchrun for several GPUs)",
}


def _module(command: str):
    return importlib.import_module(f"{__name__}.{command.replace('-', '_')}")


def _prepare_environment() -> None:
    # Without a GPU, Triton kernels can still run (slowly, for correctness) under its interpreter; the
    # variable must be set before any kernel module is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = argparse.ArgumentParser(prog="blockfp8", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Argument definitions are imported only for the chosen command (keeps --help fast).
        if argv and argv[0] == name:
            _prepare_environment()
            _module(name).add_arguments(p)
    args = parser.parse_args(argv)
    return int(_module(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
