"""bench-e2e --fused: the fused-producer model runs beside the dispatched one, within its tolerance."""

import json

from blockfp8 import fused
from blockfp8.cli import main


def test_fused_variant_on_cpu(capsys, tmp_path, monkeypatch):
    calls = []
    # Eager calls run the producers' implementations directly, traced ones their ops: count either.
    for name in ("_rms_norm_quant_op", "_silu_mul_quant_op", "_rms_norm_quant_impl", "_silu_mul_quant_impl"):
        op = getattr(fused, name)
        producer = name.removesuffix("_op").removesuffix("_impl")
        monkeypatch.setattr(fused, name, lambda *a, op=op, producer=producer: calls.append(producer) or op(*a))
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    argv = ["bench-e2e", "--preset", "tiny", "--steps", "1", "--layers", "1", "--batch", "2", "--device", "cpu",
            "--backends", "", "--fused", "--json", str(out_json), "--markdown", str(out_md)]
    assert main(argv) == 0
    assert "fused vs auto, eager, M=2: " in capsys.readouterr().out
    assert {"_rms_norm_quant", "_silu_mul_quant"} <= set(calls)  # the fused variant ran the producers
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"bf16", "auto", "fused"}
    assert rows["fused"]["tpot_ms"] > 0
    # Same numerics as the unfused FP8 model up to rounding: the same distance from the bf16 model.
    assert abs(rows["fused"]["rel_err"] - rows["auto"]["rel_err"]) < 1e-3
    md = out_md.read_text()
    assert "| fused | eager | 2 |" in md and "--fused" in md and "- fused vs auto, eager, M=2:" in md
