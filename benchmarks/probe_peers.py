"""Raw probe of the peer block-FP8 GEMMs (cuBLAS blockwise through torch, DeepGEMM) on this GPU.

Calls each library directly, with no blockfp8 limits in front, over a grid of shapes and records
ok / wrong (relative error) / error (exception) per cell. Its output (benchmarks/probe_h100.json on the H100)
is the evidence behind the limits declared in src/blockfp8/backends/cublas.py and deepgemm.py. Shared
helpers: operands from ``blockfp8.testing.operands``, the ground truth and the error from
``blockfp8.reference``, the copy and FP8 ceilings from ``blockfp8.testing.timing``, the device and versions
from ``blockfp8.testing.environment``. (probe_h100.json was written before the script used them: the same grid
and verdict strings, random fp8 values with random scales as operands, other keys in its info and ceilings.)
Run on a GPU:

    python benchmarks/probe_peers.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from blockfp8.format import cdiv, empty_scales
from blockfp8.reference import TOLERANCE, reference_gemm, rel_error
from blockfp8.testing.environment import environment, environment_line
from blockfp8.testing.operands import random_problem
from blockfp8.testing.timing import measure_ceilings


def make_problem(m: int, n: int, k: int, seed: int = 0):
    """(x_fp8, x_scale (M, Kb) row-major, w_fp8, weight_scale_inv) and the fp32 reference output."""
    _, a, sa, w, sw = random_problem(m, n, k, seed=seed, device="cuda")
    return a, sa, w, sw, reference_gemm(a, sa, w, sw, out_dtype=torch.float32)


def verdict(fn, ref) -> str:
    try:
        out = fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - we record every failure mode
        torch.cuda.synchronize()
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return f"error: {msg}"
    err = rel_error(out, ref)
    return f"ok {err:.1e}" if err <= TOLERANCE else f"wrong {err:.1e}"


def probe_cublas(ms, ns, ks) -> dict:
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType

    res = {}
    for n in ns:
        for k in ks:
            for m in ms:
                a, sa, w, sw, ref = make_problem(m, n, k)
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
                        lambda a=a, w=w, s_a=s_a, s_b=s_b: F.scaled_mm(
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
        a, sa, w, sw, ref = make_problem(m, n, k)
        t0 = time.time()

        def run(m=m, a=a, sa=sa, w=w, sw=sw):
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
        a, sa, w, sw, ref = make_problem(m, n, k)
        sa_col = empty_scales(m, sa.shape[1], "col", "cuda").copy_(sa)  # (M, Kb), stride (1, align(M, 4))
        for name, s in (("rowmajor", sa), ("colmajor_tma", sa_col)):
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def run(a=a, s=s, w=w, sw=sw, d=d):
                deep_gemm.fp8_gemm_nt((a, s), (w, sw), d, disable_ue8m0_cast=True)
                return d

            res[f"m={m},{name}"] = {"verdict": verdict(run, ref), "kernels": count_kernels(run)}
    return res


def ceilings() -> dict:
    """Device copy bandwidth and dense FP8 throughput, measured as ``blockfp8 bench`` measures them."""
    return measure_ceilings("cuda").to_json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="probe.json")
    p.add_argument("--procs", type=int, default=14)
    args = p.parse_args()
    info = environment("cuda")
    try:
        import deep_gemm  # noqa: F401 - called directly below, without blockfp8's limits in front

        have_deepgemm = True
    except Exception as e:  # noqa: BLE001
        have_deepgemm = False
        info["deep_gemm"] = f"unavailable: {e}"
    print(environment_line(info), flush=True)
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

    if have_deepgemm:
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
