"""One-shot compression from calibration data: GPTQ, SparseGPT, Wanda, layerwise."""
from compressjax.oneshot._sweep import error_feedback

__all__ = ["error_feedback"]
