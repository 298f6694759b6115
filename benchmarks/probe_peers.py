"""Raw probe of the peer block-FP8 GEMMs (cuBLAS blockwise through torch, DeepGEMM) on this GPU.

Calls each library directly, with no blockfp8 limits in front, over a grid of shapes and records
ok / wrong (relative error) / error (exception) per cell. Its output is the evidence behind the
limits declared in src/blockfp8/backends/. Run on a GPU:

    python benchmarks/probe_peers.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

TOL = 5e-3
FP8 = torch.float8_e4m3fn


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def make_problem(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kb, nb = cdiv(k, 128), cdiv(n, 128)
    a = (torch.randn(m, k, device="cuda", generator=g) * 2).to(FP8)
    w = (torch.randn(n, k, device="cuda", generator=g) * 2).to(FP8)
    sa = torch.rand(m, kb, device="cuda", generator=g) * 0.01 + 1e-3
    sw = torch.rand(nb, kb, device="cuda", generator=g) * 0.01 + 1e-3
    return a, sa, w, sw


def reference(a, sa, w, sw):
    m, k = a.shape
    n = w.shape[0]
    af = a.float() * sa.repeat_interleave(128, dim=1)[:, :k]
    wf = w.float() * sw.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return af @ wf.t()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def verdict(fn, ref) -> str:
    try:
        out = fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - we record every failure mode
        torch.cuda.synchronize()
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return f"error: {msg}"
    err = rel_err(out, ref)
    return f"ok {err:.1e}" if err <= TOL else f"wrong {err:.1e}"


def probe_cublas(ms, ns, ks) -> dict:
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType

    res = {}
    for n in ns:
        for k in ks:
            for m in ms:
                a, sa, w, sw = make_problem(m, n, k)
                ref = reference(a, sa, w, sw)
                kb = sa.shape[1]
                kb4 = cdiv(kb, 4) * 4
                sa_col = sa.t().contiguous().t()  # (M, Kb) column-major
                sw_pad = torch.zeros(sw.shape[0], kb4, device="cuda")
                sw_pad[:, :kb] = sw
                variants = {
                    "padded": (sa_col, sw_pad.t()),
                    "unpadded": (sa_col, sw.t()),
                    "a_rowmajor": (sa, sw_pad.t()),
                }
                for name, (s_a, s_b) in variants.items():
                    res[f"{m},{n},{k},{name}"] = verdict(
                        lambda s_a=s_a, s_b=s_b: F.scaled_mm(
                            a, w.t(), s_a, ScalingType.BlockWise1x128, s_b, ScalingType.BlockWise128x128,
                            output_dtype=torch.bfloat16,
                        ),
                        ref,
                    )
    return res


def _dg_worker(args):
    n, k, ms = args
    import deep_gemm

    out = {}
    for m in ms:
        a, sa, w, sw = make_problem(m, n, k)
        ref = reference(a, sa, w, sw)
        t0 = time.time()

        def run(sa=sa):
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            deep_gemm.fp8_gemm_nt((a, sa), (w, sw), d, disable_ue8m0_cast=True)
            return d

        out[f"{m},{n},{k}"] = verdict(run, ref) + f" ({time.time() - t0:.1f}s)"
    return out


def probe_deepgemm(ms, ns, ks, procs: int) -> dict:
    ctx = mp.get_context("spawn")
    jobs = [(n, k, ms) for n in ns for k in ks]
    res = {}
    with ctx.Pool(procs) as pool:
        for part in pool.imap_unordered(_dg_worker, jobs):
            res.update(part)
    return res


def count_kernels(fn) -> list[str]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name[:80] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def deepgemm_layouts() -> dict:
    """Which activation-scale layouts DeepGEMM takes without launching its own transpose kernel."""
    import deep_gemm

    res = {}
    for m in (1, 16, 77, 128):
        n, k = 2112, 7168
        a, sa, w, sw = make_problem(m, n, k)
        ref = reference(a, sa, w, sw)
        m4 = cdiv(m, 4) * 4
        col = torch.zeros(sa.shape[1], m4, device="cuda")
        col[:, :m] = sa.t()
        sa_col = col.t()[:m]  # (M, Kb), stride (1, align(M, 4))
        for name, s in (("rowmajor", sa), ("colmajor_tma", sa_col)):
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def run(s=s, d=d):
                deep_gemm.fp8_gemm_nt((a, s), (w, sw), d, disable_ue8m0_cast=True)
                return d

            res[f"m={m},{name}"] = {"verdict": verdict(run, ref), "kernels": count_kernels(run)}
    return res


def ceilings() -> dict:
    import triton.testing as tt

    x = torch.empty(2 * 1024**3 // 4, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = tt.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    copy_tbs = 2 * x.numel() * 4 / ms / 1e9
    del x, y
    s = 8192
    a = torch.randn(s, s, device="cuda").to(FP8)
    b = torch.randn(s, s, device="cuda").to(FP8).t()
    one = torch.ones((), device="cuda")
    ms = tt.do_bench(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), warmup=50, rep=300,
                     return_mode="median")
    return {"copy_TBps": copy_tbs, "fp8_tensorwise_TFLOPs": 2 * s**3 / ms / 1e9}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="probe.json")
    p.add_argument("--procs", type=int, default=14)
    args = p.parse_args()
    import triton

    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import deep_gemm

        info["deep_gemm"] = getattr(deep_gemm, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info["deep_gemm"] = f"unavailable: {e}"
    print(info, flush=True)
    result = {"info": info}
    t0 = time.time()
    result["ceilings"] = ceilings()
    print("ceilings", result["ceilings"], f"{time.time() - t0:.0f}s", flush=True)

    ms = [1, 2, 3, 4, 7, 8, 15, 16, 17, 32, 77, 128]
    ns = [8, 16, 64, 130, 200, 576, 2112]
    ks = [128, 256, 1000, 1008, 1024, 1088, 7168]
    t0 = time.time()
    result["cublas"] = probe_cublas(ms, ns, ks)
    print(f"cublas probe {time.time() - t0:.0f}s", flush=True)

    if not info["deep_gemm"].startswith("unavailable"):
        t0 = time.time()
        result["deepgemm_layouts"] = deepgemm_layouts()
        print(json.dumps(result["deepgemm_layouts"], indent=1), flush=True)
        dg_ns = [8, 16, 32, 64, 96, 130, 200, 576, 2112, 7168]
        dg_ks = [128, 256, 1000, 1008, 1024, 1088, 7168]
        result["deepgemm"] = probe_deepgemm([1, 7, 77, 128, 300], dg_ns, dg_ks, args.procs)
        print(f"deepgemm probe {time.time() - t0:.0f}s", flush=True)

    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    summarize(result)


def summarize(result: dict) -> None:
    for lib in ("cublas", "deepgemm"):
        cells = result.get(lib, {})
        bad = {k: v for k, v in cells.items() if not v.startswith("ok")}
        print(f"{lib}: {len(cells)} cells, {len(bad)} not ok")
        kinds: dict[str, list[str]] = {}
        for key, v in bad.items():
            kinds.setdefault(v.split(" (")[0][:70], []).append(key)
        for v, keys in kinds.items():
            print(f"  {v}: {len(keys)} e.g. {keys[:12]}")


if __name__ == "__main__":
    main()
