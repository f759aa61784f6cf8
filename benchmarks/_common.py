"""What every benchmark script shares: arguments, interleaved timing, the machine description, JSON output.

Each script in ``benchmarks/`` builds its parser with :func:`parser` (``--quick`` and ``--json`` for the
runner), times the two sides of a comparison with :func:`interleaved` (warm-up first, then the sides in
turn so that machine load hits all of them alike, medians reported), and ends with :func:`finish`, which
adds :func:`machine` to the result, prints it as one JSON line and writes it to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the runner's flags: ``--quick`` (smoke-test sizes) and ``--json PATH``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    return ap


def interleaved(
    fns: Sequence[Callable[[], Any]], repeats: int, *, warmup: int = 1, cpu_out: list[list[float]] | None = None
) -> list[list[float]]:
    """Seconds of each zero-argument function over ``repeats`` rounds, the functions run in turn.

    Each call's result is waited for with ``jax.block_until_ready``. ``warmup`` untimed rounds come first
    (compilation). Returns one list of wall-clock times per function, in the order given. If ``cpu_out`` is
    a list, one list per function of CPU seconds (``time.process_time``: all threads of the process) is
    appended to it; on a shared machine the wall time also measures the other tenants.
    """
    import jax

    for _ in range(warmup):
        for f in fns:
            jax.block_until_ready(f())
    times: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f())
            times[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    if cpu_out is not None:
        cpu_out.extend(cpu)
    return times


def medians(times: Sequence[Sequence[float]]) -> list[float]:
    """The median of each list of times."""
    return [statistics.median(t) for t in times]


def interleaved_medians(fns: Sequence[Callable[[], Any]], repeats: int, *, warmup: int = 1) -> list[float]:
    """Median seconds of each function, timed with :func:`interleaved`."""
    return medians(interleaved(fns, repeats, warmup=warmup))


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores, accelerator kind and count, jax/jaxlib/python versions, OS."""
    import jax

    devices = jax.devices()
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        jaxlib_version = None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "device_kind": devices[0].device_kind,
        "device_platform": devices[0].platform,
        "device_count": len(devices),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def peak_rss() -> int:
    """This process' peak resident memory in bytes: ``VmHWM`` where Linux has it (since the process started,
    or since ``/proc/self/clear_refs`` was reset; a child process' ``ru_maxrss`` counts its parent's resident
    memory at the fork, ``VmHWM`` does not), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def finish(result: dict[str, Any], json_path: Path | str | None) -> dict[str, Any]:
    """Adds ``result["machine"]``, prints the result as one JSON line and writes it to ``json_path``."""
    result = {**result, "machine": machine()}
    print(json.dumps(result))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (no ties expected)."""
    import numpy as np

    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def alpha_agreement(exact: dict[str, float], estimate: dict[str, float]) -> dict[str, float]:
    """How close per-kernel importances ``estimate`` are to ``exact``: the median and largest relative error
    and the rank correlation (keys ``median_rel_err``, ``max_rel_err``, ``spearman_with_forward``)."""
    import numpy as np

    a = np.array([exact[p] for p in exact])
    e = np.array([estimate[p] for p in exact])
    rel = np.abs(e / a - 1)
    return {"median_rel_err": round(float(np.median(rel)), 4), "max_rel_err": round(float(rel.max()), 4),
            "spearman_with_forward": round(spearman(a, e), 4)}
