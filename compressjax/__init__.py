"""compressjax: pruning, quantization, distillation and compact export for JAX and Flax models.

Every function is a pure function over parameter pytrees (linen ``params`` dicts, ``nnx.State``, equinox
modules, plain dicts) and runs under ``jax.jit``. See README.md for a tour.
"""

from compressjax.tree import Where, leaves_with_paths, path_to_str, selector

# [pruning exports]
# [quantization exports]
# [distillation exports]
# [export exports]

__version__ = "0.1.0"

__all__ = [
    "Where",
    "leaves_with_paths",
    "path_to_str",
    "selector",
    # [pruning __all__]
    # [quantization __all__]
    # [distillation __all__]
    # [export __all__]
]
