"""auto_compress and apply_plan: from a budget to compressed params and the plan."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from compressjax import tree
from compressjax.allocation._allocate import allocate, check_budget
from compressjax.allocation._costs import (
    Candidates,
    _exact,
    decoded,
    kernel_infos,
    layer_error,
    leaf_bytes,
    option_costs_and_damages,
    solve_option,
)
from compressjax.allocation._importance import METHODS, kernel_importance, softmax_kl
from compressjax.allocation._measured import Distance, plan_distances, softmax_kl_distance
from compressjax.allocation._menu import Option, check_menu, default_menu
from compressjax.allocation._plan import Plan, PlanEntry
from compressjax.hessians import Hessian, collect_hessians
from compressjax.oneshot import Pruned
from compressjax.oneshot import sequential as one_pass_sequential

__all__ = ["auto_compress", "apply_plan", "budget_bytes", "model_stages", "make_plan", "from_candidates", "candidate_importance",
           "uniform_choices"]


def budget_bytes(num_weights: int, *, bits_per_weight: Any = None, max_bytes: Any = None, ratio: Any = None) -> int:
    """The byte budget of the selected kernels from exactly one of the three forms.

    ``max_bytes``: bytes; ``bits_per_weight``: ``floor(bits_per_weight * num_weights / 8)``; ``ratio``: against
    float32, ``floor(4 * num_weights / ratio)``.

    Raises:
        ValueError: none or several forms given, a NaN, infinite or negative value, a zero ratio.
        TypeError: a value that is not a real number.
    """
    given = {k: v for k, v in (("bits_per_weight", bits_per_weight), ("max_bytes", max_bytes), ("ratio", ratio)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one budget: bits_per_weight=, max_bytes= or ratio= (got {given or 'none'})")
    (name, value), = given.items()
    v = check_budget(value, name)
    if name == "max_bytes":
        return int(math.floor(v))
    if name == "bits_per_weight":
        return int(math.floor(v * num_weights / 8))
    if v == 0:
        raise ValueError("ratio must be > 0, got 0")
    return int(math.floor(4 * num_weights / v))


def _masks_tree(params: Any, masks: dict[str, Any]) -> Any:
    def visit(kp, x):
        return masks.get(tree.path_to_str(kp))

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=tree.is_compressed_leaf)


def _first_use(apply_fn: Callable, params: Any, batch: Any, paths: list[str]) -> dict[str, int]:
    """The position (in evaluation order of the model's jaxpr, sub-jaxprs included) of each kernel's first use."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=tree.is_compressed_leaf)
    leaf_paths = [tree.path_to_str(kp) for kp, _ in flat]
    leaves = [decoded(x) if tree.is_compressed_leaf(x) else x for _, x in flat]
    closed = jax.make_jaxpr(lambda ls: apply_fn(jax.tree_util.tree_unflatten(treedef, ls), batch))(leaves)
    want = {}
    for p in paths:
        want[closed.jaxpr.invars[leaf_paths.index(p)]] = p
    first: dict[str, int] = {}
    counter = [0]

    def visit(jaxpr, names):
        for eqn in jaxpr.eqns:
            sub = None
            for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                if key in eqn.params:
                    sub = eqn.params[key]
                    break
            sub = getattr(sub, "jaxpr", sub)
            if sub is not None and hasattr(sub, "invars") and len(sub.invars) == len(eqn.invars) and eqn.primitive.name != "while":
                inner = {sv: names[v] for v, sv in zip(eqn.invars, sub.invars, strict=True) if not isinstance(v, jcore.Literal) and v in names}
                visit(sub, inner)
                continue
            counter[0] += 1
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal) and v in names:
                    first.setdefault(names[v], counter[0])

    visit(closed.jaxpr, want)
    return {p: first.get(p, counter[0] + 1) for p in paths}


def model_stages(apply_fn: Callable, params: Any, batch: Any, paths: Sequence[str]) -> list[list[str]]:
    """Groups kernels into blocks in model order: a block is the path up to its first component holding a
    digit (``layer_0``, ``params/layers_3``, ``blocks/2``); kernels outside such a component are a stage
    each. Stages are sorted by the first use of their kernels in the traced model."""
    order = _first_use(apply_fn, params, batch, list(paths))
    groups: dict[str, list[str]] = {}
    for p in paths:
        parts = p.split("/")
        key = p
        for i, part in enumerate(parts[:-1]):
            if re.search(r"\d", part):
                key = "/".join(parts[: i + 1])
                break
        groups.setdefault(key, []).append(p)
    stages = sorted(groups.values(), key=lambda ps: min(order[p] for p in ps))
    return [sorted(ps, key=lambda p: order[p]) for ps in stages]


def make_plan(cands: Candidates, choice: Sequence[int], damages: np.ndarray, importance: dict[str, float] | None,
              budget: int, *, sequential: bool, final: dict[str, tuple[Any, ...]] | None = None,
              masks: Any = None, order: Sequence[str] | None = None, measured: bool = False,
              compared: Sequence[tuple[str, int, float]] = ()) -> Plan:
    """A :class:`Plan` from the candidates and the chosen columns (``final``: ``{path: (bytes, layer_error)}``
    measured on the results actually used, when they differ from the candidates'). ``measured``: ``damages``
    were given (e.g. :func:`output_damages`), not ``importance * layer_error``; each entry keeps its planned
    damage and, as its importance, the ratio of that damage to the option's layer error. ``compared``: the
    whole plans measured at the output when the choice was made (see :func:`from_candidates`)."""
    entries = []
    for i, p in enumerate(cands.paths):
        j = int(choice[i])
        alpha = 1.0 if importance is None else float(importance[p])
        nb, err = (int(cands.costs[i, j]), float(cands.errors[i, j])) if final is None or p not in final else final[p]
        cand = tuple((o.name, int(cands.costs[i, k]), float(damages[i, k])) for k, o in enumerate(cands.options) if cands.costs[i, k] >= 0)
        damage = alpha * err
        if measured:
            damage = float(damages[i, j])
            alpha = damage / float(cands.errors[i, j]) if cands.errors[i, j] > 0 else 1.0
        entries.append(PlanEntry(p, cands.infos[i].shape, cands.options[j].name, nb, damage, err, alpha, cand))
    if order is not None:
        rank = {p: k for k, p in enumerate(order)}
        entries.sort(key=lambda e: rank.get(e.path, len(rank)))
    return Plan(tuple(entries), int(budget), tuple(cands.options), sequential, importance is not None or measured, masks,
                tuple(compared))


def apply_plan(
    params: Any,
    plan: Plan | dict[str, str],
    hessians: Any = None,
    *,
    menu: Sequence[Option] | None = None,
    apply_fn: Callable[[Any, Any], Any] | None = None,
    batches: Iterable[Any] | None = None,
    row_mask: Callable[[Any], Any] | None = None,
    stages: Sequence[Sequence[str]] | None = None,
) -> tuple[Any, Any]:
    """Compresses each kernel with its planned option; returns ``(params, masks)``.

    One-shot (``hessians`` given): every option is solved once for its kernels from these Hessians.
    Sequential (``apply_fn`` and ``batches`` given, no ``hessians``): stage by stage in model order (see
    :func:`model_stages`, or ``stages`` as lists of paths), each stage's Hessians collected on the model as
    compressed so far (compressed kernels decoded), like :func:`compressjax.layerwise`.

    Args:
        params: the float params.
        plan: a :class:`Plan` or ``{path: option name}``.
        hessians: from :func:`compressjax.collect_hessians` (one-shot).
        menu: the options the names refer to (default: the plan's, else :func:`default_menu`).
        apply_fn, batches, row_mask, stages: the sequential mode.

    Returns:
        ``(params, masks)``: compressed kernels in place, and keep-masks at the pruned kernels (``None``
        elsewhere), or ``masks=None`` when nothing is pruned.

    Raises:
        ValueError: an unknown option name, a planned path that is not a kernel, neither or both modes.
    """
    choices = plan.choices if isinstance(plan, Plan) else dict(plan)
    options = {o.name: o for o in (menu or (plan.options if isinstance(plan, Plan) else None) or default_menu())}
    for p, name in choices.items():
        if name not in options:
            raise ValueError(f"kernel {p!r}: option {name!r} is not in the menu ({sorted(options)})")
    sequential = hessians is None
    if sequential and (apply_fn is None or batches is None):
        raise ValueError("give hessians= (one-shot) or apply_fn= and batches= (sequential)")
    if not sequential and (apply_fn is not None or batches is not None):
        raise ValueError("give either hessians= (one-shot) or apply_fn= and batches= (sequential), not both")
    if sequential:
        out, masks, _ = _sequential(params, choices, options, apply_fn, list(batches), row_mask, stages, None)
    else:
        have = kernel_infos(params, hessians)
        missing = [p for p in choices if p not in have]
        if missing:
            raise ValueError(f"planned kernels without a Hessian in hessians: {missing[:4]} (kernels with one: {list(have)[:4]})")
        out, masks = params, {}
        for name in dict.fromkeys(choices.values()):
            todo = [p for p, n in choices.items() if n == name]
            solved = solve_option(options[name], params, hessians, todo)
            out = tree.replace_leaves(out, {p: r[0] for p, r in solved.items()})
            masks.update({p: r[1] for p, r in solved.items() if r[1] is not None})
    return out, (_masks_tree(params, masks) if masks else None)


def _sequential(params, choices, options, apply_fn, batches, row_mask, stages, fallback, first_from_fallback=False):
    """The stage loop. ``fallback``: ``{path: ((leaf, mask), bytes, layer_error)}``, results from the
    float-model Hessians whose bytes were planned; a stage result that takes more bytes is replaced by it, so
    the plan never grows. ``first_from_fallback``: the first stage takes them as they are (its Hessians
    would be the float model's again; not for stacked kernels, which are calibrated layer after layer).
    Returns ``(params, masks, {path: (bytes, layer_error)})``."""
    paths = list(choices)
    if stages is None:
        stages = model_stages(apply_fn, params, batches[0], paths)
    listed = [p for s in stages for p in s]
    if sorted(listed) != sorted(paths):
        raise ValueError(f"stages must list every planned kernel once; got {listed}, planned {paths}")
    leaves = dict(tree.leaves_with_paths(params, tree.is_compressed_leaf))
    view, out, masks, final = params, params, {}, {}
    for i, stage in enumerate(stages):
        if i == 0 and first_from_fallback:
            new = {p: fallback[p][0] for p in stage}
            final.update({p: (int(fallback[p][1]), float(fallback[p][2])) for p in stage})
        else:
            new = _stage_results(params, view, stage, i, choices, options, apply_fn, batches, row_mask, fallback, final)
        out = tree.replace_leaves(out, {p: r[0] for p, r in new.items()})
        view = tree.replace_leaves(view, {p: decoded(r[0]).astype(leaves[p].dtype) for p, r in new.items()})
        masks.update({p: r[1] for p, r in new.items() if r[1] is not None})
    return out, masks, final


def _stage_results(params, view, stage, i, choices, options, apply_fn, batches, row_mask, fallback, final):
    """``{path: (leaf, mask)}`` of stage ``i``'s kernels solved from Hessians collected on ``view`` (the model
    as compressed so far); records ``final[path] = (bytes, layer_error)``."""
    try:
        hess = collect_hessians(apply_fn, view, batches, where=_exact(stage), row_mask=row_mask)
    except ValueError as e:
        raise ValueError(f"stage {i} ({stage}): {e}") from e
    infos = kernel_infos(params, hess)
    new = {}
    # Stacked kernels (layers run by lax.scan): a stage holds every layer at once, so calibrate slice by
    # slice in one pass instead, each layer on the outputs of the layers already compressed.
    stacked = None
    if any(infos[p][0].layer_axes for p in stage):
        stacked = _one_pass_stage(view, stage, choices, options, apply_fn, batches, row_mask)
    for name in dict.fromkeys(choices[p] for p in stage):
        todo = [p for p in stage if choices[p] == name]
        if stacked is not None:
            solved = {p: stacked[p] for p in todo}
        else:
            solved = solve_option(options[name], params, hess, todo)
        sizes = leaf_bytes([solved[p][0] for p in todo])
        for p, nb in zip(todo, sizes, strict=True):
            res = solved[p]
            if fallback is not None and nb > fallback[p][1]:
                res, nb = fallback[p][:2]
            new[p] = res
            info, w, h = infos[p]
            final[p] = (int(nb), 0.0 if options[name].method == "float" else layer_error(info, w, res[0], h))
    return new


def _stacked_together(stages: list[list[str]], stacked: Sequence[str]) -> list[list[str]]:
    """``stages`` with every stacked kernel in one stage, where the first of them was: kernels run by the
    same ``lax.scan`` are compressed in one pass, layer after layer, rather than one kernel (all its layers)
    per pass."""
    if not stacked:
        return stages
    keep = set(stacked)
    at = next(i for i, s in enumerate(stages) if keep & set(s))
    rest = [[p for p in s if p not in keep] for s in stages]
    merged = [p for s in stages for p in s if p in keep]
    out = [s for s in rest[:at] if s] + [merged] + [s for s in rest[at:] if s]
    return out


def _one_pass_stage(view, stage, choices, options, apply_fn, batches, row_mask) -> dict[str, tuple[Any, Any]]:
    """``{path: (leaf, mask)}`` of a stage's kernels compressed by :func:`compressjax.sequential`: every slice
    of a stacked kernel with the kernel's planned option, calibrated on inputs through the slices compressed
    before it (one pass over ``batches``)."""
    def compress(sub, hessians):
        hs = [p for p, h in tree.leaves_with_paths(hessians, lambda x: x is None or isinstance(x, Hessian)) if h is not None]
        solved = solve_option(options[choices[hs[0]]], sub, hessians, hs)
        masks = jax.tree_util.tree_map(lambda _: None, sub, is_leaf=tree.is_compressed_leaf)
        return Pruned(tree.replace_leaves(sub, {p: r[0] for p, r in solved.items()}),
                      tree.replace_leaves(masks, {p: r[1] for p, r in solved.items()}))

    out, masks = one_pass_sequential(apply_fn, view, batches, compress, where=_exact(stage), row_mask=row_mask)
    got = dict(tree.leaves_with_paths(out, tree.is_compressed_leaf))
    mk = dict(tree.leaves_with_paths(masks, tree.is_none_or_compressed))
    return {p: (got[p], mk.get(p)) for p in stage}


def auto_compress(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    *,
    bits_per_weight: float | None = None,
    max_bytes: int | None = None,
    ratio: float | None = None,
    menu: Sequence[Option] | None = None,
    where: tree.Where = None,
    row_mask: Callable[[Any], Any] | None = None,
    sequential: bool = True,
    importance: bool | Callable[[Any, Any], Any] = True,
    importance_method: str = "auto",
    stages: Sequence[Sequence[str]] | None = None,
    compare_uniform: bool = True,
    distance: Distance | None = None,
) -> tuple[Any, Plan]:
    """Compresses a model to a byte budget, choosing per kernel the option (method and bits) that costs least.

    1. ``collect_hessians`` over ``batches`` (the kernels with a Hessian are the selection);
    2. every option of ``menu`` is solved once per kernel from those Hessians, its exact bytes in the file
       measured (:func:`option_costs_and_damages`) and its damage estimated: the layer output error
       ``tr(dW^T H dW)``, times, with ``importance``, the kernel's output-error amplification
       (:func:`kernel_importance`, probed with the error of the kernel's median-damage option; estimated by
       reverse mode where the samples allow, see ``importance_method``);
    3. :func:`allocate` picks one option per kernel: least total damage, total bytes at most the budget;
       with ``compare_uniform``, that plan and every uniform setting of the menu that fits the budget are
       then run as whole plans on two calibration batches, and the one whose output is closest to the float
       model's is kept (the damages of step 2 add up kernel by kernel; this sees how errors combine);
    4. the plan is applied. ``sequential=False``: the results of step 2 are used as they are, so every
       kernel's bytes are exactly the planned ones. ``sequential=True``: the kernels are compressed again
       stage by stage (blocks in model order, :func:`model_stages`), each stage with Hessians collected on
       the model as compressed so far, so later layers correct for earlier ones (GPTQ's sequential mode; the
       first stage keeps its step-2 results, from the same float-model Hessians); a kernel whose new result
       would take more bytes than planned keeps its step-2 result instead, so the budget holds (every
       kernel's bytes at most the planned ones). The stacked kernels (layers run by ``lax.scan``) form one
       stage, which goes through :func:`compressjax.sequential` instead: each layer slice with its kernel's
       planned option, on the outputs of the slices compressed before it (one pass, layer after layer). The
       plan records the bytes and layer errors of the results used.

    The budget covers the selected kernels' bytes in the file (``size_report``'s ``stored_bytes`` of those
    leaves); other leaves (biases, norms, embeddings not selected) and the file's header are outside it.

    Args:
        apply_fn: ``(params, batch) -> output``, as for :func:`compressjax.collect_hessians`.
        params: the float params.
        batches: calibration batches.
        bits_per_weight, max_bytes, ratio: the budget, exactly one: bits per selected weight, bytes, or a
            compression ratio against float32 (4 bytes per weight) of the selected kernels.
        menu: a sequence of :class:`Option` (default :func:`default_menu`: options that do not fit a kernel
            are skipped for it; in an explicit menu an option that fits no kernel is an error).
        where: which kernels (as for ``collect_hessians``; default every matmul/conv kernel).
        row_mask: ``batch -> bool`` rows to leave out of the Hessians (padding).
        sequential: compress stage by stage (see above).
        importance: weight each kernel's damages by its importance (see above). A callable is the output
            metric of :func:`kernel_importance` (``True``: :func:`squared_change` of the outputs; for a model
            returning logits, :func:`softmax_kl` weights a change by how much it moves the predictions).
        importance_method: :func:`kernel_importance`'s ``method``: ``"auto"`` (default) estimates the
            importance by reverse mode (one backward pass per calibration sample for all kernels) when the
            batches have a leading axis of independent samples, the metric is built in, the per-sample
            gradients fit and there are enough kernels for it to be clearly cheaper (see
            :func:`kernel_importance`), and computes it exactly by forward mode (one tangent pass per kernel
            and batch) otherwise; ``"forward"`` or ``"reverse"`` force one.
        stages: for ``sequential``, lists of kernel paths (default :func:`model_stages`).
        compare_uniform: compare the plan with the fitting uniform settings at the output (step 3).
        distance: ``(float_output, output) -> scalar`` for that comparison (default
            :func:`squared_distance`; :func:`softmax_kl_distance` when ``importance`` is :func:`softmax_kl`).

    Returns:
        ``(params, plan)``: the compressed params (``QArray``, ``Codebook`` or pruned float leaves at the
        kernels) and the :class:`Plan` (``plan.masks`` holds keep-masks at pruned kernels).

    Raises:
        ValueError: no or several budgets, a NaN, negative or infinite budget, a budget smaller than the
            cheapest plan, an empty menu, an explicit option that fits no kernel, plus what
            ``collect_hessians`` and the solvers raise.
        TypeError: a non-real budget, a menu entry that is not an :class:`Option`.

    References:
        Frantar et al., "GPTQ", ICLR 2023; Frantar & Alistarh, "SparseGPT", ICML 2023; Dong et al.,
        "HAWQ-V2", NeurIPS 2020; Sinha & Zoltners, "The Multiple-Choice Knapsack Problem", 1979.
    """
    # Cheap checks first: the budget form, the menu.
    budget_bytes(1, bits_per_weight=bits_per_weight, max_bytes=max_bytes, ratio=ratio)
    check_menu(menu)
    if importance_method not in METHODS:
        raise ValueError(f"importance_method must be one of {METHODS}, got {importance_method!r}")
    batches = list(batches)
    hessians = collect_hessians(apply_fn, params, batches, where=where, row_mask=row_mask)
    cands = option_costs_and_damages(params, hessians, menu, keep_results=True)
    metric = importance if callable(importance) else None
    alpha = None
    if importance:
        alpha = candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, output_metric=metric,
                                     method=importance_method, hessians=hessians)
    budget = budget_bytes(cands.num_weights, bits_per_weight=bits_per_weight, max_bytes=max_bytes, ratio=ratio)
    if distance is None and importance is softmax_kl:
        distance = softmax_kl_distance
    return from_candidates(apply_fn, params, batches, cands, budget, alpha, sequential=sequential, row_mask=row_mask,
                           stages=stages, compare_uniform=compare_uniform, distance=distance)


def candidate_importance(apply_fn: Callable, params: Any, batches: Sequence[Any], cands: Candidates, *,
                         row_mask: Callable | None = None, output_metric: Callable | None = None,
                         method: str = "forward", seed: int = 0, hessians: Any = None) -> dict[str, float]:
    """:func:`kernel_importance` of every kernel, probed with the error of its median-damage option (needs
    ``cands`` made with ``keep_results=True``); 1.0 for a kernel whose options all have zero error.
    ``output_metric``, ``method``, ``seed``, ``hessians`` (those ``cands`` were solved from, to reuse): as
    for :func:`kernel_importance`."""
    probes = {}
    leaves = dict(tree.leaves_with_paths(params, tree.is_compressed_leaf))
    for i, p in enumerate(cands.paths):
        ok = [j for j in range(len(cands.options)) if cands.costs[i, j] >= 0 and cands.errors[i, j] > 0]
        if not ok:
            continue
        ok.sort(key=lambda j: cands.errors[i, j])
        j = ok[len(ok) // 2]
        probes[p] = decoded(cands.results[(p, cands.options[j].name)][0]) - leaves[p]
    alpha = {p: 1.0 for p in cands.paths}
    if probes:
        alpha.update(kernel_importance(apply_fn, params, batches, probes, row_mask=row_mask, output_metric=output_metric,
                                       method=method, seed=seed, hessians=hessians))
    return alpha


def uniform_choices(cands: Candidates, budget: int) -> dict[str, np.ndarray]:
    """``{option name: choice}`` for every option that applies to every kernel and fits ``budget`` on all of
    them (the uniform settings a plan competes with)."""
    out = {}
    for j, opt in enumerate(cands.options):
        if np.all(cands.costs[:, j] >= 0) and cands.costs[:, j].sum() <= budget:
            out[opt.name] = np.full(len(cands.paths), j)
    return out


def _compare_at_output(apply_fn, params, batches, cands, choice, budget, distance):
    """The allocator's plan against the uniform settings that fit, measured as whole plans at the output
    (:func:`plan_distances`); returns the best choice and ``(name, bytes, distance)`` of each compared."""
    plans = {"allocated": np.asarray(choice)}
    for name, c in uniform_choices(cands, budget).items():
        if not any(np.array_equal(c, q) for q in plans.values()):
            plans[f"uniform {name}"] = c
    if len(plans) == 1:
        return choice, ()
    dist = plan_distances(apply_fn, params, batches, cands, list(plans.values()), distance=distance)
    rows = np.arange(len(cands.paths))
    compared = tuple((n, int(cands.costs[rows, c].sum()), float(d)) for (n, c), d in zip(plans.items(), dist, strict=True))
    best = int(np.argmin(dist))  # the first of equals: the allocated plan wins ties
    return list(plans.values())[best], compared


def from_candidates(apply_fn: Callable, params: Any, batches: Sequence[Any], cands: Candidates, budget: int,
                    alpha: dict[str, float] | None, *, sequential: bool = True, row_mask: Callable | None = None,
                    stages: Sequence[Sequence[str]] | None = None, damages: np.ndarray | None = None,
                    compare_uniform: bool = True, distance: Distance | None = None) -> tuple[Any, Plan]:
    """Steps 3 and 4 of :func:`auto_compress` on candidates already measured (``keep_results=True``):
    allocate ``budget`` bytes with damages ``alpha[path] * layer_error`` (``alpha=None``: unweighted), or with
    ``damages`` given as a ``(kernels, options)`` array (e.g. :func:`output_damages`; ``alpha`` is then
    ignored), and apply.

    ``compare_uniform``: the allocated plan and every uniform setting that fits the budget are measured as
    whole plans at the output (:func:`plan_distances` with ``distance``, default :func:`squared_distance`,
    on two calibration batches) and the closest to the float model is applied. The allocator sums damages
    kernel by kernel; on a model with few, large allocation units (stacked kernels spanning every layer)
    their errors compound beyond that sum, and a plan the estimate prefers can lose to a uniform setting.
    The comparison costs one forward pass per plan and batch; ``plan.compared`` records it."""
    measured = damages is not None
    if measured:
        damages = np.asarray(damages, np.float64)
        if damages.shape != cands.costs.shape:
            raise ValueError(f"damages must have the candidates' shape {cands.costs.shape} (kernels, options), got {damages.shape}")
        bad = (cands.costs >= 0) & ~(np.isfinite(damages) & (damages >= 0))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"damages[{i}, {j}] (kernel {cands.paths[i]!r}, option {cands.options[j].name!r}) is "
                             f"{damages[i, j]}: need a finite value >= 0 wherever the option applies")
        alpha = None
    else:
        scale = np.array([1.0 if alpha is None else alpha[p] for p in cands.paths])[:, None]
        damages = cands.errors * scale
    damages = np.where(cands.costs >= 0, damages, np.inf)
    costs = np.where(cands.costs >= 0, cands.costs, -1)
    choice = allocate(costs, damages, budget)
    batches = list(batches)
    compared: tuple = ()
    if compare_uniform:
        choice, compared = _compare_at_output(apply_fn, params, batches, cands, choice, budget, distance)
    choices = {p: cands.options[int(j)].name for p, j in zip(cands.paths, choice, strict=True)}
    order = None
    if sequential:
        order_stages = stages
        stacked = [p for p, info in zip(cands.paths, cands.infos, strict=True) if info.layer_axes]
        if stages is None:
            order_stages = _stacked_together(model_stages(apply_fn, params, batches[0], list(cands.paths)), stacked)
        order = [p for s in order_stages for p in s]
        fallback = {p: (cands.results[(p, n)], int(cands.costs[i, int(choice[i])]), float(cands.errors[i, int(choice[i])]))
                    for i, (p, n) in enumerate(choices.items())}
        opts = {o.name: o for o in cands.options}
        out, masks, final = _sequential(params, choices, opts, apply_fn, batches, row_mask, order_stages, fallback,
                                        first_from_fallback=not set(stacked) & set(order_stages[0]))
    else:
        final = None
        out = tree.replace_leaves(params, {p: cands.results[(p, n)][0] for p, n in choices.items()})
        masks = {p: cands.results[(p, n)][1] for p, n in choices.items() if cands.results[(p, n)][1] is not None}
    mtree = _masks_tree(params, masks) if masks else None
    plan = make_plan(cands, choice, damages, alpha, budget, sequential=sequential, final=final, masks=mtree, order=order,
                     measured=measured, compared=compared)
    if plan.total_bytes > budget:  # cannot happen: the allocator and the fallback keep it within
        raise AssertionError(f"plan of {plan.total_bytes} bytes exceeds the budget of {budget}")
    return out, plan
