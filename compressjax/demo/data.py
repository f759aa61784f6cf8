"""MNIST-1D generated locally by the ``mnist1d`` package and cached as ``.npz`` files.

MNIST-1D (Greydanus, 2020, "Scaling down deep learning", arXiv:2011.14439) draws each example from ten
1-D digit templates with random padding, translation, shear, scaling and correlated noise, so a fresh
random seed yields fresh examples from the same distribution. The demo uses that to build an unlabelled
*transfer set* for distillation (Hinton et al., 2015, arXiv:1503.02531, Sec. 2: the teacher labels a
transfer set that may hold unlabelled data).

Nothing is downloaded: :func:`mnist1d.data.make_dataset` builds the arrays from its templates. Because it
seeds NumPy's and Python's global generators, the global RNG state is saved and restored around it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MNIST1D", "cache_dir", "load_mnist1d", "load_transfer_inputs"]

#: Seed of the published MNIST-1D split (``get_dataset_args().seed``).
DATASET_SEED = 42


@dataclass(frozen=True)
class MNIST1D:
    """Train/test arrays: ``x`` float32 of shape ``(n, 40)``, ``y`` int32 labels in ``[0, 10)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/compressjax`` (default ``~/.cache/compressjax``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compressjax"


def _generate(num_samples: int, seed: int, train_split: float) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the demo needs the mnist1d package: pip install "compressjax[demo]"') from e
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    args.train_split = float(train_split)
    # mnist1d seeds the legacy global generators; put them back as they were.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], np.float32),
        "y": np.asarray(data["y"], np.int32),
        "x_test": np.asarray(data["x_test"], np.float32).reshape(-1, np.asarray(data["x"]).shape[-1]),
        "y_test": np.asarray(data["y_test"], np.int32),
    }


def _cached(name: str, num_samples: int, seed: int, train_split: float, use_cache: bool) -> dict[str, np.ndarray]:
    path = cache_dir() / f"{name}-n{num_samples}-seed{seed}-split{train_split:g}.npz"
    if use_cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # a corrupt or partial cache file: regenerate and overwrite it
    data = _generate(num_samples, seed, train_split)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    return data


def load_mnist1d(*, use_cache: bool = True, seed: int = DATASET_SEED) -> MNIST1D:
    """The standard MNIST-1D split: 4000 train / 1000 test examples of length 40 (seed 42).

    Another ``seed`` draws a fresh split of the same size from the same distribution: data that no choice
    made on the standard split has seen, to check that a result generalises.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    d = _cached("mnist1d", 5000, int(seed), 0.8, use_cache)
    return MNIST1D(d["x"], d["y"], d["x_test"], d["y_test"])


def load_transfer_inputs(num_samples: int, seed: int = 1, *, use_cache: bool = True) -> np.ndarray:
    """``num_samples`` extra MNIST-1D inputs drawn with another ``seed`` (labels discarded).

    Raises:
        ValueError: if ``seed`` is the dataset's own seed (the inputs would repeat the test set).
    """
    if seed == DATASET_SEED:
        raise ValueError(f"transfer seed must differ from the dataset seed {DATASET_SEED}, got {seed}")
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
    return _cached("mnist1d-transfer", int(num_samples), int(seed), 1.0, use_cache)["x"]
