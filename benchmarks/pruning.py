"""Global magnitude pruning at scale: radix select (compressjax) vs concatenate + sort.

Builds a pytree of about 50 million float32 weights in several leaves and measures, in one process,
(a) ``magnitude_masks(params, s, scope="global")`` jitted and compiled before timing (the layout that
``strategy="auto"`` picks for this backend), (b) the same selection in each layout of
``compressjax.radix_select`` (``chunked``, ``whole``, ``fused``; interleaved with (a)), and (c) the
straightforward method: concatenate all magnitudes, ``jnp.sort``, take the k-th value as the threshold.
Checks that every layout gives the same masks as (a), that the count is exact, and that the masks agree
with (c) everywhere except among weights tied at the threshold (the exact method splits ties to hit the
count; the sort threshold keeps or drops all of them), then prints the time ratios. With ``--peak-gbps``
it also reports the fraction of the memory-bandwidth limit reached: the selection reads the params three
times (two counting passes and the mask pass), so ``3 * param bytes / time / peak``. Peak RSS of (a) and
(c) is measured in separate subprocesses (``--rss METHOD``).

    python -m benchmarks.pruning            # ~50M weights (several minutes: the sort is slow on CPU)
    python -m benchmarks.pruning --quick    # ~1M weights, seconds
    python -m benchmarks.pruning --strategies chunked --no-rss   # only some layouts, no RSS subprocesses
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import compressjax as cj
from benchmarks._common import finish, interleaved, parser, peak_rss
from compressjax import radix_select

FULL_SHAPES = [(4096, 4096), (4096, 4096), (2048, 4096), (4096, 1024), (1024, 4096), (512, 1000), (1000,)]
QUICK_SHAPES = [(512, 512), (512, 512), (256, 1024), (1024, 128), (100, 10)]
SPARSITY = 0.7


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    # ndim >= 2 leaves are selected by the default `where`; the 1-D one is a bias left alone.
    params = {
        f"layer{i}/kernel" if len(s) > 1 else f"layer{i}/bias": jax.random.normal(k, s, jnp.float32)
        for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
    }
    return jax.block_until_ready(params)


def ours(params, sparsity):
    return cj.magnitude_masks(params, sparsity, scope="global")


def by_strategy(strategy: str, banks: int = radix_select.BANKS):
    """``magnitude_masks(params, s, scope="global")`` with the selection's layout fixed to ``strategy`` (and
    at most ``banks`` histogram copies): the same steps (the selected leaves, the exact count in-graph,
    ``exact_keep_masks``) without the checks."""
    def masks(params, sparsity):
        sel = [p for p, w in params.items() if w.ndim >= 2]
        leaves = [params[p] for p in sel]
        k = radix_select.round_half_even_count(sparsity, sum(int(w.size) for w in leaves))
        out = dict.fromkeys(params)
        out.update(zip(sel, radix_select.exact_keep_masks(leaves, k, strategy=strategy, banks=banks), strict=True))
        return out

    return masks


def sort_baseline(params, sparsity):
    """Concatenate |w| of the selected leaves, sort, threshold at the k-th smallest (prunes all ties)."""
    sel = {p: w for p, w in params.items() if w.ndim >= 2}
    flat = jnp.concatenate([jnp.abs(w).ravel() for w in sel.values()])
    n = flat.size
    k = jnp.round(sparsity * n).astype(jnp.int32)
    srt = jnp.sort(flat)
    t = srt[jnp.maximum(k - 1, 0)]
    return {p: (jnp.abs(w) > t) | (k == 0) if p in sel else None for p, w in params.items()}, t


def _sort_masks(params, sparsity):
    return sort_baseline(params, sparsity)[0]


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_fn(fn, *args, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn(*args)`` after a warm-up call (compile)."""
    return interleaved([lambda: fn(*args)], repeats)[0]


def rss_child(method: str, quick: bool) -> dict:
    """Runs in a subprocess: peak RSS of one method beyond the params it was given."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    fn = jax.jit(ours if method == "ours" else _sort_masks)
    s = jnp.float32(SPARSITY)
    # Compile on a tiny tree first would not reuse the executable; compile the real one via lower() on
    # shapes only, before any params exist, so compile memory is not counted against the run.
    specs = {
        f"layer{i}/kernel" if len(sh) > 1 else f"layer{i}/bias": jax.ShapeDtypeStruct(sh, jnp.float32)
        for i, sh in enumerate(shapes)
    }
    compiled = fn.lower(specs, s).compile()
    gc.collect()
    base = current_rss()
    params = make_params(shapes)
    params_bytes = sum(int(w.nbytes) for w in params.values())
    gc.collect()
    reset = reset_peak_rss()  # count only the masking call from here on
    after_params = current_rss()
    masks = jax.block_until_ready(compiled(params, s))
    masks_bytes = sum(int(m.nbytes) for m in jax.tree.leaves(masks))
    peak = peak_rss()
    return {
        "method": method,
        "peak_reset": reset,
        "rss_before_params": base,
        "rss_after_params": after_params,
        "peak_rss": peak,
        "params_bytes": params_bytes,
        "masks_bytes": masks_bytes,
        # what the call needs beyond the resident process (which holds the params) and its output masks
        "extra_bytes": peak - after_params - masks_bytes,
    }


def alternatives(quick: bool, repeats: int = 5) -> dict:
    """Times one counting pass of each candidate scheme on one leaf (what compressjax.radix_select chose between)."""
    n = (1 << 20) if quick else 10 * (1 << 20)
    x = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    b = lax.bitcast_convert_type(jnp.abs(x), jnp.uint32)
    t = jnp.uint32(0x3F000000)
    ts7 = jnp.arange(1, 8, dtype=jnp.uint32) * jnp.uint32(0x3F800000 // 8)
    chunked = jax.jit(
        lambda x: radix_select._fold_chunks(
            x,
            lambda acc, bb, v, i: radix_select._histogram(
                jnp.where(v, (bb >> 15).astype(jnp.int32), 65536) if v is not None else (bb >> 15).astype(jnp.int32),
                65536,
                acc,
            ),
            jnp.zeros((65537,), jnp.int32),
        )
    )
    cands = {
        "1 threshold: sum(bits < t) (31 passes needed)": (jax.jit(lambda b: jnp.sum(b < t, dtype=jnp.int32)), b),
        "7 thresholds in one fused pass (11 passes needed)": (
            jax.jit(lambda b: jnp.sum(b[:, None] < ts7[None, :], axis=0, dtype=jnp.int32)),
            b,
        ),
        "scatter-add histogram, 2**16 bins, whole leaf (2 passes)": (
            jax.jit(lambda b: jnp.zeros(65537, jnp.int32).at[(b >> 15).astype(jnp.int32)].add(1)),
            b,
        ),
        "jnp.bincount, 2**16 bins (2 passes)": (
            jax.jit(lambda b: jnp.bincount((b >> 15).astype(jnp.int32), length=65536)),
            b,
        ),
        "scatter-add histogram, 2**16 bins, chunks of 2**18 (chosen)": (chunked, x),
    }
    out = {}
    print(f"one pass over {n:,} float32 weights (median of {repeats}):")
    for name, (fn, arg) in cands.items():
        med = statistics.median(time_fn(fn, arg, repeats=repeats)) * 1e3
        out[name] = med
        print(f"  {med:8.1f} ms  {name}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = parser(__doc__)  # --quick: ~1M weights, seconds
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (median reported)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--alternatives", action="store_true", help="only time one pass of each candidate scheme")
    ap.add_argument("--strategies", default=",".join(radix_select.STRATEGIES),
                    help="comma-separated layouts of the selection to time next to the automatic one (default: all)")
    ap.add_argument("--banks", default="", help="also time the whole and fused layouts with at most these numbers of "
                    f"histogram copies, e.g. 1,8 (default {radix_select.BANKS}); entries named like 'whole/banks=1'")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="the device's peak memory bandwidth in GB/s (for bandwidth_fraction)")
    ap.add_argument("--rss", choices=["ours", "sort"], default=None, help=argparse.SUPPRESS)
    return ap


def parse_layouts(ap: argparse.ArgumentParser, args) -> tuple[list[str], list[int]]:
    """``(strategies, banks)`` from the flags; a bad value is a usage error."""
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    for name in strategies:
        if name not in radix_select.STRATEGIES:
            ap.error(f"--strategies: {name!r} is not one of {radix_select.STRATEGIES}")
    try:
        banks = [int(b) for b in args.banks.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--banks must be comma-separated integers, got {args.banks!r}")
    if any(b < 1 for b in banks):
        ap.error(f"--banks must be positive, got {args.banks!r}")
    return strategies, banks


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.rss:
        print(json.dumps(rss_child(args.rss, args.quick)))
        return {}
    if args.alternatives:
        res = {"benchmark": "pruning_alternatives", "quick": args.quick, "pass_ms": alternatives(args.quick)}
        return finish(res, args.json)
    strategies, banks = parse_layouts(ap, args)
    params = make_params(QUICK_SHAPES if args.quick else FULL_SHAPES)
    s = jnp.float32(SPARSITY)
    layouts = compiled_layouts(params, s, strategies, banks)
    times = time_methods(params, s, layouts, args.repeats, args.quick)
    checks = check_masks(params, s, layouts)
    result = report(params, times, checks, args.peak_gbps, args.quick)
    if not args.no_rss:
        del params
        result.update(rss_runs(args.quick))
    result = finish(result, args.json)
    if not checks["ok"]:
        raise SystemExit("mask check failed")
    return result


def compiled_layouts(params, s, strategies: list[str], banks: list[int]) -> dict:
    """The selection in each requested layout, jitted; with ``banks``, the vectorised layouts compiled again
    with at most that many histogram copies (named like ``whole/banks=1``)."""
    layouts = {name: jax.jit(by_strategy(name)) for name in strategies}
    for nb in banks:
        for name in (n for n in strategies if n != "chunked"):
            layouts[f"{name}/banks={nb}"] = jax.jit(by_strategy(name, banks=nb)).lower(params, s).compile()
    return layouts


def time_methods(params, s, layouts: dict, repeats: int | None, quick: bool) -> dict:
    """Wall times: ``magnitude_masks`` and the layouts in turn (machine load hits them alike), then the slow
    sort alone."""
    f_ours, f_sort = jax.jit(ours), jax.jit(sort_baseline)
    fns = [lambda: f_ours(params, s)] + [lambda f=f: f(params, s) for f in layouts.values()]
    t_all = interleaved(fns, repeats or 5)
    return {"ours": t_all[0], "layouts": dict(zip(layouts, t_all[1:], strict=True)),
            "sort": time_fn(f_sort, params, s, repeats=repeats or (3 if quick else 2))}


def check_masks(params, s, layouts: dict) -> dict:
    """Exact count, agreement with the sort threshold off ties, and the same masks from every layout."""
    n_sel = sum(int(w.size) for w in params.values() if w.ndim >= 2)
    # The sparsity is passed as a float32 array (traced under jit): k is its exact product with n, rounded
    # half to even (float32(0.7) = 0.69999999, so this can differ from round(0.7 * n) by one).
    k = round(Fraction(float(np.float32(SPARSITY))) * n_sel)
    m_ours = jax.jit(ours)(params, s)
    m_sort, thr = jax.jit(sort_baseline)(params, s)
    pruned = sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(m_ours))
    disagree = ties = disagree_off_tie = 0
    for p, w in params.items():
        if m_ours[p] is None:
            continue
        a, b = np.asarray(m_ours[p]), np.asarray(m_sort[p])
        tie = np.abs(np.asarray(w)) == np.asarray(thr)
        disagree += int(np.sum(a != b))
        ties += int(np.sum(tie))
        disagree_off_tie += int(np.sum((a != b) & ~tie))
    same = {}
    for name, f in layouts.items():
        m = f(params, s)
        same[name] = all(m[p] is None if m_ours[p] is None else bool(np.array_equal(m[p], m_ours[p])) for p in params)
    print(f"pruned exactly {pruned:,} (k = {k:,}): {pruned == k}; masks differ at {disagree} positions, "
          f"all among the {ties} weights tied at the threshold: {disagree_off_tie == 0}")
    return {"k": k, "exact": pruned == k, "agree_off_ties": disagree_off_tie == 0, "same": same,
            "ok": pruned == k and disagree_off_tie == 0 and all(same.values())}


def report(params, times: dict, checks: dict, peak_gbps: float | None, quick: bool) -> dict:
    """Prints the timings and returns the result dict (ratios to the sort, bandwidth)."""
    n_sel = sum(int(w.size) for w in params.values() if w.ndim >= 2)
    sel_bytes = sum(int(w.nbytes) for w in params.values() if w.ndim >= 2)
    auto = radix_select.resolve_strategy("auto", list(params.values()))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs; "
          f"{n_sel:,} selected float32 weights in {sum(w.ndim >= 2 for w in params.values())} leaves; "
          f"sparsity {SPARSITY} -> k = {checks['k']:,}; strategy auto = {auto}")
    med_o, med_s = statistics.median(times["ours"]), statistics.median(times["sort"])

    def bandwidth(seconds: float) -> dict:
        gbps = 3 * sel_bytes / seconds / 1e9
        return {"gbps_three_passes": gbps} | ({"bandwidth_fraction": gbps / peak_gbps} if peak_gbps else {})

    def runs(ts: list[float]) -> str:
        return ", ".join(f"{t * 1e3:.3g}" for t in ts)

    print(f"magnitude_masks(global) [{auto}]: median {med_o * 1e3:9.3f} ms  (runs: {runs(times['ours'])})")
    strat_res = {}
    for name, ts in times["layouts"].items():
        med = statistics.median(ts)
        same = checks["same"][name]
        strat_res[name] = {"ms": med * 1e3, "speedup": med_s / med, "same_masks": same, **bandwidth(med)}
        print(f"  strategy {name:15s} : median {med * 1e3:9.3f} ms  speed-up {med_s / med:7.2f}x  "
              f"{strat_res[name]['gbps_three_passes']:8.1f} GB/s (3 passes)  same masks: {same}  (runs: {runs(ts)})")
    print(f"concat + jnp.sort              : median {med_s * 1e3:9.3f} ms  (runs: {runs(times['sort'])})")
    bw = bandwidth(med_o)
    print(f"speed-up: {med_s / med_o:.2f}x (target >= 50x on CPU, >= 5x on GPU); "
          f"{bw['gbps_three_passes']:.1f} GB/s over three passes"
          + (f" = {bw['bandwidth_fraction']:.1%} of {peak_gbps:g} GB/s (target >= 25%)" if peak_gbps else ""))
    return {
        "benchmark": "pruning",
        "n_weights": n_sel,
        "quick": quick,
        "ours_ms": med_o * 1e3,
        "sort_ms": med_s * 1e3,
        "speedup": med_s / med_o,
        "exact_count": checks["exact"],
        "agree_except_ties": checks["agree_off_ties"],
        "strategy_auto": auto,
        "params_bytes": sel_bytes,
        **bw,
        "peak_gbps": peak_gbps,
        "strategies": strat_res,
        "same_masks_every_strategy": all(checks["same"].values()),
        # what benchmarks/run.py shows
        "ratios": {"speedup_vs_sort": med_s / med_o} | {f"speedup_{n}": r["speedup"] for n, r in strat_res.items()},
    }


def rss_runs(quick: bool) -> dict:
    """Peak RSS of ``magnitude_masks`` and of the sort, each in its own subprocess."""
    out = {}
    for method in ("ours", "sort"):
        cmd = [sys.executable, "-m", "benchmarks.pruning", "--rss", method] + (["--quick"] if quick else [])
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            # On a GPU this process keeps its preallocated device memory: the child must not ask for
            # the same share again (it measures host RSS either way).
            env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"{method}_rss"] = r
        mib = 1 / 2**20
        print(f"peak RSS {method:>4}: {r['peak_rss'] * mib:8.0f} MiB = resident with params "
              f"{r['rss_after_params'] * mib:.0f} MiB (params {r['params_bytes'] * mib:.0f} MiB) "
              f"+ masks {r['masks_bytes'] * mib:.0f} MiB + extra {r['extra_bytes'] * mib:.0f} MiB"
              f"{'' if r['peak_reset'] else ' (peak counter not resettable: includes start-up)'}")
    return out


if __name__ == "__main__":
    main()
