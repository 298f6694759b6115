"""The ``blockfp8`` command line. Each subcommand lives in its own module of this package exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file wires them up and holds the one error policy:

* a user error -- a bad argument, a missing or unreadable file, a full or read-only disk, a CUDA-only request
  on a machine without CUDA, a value the library refuses (``ValueError``, ``TypeError``, ``OSError``), a
  missing optional package -- prints one line naming the argument or file and exits 2;
* anything else is a bug: its traceback is printed and the exit status is 1;
* Ctrl-C exits 130 with one line, after the command's own cleanup (``finally`` blocks, partial output folders);
* ``--debug`` prints the traceback of any error.

Subcommands raise; none prints its own errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from .. import __version__
from .common import Parser, check_output_paths

DESCRIPTION = ("blockfp8 makes block-scaled FP8 linear layers (float8_e4m3fn weights with one fp32 scale per "
               "128x128 block, activations quantized per 1x128 group) fast and correct in PyTorch; these commands "
               "check, measure, convert and explain them on this machine.")
EPILOG = ("Run 'blockfp8 COMMAND --help' for a command's options. On a GPU, start with 'blockfp8 check' (which "
          "backend is correct here), then 'blockfp8 tune' (launch configs for this GPU). Without a GPU every "
          "command runs CPU-sized defaults and says how to run the full version.")

# name -> one-line help; the module is blockfp8.cli.<name with "-" as "_">
COMMANDS = {
    "demo": "quantize a small decoder, run it, show backends, speed and fidelity",
    "check": "which backend is correct on which shapes, on this device",
    "explain": "show the dispatcher's choice and every backend's verdict for one shape",
    "bench": "per-shape GEMM speed against peers and the hardware ceilings",
    "bench-e2e": "decode-step time (TPOT) of a decoder stack with DeepSeek-V3 shapes (tiny ones on CPU)",
    "bench-hf": "generate() tokens/s of a transformers model: bf16 vs transformers' FP8 vs blockfp8",
    "tune": "measure the fastest backend and launch config per shape on this GPU, kept for the dispatcher "
            "(needs CUDA)",
    "convert": "bf16/fp16/fp32 safetensors checkpoint (folder or cached Hugging Face id) -> block-FP8 checkpoint",
    "fidelity": "block-FP8 vs original on a real pretrained model, offline (needs blockfp8[fidelity])",
    "reliability": "print which bad inputs raise what, as the markdown table of docs/reliability.md "
                   "(--out writes a file)",
    "tp-demo": "tensor-parallel decode demo (run under torchrun for several GPUs)",
}

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _module(command: str):
    return importlib.import_module(f"{__name__}.{command.replace('-', '_')}")


def _prepare_environment() -> None:
    # Without a GPU, Triton kernels can still run (slowly, for correctness) under its interpreter; the
    # variable must be set before any kernel module is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None) -> Parser:
    """The top-level parser; only ``command``'s own arguments are defined (importing the others is slow)."""
    parser = Parser(prog="blockfp8", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"blockfp8 {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the command; SUPPRESS keeps the subparser from resetting a top-level --debug.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == command:
            _prepare_environment()
            _module(name).add_arguments(p)
    return parser


def _missing_package(e: BaseException) -> bool:
    """An ImportError for an optional package that is not installed (its message carries the install hint),
    as opposed to a broken import inside blockfp8, which is a bug."""
    for err in (e, e.__cause__):
        if isinstance(err, ModuleNotFoundError) and err.name and not err.name.startswith("blockfp8"):
            return True
    return False


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is the user's to fix (one line, exit 2) rather than a bug (traceback, exit 1)."""
    return isinstance(e, (ValueError, TypeError, OSError)) or (isinstance(e, ImportError) and _missing_package(e))


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an operating-system error names its file first (when its message does
    not already) and leaves out the ``[Errno N]`` prefix."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None and str(e.filename) not in text:
            names = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
            text = f"{names}: {text}"
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one ``blockfp8`` command; returns the exit status (see the module docstring for the error policy)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    prog = f"blockfp8 {command}" if command in COMMANDS else "blockfp8"
    debug = "--debug" in argv
    try:
        parser = build_parser(command if command in COMMANDS else None)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version print and exit 0
            return int(e.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USER_ERROR
        check_output_paths(args)
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place that decides how an error is shown
        user = is_user_error(e)
        if debug or not user:
            traceback.print_exc()
        if not user:
            print(f"{prog}: internal error (a bug in blockfp8; the traceback above shows where)", file=sys.stderr)
            return EXIT_BUG
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
