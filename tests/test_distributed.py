"""Tensor-parallel shards (blockfp8.distributed): simulated ranks in one process, real gloo process groups,
loading a shard's slice from a checkpoint, and the torchrun demo."""

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import blockfp8.distributed as tp
from blockfp8 import Fp8BlockLinear, dequantize_weight, quantize_activation, quantize_weight, reference_gemm, rel_error
from blockfp8.distributed import (
    ColumnParallelFp8Linear,
    RowParallelFp8Linear,
    cut_group_amax,
    load_shard,
    shard,
    shard_range,
    slice_input,
    split_sizes,
)
from blockfp8.reference import TOLERANCE
from blockfp8.testing.operands import random_fp8_weight

# With fp32 activations and outputs the only difference left between a shard and the unsharded layer is
# fp32 summation order (~1e-7); one activation group quantized with a different scale gives >= 1e-4.
EXACT = 1e-6


def make_layer(n: int, k: int, bias: bool = True, seed: int = 0) -> Fp8BlockLinear:
    """Random block-FP8 layer whose block magnitudes spread over ~e^+-2, so a misplaced scale shows."""
    wq, ws = random_fp8_weight(n, k, spread=1.0, seed=seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) if bias else None
    return Fp8BlockLinear.from_fp8(wq, ws, b)


def reference(layer: Fp8BlockLinear, x: torch.Tensor) -> torch.Tensor:
    return reference_gemm(*quantize_activation(x), layer.weight, layer.weight_scale_inv, layer.bias, x.dtype)


# ------------------------------------------------------------------------------------------ split rule


def test_split_sizes_follow_tensor_split():
    for total, ws in [(2112, 8), (7168, 3), (200, 2), (200, 4), (10, 10), (1, 1), (130, 7)]:
        want = [len(c) for c in torch.arange(total).tensor_split(ws)]
        assert split_sizes(total, ws) == want
        assert [shard_range(total, r, ws) for r in range(ws)] == [
            (sum(want[:r]), sum(want[:r + 1])) for r in range(ws)]


@pytest.mark.parametrize("call,match", [
    (lambda: split_sizes(100, 0), "world_size must be an int >= 1"),
    (lambda: split_sizes(4, 8), "world_size=8 is larger than the dimension"),
    (lambda: shard_range(100, 4, 4), r"rank must be an int in \[0, 4\)"),
    (lambda: shard_range(100, -1, 4), "rank must be"),
    (lambda: split_sizes(0, 1), "total must be a positive int"),
])
def test_split_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_shard_argument_errors():
    layer = make_layer(200, 256)
    with pytest.raises(TypeError, match="Fp8BlockLinear"):
        shard(torch.nn.Linear(4, 4), 0, 2)
    with pytest.raises(ValueError, match="style must be one of"):
        shard(layer, 0, 2, style="diagonal")
    with pytest.raises(ValueError, match="gather_output=True applies to style='column'"):
        shard(layer, 0, 2, style="row", gather_output=True)
    with pytest.raises(ValueError, match="parts must be positive ints summing to out_features=200"):
        shard(layer, 0, 2, parts=(100, 99))
    with pytest.raises(ValueError, match="reduce_dtype= applies to style='row'"):
        shard(layer, 0, 2, reduce_dtype=torch.float32)
    with pytest.raises(ValueError, match="world_size=300 is larger"):
        shard(layer, 0, 300, style="row")
    with pytest.raises(ValueError, match="rank must be"):
        shard(layer, 2, 2)
    with pytest.raises(ValueError, match="group= was given but torch.distributed is not initialized"):
        shard(layer, 0, 2, group=object())
    row = shard(layer, 1, 3, style="row")
    with pytest.raises(ValueError, match=r"rank 1's input slice \[..., 85\]"):
        row(torch.randn(2, 256))


# --------------------------------------------------------------------------- simulated ranks, no group


def test_column_2112_tp8_simulated():
    """N=2112 at TP 8: 264-row shards whose boundaries cut 128-blocks (engines refuse to load this)."""
    layer = make_layer(2112, 256)
    shards = [shard(layer, r, 8, "column") for r in range(8)]
    for r, s in enumerate(shards):
        start, stop = 264 * r, 264 * (r + 1)
        assert s.segments[0].start == start and s.segments[0].pad == start % 128
        assert s.weight.shape[0] % 16 == 0 and s.weight.shape[0] >= start % 128 + 264
        assert torch.equal(s.weight_scale_inv, layer.weight_scale_inv[start // 128:-(-stop // 128)])
        assert torch.equal(s.weight[:start % 128].float(), torch.zeros(start % 128, 256))
    assert [s.segments[0].pad for s in shards] == [0, 8, 16, 24, 32, 40, 48, 56]
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    out = torch.cat([s(x) for s in shards], dim=-1)
    assert rel_error(out, layer(x)) <= TOLERANCE
    assert rel_error(out, reference(layer, x)) <= TOLERANCE
    x32 = x.float()
    assert rel_error(torch.cat([s(x32) for s in shards], -1), layer(x32)) <= EXACT


def test_column_fused_parts_simulated():
    """A fused q_a + kv_a output (1536 + 576) split part by part: each rank gets a slice of both."""
    layer = make_layer(2112, 256)
    x = torch.randn(3, 256)
    outs = [shard(layer, r, 8, "column", parts=(1536, 576))(x) for r in range(8)]
    q = torch.cat([o[..., :192] for o in outs], -1)
    kv = torch.cat([o[..., 192:] for o in outs], -1)
    assert all(o.shape[-1] == 192 + 72 for o in outs)
    assert rel_error(torch.cat([q, kv], -1), layer(x)) <= EXACT


@pytest.mark.parametrize("k,world_size", [(7168, 3), (200, 4), (2112, 8)])
def test_row_simulated_matches_unsharded(k, world_size):
    """Cut activation groups get the unsharded scale from cut_group_amax: the sum matches the unsharded layer."""
    layer = make_layer(64, k)
    x = torch.randn(2, 3, k)
    shards = [shard(layer, r, world_size, "row") for r in range(world_size)]
    assert [s.bias is not None for s in shards] == [True] + [False] * (world_size - 1)
    amax = cut_group_amax(x, world_size)
    exact = sum(s(slice_input(x, r, world_size), cut_amax=amax) for r, s in enumerate(shards))
    assert rel_error(exact, layer(x)) <= EXACT
    # Without the exchange each part of a cut group has its own (finer) scale: as close to the unquantized
    # product as the unsharded layer, but no longer the same numbers (up to 2.7e-2 apart at K=200, TP 4).
    local = sum(s(slice_input(x, r, world_size)) for r, s in enumerate(shards))
    unquantized = x @ dequantize_weight(layer.weight, layer.weight_scale_inv).T + layer.bias.float()
    assert rel_error(local, layer(x)) > EXACT
    assert rel_error(local, unquantized) <= 1.1 * rel_error(layer(x), unquantized)
    xb = x.to(torch.bfloat16)
    bf16 = sum(s(slice_input(xb, r, world_size), cut_amax=cut_group_amax(xb, world_size)).float()
               for r, s in enumerate(shards))
    assert rel_error(bf16, layer(xb)) <= TOLERANCE
    assert rel_error(bf16, reference(layer, xb)) <= TOLERANCE


def test_row_200_tp4_group_shared_by_three_ranks():
    shards = [shard(make_layer(8, 200), r, 4, "row") for r in range(4)]
    assert tp._cut_groups(200, 4) == [0, 1]
    assert [s._slots.tolist() for s in shards] == [[0], [0], [0, 1], [1]]
    # local K: pad + shard + a spare column for a cut tail group's amax, rounded up to 16
    assert [s.weight.shape[1] for s in shards] == [64, 112, 160, 80]
    assert [s._sentinels.tolist() for s in shards] == [[50], [0], [0, 150], [0]]


def test_triton_kernel_runs_a_padded_shard():
    """The kernels need no change: a column shard starting mid-block runs through the Triton GEMM."""
    # On a CUDA machine the kernel runs compiled on the GPU; on CPU under the interpreter.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = make_layer(200, 256)
    s = shard(layer, 1, 2, "column").to(dev)
    s.backend = "triton"
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert s.segments[0].pad == 100 % 128
    assert rel_error(s(x.to(dev)).cpu(), reference(layer, x)[..., 100:]) <= TOLERANCE


# ------------------------------------------------------------------------------- checkpoint slices


class _CountingOpen:
    """Stands in for safetensors.safe_open and records the bytes every slice read returns."""

    def __init__(self, real, log: list):
        self.real, self.log = real, log

    def __call__(self, path, framework="pt", **kw):
        return _Handle(self.real(path, framework=framework, **kw), self.log)


class _Handle:
    """A safe_open handle that only offers get_slice: a whole-tensor read (get_tensor) would fail the test."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_slice(self, name):
        return _Slice(self.inner.get_slice(name), name, self.log)


class _Slice:
    def __init__(self, inner, name, log):
        self.inner, self.name, self.log = inner, name, log

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, idx):
        t = self.inner[idx]
        self.log.append((self.name, t.numel() * t.element_size()))
        return t


def write_checkpoint(root: Path, layers: dict[str, Fp8BlockLinear]) -> None:
    """Two files and an index: weights in one, scales and biases in the other."""
    weights, rest = {}, {}
    for name, layer in layers.items():
        weights[f"{name}.weight"] = layer.weight
        rest[f"{name}.weight_scale_inv"] = layer.weight_scale_inv
        if layer.bias is not None:
            rest[f"{name}.bias"] = layer.bias
    save_file(weights, root / "a.safetensors")
    save_file(rest, root / "b.safetensors")
    index = {**{k: "a.safetensors" for k in weights}, **{k: "b.safetensors" for k in rest}}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def _bytes_by_tensor(log) -> dict[str, int]:
    """Bytes read per tensor kind ("weight", "weight_scale_inv", "bias")."""
    out: dict[str, int] = {}
    for name, nbytes in log:
        kind = name.rsplit(".", 1)[-1]
        out[kind] = out.get(kind, 0) + nbytes
    return out


def test_load_shard_reads_only_its_slice(tmp_path, monkeypatch):
    col, row = make_layer(2112, 512, seed=1), make_layer(256, 7168, seed=2)
    write_checkpoint(tmp_path, {"qkv": col, "down": row})
    log: list = []
    monkeypatch.setattr(tp, "safe_open", _CountingOpen(tp.safe_open, log))

    for r in (0, 3, 7):
        log.clear()
        got = load_shard(tmp_path, "qkv", r, 8, "column")
        want = shard(col, r, 8, "column")
        assert isinstance(got, ColumnParallelFp8Linear)
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                   for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True))
        read = _bytes_by_tensor(log)
        assert read["weight"] == 264 * 512  # exactly its rows: 1/8 of the weight
        assert read["weight_scale_inv"] == want.weight_scale_inv.numel() * 4
        assert read["bias"] == 264 * 2

    for r in (0, 1, 2):
        log.clear()
        got = load_shard(tmp_path, "down", r, 3, "row", reduce_dtype=torch.float32)
        start, stop = shard_range(7168, r, 3)
        assert isinstance(got, RowParallelFp8Linear) and got.reduce_dtype == torch.float32
        read = _bytes_by_tensor(log)
        assert read["weight"] == 256 * (stop - start)
        assert read["weight_scale_inv"] == 2 * got.weight_scale_inv.shape[1] * 4
        assert read.get("bias", 0) == (256 * 2 if r == 0 else 0)  # the bias lives on rank 0 only
        x = torch.randn(2, 7168)
        want = shard(row, r, 3, "row")
        assert torch.equal(got(slice_input(x, r, 3)), want(slice_input(x, r, 3)))

    with pytest.raises(ValueError, match="tensor 'nope.weight' is not in the checkpoint"):
        load_shard(tmp_path, "nope", 0, 2)


# ------------------------------------------------------------------------------- real gloo groups

WORLD = 4
# name -> (N, K, style, world_size, extra shard kwargs, input dtype)
GLOO_CASES = {
    "col_n200_tp2": (200, 256, "column", 2, {"gather_output": True}, torch.bfloat16),
    "row_k7168_tp3": (64, 7168, "row", 3, {}, torch.bfloat16),
    "row_k7168_tp3_fp32": (64, 7168, "row", 3, {"reduce_dtype": torch.float32}, torch.float32),
    "col_n2112_tp3_parts": (2112, 256, "column", 3, {"gather_output": True, "parts": (1536, 576)}, torch.float32),
    # K=2112 at TP 3: rank 2's columns [1408, 2112) start on a block edge and hold no cut group, yet it must
    # join the other ranks' amax exchange.
    "row_k2112_tp3": (64, 2112, "row", 3, {}, torch.bfloat16),
    "row_k2112_tp4": (64, 2112, "row", 4, {"reduce_dtype": torch.float32}, torch.float32),
}


def _gloo_layers() -> dict[str, tuple[Fp8BlockLinear, torch.Tensor]]:
    out = {}
    for i, (name, (n, k, *_, dtype)) in enumerate(GLOO_CASES.items()):
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(i)).to(dtype)
        out[name] = (make_layer(n, k, seed=10 + i), x)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(99)).to(torch.bfloat16)
    out["pair_up"] = (make_layer(200, 256, seed=30), x)
    out["pair_down"] = (make_layer(256, 200, seed=31), None)
    return out


def _gloo_worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    groups = {2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2]), WORLD: dist.group.WORLD}
    layers = _gloo_layers()
    results = {}
    for name, (_, _, style, ws, kwargs, _) in GLOO_CASES.items():
        if rank >= ws:
            continue
        layer, x = layers[name]
        inp = x if style == "column" else slice_input(x, rank, ws)
        results[name] = shard(layer, rank, ws, style, group=groups[ws], **kwargs)(inp)
        results[name + "/checkpoint"] = load_shard(root, name, rank, ws, style, group=groups[ws], **kwargs)(inp)
    if rank < 2:  # a Megatron pair: column (no gather) -> activation -> row (all-reduce)
        (up, x), (down, _) = layers["pair_up"], layers["pair_down"]
        h = F.silu(shard(up, rank, 2, "column", group=groups[2])(x))
        results["pair"] = shard(down, rank, 2, "row", group=groups[2])(h)
        try:
            shard(up, 1 - rank, 2, "column", group=groups[2])
        except ValueError as e:
            results["mismatch_error"] = str(e)
    torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    dist.barrier()  # leave together: a rank exiting while a peer still works can abort in gloo's threads
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gloo")
    layers = _gloo_layers()
    write_checkpoint(root, {name: layers[name][0] for name in GLOO_CASES})
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, str(root))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=100)
    for p in procs:
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"gloo workers exited with {codes}"
    return layers, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(GLOO_CASES))
def test_gloo_collectives_match_unsharded(gloo_results, name):
    layers, results = gloo_results
    layer, x = layers[name]
    ws = GLOO_CASES[name][3]
    want = layer(x)
    bound = EXACT if x.dtype == torch.float32 else TOLERANCE
    for r in range(ws):
        for key in (name, name + "/checkpoint"):
            got = results[r][key]
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, results[0][key]), "ranks disagree after the collective"
            assert rel_error(got, want) <= bound
            assert rel_error(got, reference(layer, x)) <= TOLERANCE


@pytest.mark.timeout(120)
def test_gloo_megatron_pair_and_group_check(gloo_results):
    layers, results = gloo_results
    (up, x), (down, _) = layers["pair_up"], layers["pair_down"]
    want = down(F.silu(up(x)))
    assert torch.equal(results[0]["pair"], results[1]["pair"])
    assert rel_error(results[0]["pair"], want) <= TOLERANCE
    assert "rank/world_size must match the process group" in results[0]["mismatch_error"]


# ------------------------------------------------------------------------------------------ the demo


def test_tp_demo_single_process(tmp_path):
    from blockfp8.cli import main

    out = tmp_path / "tp1.json"
    assert main(["tp-demo", "--small", "--layers", "1", "--steps", "1", "--gemm-reps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["world_size"] == 1
    assert report["batches"][0]["max_rel_error_vs_tp1"]["final"] == {"bf16": 0.0, "fp32": 0.0}


@pytest.mark.timeout(120)
def test_tp_demo_torchrun_gloo_tp2(tmp_path):
    out = tmp_path / "tp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "blockfp8", "tp-demo", "--small", "--layers", "1", "--steps", "2", "--batch", "2",
           "--gemm-reps", "1", "--json", str(out)]
    # The CPU path (gloo, Triton interpreter) on any host: hide GPUs, or rank 1 asks for a second one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[:6000]
    report = json.loads(out.read_text())
    batch = report["batches"][0]
    assert report["world_size"] == 2 and report["dist_backend"] == "gloo" and batch["M"] == 2
    errors = batch["max_rel_error_vs_tp1"]
    assert errors["first_pair"]["bf16"] <= TOLERANCE
    assert errors["first_pair"]["fp32"] <= EXACT and errors["final"]["fp32"] <= EXACT
    gemms = {(g["layer"], g["style"]): (g["local_N"], g["local_K"]) for g in batch["gemms"]}
    assert gemms[("fused_qkv_a_proj", "column")] == (80, 448)  # 66 rows -> padded to 16
    assert gemms[("dense_mlp.down_proj", "row")] == (448, 592)  # 576 columns + a spare, rounded up to 16


@pytest.mark.parametrize("style", ["column", "row"])
def test_shards_keep_fp8_buffers_on_dtype_casts(style):
    layer = Fp8BlockLinear.from_linear(torch.nn.Linear(300, 200))
    part = tp.shard(layer, 0, 2, style=style).to(torch.bfloat16)
    assert part.weight.dtype == torch.float8_e4m3fn and part.weight_scale_inv.dtype == torch.float32
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    part(x if style == "column" else tp.slice_input(x, 0, 2))


def test_load_shard_rejects_wrong_dtypes(tmp_path):
    w, s = quantize_weight(torch.randn(256, 256))
    save_file({"l.weight": w.to(torch.bfloat16), "l.weight_scale_inv": s}, tmp_path / "model.safetensors")
    with pytest.raises(TypeError, match=r"l\.weight .* must have dtype F8_E4M3, got BF16"):
        tp.load_shard(tmp_path, "l", 0, 2)
    save_file({"l.weight": w, "l.weight_scale_inv": s.to(torch.bfloat16)}, tmp_path / "model.safetensors")
    with pytest.raises(TypeError, match=r"weight_scale_inv .* must have dtype F32"):
        tp.load_shard(tmp_path, "l", 0, 2)


@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize(("tensor", "index", "value", "match", "refusers"), [
    # refusers: the ranks (of 2) whose slice holds the element, for (column, row). Column rank 0 holds rows
    # [0, 128); row rank 0 holds input columns [0, 150), i.e. block columns 0 and 1 (block 1 is shared).
    ("weight", (7, 1), 0x7F, r"holds 1 NaN encoding\(s\).*byte 0x7F", ({0}, {0})),
    ("weight", (200, 260), 0xFF, r"holds 1 NaN encoding\(s\).*byte 0xFF", ({1}, {1})),
    ("weight_scale_inv", (1, 1), 2.0**57, r"holds 1 invalid value\(s\).*above 2\^56", ({1}, {0, 1})),
    ("weight_scale_inv", (0, 0), 0.0, r"holds 1 invalid value\(s\)", ({0}, {0})),
    ("bias", (3,), math.inf, r"holds 1 NaN or Inf value\(s\)", ({0}, {0})),  # a row shard's bias is rank 0's
])
def test_load_shard_checks_the_values_it_reads(tmp_path, style, tensor, index, value, match, refusers):
    layer = make_layer(256, 300)
    state = {f"l.{k}": v.clone() for k, v in layer.state_dict().items()}
    t = state[f"l.{tensor}"]
    (t.view(torch.uint8) if tensor == "weight" else t)[index] = value
    save_file(state, tmp_path / "model.safetensors")
    for rank in (0, 1):
        if rank in refusers[style == "row"]:
            with pytest.raises(ValueError, match=rf"^l\.{tensor} in .*model.safetensors \(rank {rank}'s {style} "
                                                 rf"shard, local indices\) {match}"):
                tp.load_shard(tmp_path, "l", rank, 2, style)
        else:
            tp.load_shard(tmp_path, "l", rank, 2, style)


def _row_and_inputs(k: int = 300, world_size: int = 2, rank: int = 0):
    layer = make_layer(64, k)
    x = torch.randn(3, k)
    return shard(layer, rank, world_size, "row"), slice_input(x, rank, world_size), cut_group_amax(x, world_size)


@pytest.mark.parametrize(("change", "error", "match"), [
    (lambda a: a[:, :0], ValueError, r"^cut_amax must have shape \(3, 1\) .*cut_group_amax\(x_full, 2\)\), got"),
    (lambda a: a[None], ValueError, r"^cut_amax must have shape \(3, 1\)"),
    (lambda a: a.t(), ValueError, r"^cut_amax must have shape \(3, 1\)"),
    (lambda a: a.int(), TypeError, r"^cut_amax must have dtype"),
    (lambda a: a.double(), TypeError, r"^cut_amax must have dtype"),
    (lambda a: a.tolist(), TypeError, r"^cut_amax must be a torch.Tensor"),
    (lambda a: a.to("meta"), ValueError, r"^cut_amax is on meta but x is on cpu"),
    (lambda a: a * 0.5, ValueError, r"^cut_amax holds 3 value\(s\) below the absolute maximum of rank 0's own part"),
    (lambda a: -a, ValueError, r"^cut_amax holds 3 value\(s\) below"),
    (lambda a: torch.full_like(a, math.nan), ValueError, r"^cut_amax holds 3 value\(s\) below"),
    (lambda a: torch.zeros_like(a), ValueError, r"first: cut_amax\[0, 0\] = 0\.0 < "),
])
def test_row_shard_checks_cut_amax(change, error, match):
    row, x0, amax = _row_and_inputs()
    want = row(x0, amax)
    with pytest.raises(error, match=match):
        row(x0, change(amax))
    assert torch.equal(row(x0, amax), want)
    # The rank whose part holds the larger values sees them too; a larger cut_amax cannot be seen (documented).
    row(x0, amax * 2)


def test_cut_amax_of_a_block_aligned_split_is_still_shape_checked():
    row, x0, amax = _row_and_inputs(k=256)
    assert amax.shape == (3, 0) and row.num_cut_groups == 0
    row(x0, amax)
    with pytest.raises(ValueError, match=r"^cut_amax must have shape \(3, 0\)"):
        row(x0, torch.ones(3, 1))
