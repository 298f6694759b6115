"""Decode-kernel probe on the GPU: which inner product streams weights fastest at small M.

Compares, per DeepSeek-V3 shape and M, L2-cold CUDA-graph times of
* the shipped Triton config (FP8 dot per 128-K group, scaled after it),
* (at commit 1817063 only, where the kernel had them) the ``mma="bf16"`` / ``"bf16x2"`` paths: weights upcast to
  bf16, scales folded into the activations, dots chained into one accumulator; measured slower on every
  decode cell (results/decode_mma_probe/) and removed,
* an experimental CUDA-core GEMV for M=1 (no tensor cores, full K per program, no split-K reduction),
* the FP8 kernel with TMA tile loads (``TritonConfig(tma=True)``) over a small config grid,
* DeepGEMM when installed.
Prints one JSON line per cell. ``--compile-only`` just compiles every config (run it in parallel processes
first so the timed pass finds Triton's cache warm).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl
from probe_triton import graph_time_us

from blockfp8 import quantize_weight, reference_gemm, rel_error
from blockfp8.act_quant import quantize_activation_fused
from blockfp8.backends.triton import triton_gemm
from blockfp8.backends.triton_configs import TritonConfig, get_config
from blockfp8.quant import cdiv
from blockfp8.shapes import parse_ints, parse_shapes


@triton.jit
def _gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, N, K, stride_xsk, stride_wn, stride_wsn, stride_wsk,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[0, n] = sum_k x[0, k] w[n, k] * scales, fp32 FMAs on CUDA cores, K % BLOCK_K == 0, M == 1."""
    pid = tl.program_id(0)
    rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    wsb = ws_ptr + (rn // 128) * stride_wsn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        w = tl.load(w_ptr + rn[:, None] * stride_wn + ks[None, :]).to(tl.float32)
        x = tl.load(x_ptr + ks).to(tl.float32) * tl.load(xs_ptr + (ks // 128) * stride_xsk)
        sw = tl.load(wsb[:, None] + (ks // 128)[None, :] * stride_wsk)
        acc += w * sw * x[None, :]
    y = tl.sum(acc, axis=1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def gemv(xq, xs, wq, ws, block_n: int, block_k: int, warps: int, out=None):
    n, k = wq.shape
    y = out if out is not None else torch.empty(1, n, dtype=torch.bfloat16, device=xq.device)
    _gemv_kernel[(cdiv(n, block_n),)](xq, xs, wq, ws, y, n, k, xs.stride(1), wq.stride(0), ws.stride(0),
                                      ws.stride(1), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def tma_configs(m: int, n: int, k: int, sms: int) -> list[TritonConfig]:
    groups = cdiv(k, 128)
    bm = max(16, 1 << max(0, (m - 1).bit_length()))
    out = []
    for bn in (64, 128):
        tiles = cdiv(n, bn) * cdiv(m, bm)
        for split in sorted({s for s in (1, cdiv(sms, tiles), cdiv(2 * sms, tiles), cdiv(4 * sms, tiles))
                             if s <= groups and tiles * s <= 8 * sms}):
            for warps, stages in ((4, 4), (8, 4), (4, 6), (4, 8)):
                out.append(TritonConfig(bm, bn, split, 1, True, warps, stages, tma=True))
    return out


GEMV = [(bn, bk, w) for bn in (8, 16, 32) for bk in (512, 1024) for w in (4, 8)]


def cells(args):
    for shape in parse_shapes(args.shapes):
        for m in parse_ints(args.m):
            yield shape.n, shape.k, m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="deepseek-v3")
    ap.add_argument("--m", default="1,16,64")
    ap.add_argument("--compile-only", type=int, nargs=2, metavar=("PART", "PARTS"))
    ap.add_argument("--families", default="fp8,gemv,tma,deepgemm")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size

    if args.compile_only:
        part, parts = args.compile_only
        fam = args.families.split(",")
        todo = [(n, k, m, c) for n, k, m in cells(args)
                for c in (["gemv"] if "gemv" in fam else [])
                + (tma_configs(m, n, k, sms) if "tma" in fam else [])]
        for i, (n, k, m, c) in enumerate(todo):
            if i % parts != part:
                continue
            wq = torch.zeros(n, k, device=dev, dtype=torch.float8_e4m3fn)
            ws = torch.ones(cdiv(n, 128), cdiv(k, 128), device=dev)
            xq = torch.zeros(m, k, device=dev, dtype=torch.float8_e4m3fn)
            xs = torch.ones(cdiv(k, 128), m, device=dev).t()
            if c == "gemv":
                if m == 1:
                    for bn, bk, w in GEMV:
                        if k % bk == 0:
                            gemv(xq, xs, wq, ws, bn, bk, w)
            else:
                triton_gemm(xq, xs, wq, ws, config=c)
        torch.cuda.synchronize()
        return

    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_bw = 2 * big.numel() / (graph_time_us(lambda i: dst.copy_(big), 1, 10) * 1e-6) / 1e12
    del big, dst
    print(json.dumps({"copy_TBps": round(copy_bw, 3), "l2_MB": l2 / 1e6, "gpu": torch.cuda.get_device_name(),
                      "triton": triton.__version__, "torch": torch.__version__}), flush=True)
    fam = args.families.split(",")
    try:
        import deep_gemm
    except ImportError:
        deep_gemm = None
    if "deepgemm" not in fam:
        deep_gemm = None
    for shape in parse_shapes(args.shapes):
        n, k = shape.n, shape.k
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_weight(w)
        del w
        wbytes = wq.numel() + ws.numel() * 4
        copies = max(2, min(64, math.ceil(4 * l2 / wbytes)))
        wqs = [wq.clone() for _ in range(copies)]
        wss = [ws.clone() for _ in range(copies)]
        for m in parse_ints(args.m):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_activation_fused(x, layout="col")
            ref = reference_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
            rec = {"N": n, "K": k, "M": m, "weight_MB": round(wbytes / 1e6, 1), "copies": copies}

            def timed(fn):
                err = rel_error(fn(0).float(), ref)
                return graph_time_us(fn, copies), err

            shipped = get_config(m, n, k, dev)
            t, e = timed(lambda i: triton_gemm(xq, xs, wqs[i], wss[i], config=shipped))
            rec["fp8_shipped"] = [round(t, 2), e, shipped.to_json()]
            if "tma" in fam:
                best = None
                for c in tma_configs(m, n, k, sms):
                    t, e = timed(lambda i, c=c: triton_gemm(xq, xs, wqs[i], wss[i], config=c))
                    if best is None or t < best[0]:
                        best = (t, e, c)
                    rec["tma_worst_err"] = max(rec.get("tma_worst_err", 0.0), e)
                rec["tma"] = [round(best[0], 2), best[1], best[2].to_json()]
            if m == 1 and "gemv" in fam:
                out = torch.empty(1, n, dtype=torch.bfloat16, device=dev)
                best = None
                for bn, bk, wp in GEMV:
                    if k % bk:
                        continue
                    t, e = timed(lambda i, a=(bn, bk, wp): gemv(xq, xs, wqs[i], wss[i], *a, out=out))
                    if best is None or t < best[0]:
                        best = (t, e, (bn, bk, wp))
                if best:
                    rec["gemv"] = [round(best[0], 2), best[1], best[2]]
            if deep_gemm is not None:
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                t, e = timed(lambda i: (deep_gemm.fp8_gemm_nt((xq, xs), (wqs[i], wss[i]), out,
                                                              disable_ue8m0_cast=True), out)[1])
                rec["deepgemm"] = [round(t, 2), e]
            rec["copy_us"] = round(wbytes / (copy_bw * 1e12) * 1e6, 2)
            print(json.dumps(rec), flush=True)
        del wqs, wss
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
