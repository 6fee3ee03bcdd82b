"""The suite's report as text: every figure against its target, and the tables behind them (bench.md)."""

from __future__ import annotations

import math

OPS = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "==": lambda v, b: v == b, "|<=|": lambda v, b: abs(v) <= b}
SHOWN = {">=": "≥ {}", "<=": "≤ {}", "==": "= {}", "|<=|": "abs ≤ {}"}  # no "|": it would split a table cell
EXERCISE_RUNS = {  # exercise run -> its row in the table
    "peer_1thread": "NumPy + SciPy L-BFGS-B, 1 BLAS thread (the reference)",
    "peer": "NumPy + SciPy L-BFGS-B, default BLAS threads",
    "ray": "`dist-sae train` (private local Ray)",
    "attached": "`dist-sae train --address` (a running local Ray head)",
    "local": "`dist-sae train --local`",
    "local32": "`dist-sae train --local compute.dtype=float32`",
    "ray_twopass": "`dist-sae train sparsity.passes=2` (private local Ray, two passes per evaluation)",
    "ray_float32": "`dist-sae train compute.dtype=float32` (private local Ray)",
    "demo": "`dist-sae demo` (data, training on Ray, report)",
}


def targets(ratios: dict[str, float], bounds: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """Every figure with its target (None: none set) and whether it is met (None: skipped, not finite or no target)."""
    out = {}
    for key in [*bounds, *(k for k in ratios if k not in bounds)]:
        value = ratios.get(key)
        op, bound = bounds.get(key, (None, None))
        ok = value is not None and op is not None and math.isfinite(value)
        out[key] = {"target": SHOWN[op].format(bound) if op else None, "value": value, "met": OPS[op](value, bound) if ok else None}
    return out


def markdown(report: dict) -> str:
    """The table of ratios against targets, then the figures behind them."""
    lines = ["| ratio | value | target | met |", "|---|---|---|---|"]
    for key, t in report["targets"].items():
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| `{key}` | {value} | {t['target'] or '—'} | {met} |")
    for key, value in report.get("ratios_784_1024", {}).items():
        lines.append(f"| `{key}` (784-1024) | {value:.3f} | {report['targets'][key]['target']} | — |")
    lines.append("")
    c = report.get("compute", {})
    if c:
        lines += ["| model | rows | streamed ex/s | in-memory PyTorch ex/s | pass 2 autograd / hand-written |", "|---|---|---|---|---|"]
        for r in c.values():
            lines.append(f"| {r['model']} | {r['rows']:,} | {r['examples_per_s']['stream_twopass']:,.0f} | "
                         f"{r['examples_per_s']['memory_best']:,.0f} | {r['ratios']['pass2_autograd_vs_handwritten']:.2f} |")
        lines.append("")
    if "exercise" in report:
        lines += exercise_table(report["exercise"])
    if "gemm" in report:
        lines += gemm_table(report["gemm"])
    if "rss" in report:
        r = report["rss"]
        lines.append("Peak RSS from outside, `dist-sae evaluate` on a local Ray (data.cache_mb=0), "
                     + "; ".join(f"{k} ({v['rows']:,} rows): largest process {v['largest_peak_mb']:.0f} MB, tree {v['tree_peak_mb']:.0f} MB"
                                 for k, v in r["results"].items()) + ".")
        lines.append("")
    if report.get("parts"):
        lines += parts_table(report["parts"])
    m = report["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}, GPU: {'yes' if m['gpu'] else 'none'}; "
                 f"load average {m['loadavg_start'][0]:.1f} at start. Medians of {report['reps']} interleaved repetitions.")
    return "\n".join(lines) + "\n"


def exercise_table(e: dict) -> list[str]:
    lines = [f"Exercise ({e['rows']:,} patches, 64-25-64, {e['iterations']} L-BFGS iterations, the same θ0), "
             "wall time of a fresh process each; J at the final θ by the peer's cost function:", "",
             "| run | wall s | vs peer, 1 thread | final J | J vs peer |", "|---|---|---|---|---|"]
    peer = e["wall_s"]["peer_1thread"]
    for name, label in EXERCISE_RUNS.items():
        if name not in e["wall_s"]:
            continue
        wall = f"{e['wall_s'][name]:.1f}"
        if name in e.get("train_s", {}):
            wall += f" (training {e['train_s'][name]:.1f})"
        j = f"{e['J'][name]:.6g}" if name in e["J"] else ""
        dj = f"{100 * e['J_rel_diff_vs_peer'][name]:+.2f}%" if name in e["J_rel_diff_vs_peer"] and name != "peer_1thread" else ""
        lines.append(f"| {label} | {wall} | {e['wall_s'][name] / peer:.2f}× | {j} | {dj} |")
    if "ray_startup_s" in e:
        lines.append(f"| Ray start-up alone (workers ready) | {e['ray_startup_s']:.1f} | | | |")
    return lines + [""] + [f"Note: {n}." for n in e.get("notes", [])] + [""] * bool(e.get("notes"))


def gemm_table(g: dict) -> list[str]:
    lines = [f"GEMM fraction: {g['model']} float32, {g['rows']:,} rows streamed from HDF5 (units of "
             f"{', '.join(map(str, sorted(set(g['unit_rows']))))} rows), {g['torch_threads']} torch thread(s) on both sides:", "",
             "| evaluation | GFLOP counted | evaluation GFLOP/s | the same GEMMs alone, GFLOP/s | fraction |", "|---|---|---|---|---|"]
    for kind, suffix in (("twopass", ""), ("onepass", "_onepass")):
        r = g[kind]
        lines.append(f"| {kind} | {r['gflop']:.2f} | {r['evaluation_gflop_per_s']:.1f} | {r['gemm_gflop_per_s']:.1f} | "
                     f"{g['ratios']['gemm_fraction_784' + suffix]:.3f} |")
    return lines + [""]


def parts_table(parts: dict) -> list[str]:
    lines = ["Child-process parts (`python -m dist_sae.bench.<part>`; each one's JSON is in bench.json under `parts`):", "",
             "| part | arguments | seconds | status |", "|---|---|---|---|"]
    for name, p in parts.items():
        status = ("skipped: " + p["skipped"]) if "skipped" in p else ("**failed**: " + p["error"].strip().splitlines()[-1][:200]
                                                                       if "error" in p else "ran")
        status += "".join(f"; {n}" for n in p.get("notes", []))
        seconds = f"{p['seconds']:.0f}" if "seconds" in p else "—"
        lines.append(f"| {name} | `{' '.join(p.get('args', [])) or '(defaults)'}` | {seconds} | {status} |")
    return lines + [""]
