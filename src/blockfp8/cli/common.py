"""What every subcommand shares: argument parsing, output files, progress and plain-text rendering."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..validate import check_device


class UsageError(ValueError):
    """A bad command line (what argparse reports): printed as one line, like every other user error."""


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing usage and exiting, so that ``main`` reports a bad
    argument in one line like any other user error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_names(spec: str | None, default: Iterable[str], allowed: Iterable[str] | None = None,
                name: str = "") -> list[str]:
    """A comma-separated list of names (``default`` when ``spec`` is None), each checked against ``allowed``."""
    values = list(default) if spec is None else [v.strip() for v in spec.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} got {bad}; expected names from {list(allowed)}")
    return values


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive ints."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: one int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def resolve_device(spec: str | None, option: str = "--device") -> torch.device:
    """The device a ``--device`` option names (None: CUDA when available, else the CPU); a ``ValueError``
    naming the option for anything else than cpu or an existing CUDA device (``validate.check_device``)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(spec, option)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {spec!r}: expected cpu or cuda[:INDEX]")
    return device


def modes_on(device: torch.device, spec: str | None, modes: Iterable[str], option: str = "--modes") -> list[str]:
    """The modes a ``--modes`` option names (every one of ``modes`` when None). Only eager runs off CUDA: another
    mode named there is a user error; left to the default, it is dropped."""
    names = parse_names(spec, modes, modes, option)
    if device.type == "cuda":
        return names
    gpu_only = [m for m in names if m != "eager"]
    if spec is not None and gpu_only:
        raise ValueError(f"{option} {','.join(gpu_only)} needs a CUDA device; on the CPU only eager runs")
    return [m for m in names if m == "eager"]


def refuse_unused(what: str, **given: bool) -> None:
    """A ``ValueError`` naming every option (``given``: its flag without dashes, underscores for dashes ->
    whether the user set it) that ``what`` would silently ignore."""
    names = ["--" + name.replace("_", "-") for name, used in given.items() if used]
    if names:
        raise ValueError(f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not apply to {what}")


# Options that name a file a command writes (by argparse dest; fidelity's --json is json_path), and those naming
# a file it reads first. bench's --save-table is merged into, so it is both.
OUTPUT_OPTIONS = {"json": "--json", "json_path": "--json", "markdown": "--markdown", "save": "--save",
                  "plot": "--plot", "save_table": "--save-table"}
INPUT_OPTIONS = {"from_json": "--from-json", "save_table": "--save-table"}


def check_output_paths(args: argparse.Namespace) -> None:
    """Before any work: refuse an output option that names a folder or a file in a folder that does not exist
    (found only after a long run otherwise), two options naming one file, and an output naming a file the
    command reads (it would be overwritten: the user's input must survive every command)."""
    owner: dict[str, str] = {}
    for dest, flag in INPUT_OPTIONS.items():
        path = getattr(args, dest, None)
        if path:
            owner[os.path.realpath(path)] = flag
    for dest, flag in OUTPUT_OPTIONS.items():
        path = getattr(args, dest, None)
        if not path:
            continue
        where = Path(path)
        if where.is_dir():
            raise ValueError(f"{flag} {path} is a folder; expected a file name")
        if not where.resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: folder {where.resolve().parent} does not exist")
        key = os.path.realpath(path)
        if owner.get(key, flag) != flag:
            raise ValueError(f"{flag} {path} names the same file as {owner[key]}, which it would overwrite")
        owner[key] = flag


def cpu_timing_note(what: str) -> str:
    """The line that goes under CPU times: how they were taken (``what``) and what they cannot say."""
    return f"CPU times: one thread, {what}; small CPU matmuls measure Python and dispatch overhead, not a GPU's speed"


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op thread when ``device`` is the CPU. Small matmuls timed with the default
    pool on a 2-core machine stalled for whole scheduler ticks (8-60 ms for calls that take 0.02-1.1 ms with one
    thread, ``blockfp8 demo`` runs in docs/e2e.md), so the times were noise."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ output files


@contextmanager
def naming_path(path: str | Path) -> Iterator[None]:
    """Give an operating-system error raised inside the block ``path`` as its file name when neither its file
    name nor its message names a file: a full disk (``ENOSPC``) or a failed flush reports only the error number,
    and the one-line message must say where."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and e.filename is None and str(path) not in str(e):
            e.filename = str(path)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write one of a command's output files (``--json``, ``--markdown``, ...)."""
    with naming_path(path):
        Path(path).write_text(text)


# ----------------------------------------------------------------------------------------- what gets printed


def plain(value: object, style: str = "") -> Text:
    """``value`` as text that rich prints as written: a plain string would be read as markup, and an install
    hint such as ``pip install 'blockfp8[plot]'`` would lose its ``[plot]``."""
    return value if isinstance(value, Text) else Text(str(value), style=style)


def add_row(table: Table, *cells: object) -> None:
    """Add a row of plain-text cells (``plain``) to a rich table."""
    table.add_row(*(plain(c) for c in cells))


def stdout_console(width: int = 160) -> Console:
    """The console a command prints its result on; a log file gets ``width`` columns instead of the
    80-column squeeze rich applies when stdout is not a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=width)


def short_error(e: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an error for a table cell, cut at a word boundary with "..." past ``limit``
    characters."""
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {first}"


def announce(what: str, full: str | None = None) -> None:
    """Say on stderr, before the work starts, what the command is about to do and (for the CPU-sized defaults)
    how to run the full version: a user on a slow machine knows at once what to expect."""
    line = what if full is None else f"{what}; the full version: {full}"
    print(line, file=sys.stderr, flush=True)


class CellProgress:
    """Progress over a known number of cells on stderr: a rich bar on a terminal, otherwise one plain line per
    finished cell with the time so far and an estimate of the time left (what a log file or CI can show)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.console = Console(stderr=True)
        self.t0 = time.perf_counter()
        self.bar: Progress | None = None
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> CellProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def step(self, description: str) -> None:
        """What is running now (shown on the bar only: a log gets a line per finished cell)."""
        if self.bar is not None:
            self.bar.update(self.task, description=description)

    def advance(self, description: str = "") -> None:
        """One cell finished."""
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        what = f" {description}" if description else ""
        print(f"{self.label} {self.done}/{self.total}{what} done: {elapsed:.0f} s so far, about {left:.0f} s left",
              file=sys.stderr, flush=True)
