"""Compress to a budget: per kernel, the choice of method and bits that loses least under a byte limit.

A *menu* lists ways to compress one kernel (:class:`Option`: float, GPTQ or round-to-nearest at some
bits and groups, SparseGPT at a sparsity or N:M, k-means codebooks with error feedback). For every
selected kernel and option, :func:`option_costs_and_damages` solves the option and measures its exact
bytes in the library's file and its layer output error ``tr(dW^T H dW)``; :func:`kernel_importance`
weights each kernel by how much of that error reaches the model's output; :func:`allocate` solves the
multiple-choice knapsack (least total damage, bytes at most the budget); :func:`apply_plan` compresses
the kernels as planned. :func:`auto_compress` does all of it in one call and returns the :class:`Plan`
(a table through ``rich``, a plot of each kernel's options through ``matplotlib``).

The allocation sits above the export layer: costs are measured with the file encoder itself.
"""

from compressjax.allocation._allocate import allocate
from compressjax.allocation._auto import (
    apply_plan,
    auto_compress,
    budget_bytes,
    candidate_importance,
    from_candidates,
    model_stages,
    uniform_choices,
)
from compressjax.allocation._costs import Candidates, option_costs_and_damages
from compressjax.allocation._importance import kernel_importance, softmax_kl, squared_change
from compressjax.allocation._measured import output_damages, plan_distances, softmax_kl_distance, squared_distance
from compressjax.allocation._menu import Option, default_menu
from compressjax.allocation._plan import Plan, PlanEntry, pareto_front

__all__ = [
    "auto_compress",
    "Option",
    "default_menu",
    "option_costs_and_damages",
    "Candidates",
    "kernel_importance",
    "softmax_kl",
    "squared_change",
    "allocate",
    "apply_plan",
    "Plan",
    "PlanEntry",
    "budget_bytes",
    "model_stages",
    "candidate_importance",
    "from_candidates",
    "pareto_front",
    "output_damages",
    "squared_distance",
    "plan_distances",
    "softmax_kl_distance",
    "uniform_choices",
]
