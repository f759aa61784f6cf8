"""compressjax: pruning, quantization, distillation and compact export for JAX and Flax models.

Every function is a pure function over parameter pytrees (linen ``params`` dicts, ``nnx.State``, equinox
modules, plain dicts) and runs under ``jax.jit``. See README.md for a tour.
"""

from compressjax.calibration import ActivationRange, calibrate

# weight sharing
from compressjax.codebook import (
    Codebook,
    cast_centroids,
    codebook_error_feedback,
    codebook_student,
    decode_params,
    kmeans_codebooks,
    merge_centroids,
    reassign_indices,
    refit_centroids,
    split_centroids,
)
from compressjax.distillation import DistillState, make_distill_step
from compressjax.export import FormatError, LeafSize, SizeReport, load, save, size_report
from compressjax.losses import cosine_loss, distillation_loss, hint_loss, kd_loss, mse_loss, softmax_cross_entropy
from compressjax.pruning import (
    LeafSparsity,
    SparsitySummary,
    apply_masks,
    channel_masks,
    magnitude_masks,
    nm_masks,
    score_masks,
    sparsity_summary,
)
from compressjax.qarray import (
    QArray,
    QuantSpec,
    qarray_from_ints,
    qarray_from_parts,
    qarray_to_parts,
    quantized_ints,
)
from compressjax.qdot import quantized_dot_general
from compressjax.quantization import (
    DTypeError,
    compute_scale,
    dequantize,
    dequantize_params,
    fake_quant,
    fake_quant_params,
    quantize,
    quantize_params,
    resolve_rules,
    ste_surrogate,
)
from compressjax.schedules import (
    GradualPruningState,
    gradual_pruning,
    keep_masked,
    masks_from_state,
    polynomial_sparsity,
)
from compressjax.tree import Where, leaves_with_paths, path_to_str, selector

# isort: split
# one-shot compression
from compressjax.hessians import Hessian, collect_hessians
from compressjax.oneshot import error_feedback, gptq, layerwise, sparsegpt, wanda_masks

__version__ = "0.1.0"

__all__ = [
    "Where",
    "leaves_with_paths",
    "path_to_str",
    "selector",
    "magnitude_masks",
    "score_masks",
    "nm_masks",
    "channel_masks",
    "apply_masks",
    "sparsity_summary",
    "SparsitySummary",
    "LeafSparsity",
    "polynomial_sparsity",
    "keep_masked",
    "gradual_pruning",
    "GradualPruningState",
    "masks_from_state",
    "QArray",
    "QuantSpec",
    "ActivationRange",
    "DTypeError",
    "calibrate",
    "quantized_dot_general",
    "compute_scale",
    "dequantize",
    "dequantize_params",
    "fake_quant",
    "fake_quant_params",
    "qarray_from_ints",
    "qarray_from_parts",
    "qarray_to_parts",
    "quantize",
    "quantize_params",
    "quantized_ints",
    "resolve_rules",
    "ste_surrogate",
    "DistillState",
    "make_distill_step",
    "kd_loss",
    "distillation_loss",
    "mse_loss",
    "hint_loss",
    "cosine_loss",
    "softmax_cross_entropy",
    "save",
    "load",
    "size_report",
    "SizeReport",
    "LeafSize",
    "FormatError",
    # weight sharing
    "Codebook",
    "kmeans_codebooks",
    "decode_params",
    "split_centroids",
    "merge_centroids",
    "codebook_student",
    "reassign_indices",
    "cast_centroids",
    "codebook_error_feedback",
    "refit_centroids",
    # one-shot compression
    "Hessian",
    "collect_hessians",
    "error_feedback",
    "gptq",
    "sparsegpt",
    "wanda_masks",
    "layerwise",
]
