"""Writes the summary table of BENCHMARKS.md from ``benchmarks/results/results.json``, so that the two cannot disagree.

The table sits between the lines ``<!-- summary:begin -->`` and ``<!-- summary:end -->`` of BENCHMARKS.md;
this script replaces what is between them. Each row reads one number from a script's JSON in
``results.json`` (what ``python -m benchmarks`` wrote), compares it with its target and says "met" or
"missed" by that comparison alone. A test checks that the block matches ``results.json``.

    python -m benchmarks.summary            # rewrite the block in BENCHMARKS.md
    python -m benchmarks.summary --check    # exit 1 if the block is stale
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "results.json"
DOC = HERE.parent / "BENCHMARKS.md"
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"


def _get(result: dict, path: str) -> Any:
    node: Any = result
    for key in path.split("."):
        node = node[key]
    return node


def _throughput(r: dict, key: str) -> float:
    return r["throughput"][key]["mb_per_s"]


# (benchmark, measure, value(result) -> float, format, comparison, target, target text)
Row = tuple[str, str, Callable[[dict], float], str, Callable[[float, float], bool], float, str]
LE, GE = operator.le, operator.ge
ROWS: list[Row] = [
    ("pruning", "`magnitude_masks(global)` vs concat + sort, {n_weights:,} weights ({ours_ms:.0f} ms vs {sort_s:.1f} s)",
     lambda r: r["speedup"], "{:.0f}x", GE, 50, ">= 50x"),
    ("quantization", "QAT step / float step, MLP int8", lambda r: r["ratios"]["qat_mlp_int8"], "{:.2f}", LE, 1.3, "<= 1.3"),
    ("quantization", "QAT step / float step, MLP int4", lambda r: r["ratios"]["qat_mlp_int4"], "{:.2f}", LE, 1.3, "<= 1.3"),
    ("quantization", "QAT step / float step, CNN int8", lambda r: r["ratios"]["qat_cnn_int8"], "{:.2f}", LE, 1.3, "<= 1.3"),
    ("quantization", "QAT step / float step, CNN int4", lambda r: r["ratios"]["qat_cnn_int4"], "{:.2f}", LE, 1.3, "<= 1.3"),
    ("quantization", "`quantize` throughput / `x * 2.0` throughput, {n_quant:,} weights",
     lambda r: r["ratios"]["quantize_throughput"], "{:.2f}", GE, 0.5, ">= 0.5"),
    ("quantization", "int4 per-channel mean error: absmax / Qwix absmax",
     lambda r: r["ratios"]["int4_channel_absmax_over_qwix"], "{:.3f}", LE, 1.0, "<= 1"),
    ("quantization", "int4 per-channel mean error: mse / absmax calibration",
     lambda r: r["ratios"]["int4_channel_mse_over_absmax"], "{:.3f}", LE, 0.9, "<= 0.9"),
    ("distillation", "step / (teacher forward + student step)", lambda r: r["ratios"]["parts"], "{:.2f}", LE, 1.1, "<= 1.1"),
    ("distillation", "90% masks + 4-bit step / plain step", lambda r: r["ratios"]["compress"], "{:.2f}", LE, 1.25, "<= 1.25"),
    ("distillation", "PyTorch eager step ({torch}) / jit step", lambda r: r["ratios"]["torch"], "{:.2f}", GE, 1.0, ">= 1.0"),
    ("distillation", "step FLOP rate / 2048^3 matmul FLOP rate ({step_gflops:.0f} / {mm_gflops:.0f} GFLOP/s)",
     lambda r: r["ratios"]["flops"], "{:.2f}", GE, 0.8, ">= 0.8"),
    ("export", "LeNet-300-100, 92% pruned + int4, vs float32 bytes",
     lambda r: r["summary"]["lenet_prune92_int4_ratio"], "{:.1f}x", GE, 40, ">= 40x"),
    ("export", "save, {export_weights:,} dense float32 weights (MB/s of float32)",
     lambda r: _throughput(r, "dense save"), "{:.0f} MB/s", GE, 100, ">= 100 MB/s"),
    ("export", "load, the same file", lambda r: _throughput(r, "dense load"), "{:.0f} MB/s", GE, 100, ">= 100 MB/s"),
    ("demo", "distilled / student test accuracy, mean of {n_seeds} seeds ({distilled:.2%} vs {student:.2%})",
     lambda r: r["ratios"]["distilled_over_student"], "{:.3f}", GE, 1.0, ">= 1.0"),
]


def _context(results: dict) -> dict[str, Any]:
    """Numbers quoted inside the measure texts (sizes, absolute times)."""
    b = {name: rec["result"] for name, rec in results["benchmarks"].items() if rec.get("ok")}
    ctx: dict[str, Any] = {}
    if "pruning" in b:
        ctx.update(n_weights=b["pruning"]["n_weights"], ours_ms=b["pruning"]["ours_ms"], sort_s=b["pruning"]["sort_ms"] / 1e3)
    if "quantization" in b:
        ctx["n_quant"] = b["quantization"]["throughput"]["n"]
    if "distillation" in b:
        r = b["distillation"]
        ctx.update(step_gflops=r["step_gflops_per_s"], mm_gflops=r["matmul_gflops_per_s"],
                   torch=str(r.get("torch", "")).split(",")[0])
    if "export" in b:
        ctx["export_weights"] = b["export"]["throughput"]["weights"]
    if "demo" in b:
        r = b["demo"]
        ctx.update(n_seeds=len(r["seeds"]), distilled=r["distilled_mean"], student=r["student_mean"])
    return ctx


def table(results: dict) -> str:
    """The Markdown block (without the markers) for ``results`` (the content of ``results.json``)."""
    m = results["machine"]
    lines = [
        f"Generated by `python -m benchmarks.summary` from `benchmarks/results/results.json` "
        f"(`python -m benchmarks{' --quick' if results.get('quick') else ''}`, {results['seconds']:.0f} s): "
        f"{m['cpu_model']}, {m['cpu_cores']} cores, {m['device_kind']} x{m['device_count']}, jax {m['jax']}, "
        f"Python {m['python']}.",
        "",
        "| benchmark | measure | result | target | |",
        "|---|---|---:|---:|---|",
    ]
    ctx = _context(results)
    records = results["benchmarks"]
    missing = []
    for name, measure, value, fmt, cmp, target, target_text in ROWS:
        rec = records.get(name)
        if rec is None or not rec.get("ok"):
            missing.append(name)
            continue
        v = float(value(rec["result"]))
        status = "met" if math.isfinite(v) and cmp(v, target) else "**missed**"
        shown = fmt.format(v)
        lines.append(f"| {name} | {measure.format(**ctx)} | {shown if status == 'met' else f'**{shown}**'} "
                     f"| {target_text} | {status} |")
    for name in sorted(set(missing)):
        lines.append(f"| {name} | not in this `results.json` (not run, or failed) | | | |")
    return "\n".join(lines)


def render(doc: str, results: dict) -> str:
    """``doc`` with the block between the markers replaced by :func:`table`."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"BENCHMARKS.md must hold the markers {BEGIN} and {END} once each, in that order")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table(results)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md's block differs from results.json")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    doc = args.doc.read_text()
    new = render(doc, results)
    if args.check:
        if new != doc:
            print(f"{args.doc} is stale: run python -m benchmarks.summary", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        args.doc.write_text(new)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
