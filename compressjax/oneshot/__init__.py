"""One-shot compression from calibration data: GPTQ, SparseGPT, Wanda, the layerwise mode and
the one-pass sequential mode.

Every solver takes the params and a Hessian tree from :func:`compressjax.collect_hessians` (the Hessian
tree is the selection) and returns the library's own types: ``QArray`` leaves and boolean keep-masks
(``sparsegpt`` returns them as a :class:`Pruned` ``(params, masks)``). Stacked kernels (scanned layers, MoE
experts, grouped convolutions) with stacked Hessians are solved per slice and keep their stacked layout.
"""

from compressjax.oneshot._gptq import gptq, gptq_many
from compressjax.oneshot._layerwise import layerwise, split_result
from compressjax.oneshot._sequential import sequential
from compressjax.oneshot._sparsegpt import Pruned, sparsegpt
from compressjax.oneshot._sweep import error_feedback
from compressjax.oneshot._wanda import wanda_masks

__all__ = ["error_feedback", "gptq", "gptq_many", "sparsegpt", "wanda_masks", "layerwise", "sequential", "Pruned", "split_result"]
