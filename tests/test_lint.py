"""``ruff check .`` over the whole repository (src, tests, benchmarks), with the settings in pyproject.toml, so the
README's test command -- and CI, which runs it -- lints everything."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:  # the test extra installs it (CI does); a machine without it cannot lint
        pytest.skip("ruff is not installed (it is part of the test extra: pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
