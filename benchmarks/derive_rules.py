"""How well the dispatcher's static rules (``blockfp8.rules``) and its nearest-shape lookup match measured data.

Reads ``blockfp8 bench --save`` JSON files and, per cell (shape x M x mode), takes the fastest correct blockfp8
backend as the oracle. For each set of installed backends (all; no DeepGEMM; no cuBLAS; neither) it prints the
geomean and the worst of oracle time / time of the backend the rule picks, per phase, next to the same for the
old static order ("Triton for all decode"), and lists the cells where the rule picks a backend more than 5%
slower than the oracle. The nearest-shape lookup is scored leave-one-shape-out: each shape's cells are answered
from the ranking of the nearest other measured shape within 2x in N and K (cells with no such shape are
counted under the static rule).

    python benchmarks/derive_rules.py benchmarks/results/bench_A.json benchmarks/results/bench_B.json
"""

import argparse
import json
import math

from blockfp8.backends import Problem
from blockfp8.format import is_decode
from blockfp8.rules import static_rule

BACKENDS = ("triton", "gluon", "cublas", "deepgemm")
INSTALLED = {
    "all": set(BACKENDS),
    "no deepgemm": {"triton", "gluon", "cublas"},
    "no cublas": {"triton", "gluon", "deepgemm"},
    "neither": {"triton", "gluon"},
}
OLD_STATIC = {"decode": ("triton", "deepgemm", "cublas"), "prefill": ("deepgemm", "cublas", "gluon", "triton")}


def load_cells(paths: list[str]) -> tuple[dict, dict]:
    """(n, k, m, mode) -> {backend: median us} of correct results, and the environment of the first file."""
    cells: dict = {}
    env = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        env = env or data["environment"]
        for r in data["records"]:
            if r["kind"] == "backend" and r["status"] == "ok" and r.get("timing") and r["method"] in BACKENDS:
                cells.setdefault((r["n"], r["k"], r["m"], r["mode"]), {})[r["method"]] = r["timing"]["median_us"]
    return cells, env


def first_present(order, times: dict) -> str | None:
    return next((b for b in order if b in times), None)


def score(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return f"{geo:.3f} (worst {min(ratios):.2f}, {len(ratios)} cells)"


def rule_choice(n, k, m, times, env) -> str | None:
    arch = tuple(int(x) for x in env.get("capability", "9.0").split("."))
    p = Problem(m, n, k, "cuda", arch, device_name=env["device"], sms=env.get("sms", 0))
    return first_present(static_rule(p).order, times)


def old_choice(n, k, m, times, env) -> str | None:
    return first_present(OLD_STATIC["decode" if is_decode(m) else "prefill"], times)


def nearest_choice(cells: dict, key: tuple, times: dict, env) -> str | None:
    """The fastest backend (among ``times``) of the nearest other shape measured at the same M and mode."""
    n, k, m, mode = key
    best = None
    for (n2, k2, m2, mode2), other in cells.items():
        if (m2, mode2) != (m, mode) or (n2, k2) == (n, k) or max(n2 / n, n / n2) > 2 or max(k2 / k, k / k2) > 2:
            continue
        dist = abs(math.log(n2 / n)) + abs(math.log(k2 / k))
        if best is None or dist < best[0]:
            best = (dist, other)
    if best is None:
        return rule_choice(n, k, m, times, env)
    return first_present(sorted(best[1], key=best[1].get), times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--mode", default="gemm", choices=("gemm", "linear"))
    args = ap.parse_args()
    all_cells, env = load_cells(args.files)
    cells = {key: t for key, t in all_cells.items() if key[3] == args.mode}
    print(f"{env['device']} ({env.get('capability')}, {env.get('sms')} SMs), {args.mode} mode, {len(cells)} cells; "
          "oracle / chosen time, geomean (worst)")
    pickers = {"rules": rule_choice, "old static order": old_choice,
               "nearest shape (leave one out)": lambda n, k, m, t, e: nearest_choice(cells, (n, k, m, args.mode),
                                                                                     t, e)}
    for label, installed in INSTALLED.items():
        print(f"\ninstalled: {label}")
        for name, picker in pickers.items():
            by_phase: dict[str, list[float]] = {"decode": [], "prefill": []}
            for (n, k, m, _), times in sorted(cells.items()):
                times = {b: t for b, t in times.items() if b in installed}
                chosen = picker(n, k, m, times, env)
                if chosen is None:
                    continue
                by_phase["decode" if is_decode(m) else "prefill"].append(min(times.values()) / times[chosen])
            print(f"  {name:30s} decode {score(by_phase['decode'])}; prefill {score(by_phase['prefill'])}")
    print("\ncells where the rules pick a backend > 5% slower than the fastest (all installed):")
    for (n, k, m, _), times in sorted(cells.items(), key=lambda c: (c[0][2], c[0][0] * c[0][1])):
        chosen = rule_choice(n, k, m, times, env)
        best = min(times, key=times.get)
        if times[best] / times[chosen] < 0.95:
            print(f"  N={n} K={k} M={m}: {chosen} {times[chosen]:.1f} us, fastest {best} {times[best]:.1f} us "
                  f"({times[best] / times[chosen]:.2f})")


if __name__ == "__main__":
    main()
