"""Runs every benchmark script in ``benchmarks/``, prints one table of ratios, writes ``results.json``.

Each script ``benchmarks/<name>.py`` is run as ``python -m benchmarks.<name> [--quick] --json FILE`` from the
repository root, one after the other (they time things, so they must not share the CPU). Its JSON is
collected under its name, with the machine description: CPU model, cores, device kind, jax version.

The table shows each script's ``"ratios"`` (or, where a script has none, its ``"summary"``, or else every
number whose key names a ratio). A script that fails is reported with its exit status and the tail of its
output, and the runner exits with status 1.

Usage: ``python -m benchmarks [--quick] [--only pruning,export] [--out benchmarks/results/results.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SKIP = {"__init__", "__main__", "run", "summary", "gpu_suite"}  # summary.py writes BENCHMARKS.md; gpu_suite runs others


def discover() -> list[str]:
    """Names of the benchmark scripts (``benchmarks/*.py`` except this runner and ``summary``), sorted."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP and not p.stem.startswith("_"))


def _numbers(node: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Flattens nested dicts/lists to ``{"a.b": number}`` (list items named by their ``"name"`` key)."""
    out: dict[str, float] = {}
    if depth > 4:
        return out
    if isinstance(node, bool):
        return out
    if isinstance(node, int | float):
        if math.isfinite(node):
            out[prefix] = float(node)
        return out
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(v.get("name", i)) if isinstance(v, dict) else str(i), v) for i, v in enumerate(node))
    else:
        return out
    for k, v in items:
        out.update(_numbers(v, f"{prefix}.{k}" if prefix else str(k), depth + 1))
    return out


def headline(result: Any) -> dict[str, float]:
    """The numbers shown in the table for one script's JSON (see the module docstring)."""
    if isinstance(result, dict):
        for key in ("ratios", "summary"):
            if isinstance(result.get(key), dict) and result[key]:
                return _numbers(result[key])
    return {k: v for k, v in _numbers(result).items() if "ratio" in k.rsplit(".", 1)[-1]}


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Runs ``benchmarks/<name>.py`` in a subprocess and returns its record."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, f"{name}.json")
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", json_path] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            code = None
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = f"timed out after {timeout:.0f} s"
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"command": " ".join(["python", *cmd[1:3], *(["--quick"] if quick else [])]),
                                  "returncode": code, "seconds": seconds}
        result = None
        if code == 0:
            if os.path.exists(json_path):
                with open(json_path) as f:
                    result = json.load(f)
            else:  # fall back to the last JSON line printed
                for line in reversed(stdout.strip().splitlines()):
                    try:
                        result = json.loads(line)
                        break
                    except json.JSONDecodeError:
                        continue
        record["ok"] = code == 0 and result is not None
        record["result"] = result
        record["ratios"] = headline(result) if result is not None else {}
        if not record["ok"]:
            record["error"] = (stderr or stdout)[-2000:] or "no JSON output"
        return record


def _finite(node: Any) -> Any:
    """Replaces NaN and infinities (which strict JSON cannot hold) by their names as strings."""
    if isinstance(node, float) and not math.isfinite(node):
        return str(node)
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(v) for v in node]
    return node


def print_table(records: dict[str, dict[str, Any]]) -> None:
    """One table: benchmark, ratio name, value (or the failure)."""
    rows = []
    for name, rec in records.items():
        if not rec["ok"]:
            status = "timeout" if rec["returncode"] is None else f"exit {rec['returncode']}"
            rows.append((name, f"FAILED ({status})", ""))
            continue
        if not rec["ratios"]:
            rows.append((name, "(no ratios reported)", ""))
        for key, value in rec["ratios"].items():
            rows.append((name, key, f"{value:.4g}"))
    widths = [max(len(r[i]) for r in [("benchmark", "ratio", "value"), *rows]) for i in range(3)]
    line = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"  # noqa: E731
    print(line(("benchmark", "ratio", "value")))
    print("-" * (sum(widths) + 4))
    for r in rows:
        print(line(r))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Runs every benchmarks/*.py script and prints one table of ratios.")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script (a smoke run)")
    ap.add_argument("--only", default=None, help="comma-separated script names (default: all)")
    ap.add_argument("--out", default=str(HERE / "results" / "results.json"), help="results file (default benchmarks/results/results.json)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per script")
    args = ap.parse_args(argv)
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in wanted]

    t0 = time.perf_counter()
    records = {}
    for name in names:
        print(f"running benchmarks/{name}.py{' --quick' if args.quick else ''} ...", flush=True)
        records[name] = run_one(name, args.quick, args.timeout)
        rec = records[name]
        print(f"  {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.1f} s", flush=True)
        if not rec["ok"]:
            print("  " + rec["error"].strip().replace("\n", "\n  ")[-800:], flush=True)
    results = {"machine": machine(), "quick": bool(args.quick), "seconds": time.perf_counter() - t0,
               "benchmarks": records}
    print()
    print_table(records)
    m = results["machine"]
    print(f"\nmachine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['device_kind']} x{m['device_count']}, "
          f"jax {m['jax']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(_finite(results), f, indent=2, allow_nan=False, default=str)
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
