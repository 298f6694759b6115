"""Read and write block-FP8 checkpoints in the Hugging Face / DeepSeek format with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def weight_map(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded via the index file, or a single file)."""
    root = Path(checkpoint_dir)
    index = root / INDEX_NAME
    if index.is_file():
        with open(index) as f:
            entries = json.load(f)["weight_map"]
        return {name: root / fname for name, fname in entries.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no {INDEX_NAME} and no *.safetensors file in {root}")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = path
    return out
