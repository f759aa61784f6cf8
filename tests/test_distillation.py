"""Tests for make_distill_step and DistillState: correctness, no teacher gradient, tracing, donation, mesh."""

import functools
import textwrap

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_example, run_with_8_devices
from flax import nnx

from compressjax.distillation import DistillState, make_distill_step
from compressjax.losses import (
    cosine_loss,
    distillation_loss,
    hint_loss,
    kd_loss,
    softmax_cross_entropy_with_integer_labels,
)


def mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        "layers": [
            {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]
    }


def mlp_apply(params, x):
    layers = params["layers"]
    for i, layer in enumerate(layers):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


@functools.lru_cache
def problem(n=32, d=8, classes=5):
    k = jax.random.split(jax.random.key(0), 4)
    teacher = mlp_init(k[0], [d, 32, classes])
    student = mlp_init(k[1], [d, 6, classes])
    x = jax.random.normal(k[2], (n, d))
    y = jnp.argmax(mlp_apply(teacher, x), -1)
    return teacher, student, x, y


def test_state_create_is_a_pytree():
    _, student, _, _ = problem()
    tx = optax.adam(1e-3)
    state = DistillState.create(student, tx)
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    chex.assert_trees_all_equal(state.opt_state, tx.init(student))
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(jax.tree.leaves(student)) + len(jax.tree.leaves(tx.init(student))) + 1
    with pytest.raises(TypeError, match="GradientTransformation"):
        DistillState.create(student, "adam")


def test_one_step_matches_manual_eager_computation():
    teacher, student, x, y = problem()
    lr = 0.1
    tx = optax.sgd(lr)
    step = make_distill_step(mlp_apply, mlp_apply, tx)
    state, metrics = step(DistillState.create(student, tx), teacher, (x, y))

    t_out = mlp_apply(teacher, x)

    def loss(p):
        return distillation_loss(mlp_apply(p, x), t_out, y).mean()

    grads = jax.grad(loss)(student)
    expected = jax.tree.map(lambda p, g: p - lr * g, student, grads)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-5, atol=1e-6)
    assert int(state.step) == 1
    s_out = mlp_apply(student, x)
    np.testing.assert_allclose(metrics["loss"], loss(student), rtol=1e-5)
    np.testing.assert_allclose(metrics["kd"], kd_loss(s_out, t_out).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ce"], softmax_cross_entropy_with_integer_labels(s_out, y).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(s_out, -1) == np.asarray(y)), rtol=1e-6)
    assert set(metrics) == {"loss", "kd", "ce", "accuracy"}
    assert all(v.shape == () for v in metrics.values())


def test_student_loss_falls():
    teacher, student, x, y = problem()
    tx = optax.adam(3e-2)
    step = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=functools.partial(distillation_loss, temperature=2.0))
    state = DistillState.create(student, tx)
    history = []
    for _ in range(60):
        state, m = step(state, teacher, (x, y))
        history.append(float(m["loss"]))
    assert history[-1] < 0.5 * history[0]
    assert float(m["accuracy"]) > 0.8


def test_label_free_batches():
    teacher, student, x, _ = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, mlp_apply, tx, donate=False)
    state = DistillState.create(student, tx)
    _, m1 = step(state, teacher, x)
    _, m2 = step(state, teacher, (x, None))
    assert set(m1) == {"loss", "kd", "ce"} and float(m1["ce"]) == 0.0
    np.testing.assert_allclose(m1["loss"], kd_loss(mlp_apply(student, x), mlp_apply(teacher, x)).mean(), rtol=1e-5)
    chex.assert_trees_all_close(m1, m2)
    # Dict inputs are inputs alone.
    step_d = make_distill_step(lambda p, b: mlp_apply(p, b["x"]), lambda p, b: mlp_apply(p, b["x"]), tx, donate=False)
    _, m3 = step_d(state, teacher, {"x": x})
    np.testing.assert_allclose(m3["loss"], m1["loss"], rtol=1e-6)


def test_custom_loss_fn_per_example_and_pair():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    state = DistillState.create(student, tx)

    step = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=lambda s, t, labels: cosine_loss(s, t), donate=False)
    _, m = step(state, teacher, x)
    np.testing.assert_allclose(m["loss"], cosine_loss(mlp_apply(student, x), mlp_apply(teacher, x)).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["kd"], m["loss"])

    def pair_loss(s, t, labels):
        kd = kd_loss(s, t, temperature=4.0)
        ce = softmax_cross_entropy_with_integer_labels(s, labels)
        return 0.9 * kd + 0.1 * ce, {"kd": kd, "ce": ce, "extra": jnp.float32(7.0)}

    step2 = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=pair_loss, donate=False)
    _, m2 = step2(state, teacher, (x, y))
    s_out, t_out = mlp_apply(student, x), mlp_apply(teacher, x)
    np.testing.assert_allclose(m2["kd"], kd_loss(s_out, t_out, temperature=4.0).mean(), rtol=1e-5)
    np.testing.assert_allclose(m2["loss"], 0.9 * m2["kd"] + 0.1 * m2["ce"], rtol=1e-5)
    assert float(m2["extra"]) == 7.0 and "accuracy" in m2

    # A keyword partial of distillation_loss still reports its two terms.
    part = functools.partial(distillation_loss, temperature=3.0, alpha=0.8)
    _, m3 = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=part, donate=False)(state, teacher, (x, y))
    np.testing.assert_allclose(m3["kd"], kd_loss(s_out, t_out, temperature=3.0).mean(), rtol=1e-5)
    np.testing.assert_allclose(m3["ce"], softmax_cross_entropy_with_integer_labels(s_out, y).mean(), rtol=1e-5)
    np.testing.assert_allclose(m3["loss"], 0.8 * m3["kd"] + 0.2 * m3["ce"], rtol=1e-5)

    bad = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=lambda s, t, labels: (s, t, labels), donate=False)
    with pytest.raises(TypeError, match="tuple of length 3"):
        bad(state, teacher, (x, y))


def exploding_teacher(params, x):
    @jax.custom_vjp
    def forward(params, x):
        return mlp_apply(params, x)

    def fwd(params, x):
        return forward(params, x), None

    def bwd(res, g):
        raise AssertionError("the teacher's backward pass ran")

    forward.defvjp(fwd, bwd)
    return forward(params, x)


def test_teacher_backward_never_runs():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, exploding_teacher, tx)
    state, m = step(DistillState.create(student, tx), teacher, (x, y))
    assert np.isfinite(float(m["loss"]))
    # Sanity check that the exploding teacher would explode if it were differentiated.
    with pytest.raises(AssertionError, match="backward pass ran"):
        jax.grad(lambda p: exploding_teacher(p, x).sum())(teacher)


def count_dots(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += count_dots(sub)
    return n


def test_jaxpr_holds_teacher_forward_only():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, mlp_apply, tx)
    jaxpr = jax.make_jaxpr(step.jitted)(DistillState.create(student, tx), teacher, (x, y))
    # teacher forward: 2 matmuls; student forward: 2; student backward: 2 weight grads + 1 input grad of
    # the second layer (the first layer's input gradient is not needed). A teacher backward would add more.
    assert count_dots(jaxpr.jaxpr) == 7


def test_student_transform_gets_step_and_gradient_flows_through_it():
    teacher, student, x, y = problem()
    mask = jax.tree.map(
        lambda p: jnp.asarray(np.random.default_rng(0).random(p.shape) > 0.5) if p.ndim == 2 else None, student
    )
    calls = []

    def transform(params, step):
        calls.append(step)
        masked = jax.tree.map(lambda p, m: p if m is None else p * m, params, mask, is_leaf=lambda v: v is None)
        # From step 2 on the student is all zeros: uniform logits.
        return jax.tree.map(lambda p: jnp.where(step >= 2, 0.0, p), masked)

    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, mlp_apply, tx, student_transform=transform)
    state = DistillState.create(student, tx)
    state, m0 = step(state, teacher, (x, y))
    assert isinstance(calls[0], jax.core.Tracer) and calls[0].dtype == jnp.int32
    for new, old, mk in zip(state.params["layers"], student["layers"], mask["layers"], strict=True):
        # Masked-out weights get zero gradient: unchanged by SGD; kept ones move.
        off = ~np.asarray(mk["kernel"])
        np.testing.assert_array_equal(np.asarray(new["kernel"])[off], np.asarray(old["kernel"])[off])
        assert np.any(np.asarray(new["kernel"])[~off] != np.asarray(old["kernel"])[~off])
    state, _ = step(state, teacher, (x, y))
    state, m2 = step(state, teacher, (x, y))
    uniform = jnp.zeros((x.shape[0], 5))
    np.testing.assert_allclose(m2["kd"], kd_loss(uniform, mlp_apply(teacher, x)).mean(), rtol=1e-5)
    assert len(calls) == 1  # traced once, then reused


def test_no_retracing_across_steps():
    teacher, student, x, y = problem()
    traces = []

    def student_apply(p, x):
        traces.append(1)
        return mlp_apply(p, x)

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    step = make_distill_step(student_apply, mlp_apply, tx)
    state = DistillState.create(student, tx)
    for i in range(5):
        state, _ = step(state, teacher, (x + i, y))
    assert len(traces) == 1 and int(state.step) == 5
    assert step.jitted._cache_size() == 1

    counted = chex.assert_max_traces(mlp_apply, n=1)
    step2 = make_distill_step(counted, mlp_apply, tx)
    state = DistillState.create(student, tx)
    for _ in range(3):
        state, _ = step2(state, teacher, (x, y))


@pytest.mark.slow
def test_donation_keeps_teacher_params_and_batch_usable():
    teacher, student, x, y = problem()
    teacher = jax.tree.map(jnp.copy, teacher)
    tx = optax.adam(1e-2)
    step = make_distill_step(mlp_apply, mlp_apply, tx, donate=True)
    state0 = DistillState.create(jax.tree.map(jnp.copy, student), tx)
    state1, _ = step(state0, teacher, (x, y))
    state2, _ = step(state1, teacher, (x, y))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(teacher))
    assert not x.is_deleted() and not y.is_deleted()
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state1.params))  # the state is donated
    np.testing.assert_allclose(mlp_apply(teacher, x), mlp_apply(problem()[0], x))

    # create() copies: the caller's student params survive donation, and an optimizer state that holds
    # the params themselves does not make the step donate one buffer twice.
    own = jax.tree.map(jnp.copy, student)
    holds_params = optax.chain(optax.sgd(0.1), optax.GradientTransformation(lambda p: p, lambda u, s, p=None: (u, p)))
    step_h = make_distill_step(mlp_apply, mlp_apply, holds_params)
    sh, _ = step_h(DistillState.create(own, holds_params), teacher, (x, y))
    sh, _ = step_h(sh, teacher, (x, y))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(own))

    keep = make_distill_step(mlp_apply, mlp_apply, tx, donate=False)
    s0 = DistillState.create(jax.tree.map(jnp.copy, student), tx)
    s1, _ = keep(s0, teacher, (x, y))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(s0))
    s1_again, _ = keep(s0, teacher, (x, y))  # s0 is still valid, and the step is deterministic
    chex.assert_trees_all_equal(s1.params, s1_again.params)


def test_teacher_sharing_a_donated_state_buffer_is_a_clear_error():
    _, student, x, y = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, mlp_apply, tx)
    state = DistillState.create(student, tx)
    with pytest.raises(ValueError, match=r"shares 4 array\(s\) with the donated student state \(first at 'layers/0/bias'\).*jnp.copy"):
        step(state, state.params, (x, y))  # self-distillation from the live params
    state, _ = step(state, jax.tree.map(jnp.copy, state.params), (x, y))  # a copy is fine
    keep = make_distill_step(mlp_apply, mlp_apply, tx, donate=False)
    keep(state, state.params, (x, y))  # and so is no donation


def test_keep_masked_style_optimizer_chain_sees_params():
    """tx.update receives params (needed by weight decay and by keep_masked / gradual_pruning)."""
    teacher, student, x, y = problem()
    seen = []

    def update(updates, state, params=None):
        seen.append(params is not None)
        return updates, state

    tx = optax.chain(optax.sgd(0.1), optax.GradientTransformation(lambda p: optax.EmptyState(), update))
    step = make_distill_step(mlp_apply, mlp_apply, tx)
    step(DistillState.create(student, tx), teacher, (x, y))
    assert seen == [True]


# --- intermediate features from Flax models (FitNets hints) -------------------------------------------


class LinenMLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        self.sow("intermediates", "features", h)
        return nn.Dense(5, name="out")(h)


@pytest.mark.slow
def test_linen_hint_distillation_with_sow_and_capture_intermediates():
    _, _, x, y = problem()
    teacher, student = LinenMLP(32), LinenMLP(6)
    t_vars = teacher.init(jax.random.key(1), x)
    s_vars = student.init(jax.random.key(2), x)

    def teacher_apply(variables, x):
        # sow: the module stores what it wants to expose in the "intermediates" collection.
        logits, state = teacher.apply(variables, x, mutable=["intermediates"])
        return {"logits": logits, "features": state["intermediates"]["features"][0]}

    def student_apply(params, x):
        # capture_intermediates: every submodule's output, without changing the module.
        logits, state = student.apply(
            {"params": params["model"]}, x, capture_intermediates=True, mutable=["intermediates"]
        )
        hidden = nn.relu(state["intermediates"]["hidden"]["__call__"][0])
        return {"logits": logits, "features": hidden, "proj": params["proj"]}

    def loss_fn(s, t, labels):
        kd = distillation_loss(s["logits"], t["logits"], labels, temperature=2.0)
        hint = hint_loss(s["features"], t["features"], s["proj"])
        return kd + 0.5 * hint, {"hint": hint}

    params = {"model": s_vars["params"], "proj": jnp.zeros((6, 32))}
    tx = optax.adam(1e-2)
    step = make_distill_step(student_apply, teacher_apply, tx, loss_fn=loss_fn)
    state = DistillState.create(params, tx)
    state, m0 = step(state, t_vars, (x, y))
    for _ in range(30):
        state, m = step(state, t_vars, (x, y))
    assert {"hint", "loss", "kd", "ce", "accuracy"} <= set(m)
    assert float(m["hint"]) < float(m0["hint"])
    assert float(jnp.abs(state.params["proj"]).sum()) > 0  # the projection is trained


class NNXMLP(nnx.Module):
    def __init__(self, hidden, rngs):
        self.hidden = nnx.Linear(8, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.hidden(x))
        self.sow(nnx.Intermediate, "features", h)
        return self.out(h)


def test_nnx_hint_distillation_with_capture():
    _, _, x, y = problem()
    teacher, student = NNXMLP(32, nnx.Rngs(1)), NNXMLP(8, nnx.Rngs(2))
    t_def, t_params = nnx.split(teacher, nnx.Param)
    s_def, s_params = nnx.split(student, nnx.Param)

    def nnx_apply(graphdef):
        def apply(params, x):
            model = nnx.merge(graphdef, params)
            logits, inter = nnx.capture(model, nnx.Intermediate)(x)
            return {"logits": logits, "features": inter["features"][0]}

        return apply

    # Widths match when projected by a fixed random matrix (a stand-in for a learned regressor).
    proj = jax.random.normal(jax.random.key(3), (8, 32)) / np.sqrt(8)

    def loss_fn(s, t, labels):
        hint = hint_loss(s["features"], t["features"], proj)
        return distillation_loss(s["logits"], t["logits"], labels) + 0.1 * hint, {"hint": hint}

    tx = optax.adam(1e-2)
    step = make_distill_step(nnx_apply(s_def), nnx_apply(t_def), tx, loss_fn=loss_fn)
    state = DistillState.create(s_params, tx)
    state, m0 = step(state, t_params, (x, y))
    for _ in range(20):
        state, m = step(state, t_params, (x, y))
    assert float(m["loss"]) < float(m0["loss"])
    assert isinstance(state.params, nnx.State)
    nnx.update(student, state.params)  # the trained params go back into the module


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_arguments():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    with pytest.raises(TypeError, match="student_apply"):
        make_distill_step(None, mlp_apply, tx)
    with pytest.raises(TypeError, match="teacher_apply"):
        make_distill_step(mlp_apply, 3, tx)
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_distill_step(mlp_apply, mlp_apply, optax.sgd)
    with pytest.raises(TypeError, match="student_transform"):
        make_distill_step(mlp_apply, mlp_apply, tx, student_transform="masks")
    with pytest.raises(TypeError, match="Mesh"):
        make_distill_step(mlp_apply, mlp_apply, tx, mesh="data")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="data_axis='data'.*'batch'"):
        make_distill_step(mlp_apply, mlp_apply, tx, mesh=mesh)

    step = make_distill_step(mlp_apply, mlp_apply, tx, donate=False)
    state = DistillState.create(student, tx)
    with pytest.raises(TypeError, match="DistillState.create"):
        step(student, teacher, (x, y))
    with pytest.raises(TypeError, match="float32"):
        step(state, teacher, (x, y.astype(jnp.float32)))
    with pytest.raises(ValueError, match=r"\(32, 5\).*\(32, 3\)"):
        step(state, {"layers": [teacher["layers"][0], {"kernel": jnp.ones((32, 3)), "bias": jnp.zeros(3)}]}, (x, y))
    with pytest.raises(ValueError, match="alpha=1.5"):
        make_distill_step(
            mlp_apply, mlp_apply, tx, donate=False, loss_fn=functools.partial(distillation_loss, alpha=1.5)
        )(state, teacher, (x, y))
    with pytest.raises(ValueError, match="temperature=0"):
        make_distill_step(
            mlp_apply, mlp_apply, tx, donate=False, loss_fn=functools.partial(distillation_loss, temperature=0)
        )(state, teacher, (x, y))


def test_mesh_on_one_device_matches_plain_step():
    teacher, student, x, y = problem()
    tx = optax.adam(1e-2)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    plain = make_distill_step(mlp_apply, mlp_apply, tx, donate=False)
    sharded = make_distill_step(mlp_apply, mlp_apply, tx, mesh=mesh, donate=False)
    state = DistillState.create(student, tx)
    a, ma = plain(state, teacher, (x, y))
    b, mb = sharded(state, teacher, (x, y))
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6)
    chex.assert_trees_all_close(ma, mb, rtol=1e-6)


# --- 8 simulated devices (subprocess: XLA_FLAGS must be set before jax starts) ----------------------------

MESH_SCRIPT = textwrap.dedent(
    """
    import functools, json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, PartitionSpec
    from compressjax.distillation import DistillState, make_distill_step
    from compressjax.losses import distillation_loss
    assert jax.device_count() == 8, jax.devices()

    def init(key, sizes):
        ks = jax.random.split(key, len(sizes) - 1)
        return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
                for k, a, b in zip(ks, sizes[:-1], sizes[1:])]

    traces = []
    def apply(p, x):
        traces.append(1)
        for i, l in enumerate(p):
            x = x @ l["w"] + l["b"]
            x = jax.nn.relu(x) if i < len(p) - 1 else x
        return x

    k = jax.random.split(jax.random.key(0), 3)
    teacher, student = init(k[0], [8, 32, 5]), init(k[1], [8, 6, 5])
    xs = jax.random.normal(k[2], (4, 64, 8))
    ys = jnp.argmax(jax.vmap(lambda x: apply(teacher, x))(xs), -1)
    tx = optax.adam(1e-2)
    loss_fn = functools.partial(distillation_loss, temperature=2.0, alpha=0.7)
    out = {}
    for name, shape, names in [("1d", (8,), ("data",)), ("2d", (4, 2), ("data", "model"))]:
        mesh = Mesh(np.array(jax.devices()).reshape(shape), names)
        plain = make_distill_step(apply, apply, tx, loss_fn=loss_fn)
        sharded = make_distill_step(apply, apply, tx, loss_fn=loss_fn, mesh=mesh)
        a = DistillState.create(student, tx)
        b = DistillState.create(student, tx)
        traces.clear()
        for x, y in zip(xs, ys):
            a, ma = plain(a, teacher, (x, y))
            b, mb = sharded(b, teacher, (x, y))
        n_traces = len(traces)
        diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        mdiff = max(abs(float(ma[k]) - float(mb[k])) for k in ma)
        leaf = jax.tree.leaves(b.params)[0]
        out[name] = dict(diff=diff, mdiff=mdiff, traces=n_traces, keys=sorted(mb),
                         replicated=leaf.sharding.is_fully_replicated,
                         n_devices=len(leaf.sharding.device_set), step=int(b.step))
    # Other data-axis name, and the batch-divisibility error.
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    step = make_distill_step(apply, apply, tx, mesh=mesh, data_axis="batch")
    s, m = step(DistillState.create(student, tx), teacher, (xs[0], ys[0]))
    out["batch_axis_loss"] = float(m["loss"])
    try:
        step(s, teacher, (xs[0, :12], ys[0, :12]))
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_step_on_8_devices_matches_single_device():
    import json

    stdout = run_with_8_devices(MESH_SCRIPT)
    out = json.loads(stdout.split("RESULT", 1)[1])
    for name in ("1d", "2d"):
        r = out[name]
        assert r["diff"] < 1e-5 and r["mdiff"] < 1e-5, r
        # `apply` is both teacher and student: 2 calls per trace; one trace for the plain step and one for
        # the sharded step, over 4 steps each.
        assert r["traces"] == 4, r
        assert r["replicated"] and r["n_devices"] == 8 and r["step"] == 4
        assert r["keys"] == ["accuracy", "ce", "kd", "loss"]
    assert np.isfinite(out["batch_axis_loss"])
    assert out["error"] is not None and "batch size 12" in out["error"] and "'batch' axis of size 8" in out["error"]


# --- one step that distills, prunes and quantizes ------------------------------------------------------


@pytest.mark.slow
def test_prune_quantize_distill_in_one_step():
    from compressjax import QuantSpec, apply_masks, fake_quant_params, keep_masked, magnitude_masks, sparsity_summary

    teacher, _, x, y = problem()
    student = mlp_init(jax.random.key(7), [8, 24, 5])
    masks = magnitude_masks(student, 0.5)
    spec = QuantSpec(bits=4)

    def transform(params, step):
        del step
        return fake_quant_params(apply_masks(params, masks), spec)

    tx = optax.chain(optax.adam(1e-2), keep_masked(masks))
    step = make_distill_step(
        mlp_apply,
        mlp_apply,
        tx,
        student_transform=transform,
        loss_fn=functools.partial(distillation_loss, temperature=2.0),
    )
    state = DistillState.create(student, tx)
    state, m0 = step(state, teacher, (x, y))
    # The reported loss is the loss of the masked, 4-bit student.
    s_out = mlp_apply(transform(student, 0), x)
    np.testing.assert_allclose(
        m0["loss"], distillation_loss(s_out, mlp_apply(teacher, x), y, temperature=2.0).mean(), rtol=1e-5
    )
    for _ in range(40):
        state, m = step(state, teacher, (x, y))
    assert float(m["loss"]) < float(m0["loss"])
    # keep_masked made the pruned weights exactly zero in the trained params themselves.
    summary = sparsity_summary(state.params)
    assert summary.zeros == sum(int((~np.asarray(mk)).sum()) for mk in jax.tree.leaves(masks))
    for mk, w in zip(jax.tree.leaves(masks), [layer["kernel"] for layer in state.params["layers"]], strict=True):
        assert np.all(np.asarray(w)[~np.asarray(mk)] == 0)
    # Each output channel of the deployed student holds at most 2^4 - 1 = 15 distinct levels.
    deployed = transform(state.params, 0)
    for layer in deployed["layers"]:
        k = np.asarray(layer["kernel"])
        assert max(len(np.unique(k[:, j])) for j in range(k.shape[1])) <= 15


# --- examples, in quick mode ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", ["distill_hint.py", "distill_mesh.py"])
def test_example_runs_in_quick_mode(script):
    proc = run_example(script, "--quick", timeout=300, env={"XLA_FLAGS": None})  # distill_mesh.py sets its own
    assert "test accuracy" in proc.stdout
    if script == "distill_mesh.py":
        assert "mesh: 8 cpu devices" in proc.stdout and "90.0% zeros" in proc.stdout


# ------------------------------------------------------------------ issue 11 items 7 and 14
def test_non_finite_teacher_shows_in_the_step_metrics():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, lambda p, v: mlp_apply(p, v).at[0, 0].set(jnp.nan), tx, donate=False)
    _, metrics = step(DistillState.create(student, tx), teacher, (x, y))
    assert np.isnan(float(metrics["loss"])) and np.isnan(float(metrics["kd"]))


def test_list_batch_is_read_like_a_tuple():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(mlp_apply, mlp_apply, tx, donate=False)
    state = DistillState.create(student, tx)
    s1, m1 = step(state, teacher, (x, y))
    s2, m2 = step(state, teacher, [x, y])
    chex.assert_trees_all_close(m1, m2)
    chex.assert_trees_all_close(s1.params, s2.params)
    assert "accuracy" in m2


def test_two_inputs_as_a_batch_give_the_batch_convention():
    teacher, student, x, _ = problem()
    tx = optax.sgd(0.1)
    step = make_distill_step(lambda p, b: mlp_apply(p, b[0] + b[1]), lambda p, b: mlp_apply(p, b[0] + b[1]), tx, donate=False)
    state = DistillState.create(student, tx)
    for batch in ((x, x), [x, x]):
        with pytest.raises(TypeError, match=r"float32.*\(inputs, labels\).*\(\(x1, x2\), labels\)"):
            step(state, teacher, batch)
    _, metrics = step(state, teacher, ((x, x), None))  # the documented way to pass two inputs
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(TypeError, match=r"\(inputs, labels\)"):
        step(state, teacher, (x, "labels"))


def test_keyword_partial_reports_terms_without_identity_tests():
    teacher, student, x, y = problem()
    tx = optax.sgd(0.1)
    state = DistillState.create(student, tx)
    step = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=functools.partial(distillation_loss, temperature=3.0, alpha=0.7), donate=False)
    _, m = step(state, teacher, (x, y))
    s_out, t_out = mlp_apply(student, x), mlp_apply(teacher, x)
    np.testing.assert_allclose(m["kd"], kd_loss(s_out, t_out, temperature=3.0).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ce"], softmax_cross_entropy_with_integer_labels(s_out, y).mean(), rtol=1e-5)
    # A wrapper with the same behaviour is recognised by its protocol attribute, not by identity.

    def my_loss(s, t, labels, **kw):
        return distillation_loss(s, t, labels, **kw)

    my_loss._cj_with_terms = distillation_loss._cj_with_terms
    step2 = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=functools.partial(my_loss, temperature=3.0, alpha=0.7), donate=False)
    _, m2 = step2(state, teacher, (x, y))
    chex.assert_trees_all_close(m, m2)


def test_losses_are_no_longer_re_exported_by_distillation():
    import compressjax.distillation as d

    assert "kd_loss" not in d.__all__ and not hasattr(d, "kd_loss")
