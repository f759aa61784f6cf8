"""compressjax: pruning, quantization, distillation and compact export for JAX and Flax models.

Every function is a pure function over parameter pytrees (linen ``params`` dicts, ``nnx.State``, equinox
modules, plain dicts) and runs under ``jax.jit``. See README.md for a tour.

The layout below is the architecture: each ``# --- group`` is one layer of the library (the API reference
is generated from these groups). Helpers live in the submodules: :mod:`compressjax.tree` (leaf paths and
the ``where`` selector), :mod:`compressjax.quantization` (``compute_scale``, ``resolve_rules``),
:mod:`compressjax.losses`, :mod:`compressjax.radix_select` (the exact k-th value behind magnitude pruning).
"""

# ruff: noqa: I001  (imports are grouped by architecture layer, not alphabetically)
# --- tree selection
from compressjax.tree import Where

# --- pruning
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
from compressjax.pruning_transforms import (
    GradualPruningState,
    gradual_pruning,
    keep_masked,
    masks_from_state,
    polynomial_sparsity,
)

# --- quantization
from compressjax.qarray import QArray, QuantSpec
from compressjax.quantization import (
    DTypeError,
    dequantize,
    dequantize_params,
    fake_quant,
    fake_quant_params,
    quantize,
    quantize_params,
)
from compressjax.calibration import ActivationRange, calibrate
from compressjax.qdot import quantized_dot_general

# --- distillation
from compressjax.losses import (
    cosine_loss,
    distillation_loss,
    hint_loss,
    kd_loss,
    mse_loss,
    softmax_cross_entropy_with_integer_labels,
)
from compressjax.distillation import DistillState, make_distill_step

# --- export
from compressjax.export import FormatError, LeafSize, SizeReport, load, save, size_report

# --- one-shot compression
from compressjax.hessians import Hessian, collect_hessians
from compressjax.oneshot import error_feedback, gptq, layerwise, sparsegpt, wanda_masks

# --- weight sharing
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

__version__ = "0.1.0"

__all__ = [
    # tree selection
    "Where",
    # pruning
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
    # quantization
    "QArray",
    "QuantSpec",
    "DTypeError",
    "quantize",
    "dequantize",
    "fake_quant",
    "quantize_params",
    "dequantize_params",
    "fake_quant_params",
    "ActivationRange",
    "calibrate",
    "quantized_dot_general",
    # distillation
    "kd_loss",
    "distillation_loss",
    "softmax_cross_entropy_with_integer_labels",
    "mse_loss",
    "hint_loss",
    "cosine_loss",
    "DistillState",
    "make_distill_step",
    # export
    "save",
    "load",
    "size_report",
    "SizeReport",
    "LeafSize",
    "FormatError",
    # one-shot compression
    "Hessian",
    "collect_hessians",
    "error_feedback",
    "gptq",
    "sparsegpt",
    "wanda_masks",
    "layerwise",
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
]
