"""GEMM shapes: the named sets of ``data/shapes.json`` (DeepSeek-V3 and its TP8 shards, Qwen3, Llama, GLM, edge
cases; each set's source in its ``_sources``) and the shapes of a model folder (``model_shapes``: a checkpoint's
safetensors headers or a transformers config), tensor-parallel if asked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    n: int
    k: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.n}x{self.k})" if self.name else f"{self.n}x{self.k}"


@cache
def _data() -> dict:
    return json.loads((resources.files("blockfp8") / "data" / "shapes.json").read_text())


def shape_sets() -> list[str]:
    """Names of the shipped shape sets."""
    return [k for k, v in _data().items() if isinstance(v, list) and v and isinstance(v[0], dict)]


def shape_set(name: str) -> list[Shape]:
    """The shapes of one named set, e.g. ``shape_set("deepseek-v3")``."""
    if name not in shape_sets():
        raise ValueError(f"unknown shape set {name!r}; one of {', '.join(shape_sets())}")
    return [Shape(d["N"], d["K"], d.get("name", "")) for d in _data()[name]]


def default_m_values() -> list[int]:
    return list(_data()["m_sweep"])


def parse_shapes(spec: str) -> list[Shape]:
    """Shapes from a comma-separated mix of set names and ``N:K`` pairs, e.g. ``"edge,2112:7168"``."""
    out: list[Shape] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if ":" in item:
            try:
                n, k = (int(v) for v in item.split(":"))
            except ValueError:
                raise ValueError(f"shape {item!r} is not N:K with integers N and K") from None
            if n <= 0 or k <= 0:
                raise ValueError(f"shape {item!r} needs positive N and K")
            out.append(Shape(n, k))
        elif item in shape_sets():
            out += shape_set(item)
        else:
            raise ValueError(f"unknown shape set {item!r}; use N:K pairs or one of {', '.join(shape_sets())}")
    return list(dict.fromkeys(out))


def parse_ints(spec: str, what: str = "M") -> list[int]:
    """``"1,16,64"`` -> [1, 16, 64], each a non-negative int."""
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} list {spec!r} must be comma-separated integers") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{what} list {spec!r} must hold non-negative integers")
    return values


def load_shapes(spec: str) -> list[Shape]:
    """Shapes from a ``--shapes`` spec (set names and/or N:K pairs); unnamed ones are named "NxK"."""
    shapes = [s if s.name else replace(s, name=f"{s.n}x{s.k}") for s in parse_shapes(spec)]
    if not shapes:
        raise ValueError(f"--shapes {spec!r} names no shape")
    return shapes


def parse_m_values(spec: str | None) -> list[int]:
    """``--m`` as a list of positive token counts (default: the ``m_sweep`` of ``data/shapes.json``)."""
    ms = parse_ints(spec, "--m") if spec is not None else default_m_values()
    if min(ms) < 1:
        raise ValueError(f"--m values must be >= 1, got {spec!r}")
    return ms


# ----------------------------------------------------------------------------------- shapes of a model folder

# Tensor-parallel style by a layer's last name component, as serving engines shard the usual projections:
# column-parallel layers split N (their outputs), row-parallel ones split K (their inputs). Any other layer
# (DeepSeek's fused_qkv_a_proj, routers, MoE experts under expert parallelism) keeps its whole shape on every
# rank. DeepSeek's q_b_proj and kv_b_proj (the up-projections of its compressed attention) are column-parallel.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "q_b_proj",
                   "kv_b_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# Fused layers whose halves are split on their own (each rank gets half of gate and half of up).
FUSED_HALVES = ("gate_up_proj",)


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of a model: its qualified name and weight shape (N = out_features, K = in_features)."""

    name: str
    n: int
    k: int


def parallel_style(name: str) -> str | None:
    """"column", "row" or None (replicated) for a layer name, by its last component (see ``COLUMN_PARALLEL``)."""
    last = name.rsplit(".", 1)[-1]
    if last in COLUMN_PARALLEL:
        return "column"
    if last in ROW_PARALLEL:
        return "row"
    return None


def checkpoint_linears(folder: str | Path) -> list[LinearLayer]:
    """The linear layers of a safetensors checkpoint, from its headers only: block-FP8 weights (a ``.weight``
    with its ``.weight_scale_inv``) and the float weights ``convert_checkpoint`` would quantize."""
    from ..checkpoint.converting import skip_reason
    from ..checkpoint.files import SCALE_SUFFIX, WEIGHT_SUFFIX, prefix_of, read_tensor_infos

    infos = read_tensor_infos(folder)
    out = []
    for name, info in infos.items():
        if not name.endswith(WEIGHT_SUFFIX) or len(info.shape) != 2:
            continue
        prefix = prefix_of(name)
        fp8 = info.dtype == "F8_E4M3" and prefix + SCALE_SUFFIX in infos
        if fp8 or skip_reason(info) is None:
            out.append(LinearLayer(prefix, *info.shape))
    return out


def config_linears(folder: str | Path) -> list[LinearLayer]:
    """The ``nn.Linear`` layers of a transformers model built from ``folder``'s config.json on the meta device (no
    weights are read or allocated), less those ``convert_checkpoint`` keeps unquantized by default."""
    import torch
    from torch import nn

    from ..checkpoint.converting import DEFAULT_SKIP
    from ..nn import is_convertible_linear, matches_pattern

    try:
        import transformers
    except ImportError:
        raise ValueError(f"{folder} has no safetensors weights; reading its config.json needs transformers "
                         "(pip install 'blockfp8[hf]')") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:  # not a causal LM: the bare model still has every linear layer
                model = transformers.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config's values reach model constructors that raise anything
        raise ValueError(f"--model {str(folder)!r}: transformers cannot build a model from its config.json: "
                         f"{type(e).__name__}: {e}") from e
    return [LinearLayer(name, m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and is_convertible_linear(m) and matches_pattern(name, DEFAULT_SKIP) is None]


def model_linears(folder: str | Path) -> list[LinearLayer]:
    """Linear layers of a model folder: from its safetensors headers when it has weights, else from its config."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--model {folder!r} is not a folder")
    if any(root.glob("*.safetensors")) or (root / "model.safetensors.index.json").is_file():
        return checkpoint_linears(root)
    if (root / "config.json").is_file():
        return config_linears(root)
    raise ValueError(f"--model {folder!r} holds neither *.safetensors files nor a config.json")


def _pattern(name: str) -> str:
    """A layer name with its layer and expert indices replaced by '*' (``model.layers.3.mlp.experts.7.up_proj``
    -> ``model.layers.*.mlp.experts.*.up_proj``), to name a shape after the layers that have it."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def layer_shapes(layer: LinearLayer, tp: int = 1) -> list[tuple[int, int]]:
    """The distinct local (N, K) one layer's GEMMs run with ``tp`` ranks (``distributed.local_shape``, every
    rank; the first ranks of an uneven split hold one row or column more)."""
    style = parallel_style(layer.name)
    if tp == 1 or style is None:
        return [(layer.n, layer.k)]
    from ..distributed import local_shape

    last = layer.name.rsplit(".", 1)[-1]
    parts = (layer.n // 2, layer.n // 2) if style == "column" and last in FUSED_HALVES and layer.n % 2 == 0 else None
    return list(dict.fromkeys(local_shape(layer.n, layer.k, r, tp, style, parts) for r in range(tp)))


# Why the stacked shapes are tuned for one rank only: a tensor-parallel q/k/v stack splits q, k and v each on its own
# (each rank keeps its heads of all three), while ``layer_shapes`` splits a ``qkv_proj`` of unknown parts as one
# block of rows; and ``hf.fuse_producers`` stacks unsharded ``Fp8BlockLinear`` projections only.
STACKED_NEEDS_TP1 = ("stacked shapes (--fused) need --tp 1: a tensor-parallel q/k/v stack splits q, k and v each on "
                     "its own, not as the one block of rows layer_shapes splits a qkv_proj into, and "
                     "hf.fuse_producers stacks unsharded projections only")


def stacked_linears(layers: list[LinearLayer]) -> list[LinearLayer]:
    """The stacked layers ``hf.fuse_producers`` builds from ``layers``, one per layer prefix (the name less its last
    component): ``qkv_proj`` (N = q + k + v) where q_proj, k_proj and v_proj share one K and q's and k's N are
    multiples of 128, and ``gate_up_proj`` (N = 2 x gate's) where gate_proj and up_proj have one shape and gate's
    N is a multiple of 128."""
    from ..format import BLOCK

    by_prefix: dict[str, dict[str, LinearLayer]] = {}
    for layer in layers:
        prefix, _, last = layer.name.rpartition(".")
        by_prefix.setdefault(prefix, {})[last] = layer
    out = []
    for prefix, parts in by_prefix.items():
        head = f"{prefix}." if prefix else ""
        q, k, v = (parts.get(p) for p in ("q_proj", "k_proj", "v_proj"))
        # fp8 weights stack along whole 128-row blocks only: q and k must end on one for v to start on one.
        if q and k and v and q.k == k.k == v.k and not q.n % BLOCK and not k.n % BLOCK:
            out.append(LinearLayer(f"{head}qkv_proj", q.n + k.n + v.n, q.k))
        gate, up = parts.get("gate_proj"), parts.get("up_proj")
        if gate and up and (gate.n, gate.k) == (up.n, up.k) and not gate.n % BLOCK:
            out.append(LinearLayer(f"{head}gate_up_proj", 2 * gate.n, gate.k))
    return out


def model_shapes(folder: str | Path, tp: int = 1, stacked: bool = False) -> list[Shape]:
    """The distinct GEMM shapes of a model folder's linear layers, tensor-parallel over ``tp`` ranks, each named
    after the layers that have it (``"self_attn.o_proj+self_attn.q_proj x64"``: two kinds, 64 layers). With
    ``stacked``, also the stacked q/k/v and gate/up GEMMs of a model ``hf.fuse_producers`` has fused
    (``stacked_linears``; ``tp`` 1 only, see ``STACKED_NEEDS_TP1``), besides the separate ones an unfused run uses."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be a positive int, got {tp!r}")
    if stacked and tp != 1:
        raise ValueError(f"{STACKED_NEEDS_TP1}; got --tp {tp}")
    linears = model_linears(folder)
    if stacked:
        linears += stacked_linears(linears)
    names: dict[tuple[int, int], list[str]] = {}
    for layer in linears:
        for nk in layer_shapes(layer, tp):
            names.setdefault(nk, []).append(_pattern(layer.name))
    if not names:
        raise ValueError(f"--model {folder!r}: no linear layer found to tune")
    out = []
    for (n, k), layers in names.items():
        short = "+".join(sorted({p.split("layers.*.", 1)[-1] for p in layers}))
        out.append(Shape(n, k, f"{short} x{len(layers)}" if len(layers) > 1 else short))
    return out
