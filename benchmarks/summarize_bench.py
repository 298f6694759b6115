"""Merge ``blockfp8 bench --save`` JSON files into the markdown tables of docs/benchmarks.md and docs/performance.md.

    python benchmarks/summarize_bench.py benchmarks/results/bench_A.json benchmarks/results/bench_B.json
"""

import argparse
import json
import math

ORDER = ["triton", "gluon", "cublas", "deepgemm", "torchao", "bf16"]
OWN = ("triton", "gluon")  # blockfp8's own kernels
PEERS = ("cublas", "deepgemm", "torchao", "bf16")


def load(paths):
    records, envs = [], []
    for p in paths:
        d = json.load(open(p))
        records += d["records"]
        envs.append((d["environment"], d["ceilings"]))
    return records, envs


def cells(records):
    out = {}
    for r in records:
        out.setdefault((r["n"], r["k"], r["m"], r["mode"]), {})[r["method"]] = r
    return out


def us(r):
    return r["timing"]["median_us"] if r and r.get("timing") and r["status"] in ("ok", "wrong") else None


def fmt(r):
    t = us(r)
    if t is None:
        return "-" if r is None or r["status"] in ("unsupported", "unavailable") else r["status"]
    return f"{t:.1f}" + (" (wrong)" if r["status"] == "wrong" else "")


def fastest(row, names):
    """Fastest correct method of ``names`` in a cell: (us, name), or (None, None)."""
    ts = [(us(row.get(n)), n) for n in names if row.get(n) and row[n]["status"] == "ok" and us(row[n])]
    return min(ts) if ts else (None, None)


def best_peer(row):
    return fastest(row, PEERS)


def own(row):
    """Fastest correct own kernel: (us, name), or (None, None)."""
    return fastest(row, OWN)


def speed_table(records, mode, ceilings):
    c = cells(records)
    lines = ["| N x K | M | " + " | ".join(f"{n} us" for n in ORDER) + " | dispatched us (choice) | best peer | "
             "speedup | %BW | TFLOP/s |", "|---|---:|" + "---:|" * (len(ORDER) + 5)]
    for (n, k, m, md), row in sorted(c.items(), key=lambda x: (x[0][1] * x[0][0] * -1, x[0][2])):
        if md != mode:
            continue
        d = row.get("blockfp8")
        peer_us, peer = best_peer(row)
        speed = f"{peer_us / us(d):.2f}x" if d and us(d) and peer_us else "-"
        met = d["metrics"] if d and d.get("metrics") else {}
        lines.append(f"| {n} x {k} | {m} | " + " | ".join(fmt(row.get(x)) for x in ORDER)
                     + f" | {fmt(d)} ({d['label'].replace('blockfp8->', '') if d else '-'}) | {peer} | {speed} | "
                     f"{met.get('pct_bw', 0):.0f}% | {met.get('tflops', 0):.0f} |")
    return "\n".join(lines)


def triton_table(records, ceilings):
    """blockfp8's own kernels per cell: the faster of Triton and Gluon, us / TFLOP/s (kernel)."""
    c = cells(records)
    ms = sorted({k[2] for k in c})
    shapes = sorted({(k[0], k[1]) for k in c}, key=lambda s: -s[0] * s[1])
    lines = ["| N x K | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---:|" * len(ms)]
    for n, k in shapes:
        parts = []
        for m in ms:
            t, name = own(c.get((n, k, m, "gemm"), {}))
            parts.append(f"{t:.1f} us / {2 * m * n * k / t / 1e6:.0f} ({name})" if t else "-")
        lines.append(f"| {n} x {k} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def goals(records, ceilings):
    """Issue goals per shape: decode %BW (weights) and speed vs best peer for the dispatched op and Triton."""
    c = cells(records)
    bw = ceilings["copy_gbps"] * 1e9
    lines = ["| N x K | M | weight MB | dispatched us | % copy BW | own kernel us | % copy BW | best peer (us) | "
             "dispatched vs peer | own vs peer |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    logs_d, logs_t = [], []
    for (n, k, m, md), row in sorted(c.items(), key=lambda x: (-x[0][0] * x[0][1], x[0][2])):
        if md != "gemm" or m > 64:
            continue
        wbytes = n * k + 4 * math.ceil(n / 128) * math.ceil(k / 128)
        d, (t, _) = us(row.get("blockfp8")), own(row)
        p, peer = best_peer(row)
        logs_d.append(math.log(p / d))
        logs_t.append(math.log(p / t))
        pct_d, pct_t = 100 * wbytes / (d * 1e-6) / bw, 100 * wbytes / (t * 1e-6) / bw
        lines.append(f"| {n} x {k} | {m} | {wbytes / 1e6:.1f} | {d:.1f} | {pct_d:.0f}% | {t:.1f} | {pct_t:.0f}% | "
                     f"{peer} ({p:.1f}) | {p / d:.2f}x | {p / t:.2f}x |")
    lines.append(f"\nGeomean over these decode cells: dispatched {math.exp(sum(logs_d) / len(logs_d)):.2f}x, "
                 f"own kernel {math.exp(sum(logs_t) / len(logs_t)):.2f}x the best peer.")
    return "\n".join(lines)


def prefill(records):
    c = cells(records)
    lines = ["| N x K | M | Triton us | Gluon us | DeepGEMM us | own / DeepGEMM speed | dispatched us (choice) | "
             "best peer | dispatched vs best peer |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (n, k, m, md), row in sorted(c.items(), key=lambda x: (-x[0][0] * x[0][1], x[0][2])):
        if md != "gemm" or m < 128:
            continue
        g, d = us(row.get("deepgemm")), us(row.get("blockfp8"))
        o, _ = own(row)
        p, peer = best_peer(row)
        lines.append(f"| {n} x {k} | {m} | {fmt(row.get('triton'))} | {fmt(row.get('gluon'))} | {g:.1f} | "
                     f"{g / o:.2f}x | {d:.1f} ({row['blockfp8']['label'].replace('blockfp8->', '')}) | {peer} | "
                     f"{p / d:.2f}x |")
    return "\n".join(lines)


def linear_overhead(records):
    c = cells(records)
    lines = ["| N x K | M | dispatched GEMM us | dispatched linear us | linear / GEMM | linear - GEMM us |",
             "|---|---:|---:|---:|---:|---:|"]
    for (n, k, m, md), row in sorted(c.items(), key=lambda x: (-x[0][0] * x[0][1], x[0][2])):
        if md != "gemm":
            continue
        g = us(row.get("blockfp8"))
        lin = us(c.get((n, k, m, "linear"), {}).get("blockfp8"))
        if g and lin:
            lines.append(f"| {n} x {k} | {m} | {g:.1f} | {lin:.1f} | {lin / g:.2f} | {lin - g:+.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON files written by blockfp8 bench --save")
    recs, envs = load(ap.parse_args().files)
    env, ceil = envs[0]
    what = {"gemm": lambda: speed_table(recs, "gemm", ceil), "linear": lambda: speed_table(recs, "linear", ceil),
            "triton": lambda: triton_table(recs, ceil), "goals": lambda: goals(recs, ceil),
            "prefill": lambda: prefill(recs), "overhead": lambda: linear_overhead(recs)}
    for name, fn in what.items():
        print(f"\n<!-- {name} -->\n{fn()}")
