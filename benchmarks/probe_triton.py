"""Launch-config probe for the Triton GEMM on the GPU: L2-cold CUDA-graph timing of candidate configs vs
DeepGEMM on the DeepSeek-V3 shapes. Prints one JSON line per cell (used to choose the decode design and the
heuristic defaults; docs/performance.md)."""

import argparse
import json
import math

import torch

from blockfp8 import quantize_activation, quantize_weight, reference_gemm, rel_error
from blockfp8.act_quant import quantize_activation_fused
from blockfp8.backends.triton import triton_gemm
from blockfp8.backends.triton_configs import TritonConfig, candidate_configs, heuristic_config
from blockfp8.shapes import parse_ints, parse_shapes


def graph_time_us(fn, copies: int, reps: int = 10) -> float:
    """Median per-call time of fn(i) over i in range(copies), replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / copies)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="deepseek-v3")
    ap.add_argument("--m", default="1,16,64")
    ap.add_argument("--max-configs", type=int, default=40)
    ap.add_argument("--extra", default="", help="JSON list of extra config dicts to try")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    copy_bw = None
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_bw = 2 * big.numel() / (graph_time_us(lambda i: dst.copy_(big), 1, 10) * 1e-6) / 1e12
    del big, dst
    print(json.dumps({"copy_TBps": round(copy_bw, 3), "l2_MB": l2 / 1e6}), flush=True)
    try:
        import deep_gemm
    except ImportError:
        deep_gemm = None
    extra = [TritonConfig(**d) for d in json.loads(args.extra)] if args.extra else []
    for shape in parse_shapes(args.shapes):
        n, k = shape.n, shape.k
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        wq, ws = quantize_weight(w)
        del w
        wbytes = wq.numel() + ws.numel() * 4
        copies = max(2, min(64, math.ceil(4 * l2 / wbytes)))
        wqs = [wq.clone() for _ in range(copies)]
        wss = [ws.clone() for _ in range(copies)]
        for m in parse_ints(args.m):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_activation(x)
            xq_c, xs_c = quantize_activation_fused(x, layout="col")
            ref = reference_gemm(xq, xs, wq, ws)
            cands = list(dict.fromkeys([heuristic_config(m, n, k), *extra, *candidate_configs(m, n, k)]))
            results = []
            for cfg in cands[: args.max_configs]:
                try:
                    err = rel_error(triton_gemm(xq_c, xs_c, wq, ws, config=cfg), ref)
                    t = graph_time_us(lambda i, c=cfg: triton_gemm(xq_c, xs_c, wqs[i], wss[i], config=c), copies)
                except Exception as e:  # noqa: BLE001
                    print(json.dumps({"N": n, "K": k, "M": m, "cfg": str(cfg), "error": str(e)[:200]}), flush=True)
                    continue
                results.append((t, err, cfg))
            results.sort(key=lambda r: r[0])
            dg = None
            if deep_gemm is not None:
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                deep_gemm.fp8_gemm_nt((xq_c, xs_c), (wq, ws), out, disable_ue8m0_cast=True)
                dg = graph_time_us(lambda i: deep_gemm.fp8_gemm_nt((xq_c, xs_c), (wqs[i], wss[i]), out,
                                                                     disable_ue8m0_cast=True), copies)
            best = results[0]
            rec = {"N": n, "K": k, "M": m, "weight_MB": round(wbytes / 1e6, 1), "copies": copies,
                   "deepgemm_us": dg and round(dg, 2),
                   "heuristic_us": round(next(r[0] for r in results if r[2] == cands[0]), 2),
                   "best_us": round(best[0], 2), "best_err": best[1], "best_cfg": best[2].to_json(),
                   "best_pct_bw": round(100 * wbytes / (best[0] * 1e-6) / (copy_bw * 1e12), 1),
                   "top5": [[round(r[0], 2), r[2].to_json()] for r in results[:5]],
                   "max_err": max(r[1] for r in results)}
            print(json.dumps(rec), flush=True)
        del wqs, wss
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
