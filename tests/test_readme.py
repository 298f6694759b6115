"""The README runs as written: every ```python block in a fresh process on this machine, and every shell block
names only ``blockfp8`` commands and extras that exist; its settings table names exactly the ``BLOCKFP8_*``
environment variables the package and its tests read.

A block the machine cannot run is skipped only when the line before its fence says why, as
``<!-- not run: needs 2 GPUs -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>.*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\S*)\n(?P<body>.*?)^```$", re.S | re.M)
SHELL_START = ("python3 -m venv", "blockfp8")


def fenced_blocks(text: str) -> list[tuple[str, str, int, str | None]]:
    """(language, body, line number, reason not to run it) of every fenced block."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        blocks.append((match["lang"], match["body"], line, marker["why"] if marker else None))
    return blocks


BLOCKS = fenced_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b[0] == "python"]
SHELL = [b for b in BLOCKS if b[0] in ("", "sh", "bash", "console") and b[1].lstrip().startswith(SHELL_START)]
# As a user runs the code; without CUDA also as the tests run the library (the Triton kernels in the interpreter).
SETTINGS = ["plain"] + ([] if torch.cuda.is_available() else ["TRITON_INTERPRET=1"])


def source_env(**extra: str) -> dict[str, str]:
    """This environment with the package's sources first on PYTHONPATH, without TRITON_INTERPRET, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def test_the_readme_has_code_to_check():
    assert len(PYTHON) >= 2 and len(SHELL) >= 2


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("block", PYTHON, ids=[f"line{b[2]}" for b in PYTHON])
def test_python_block_runs(block, setting, tmp_path):
    _, body, line, not_run = block
    if not_run:
        pytest.skip(f"README.md line {line}: {not_run}")
    env = source_env(BLOCKFP8_CACHE_DIR=str(tmp_path / "cache"))
    if setting != "plain":
        env["TRITON_INTERPRET"] = "1"
    (tmp_path / "work").mkdir()
    result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path / "work", env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"README.md line {line} ({setting}) failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def listed_commands() -> set[str]:
    """The subcommands ``blockfp8 --help`` lists."""
    help_text = subprocess.run([sys.executable, "-m", "blockfp8", "--help"], env=source_env(), capture_output=True,
                               text=True, timeout=120, check=True).stdout
    commands = set(re.findall(r"^ {4}([a-z][\w-]*)", help_text, re.M))
    assert {"demo", "check"} <= commands, help_text
    return commands


def named_commands(text: str) -> set[str]:
    """Every subcommand named after ``blockfp8 `` (also ``-m blockfp8 ``)."""
    return set(re.findall(r"(?:^|[\s(`])blockfp8 ([a-z][\w-]*)", text, re.M))


def test_shell_blocks_name_existing_commands(listed_commands):
    for _, body, line, _ in SHELL:
        unknown = named_commands(body) - listed_commands
        assert not unknown, f"README.md line {line} names {sorted(unknown)}; blockfp8 --help lists {listed_commands}"


def test_commands_in_the_text_exist(listed_commands):
    spans = "\n".join(re.findall(r"`([^`\n]+)`", README.read_text()))
    named = named_commands(spans)
    assert named, "no blockfp8 command found in the README's code spans"
    assert not named - listed_commands, f"unknown: {sorted(named - listed_commands)}"


def test_extras_the_readme_installs_exist():
    tomllib = pytest.importorskip("tomllib")
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {extra for group in re.findall(r"(?:\.|blockfp8)\[([\w,-]+)\]", README.read_text())
             for extra in group.split(",")}
    assert named and not named - declared, f"unknown extras {sorted(named - declared)}; declared: {declared}"


VARIABLE = re.compile(r"\bBLOCKFP8_[A-Z][A-Z_]*[A-Z]\b")


def settings_variables(text: str) -> set[str]:
    """The variables of the README's settings table (the rows of its "Settings" section)."""
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    return {v for row in section.splitlines() if row.startswith("| `BLOCKFP8_") for v in VARIABLE.findall(row)}


def test_settings_table_names_every_variable_the_code_reads_and_no_other():
    sources = [*(ROOT / "src" / "blockfp8").rglob("*.py"), *(ROOT / "tests").rglob("test_*.py")]
    read = {v for path in sources if path.name != "test_readme.py" for v in VARIABLE.findall(path.read_text())}
    table = settings_variables(README.read_text())
    assert len(table) >= 8, table  # the parser found the table
    assert read == table, f"not in the README's settings: {sorted(read - table)}; stale: {sorted(table - read)}"
