"""The demo's stages: teacher, baseline student, distilled student, prune + 4-bit QAT, save and load, and
one-shot GPTQ of the distilled student.

Every training loop is a jitted ``lax.scan`` over ``chunk`` optimizer steps (batches are sampled and
augmented inside it), so the host only wakes up between chunks to move the progress bar. The distillation
stages scan over the step that :func:`compressjax.make_distill_step` builds (its ``step.jitted``), so the
library's step is what trains the student.

Augmentation: a random shift of each 1-D signal by up to ``max_shift`` samples, edges repeated. MNIST-1D
digits are already placed at random offsets, so a shift keeps the label; it is what lifts the teacher
above 96% and it gives the student's distillation new inputs on which to match the teacher (Hinton et
al., 2015, arXiv:1503.02531; Beyer et al., 2022, "Knowledge distillation: A good teacher is patient and
consistent", arXiv:2106.05237: the teacher sees the same augmented input as the student).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import (
    DistillState,
    QuantSpec,
    cast_centroids,
    codebook_student,
    collect_hessians,
    distillation_loss,
    fake_quant_params,
    gptq,
    gradual_pruning,
    kmeans_codebooks,
    load,
    make_distill_step,
    masks_from_state,
    merge_centroids,
    polynomial_sparsity,
    quantize_params,
    save,
    size_report,
    split_centroids,
)
from compressjax.allocation import auto_compress
from compressjax.demo import models
from compressjax.demo.data import load_mnist1d, load_transfer_inputs

__all__ = [
    "DemoConfig", "Stage", "DemoResult", "run_demo", "shift_signals", "STAGE_NAMES", "train_supervised", "distill",
    "accuracy", "predict_labels", "transfer_set", "make_optimizer",
]

#: Progress callback: ``(stage, steps_done, steps_total, metrics)``; called after every chunk.
Progress = Callable[[str, int, int, dict[str, float]], None]

STAGE_NAMES = ("teacher", "student", "distilled", "compressed", "one-shot")
TRAIN_SIZE = 4000  # MNIST-1D's training split; an "epoch" below is this many examples


#: The largest ``seed`` (``jax.random.key`` takes a 32-bit unsigned seed without x64).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (``compressjax demo`` flags map onto these).

    Attributes:
        seed: model initialisation and batch order (the dataset itself is MNIST-1D's fixed split).
        epochs: epochs of the 4000 labelled examples per training stage (teacher, student, and the
            compression stage); the distilled student takes exactly the baseline's number of steps.
        sparsity: final fraction of pruned kernel weights in the compressed model.
        bits: weight bits of the compressed model (kernels; biases keep 8 bits).
        batch_size: examples per optimizer step.
        learning_rate: peak Adam learning rate (warm-up then cosine decay in every stage).
        max_shift: largest random shift of the 1-D signals (augmentation), in samples.
        transfer_size: extra unlabelled MNIST-1D inputs (another seed) the teacher labels for distillation.
        transfer_seed: mnist1d seed of those inputs.
        temperature: distillation temperature ``T``.
        alpha: weight of the soft (teacher) term; ``1 - alpha`` weighs cross-entropy against the labels
            (the true labels on the training inputs, the teacher's argmax on the extra inputs).
        chunk: optimizer steps per compiled ``lax.scan`` call (progress granularity).
        teacher / student: model shapes.
        codebook_bits: ``None`` (default) for uniform ``bits``-bit QAT in stage 4; an int in 1..8 replaces
            it by weight sharing (Deep Compression): prune in float, ``kmeans_codebooks`` with that many
            bits on the surviving kernel weights, then distil the centroids alone (a quarter of the steps).
    """

    seed: int = 0
    epochs: int = 64
    sparsity: float = 0.8
    bits: int = 4
    batch_size: int = 128
    learning_rate: float = 3e-3
    max_shift: int = 4
    transfer_size: int = 16000
    transfer_seed: int = 7
    temperature: float = 2.0
    alpha: float = 0.5
    chunk: int = 50
    teacher: models.CNNConfig = field(default=models.TEACHER)
    student: models.CNNConfig = field(default=models.STUDENT)
    codebook_bits: int | None = None  # weight sharing instead of uniform QAT
    budget_bits: float | None = None  # an extra "allocated" stage: auto_compress to this many bits per kernel weight

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {self.bits!r}")
        if self.codebook_bits is not None and (
            isinstance(self.codebook_bits, bool) or not isinstance(self.codebook_bits, int) or not 1 <= self.codebook_bits <= 8
        ):
            raise ValueError(f"codebook_bits must be None or an int in 1..8, got {self.codebook_bits!r}")
        if self.budget_bits is not None and (
            isinstance(self.budget_bits, bool) or not isinstance(self.budget_bits, int | float) or not 0 < self.budget_bits < 64
        ):
            raise ValueError(f"budget_bits must be None or a number of bits per weight in (0, 64), got {self.budget_bits!r}")
        if self.transfer_size < 10:
            raise ValueError(f"transfer_size must be >= 10, got {self.transfer_size!r}")

    @property
    def steps(self) -> int:
        """Optimizer steps per training stage: ``epochs`` passes over 4000 examples, rounded up to ``chunk``."""
        raw = math.ceil(self.epochs * TRAIN_SIZE / self.batch_size)
        return self.chunk * math.ceil(raw / self.chunk)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A tiny run for tests and smoke checks (seconds of training; accuracies are not meaningful)."""
        base = dict(epochs=2, transfer_size=1000, chunk=16, teacher=models.CNNConfig((16, 32, 32), (5, 5, 3), (1, 2, 2), 32))
        base.update(overrides)
        return cls(**base)

    def rules(self) -> dict[str, QuantSpec]:
        """Quantization rules of the compressed model: ``bits`` per output channel for kernels, int8 biases."""
        # layer_axes=(): the 3-D kernels are conv1d (k, in, out), not stacked layers (scales shared across k)
        return {"kernel": QuantSpec(bits=self.bits, layer_axes=()), "bias": QuantSpec(bits=8, channel_axes=())}


@dataclass(frozen=True)
class Stage:
    """One row of the demo's table (``accuracy`` is a fraction of the 1000 test examples)."""

    name: str
    accuracy: float
    params: int
    nonzero: int
    bits_per_weight: float
    bytes: int
    ratio_vs_teacher: float
    seconds: float = 0.0  # wall time of the stage (training or one-shot compression, evaluation included)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "params": self.params,
            "nonzero": self.nonzero,
            "bits_per_weight": self.bits_per_weight,
            "bytes": self.bytes,
            "ratio_vs_teacher": self.ratio_vs_teacher,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class DemoResult:
    """All stages, the wall time in seconds, and where the compressed model was written."""

    stages: tuple[Stage, ...]
    seconds: float
    model_path: str
    config: DemoConfig

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "seconds": self.seconds}


# ---------------------------------------------------------------------------------------------- training


def shift_signals(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each row of ``x`` (``(batch, length)``) by a random integer in ``[-max_shift, max_shift]``.

    Samples that move in from outside repeat the edge value, so no artificial step appears.
    """
    if max_shift == 0:
        return x
    length = x.shape[-1]
    s = jax.random.randint(key, (x.shape[0], 1), -max_shift, max_shift + 1)
    idx = jnp.clip(jnp.arange(length)[None, :] - s, 0, length - 1)
    return jnp.take_along_axis(x, idx, axis=1)


def _sample(key: jax.Array, x: jax.Array, y: jax.Array, batch_size: int, max_shift: int):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])
    return shift_signals(k_shift, x[idx], max_shift), y[idx]


def _run_chunks(run_chunk, carry, key, steps: int, chunk: int, name: str, progress: Progress | None):
    for i in range(steps // chunk):
        carry, metrics = run_chunk(carry, jax.random.fold_in(key, i))
        if progress is not None:
            progress(name, (i + 1) * chunk, steps, {k: float(v) for k, v in metrics.items()})
    return carry


def make_optimizer(learning_rate: float, steps: int, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """AdamW with a linear warm-up over the first 5% of ``steps`` then cosine decay to zero (every stage)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    return optax.adamw(schedule, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=("model", "hp"))
def _supervised_chunk(carry, key, x, y, *, model, hp):
    # Module-level and keyed on hashable statics (the linen module, the hyperparameters), so stages that
    # train the same architecture with the same recipe share one compilation.
    learning_rate, steps, batch_size, max_shift, chunk = hp
    tx = make_optimizer(learning_rate, steps)

    def loss_fn(p, xb, yb):
        logits = model.apply({"params": p}, xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, (jnp.argmax(logits, -1) == yb).mean()

    def body(carry, key):
        p, opt_state = carry
        xb, yb = _sample(key, x, y, batch_size, max_shift)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), {"loss": loss, "accuracy": acc}

    carry, metrics = jax.lax.scan(body, carry, jax.random.split(key, chunk))
    return carry, jax.tree.map(jnp.mean, metrics)


def train_supervised(model, params, x, y, cfg: DemoConfig, key: jax.Array, name: str, progress: Progress | None = None):
    """Cross-entropy training on labels with shift augmentation; ``cfg.steps`` AdamW steps. Returns params."""
    hp = (cfg.learning_rate, cfg.steps, cfg.batch_size, cfg.max_shift, cfg.chunk)
    x, y = jnp.asarray(x), jnp.asarray(y)
    carry = (params, make_optimizer(cfg.learning_rate, cfg.steps).init(params))
    run_chunk = functools.partial(_supervised_chunk, x=x, y=y, model=model, hp=hp)
    params, _ = _run_chunks(run_chunk, carry, key, cfg.steps, cfg.chunk, name, progress)
    return params


def distill(student, teacher, teacher_params, state: DistillState, tx, x, labels, cfg: DemoConfig, key, name: str,
            *, student_transform=None, progress: Progress | None = None) -> DistillState:
    """``cfg.steps`` steps of :func:`make_distill_step` on augmented batches of the transfer set ``x``."""
    loss_fn = functools.partial(distillation_loss, temperature=cfg.temperature, alpha=cfg.alpha)
    step = make_distill_step(
        lambda p, xb: student.apply({"params": p}, xb),
        lambda p, xb: teacher.apply({"params": p}, xb),
        tx,
        loss_fn=loss_fn,
        student_transform=student_transform,
        donate=False,  # the step is inlined in the scan below, where XLA reuses buffers on its own
    )
    x, labels = jnp.asarray(x), jnp.asarray(labels)

    def body(state, key):
        state, metrics = step.jitted(state, teacher_params, _sample(key, x, labels, cfg.batch_size, cfg.max_shift))
        return state, {k: metrics[k] for k in ("loss", "kd", "accuracy")}

    @jax.jit
    def run_chunk(state, key):
        state, metrics = jax.lax.scan(body, state, jax.random.split(key, cfg.chunk))
        return state, jax.tree.map(jnp.mean, metrics)

    return _run_chunks(run_chunk, state, key, cfg.steps, cfg.chunk, name, progress)


@functools.partial(jax.jit, static_argnames="model")
def _predict(params, x, *, model):
    return jnp.argmax(model.apply({"params": params}, x), -1)


def accuracy(model, params, x, y) -> float:
    """Fraction of ``x`` whose argmax logit equals ``y`` (an exact count over ``len(y)``)."""
    correct = int(jnp.sum(_predict(params, jnp.asarray(x), model=model) == jnp.asarray(y)))
    return correct / len(y)


def predict_labels(model, params, x, batch: int = 4096) -> np.ndarray:
    """The model's argmax class for every row of ``x`` (in batches, to bound memory)."""
    return np.concatenate([np.asarray(_predict(params, jnp.asarray(x[i : i + batch]), model=model))
                           for i in range(0, len(x), batch)])


def transfer_set(teacher, teacher_params, x_train, y_train, extra) -> tuple[np.ndarray, np.ndarray]:
    """The labelled inputs plus ``extra`` unlabelled ones, with the teacher's argmax as their labels."""
    x = np.concatenate([x_train, extra])
    y = np.concatenate([y_train, predict_labels(teacher, teacher_params, extra)]).astype(np.int32)
    return x, y


# ---------------------------------------------------------------------------------------------- the run


def _stage(name: str, acc: float, params, nbytes: int, teacher_f32: int, since: float = 0.0) -> Stage:
    leaves = jax.tree_util.tree_leaves(params)
    n = int(sum(np.size(v) for v in leaves))
    nnz = int(sum(int(np.count_nonzero(np.asarray(v))) for v in leaves))
    seconds = round(time.perf_counter() - since, 2) if since else 0.0
    return Stage(name, acc, n, nnz, 8.0 * nbytes / n, int(nbytes), teacher_f32 / nbytes, seconds)


def run_demo(cfg: DemoConfig, out_dir: str | os.PathLike = ".", *, progress: Progress | None = None,
             log: Callable[[str], None] | None = None) -> DemoResult:
    """Runs the pipeline's six steps and returns its five table rows (``STAGE_NAMES``); steps 4 and 5 make
    the fourth row.

    1. teacher: CE on the 4000 labelled examples; 2. student: the small model, same recipe (baseline);
    3. distilled: the same student from the same init, same number of steps, distilled on the transfer set;
    4. continues 3 with ``gradual_pruning`` to ``cfg.sparsity`` and ``fake_quant_params`` at ``cfg.bits``;
    5. ``save`` with the masks and rules, ``load`` back, evaluate (the ``compressed`` row);
    6. ``one-shot``: GPTQ of the distilled student (step 3) from 512 training inputs, no training.

    Bytes are what :func:`compressjax.save` writes (:func:`compressjax.size_report` for the float stages);
    the ratio is against the teacher's dense float32 bytes. The compressed file is written to
    ``out_dir/compressjax-demo-student.cjx``.
    """
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    data = load_mnist1d()
    extra = load_transfer_inputs(cfg.transfer_size, cfg.transfer_seed)
    teacher, student = models.make_model(cfg.teacher), models.make_model(cfg.student)
    k_teacher, k_student, k_t_train, k_s_train, k_d_train, k_c_train = jax.random.split(jax.random.key(cfg.seed), 6)

    # 1. Teacher.
    t_stage = time.perf_counter()
    t_params = train_supervised(teacher, models.init_params(cfg.teacher, k_teacher), data.x_train, data.y_train, cfg,
                                k_t_train, "teacher", progress)
    teacher_f32 = 4 * models.count_params(t_params)
    rows = [_stage("teacher", accuracy(teacher, t_params, data.x_test, data.y_test), t_params,
                   size_report(t_params).total_bytes, teacher_f32, t_stage)]
    say(f"teacher: {rows[-1].accuracy:.4f}")

    # 2. Baseline student on labels alone.
    s_init = models.init_params(cfg.student, k_student)
    t_stage = time.perf_counter()
    s_params = train_supervised(student, s_init, data.x_train, data.y_train, cfg, k_s_train, "student", progress)
    rows.append(_stage("student", accuracy(student, s_params, data.x_test, data.y_test), s_params,
                       size_report(s_params).total_bytes, teacher_f32, t_stage))
    say(f"student: {rows[-1].accuracy:.4f}")

    # 3. Distillation on the transfer set: true labels where known, the teacher's argmax elsewhere.
    t_stage = time.perf_counter()
    x_transfer, y_transfer = transfer_set(teacher, t_params, data.x_train, data.y_train, extra)
    tx = make_optimizer(cfg.learning_rate, cfg.steps)
    state = distill(student, teacher, t_params, DistillState.create(s_init, tx), tx, x_transfer, y_transfer, cfg,
                    k_d_train, "distilled", progress=progress)
    d_params = state.params
    rows.append(_stage("distilled", accuracy(student, d_params, data.x_test, data.y_test), d_params,
                       size_report(d_params).total_bytes, teacher_f32, t_stage))
    say(f"distilled: {rows[-1].accuracy:.4f}")

    # 4-5. Compress (gradual pruning with b-bit QAT, or k-means weight sharing), save, load, evaluate the file.
    t_stage = time.perf_counter()
    compress = _uniform_stages if cfg.codebook_bits is None else _weight_sharing_stages
    path, report, loaded = compress(cfg, student, teacher, t_params, d_params, x_transfer, y_transfer, k_c_train,
                                    out_dir, progress)
    c_acc = accuracy(student, loaded, data.x_test, data.y_test)
    rows.append(_stage("compressed", c_acc, loaded, report.total_bytes, teacher_f32, t_stage))
    say(f"compressed: {c_acc:.4f}, {report.total_bytes} bytes")

    # 6. One-shot: GPTQ of the distilled student from a few hundred training inputs, no training.
    rows.append(_one_shot(student, d_params, data, cfg, out_dir, teacher_f32))
    say(f"one-shot: {rows[-1].accuracy:.4f}, {rows[-1].bytes} bytes, {rows[-1].seconds:.1f} s")

    # 7. (--budget) Allocated: per kernel the method and bits that lose least within the budget.
    if cfg.budget_bits is not None:
        rows.append(_allocated(student, d_params, data, cfg, out_dir, teacher_f32))
        say(f"allocated: {rows[-1].accuracy:.4f}, {rows[-1].bytes} bytes, {rows[-1].seconds:.1f} s")
    return DemoResult(tuple(rows), time.perf_counter() - t0, path, cfg)


def _uniform_stages(cfg: DemoConfig, student, teacher, t_params, d_params, x_transfer, y_transfer, key, out_dir,
                    progress: Progress | None):
    """Stages 4-5 by default: gradual pruning to ``cfg.sparsity`` with ``cfg.bits`` fake quantization, distilling
    on; then ``save`` with the masks and rules and ``load``. Returns ``(path, size report, loaded params)``."""
    # 4. Continue distilling while pruning gradually and training through b-bit fake quantization.
    rules = cfg.rules()
    steps = cfg.steps
    schedule = polynomial_sparsity(cfg.sparsity, begin_step=0, end_step=max(int(0.6 * steps), 1))
    tx_c = optax.chain(
        make_optimizer(cfg.learning_rate, steps, weight_decay=0.0),
        gradual_pruning(schedule, update_every=max(steps // 40, 1)),
    )
    # Pruned weights are exactly zero in the params (gradual_pruning's update), and zero stays zero under
    # symmetric quantization, so the forward transform needs only the fake quantization.
    state = distill(student, teacher, t_params, DistillState.create(d_params, tx_c), tx_c, x_transfer, y_transfer,
                    cfg, key, "compressed", student_transform=lambda p, _step: fake_quant_params(p, rules),
                    progress=progress)
    masks = masks_from_state(state.opt_state)

    # 5. Save, load, evaluate what came back from the file.
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), "compressjax-demo-student.cjx")
    report = save(path, state.params, masks=masks, rules=rules)
    loaded = load(path)
    return path, report, loaded


def _one_shot(student, d_params, data, cfg: DemoConfig, out_dir, teacher_f32: int, n_calib: int = 512) -> Stage:
    """GPTQ (per output channel, ``max(cfg.bits, 2)`` bits, act-order) of the distilled student, calibrated
    on ``n_calib`` training inputs (no labels, no training); biases in int8 as in the compressed stage.
    Saved to ``out_dir/compressjax-demo-oneshot.cjx`` and evaluated from the file."""
    t_stage = time.perf_counter()
    calib = jnp.asarray(data.x_train[:n_calib])
    hess = collect_hessians(lambda p, xb: student.apply({"params": p}, xb), d_params, [calib])
    q = gptq(d_params, hess, {"kernel": QuantSpec(bits=max(cfg.bits, 2))}, act_order=True)
    path = os.path.join(os.fspath(out_dir), "compressjax-demo-oneshot.cjx")
    report = save(path, quantize_params(q, {"bias": QuantSpec(bits=8, channel_axes=())}))
    loaded = load(path)
    acc = accuracy(student, loaded, data.x_test, data.y_test)
    return _stage("one-shot", acc, loaded, report.total_bytes, teacher_f32, t_stage)


def _allocated(student, d_params, data, cfg: DemoConfig, out_dir, teacher_f32: int, n_calib: int = 512) -> Stage:
    """``auto_compress`` of the distilled student to ``cfg.budget_bits`` bits per kernel weight (default menu,
    sequential), calibrated like the one-shot stage; biases in int8. Writes the model to
    ``out_dir/compressjax-demo-allocated.cjx`` and the plan's plot to ``compressjax-demo-plan.png``."""
    t_stage = time.perf_counter()
    calib = jnp.asarray(data.x_train[:n_calib])
    q, plan = auto_compress(lambda p, xb: student.apply({"params": p}, xb), d_params, [calib], bits_per_weight=cfg.budget_bits)
    os.makedirs(out_dir, exist_ok=True)
    plan.plot(os.path.join(os.fspath(out_dir), "compressjax-demo-plan.png"))
    path = os.path.join(os.fspath(out_dir), "compressjax-demo-allocated.cjx")
    report = save(path, quantize_params(q, {"bias": QuantSpec(bits=8, channel_axes=())}, on_unmatched="ignore"))
    loaded = load(path)
    acc = accuracy(student, loaded, data.x_test, data.y_test)
    return _stage("allocated", acc, loaded, report.total_bytes, teacher_f32, t_stage)


def _weight_sharing_stages(cfg: DemoConfig, student, teacher, t_params, d_params, x_transfer, y_transfer, key,
                           out_dir, progress: Progress | None):
    """Stages 4-5 with ``--codebook-bits``: Deep Compression's pruning, weight sharing and centroid tuning.

    The distilled student is pruned gradually to ``cfg.sparsity`` (float, distilling on), its kernels become
    ``cfg.codebook_bits``-bit k-means codebooks on the surviving weights (pruned ones on the reserved zero)
    and the centroids alone are distilled for a quarter of the steps; biases are stored as int8. Returns
    ``(path, size report, loaded params)``.
    """
    k_prune, k_tune = jax.random.split(key)
    steps = cfg.steps
    schedule = polynomial_sparsity(cfg.sparsity, begin_step=0, end_step=max(int(0.6 * steps), 1))
    tx_c = optax.chain(make_optimizer(cfg.learning_rate, steps, weight_decay=0.0),
                       gradual_pruning(schedule, update_every=max(steps // 40, 1)))
    state = distill(student, teacher, t_params, DistillState.create(d_params, tx_c), tx_c, x_transfer, y_transfer,
                    cfg, k_prune, "prune", progress=progress)
    masks = masks_from_state(state.opt_state)
    shared = kmeans_codebooks(state.params, cfg.codebook_bits, masks=masks, layer_axes=())  # conv1d (k, in, out) kernels
    trainable, frozen = split_centroids(shared)
    tune_cfg = dataclasses.replace(cfg, epochs=max(cfg.epochs // 4, 1))
    tx_t = make_optimizer(cfg.learning_rate / 10, tune_cfg.steps, weight_decay=0.0)
    state = distill(student, teacher, t_params, DistillState.create(trainable, tx_t), tx_t, x_transfer, y_transfer,
                    tune_cfg, k_tune, "centroids", student_transform=codebook_student(frozen), progress=progress)
    tree = cast_centroids(merge_centroids(state.params, frozen))
    tree = quantize_params(tree, {"bias": QuantSpec(bits=8, channel_axes=())}, on_unmatched="ignore")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), "compressjax-demo-student.cjx")
    report = save(path, tree)
    return path, report, load(path)
