"""MiniLM settings of issue 12 (weight sharing), registered in ``benchmarks/minilm.py`` as the group ``kmeans``.

All 36 encoder kernels become k-means codebooks (centroids stored as float16); the embeddings are int8 per
row, as in the int4 PTQ settings, so that the files compare. Settings:

* ``kmeans-4``: one 4-bit codebook per kernel, density (quantile) init, Lloyd to convergence.
* ``kmeans-3-ch``: one 3-bit codebook per output channel (3.25 bits per kernel weight with float16
  centroids).
* ``kmeans-3-ch-gptq``: the same codebooks fitted by k-means weighted with the Hessian diagonal (SqueezeLLM),
  then the indices re-assigned with GPTQ's error feedback (``codebook_error_feedback``, the one-shot
  issue's ``error_feedback`` sweep with "nearest centroid" as the quantizer), from the Gram matrices
  ``collect_hessians`` gathers on all the training sentences (padding tokens left out); finally the
  centroids are refitted by least squares under each Gram matrix for the new indices (``refit_centroids``).
* ``kmeans-3-ch-kd``: ``kmeans-3-ch-gptq``'s codebooks whose centroids alone (``split_centroids``) are
  then distilled from the float model (cosine loss on the embeddings, ``codebook_student`` as the
  ``student_transform``), for at most ``--distill-seconds`` of wall time.

Each row adds ``kernel_bits_per_weight``: the encoder kernels' bytes in the file (indices, positions and
centroids) times 8 over their weight count.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

import compressjax as cj
from compressjax.models import minilm

GROUP = "kmeans"
ENCODER_KERNELS = r"layer_\d+/.*kernel$"
EMBEDDING_RULES = {r"embeddings/(word|position|token_type)$": cj.QuantSpec(bits=8, channel_axes=(0,))}
KD_STEPS, KD_LR = 10_000, 2e-4


def _embeddings_int8(params: Any) -> Any:
    return cj.quantize_params(params, EMBEDDING_RULES, on_unmatched="ignore")


def _kernel_bits(report: cj.SizeReport) -> float:
    import re

    leaves = [s for s in report.leaves if re.search(ENCODER_KERNELS, s.path)]
    return 8 * sum(s.stored_bytes for s in leaves) / sum(s.num_elements for s in leaves)


def _record(bench, name: str, codebooks: Any, **extra) -> dict:
    tree = cj.cast_centroids(_embeddings_int8(codebooks), jnp.float16)
    report = cj.size_report(tree)
    return bench.record(name, tree, kernel_bits_per_weight=round(_kernel_bits(report), 4), **extra)


def hessian_weights(params: Any, hessians: Any) -> Any:
    """Per-weight importances for weighted k-means: the Hessian diagonal of each kernel's input rows."""
    hs = dict(cj.tree.leaves_with_paths(hessians, lambda x: x is None or isinstance(x, cj.Hessian)))

    def visit(kp, leaf):
        h = hs.get(cj.tree.path_to_str(kp))
        if h is None:
            return None
        return jnp.broadcast_to(jnp.diagonal(h.h)[:, None], leaf.shape)

    return jax.tree_util.tree_map_with_path(visit, params)


def run_kmeans(bench, batches: list, *, distill, seconds: float, quick: bool = False) -> None:
    """The four settings; ``distill`` is ``benchmarks.minilm.distill``."""
    params = bench.params

    t0 = time.perf_counter()
    k4 = cj.kmeans_codebooks(params, 4, where=ENCODER_KERNELS)
    _record(bench, "kmeans-4", k4, kmeans_seconds=round(time.perf_counter() - t0, 2))

    t0 = time.perf_counter()
    k3 = cj.kmeans_codebooks(params, 3, where=ENCODER_KERNELS, per_channel=True)
    _record(bench, "kmeans-3-ch", k3, kmeans_seconds=round(time.perf_counter() - t0, 2))

    # Error feedback: Gram matrices of every kernel's inputs on calibration batches (padding rows left out).
    t0 = time.perf_counter()
    apply = lambda p, b: bench_encode(p, b)  # noqa: E731
    calib = batches[:2] if quick else batches  # every training batch (they are sorted by length)
    hessians = cj.collect_hessians(apply, params, calib, where=ENCODER_KERNELS, row_mask=lambda b: b[1] > 0)
    t_h = time.perf_counter() - t0
    weighted = cj.kmeans_codebooks(params, 3, where=ENCODER_KERNELS, per_channel=True,
                                   weights=hessian_weights(params, hessians))
    weighted_q = bench.quality(cj.dequantize_params(_embeddings_int8(cj.cast_centroids(weighted, jnp.float16))))
    fed = cj.codebook_error_feedback(weighted, params, hessians)
    fed_q = bench.quality(cj.dequantize_params(_embeddings_int8(cj.cast_centroids(fed, jnp.float16))))
    gptq = cj.refit_centroids(fed, params, hessians)  # least-squares centroids for the new assignment
    _record(bench, "kmeans-3-ch-gptq", gptq, hessian_seconds=round(t_h, 2),
            seconds=round(time.perf_counter() - t0, 2), calibration_sentences=sum(int(b[0].shape[0]) for b in calib),
            weighted_only=weighted_q, error_feedback_without_refit=fed_q)

    # Centroid distillation from the float model, starting from kmeans-3-ch-gptq's codebooks.
    trainable, frozen = cj.split_centroids(gptq)
    steps = 1 if quick else KD_STEPS  # in practice the wall-time cap ends it
    before = bench.quality(cj.dequantize_params(_embeddings_int8(cj.cast_centroids(gptq, jnp.float16))))
    student, info = distill(trainable, params, batches, steps=steps, seconds=seconds, lr=KD_LR,
                            transform=cj.codebook_student(frozen))
    _record(bench, "kmeans-3-ch-kd", cj.merge_centroids(student, frozen), before_distill=before, **info)


def bench_encode(params, batch):
    return minilm.encode(params, batch[0], batch[1])
