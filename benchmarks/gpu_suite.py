"""One command for a lent GPU: the accelerator benchmarks in one call, their JSON named after the device.

Runs, one after the other (they time things, so they must not share the device), each as
``python -m benchmarks.<name> --json OUT/<device>-<name>.json``:

1. ``pruning``: 50.8M weights, ``magnitude_masks(global)`` in the automatic layout and in every layout of
   ``compressjax.radix_select`` side by side with concatenate + sort (the vectorised layouts also with 1 and 8
   histogram copies instead of 32), with the fraction of the memory-bandwidth limit when the device's peak
   is known (``--peak-gbps``, or the table ``PEAK_GBPS`` by device kind);
2. ``quantization``: ``quantize`` / ``fake_quant`` throughput against ``x * 2.0``, QAT overhead, errors, and
   int8 x int8 -> int32 against float32 and bfloat16 matmuls at transformer shapes with the compiled-HLO
   check for an integer dot;
3. ``distillation``: the batch-256 step and the sweep over batches 256, 2048 and 8192.

``<device>`` is ``jax.devices()[0].device_kind`` in lower case with the vendor dropped and other characters
turned to ``-`` ("NVIDIA H200" -> ``h200``; the CPU gives ``cpu``). Each JSON carries the machine (device kind
and count, jax and jaxlib versions) from ``benchmarks/_common.finish``; ``OUT/<device>-suite.json`` lists
every command with its exit status, time, log file and headline ratios, and each command's output is kept
in ``OUT/<device>-<name>.log``. The commands share one time budget (``--budget`` seconds, default 420), so
the whole call stays inside the 8 minutes a lent machine allows; a command that would overrun is stopped
and reported, and the others still run. This process does not import jax (the device belongs to the
commands).

    python -m benchmarks.gpu_suite --out "$OUT"              # on the GPU machine, from the repository root
    python -m benchmarks.gpu_suite --quick --out /tmp/suite  # tiny sizes: a smoke run on the CPU
    python -m benchmarks.gpu_suite --only pruning --out "$OUT"

Copy the JSON files into ``benchmarks/gpu/`` and the ratios into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("pruning", "quantization", "distillation")
# Peak memory bandwidth (GB/s, vendor figures) by a substring of the device kind, for pruning's
# bandwidth_fraction; the first match wins. Unknown devices report GB/s without the fraction.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0))


def slug(device_kind: str) -> str:
    """A file-name part for a device kind: lower case, the vendor dropped, other characters as ``-``."""
    s = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
    s = re.sub(r"^(nvidia|amd|google)-", "", s)
    return s or "device"


def peak_gbps(device_kind: str) -> float | None:
    """The device's peak memory bandwidth from ``PEAK_GBPS``, or None."""
    return next((gbps for key, gbps in PEAK_GBPS if key.lower() in device_kind.lower()), None)


def device_info(timeout: float = 120) -> dict[str, Any]:
    """Device kind, platform and count, jax and jaxlib versions, from a short child process."""
    code = (
        "import json, jax, jaxlib; d = jax.devices(); "
        "print(json.dumps({'device_kind': d[0].device_kind, 'platform': d[0].platform, 'device_count': len(d), "
        "'jax': jax.__version__, 'jaxlib': jaxlib.__version__}))"
    )
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def commands(quick: bool, peak: float | None) -> dict[str, list[str]]:
    """The arguments of each benchmark (after ``python -m benchmarks.<name>``), full or ``--quick``."""
    if quick:
        return {
            "pruning": ["--quick", "--no-rss", "--repeats", "2"],
            "quantization": ["--quick", "--only", "throughput,matmul"],
            "distillation": ["--quick", "--batches", "16,64"],
        }
    return {
        "pruning": ["--repeats", "11", "--banks", "1,8"] + (["--peak-gbps", f"{peak:g}"] if peak else []),
        "quantization": ["--reps", "11"],
        "distillation": ["--batches", "256,2048,8192"],
    }


def headline(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth reading first from one benchmark's JSON."""
    keep: dict[str, Any] = {"ratios": result.get("ratios", {})}
    if name == "pruning":
        keep |= {k: result.get(k) for k in ("ours_ms", "sort_ms", "speedup", "strategy_auto", "gbps_three_passes",
                                             "bandwidth_fraction", "exact_count", "same_masks_every_strategy")}
        keep["strategies"] = result.get("strategies")
    elif name == "quantization":
        keep["int_dot_in_hlo"] = result.get("int_dot_in_hlo")
    elif name == "distillation":
        keep["batches"] = result.get("batches")
    return keep


def run_all(out: Path, quick: bool, budget: float, only: list[str], peak: float | None) -> dict[str, Any]:
    """Runs the benchmarks in ``only`` within ``budget`` seconds; writes their JSON and logs under ``out``."""
    t0 = time.monotonic()
    info = device_info()
    name_of = slug(info["device_kind"])
    peak = peak if peak is not None else peak_gbps(info["device_kind"])
    print(f"{info['device_count']} x {info['device_kind']} ({info['platform']}), jax {info['jax']}; files {out}/{name_of}-*", flush=True)
    suite: dict[str, Any] = {"benchmark": "gpu_suite", "quick": quick, "device": info, "peak_gbps": peak, "runs": {}}
    args_of = commands(quick, peak)
    for name in only:
        json_path = out / f"{name_of}-{name}.json"
        log_path = out / f"{name_of}-{name}.log"
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(json_path), *args_of[name]]
        left = budget - (time.monotonic() - t0)
        record: dict[str, Any] = {"command": " ".join(["python", *cmd[1:]]), "json": json_path.name, "log": log_path.name}
        if left < 10:
            record |= {"ok": False, "error": f"skipped: the {budget:g} s budget is spent"}
            suite["runs"][name] = record
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code = None
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\n[stopped after {left:.0f} s: the suite's budget]"
        log_path.write_text(text)
        record |= {"returncode": code, "seconds": round(time.monotonic() - start, 1), "ok": code == 0 and json_path.exists()}
        if record["ok"]:
            record["result"] = headline(name, json.loads(json_path.read_text()))
        else:
            record["error"] = text[-2000:]
        suite["runs"][name] = record
        print(f"{name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s -> {json_path.name}", flush=True)
    suite["seconds"] = round(time.monotonic() - t0, 1)
    (out / f"{name_of}-suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    return suite


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")), help="folder for the JSON and logs (default $OUT)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, e.g. on the CPU)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all commands together (default 420)")
    ap.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {', '.join(NAMES)}")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth (default: PEAK_GBPS by device kind)")
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in NAMES]
    if bad:
        ap.error(f"--only: unknown benchmark(s) {bad}; choose from {', '.join(NAMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    suite = run_all(args.out, args.quick, args.budget, only, args.peak_gbps)
    print(json.dumps({name: {k: r.get(k) for k in ("ok", "seconds", "json")} for name, r in suite["runs"].items()}))
    return 0 if all(r["ok"] for r in suite["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
