"""The ``blockfp8`` command line. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("blockfp8.demo", "quantize a small decoder, run it, show backends, speed and fidelity"),
    "check": ("blockfp8.check", "which backend is correct on which shapes, on this device"),
    "explain": ("blockfp8.check", "show the dispatcher's choice and every backend's verdict for one shape"),
    "bench": ("blockfp8.bench", "per-shape GEMM speed against peers and the hardware ceilings"),
    "bench-e2e": ("blockfp8.bench_e2e", "decode-step time (TPOT) of a DeepSeek-V3-shaped decoder stack"),
    "tune": ("blockfp8.tune", "search Triton launch configs on this GPU and write a config table"),
    "convert": ("blockfp8.convert", "bf16/fp16/fp32 safetensors checkpoint -> block-FP8 checkpoint"),
    "fidelity": ("blockfp8.fidelity", "block-FP8 vs original on a real pretrained model (offline)"),
    "reliability": ("blockfp8.reliability", "which bad inputs raise what (writes docs/reliability.md)"),
    "tp-demo": ("blockfp8.tp_demo", "tensor-parallel decode demo (run under torchrun for several GPUs)"),
}


def _prepare_environment() -> None:
    # Without a GPU, Triton kernels can still run (slowly, for correctness) under its interpreter; the
    # variable must be set before any kernel module is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blockfp8", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Argument definitions are imported lazily only for the chosen command (keeps --help fast).
        if argv is None:
            argv = sys.argv[1:]
        if argv and argv[0] == name:
            _prepare_environment()
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name.replace('-', '_')}_arguments", mod.add_arguments)(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    return int(getattr(mod, f"run_{args.command.replace('-', '_')}", mod.run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
