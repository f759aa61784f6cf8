"""compressjax: pruning, quantization, distillation and compact export for JAX and Flax models.

Every function is a pure function over parameter pytrees (linen ``params`` dicts, ``nnx.State``, equinox
modules, plain dicts) and runs under ``jax.jit``. See README.md for a tour.

The modules form layers; a module imports only from its own layer or below (the contract in
pyproject.toml, checked in CI by ``lint-imports``)::

    cli, demo                  the command line and the demo pipeline
    models                     model ports shared by examples, benchmarks and tests (MiniLM, SmolLM2)
    allocation                 compress to a budget: a menu of every technique, exact file bytes, knapsack
    export                     the file format: save, load, size_report
    codebook                   weight sharing (k-means codebooks; error feedback uses the one-shot sweep)
    oneshot                    GPTQ, SparseGPT, Wanda, layerwise and sequential calibration
    hessians                   Hessian capture from any JAX model (jaxpr interpreter)
    distillation, calibration, qdot, pruning_transforms
    quantization, losses, pruning
    qarray, radix_select       the quantized array (QArray.decode); the exact k-th value
    tree, bitpack, checks      leaf paths, the ``where`` selector, the compressed-leaf protocol; bit
                               packing; argument checks

Compressed leaves (``QArray``, ``Codebook``) subclass ``tree.CompressedLeaf`` and implement ``decode()``, so
tree functions decode any of them without importing its class. Every pytree type of the library (the
compressed leaves, ``Hessian``, ``DistillState``) is declared one way, with ``tree.pytree_node``. The
``# --- group`` comments below group the public API (docs/API.md is generated from them). Helpers live in
the submodules: :mod:`compressjax.tree`, :mod:`compressjax.quantization` (``compute_scale``,
``resolve_rules``), :mod:`compressjax.losses`, :mod:`compressjax.radix_select`.
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
from compressjax.oneshot import error_feedback, gptq, gptq_many, layerwise, sequential, sparsegpt, wanda_masks

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

# --- allocation
from compressjax.allocation import (
    Option,
    Plan,
    allocate,
    apply_plan,
    auto_compress,
    default_menu,
    kernel_importance,
    option_costs_and_damages,
    softmax_kl,
    squared_change,
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
    "gptq_many",
    "sparsegpt",
    "wanda_masks",
    "layerwise",
    "sequential",
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
    # allocation
    "auto_compress",
    "Option",
    "default_menu",
    "option_costs_and_damages",
    "kernel_importance",
    "softmax_kl",
    "squared_change",
    "allocate",
    "apply_plan",
    "Plan",
]
