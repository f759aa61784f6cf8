"""Benchmark: compress the real pretrained all-MiniLM-L6-v2 and measure what is lost.

For each setting, on the evaluation sentences (every 5th of the ~930 prose sentences of the standard
library's ``pydoc_data.topics``; the other 80% train): mean and minimum cosine similarity to the float
model's embeddings, the overlap of each sentence's 10 nearest neighbours, the bytes of the file written by
``compressjax.save`` (ratio against the float32 weights, 4 bytes per value as in ``model.safetensors``),
and the forward time of one batch of 32 sentences against the float model timed in the same process
(``speed_ratio = float time / setting time``; above 1 is faster).

Settings: ``int8`` (per channel, embeddings included), ``int4-g32``/``int4-g64``/``int4-g128`` (PTQ, the best
of absmax and the clipping search for least |error| or least squares, int8 embeddings), ``int4-qad`` (QAD:
float teacher, fake-quant int4 student, cosine loss on the pooled embeddings, every weight matrix in 4
bits), ``2:4`` / ``2:4+int8`` / ``50%`` / ``50%+int8`` (pruning of the encoder's linear layers, before and
after a short distillation from the float model), ``int8-matmul`` (int8 x int8 -> int32 matmuls with
dynamic per-token activation scales, ``quantized_dot_general(mode="int")``).

Usage::

    python -m benchmarks.minilm --json minilm.json --save-dir minilm-models   # 20-35 min, 2 shared cores
    python -m benchmarks.minilm --quick                                       # smoke test
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import compressjax as cj  # noqa: E402
from benchmarks import _minilm_codebook  # noqa: E402  (weight sharing settings, issue 12)
from benchmarks._common import finish, interleaved_medians, parser  # noqa: E402
from compressjax.models import minilm  # noqa: E402

ENCODER_KERNELS = r"layer_\d+/.*kernel$"


# ----------------------------------------------------------------------------------------------- rules
# PTQ calibrations tried for int4: absmax, and the clipping search minimising the mean |error|^p for
# p = 1 (the library's default) and p = 2 (least squares).
CALIBRATIONS = {"absmax": {"calibration": "absmax"}, "mse": {"calibration": "mse"},
                "mse-p2": {"calibration": "mse", "error_power": 2.0}}


def ptq_int4_rules(group_size: int, calibration: str) -> dict:
    """int4 per-group linear layers, int8 per-row embeddings (the PTQ baseline of the issue)."""
    return {
        r"embeddings/(word|position|token_type)$": cj.QuantSpec(bits=8, channel_axes=(0,)),
        r"kernel$": cj.QuantSpec(bits=4, group_size=group_size, **CALIBRATIONS[calibration]),
    }


def qad_rules(group_size: int = 32, embed_group: int = 128) -> dict:
    """Every weight matrix in 4 bits: Dense kernels per output channel and group of ``group_size`` inputs,
    the word embeddings per row and group of ``embed_group`` features; the small position and token-type
    tables (1% of the weights) in int8. Half the weights are the word embeddings, so they must be 4-bit
    too for a file 7x smaller than float32."""
    return {
        r"embeddings/word$": cj.QuantSpec(bits=4, channel_axes=(0,), group_size=embed_group, group_axis=1),
        r"embeddings/(position|token_type)$": cj.QuantSpec(bits=8, channel_axes=(0,)),
        r"kernel$": cj.QuantSpec(bits=4, group_size=group_size),
    }


# ----------------------------------------------------------------------------------------------- helpers
def length_batches(sentences: list[str], batch_size: int, widths=(32, 48, 80, 128, 256)) -> list[tuple]:
    """Length-sorted batches (little padding), padded to a few fixed widths so that jit compiles rarely."""
    ids, mask = minilm.tokenize(sentences)
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < batch_size:  # top up the last batch with the shortest sentences
            idx = np.concatenate([idx, order[: batch_size - len(idx)]])
        need = int(lengths[idx].max())
        width = next(w for w in widths if w >= need)
        b_ids = np.zeros((batch_size, width), np.int32)
        b_mask = np.zeros((batch_size, width), np.int32)
        w = min(width, ids.shape[1])
        b_ids[:, :w], b_mask[:, :w] = ids[idx, :w], mask[idx, :w]
        out.append((jnp.asarray(b_ids), jnp.asarray(b_mask)))
    return out


def distill(params: Any, teacher: Any, batches: list, *, steps: int, seconds: float, lr: float, transform=None,
            masks=None, frozen: str | None = None, seed: int = 0) -> tuple[Any, dict]:
    """Distill the float ``teacher`` into ``params`` with ``make_distill_step``: ``steps`` steps at most,
    stopping before the step that would end past ``seconds`` of wall time (compilation included).

    The loss is ``cosine_loss`` on the pooled, normalised embeddings; Adam with a cosine decay from ``lr`` to
    ``lr / 10`` over ``steps``. ``transform`` (fake quantization, masking) is the step's
    ``student_transform``; with ``masks``, ``keep_masked`` keeps pruned weights at 0; leaves whose path
    matches ``frozen`` get no updates (and, their gradient being unused, XLA does not compute it).
    """
    apply = lambda p, b: minilm.encode(p, b[0], b[1])  # noqa: E731
    schedule = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1)
    tx = optax.adam(schedule)
    if frozen is not None:
        labels = jax.tree_util.tree_map_with_path(
            lambda kp, _: "frozen" if cj.tree.selector(frozen)(cj.tree.path_to_str(kp), _) else "train", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if masks is not None:
        tx = optax.chain(tx, cj.keep_masked(masks))
    step = cj.make_distill_step(apply, apply, tx, loss_fn=lambda s, t, _: cj.cosine_loss(s, t),
                                student_transform=transform)
    # A copy: the step donates the student's buffers, and the teacher's must stay alive.
    state = cj.DistillState.create(jax.tree.map(jnp.copy, params), tx)
    rng = np.random.default_rng(seed)
    t0 = last = time.perf_counter()
    done, losses, step_seconds = 0, [], 0.0
    while True:
        for i in rng.permutation(len(batches)):
            state, metrics = step(state, teacher, (batches[i], None))
            done += 1
            losses.append(jax.block_until_ready(metrics["loss"]))  # a sync per step keeps the time check honest
            now = time.perf_counter()
            step_seconds, last = now - last, now
            # Stop before a step that would end past the budget (the first step's time includes compilation).
            if done >= steps or now - t0 + (step_seconds if done > 1 else 0.0) > seconds:
                jax.block_until_ready(state.params)
                info = {"train_seconds": round(time.perf_counter() - t0, 1), "train_steps": done,
                        "epochs": round(done / len(batches), 2), "final_loss": round(float(np.mean(losses[-8:])), 5)}
                print(f"  distilled {info}", flush=True)
                return state.params, info


class Bench:
    """Evaluation sentences, the float reference, timing and saving shared by the settings."""

    def __init__(self, params, evaluation: list[str], save_dir: Path, timing_runs: int):
        self.params = params
        self.evaluation = evaluation
        self.ref = minilm.embed(evaluation, params)
        self.save_dir = save_dir
        self.timing_runs = timing_runs
        self.float_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
        ids, mask = minilm.tokenize(evaluation[:32])
        self.timing_batch = (jnp.asarray(ids), jnp.asarray(mask))
        self.float_fwd = jax.jit(lambda p, i, m: minilm.encode(p, i, m))
        self.results: list[dict] = []

    def speed_ratio(self, fwd, params) -> tuple[float, float, float]:
        """Median forward times of the batch of 32 for float and this setting, and their ratio.

        Both are compiled and warmed up first, then timed alternately (float, setting, float, ...), so a
        change of load on the shared machine hits both alike.
        """
        batch = self.timing_batch
        t_float, t_this = interleaved_medians(
            [lambda: self.float_fwd(self.params, *batch), lambda: fwd(params, *batch)], self.timing_runs
        )
        return t_float / t_this, t_float, t_this

    def quality(self, params, dot_general=None) -> dict:
        got = minilm.embed(self.evaluation, params, dot_general=dot_general)
        cos = minilm.cosines(self.ref, got)
        return {"mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6),
                "knn_overlap": round(minilm.knn_overlap(self.ref, got, k=10), 4)}

    def record(self, name: str, file_params, *, masks=None, embed_params=None, fwd=None, timing_params=None,
               dot_general=None, **extra) -> dict:
        """Save ``file_params``, load the file back, evaluate the loaded model, time the forward pass."""
        path = self.save_dir / f"{name}.cjx"
        cj.save(path, file_params, masks=masks)
        nbytes = path.stat().st_size
        loaded = cj.load(path)  # evaluate what a user gets from the file
        q = self.quality(loaded if embed_params is None else embed_params, dot_general)
        fwd = fwd if fwd is not None else jax.jit(lambda p, i, m: minilm.encode(cj.dequantize_params(p), i, m))
        ratio, t_float, t_this = self.speed_ratio(fwd, file_params if timing_params is None else timing_params)
        row = {"name": name, **q, "bytes": int(nbytes), "ratio": round(self.float_bytes / nbytes, 3),
               "speed_ratio": round(ratio, 3), "forward_ms": round(1e3 * t_this, 1),
               "float_forward_ms": round(1e3 * t_float, 1), "file": str(path), **extra}
        self.results.append(row)
        print(f"{name:12s} mean cos {q['mean_cosine']:.5f}  min {q['min_cosine']:.5f}  10-NN {q['knn_overlap']:.3f}  "
              f"{nbytes / 1e6:7.2f} MB  {row['ratio']:5.2f}x smaller  speed {row['speed_ratio']:.2f}x  "
              f"{ {k: v for k, v in extra.items() if k != 'before_distill'} }", flush=True)
        return row


def port_min_cosine(params) -> float:
    ref = np.load(ROOT / "tests" / "fixtures" / "minilm_reference.npz")
    got = minilm.embed([str(s) for s in ref["sentences"]], params)
    return float(minilm.cosines(got, ref["embeddings"]).min())


def run_qad(bench: Bench, batches: list, *, steps: int, seconds: float) -> None:
    """int4 QAD: the float model teaches its fake-quantized int4 copy (cosine loss on the embeddings)."""
    params, rules = bench.params, qad_rules()
    ptq_start = bench.quality(cj.quantize_params(params, rules))
    # The word embeddings stay frozen (fake-quantized as they will be stored): most of their rows never
    # occur in the training text, and skipping their gradient makes each step cheaper.
    student, info = distill(params, params, batches, steps=steps, seconds=seconds, lr=1e-4,
                            transform=lambda p, _: cj.fake_quant_params(p, rules), frozen=r"embeddings/word$")
    bench.record("int4-qad", cj.quantize_params(student, rules), before_distill=ptq_start, **info)


def run_pruning(bench: Bench, batches: list, *, steps: int, seconds: float) -> None:
    """2:4 and 50% global magnitude pruning of the encoder's linear layers, with and without int8, before
    and after a short distillation from the float model (``before_distill`` holds the one-shot numbers)."""
    params, int8 = bench.params, minilm.int8_rules()
    for name, masks in (("2:4", cj.nm_masks(params, 2, 4, where=ENCODER_KERNELS)),
                        ("50%", cj.magnitude_masks(params, 0.5, scope="global", where=ENCODER_KERNELS))):
        pruned = cj.apply_masks(params, masks)
        before = bench.quality(pruned)
        before_int8 = bench.quality(cj.quantize_params(pruned, int8))
        tuned, info = distill(pruned, params, batches, steps=steps, seconds=seconds, lr=5e-5, masks=masks,
                              transform=lambda p, _, m=masks: cj.apply_masks(p, m), frozen=r"embeddings/word$")
        bench.record(name, tuned, masks=masks, fwd=bench.float_fwd, before_distill=before, **info)
        # Pruned zeros quantize to the integer code 0, which the file stores sparsely; no masks needed.
        bench.record(f"{name}+int8", cj.quantize_params(tuned, int8), before_distill=before_int8, **info)


def run_int8_matmul(bench: Bench) -> None:
    """True int8 matmuls: int8 weight codes x int8 per-token activation codes -> int32, then rescale."""
    dg = cj.quantized_dot_general(cj.QuantSpec(bits=8), cj.QuantSpec(bits=8, channel_axes=(0, 1)), mode="int")
    fwd = jax.jit(lambda p, i, m: minilm.encode(p, i, m, dot_general=dg))
    bench.record("int8-matmul", cj.quantize_params(bench.params, minilm.int8_rules()), embed_params=bench.params,
                 fwd=fwd, timing_params=bench.params, dot_general=dg,
                 note="float weights quantized to int8 inside each call; the file is the int8 model")


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser_ = parser(__doc__)  # --quick: tiny sizes and budgets; --json PATH
    parser_.add_argument("--save-dir", type=Path, help="save each setting's model as DIR/<name>.cjx")
    parser_.add_argument("--qad-steps", type=int, default=150, help="steps of int4 QAD (batch 32)")
    parser_.add_argument("--qad-seconds", type=float, default=540.0, help="wall-time cap of int4 QAD")
    parser_.add_argument("--distill-steps", type=int, default=24, help="steps of each pruning distillation")
    parser_.add_argument("--distill-seconds", type=float, default=150.0, help="wall-time cap of each")
    parser_.add_argument("--only", help="comma-separated groups to run: int8,int4,qad,prune,matmul,oneshot,kmeans (default all)")
    args = parser_.parse_args(argv)
    all_groups = {"int8", "int4", "qad", "prune", "matmul", "oneshot", _minilm_codebook.GROUP}
    groups = set(args.only.split(",")) if args.only else all_groups
    if args.quick and not args.only:
        groups = groups - {"oneshot"}  # its compilations take minutes; smoke-test it with --only oneshot --quick
    if groups - all_groups:
        parser_.error(f"--only: unknown groups {sorted(groups - all_groups)}; choose from {sorted(all_groups)}")

    train, evaluation = minilm.split_sentences()
    qad_steps, distill_steps, runs = args.qad_steps, args.distill_steps, 5
    if args.quick:
        train, evaluation = train[:64], evaluation[:40]
        qad_steps, distill_steps, runs = min(qad_steps, 2), min(distill_steps, 1), 1
    tmp = None
    save_dir = args.save_dir
    if save_dir is None:
        tmp = tempfile.TemporaryDirectory()
        save_dir = Path(tmp.name)
    save_dir.mkdir(parents=True, exist_ok=True)

    params = minilm.load_params()
    port = port_min_cosine(params)
    print(f"port vs sentence-transformers: min cosine {port:.7f}; {len(train)} train / {len(evaluation)} eval sentences")
    bench = Bench(params, evaluation, save_dir, runs)
    batches = length_batches(train, 32)

    # int8 per channel, embeddings included.
    if "int8" in groups:
        bench.record("int8", cj.quantize_params(params, minilm.int8_rules()))

    # int4 PTQ, the better calibration per group size.
    for g in (32, 64, 128) if "int4" in groups else ():
        best, tried = None, {}
        for cal in CALIBRATIONS:
            q = cj.quantize_params(params, ptq_int4_rules(g, cal))
            score = bench.quality(q)
            tried[cal] = score["mean_cosine"]
            if best is None or score["mean_cosine"] > best[1]["mean_cosine"]:
                best = (cal, score, q)
        bench.record(f"int4-g{g}", best[2], calibration=best[0], mean_cosine_by_calibration=tried)

    # int4 quantization-aware distillation: float teacher, fake-quant int4 student.
    if "qad" in groups:
        run_qad(bench, batches, steps=qad_steps, seconds=args.qad_seconds)
    if "prune" in groups:
        run_pruning(bench, batches, steps=distill_steps, seconds=args.distill_seconds)
    if "matmul" in groups:
        run_int8_matmul(bench)
    if _minilm_codebook.GROUP in groups:  # weight sharing (issue 12)
        _minilm_codebook.run_kmeans(bench, batches, distill=distill, seconds=args.distill_seconds, quick=args.quick)
    oneshot_extra = {}
    if "oneshot" in groups:  # GPTQ / SparseGPT / Wanda (benchmarks/_minilm_oneshot.py)
        from benchmarks._minilm_oneshot import run_oneshot

        oneshot_extra = run_oneshot(bench, train, batches, length_batches=length_batches, distill=distill,
                                    steps=distill_steps, seconds=args.distill_seconds, quick=args.quick)

    result = {"benchmark": "minilm", "port_min_cosine": port, "float32_bytes": bench.float_bytes, "train_sentences": len(train),
              "eval_sentences": len(evaluation), "quick": bool(args.quick), "settings": bench.results,
              **oneshot_extra}
    result = finish(result, args.json)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
