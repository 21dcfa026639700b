"""The dataset type every source returns, splitting, and the on-device form used for training.

A :class:`Dataset` holds NumPy arrays on the host (train/validation/test). :func:`to_device`
turns it into a :class:`DeviceData`: the arrays as ``jax.Array`` (normalised with statistics of
the training split, computed on the device), which the training step indexes with batch indices
inside ``jit``, so no batch is ever copied from the host during training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("features", "image", "tokens")


class DataError(ValueError):
    """A dataset is unusable (NaN features, labels out of range, mismatched splits); the
    message names the dataset and the split."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled dataset on the host, already split.

    Attributes:
      name: the source name, e.g. ``"mnist1d"``.
      x_train, y_train, x_val, y_val, x_test, y_test: NumPy arrays; labels are int32.
      num_classes: number of classes.
      kind: ``"features"`` (flat vectors), ``"image"`` (H, W, C) or ``"tokens"`` (int ids).
      info: free-form metadata (generation arguments, descriptions) for reports.

    Examples:
      >>> import numpy as np
      >>> x, y = np.zeros((10, 4), np.float32), np.arange(10, dtype=np.int32) % 2
      >>> ds = Dataset("toy", x[:6], y[:6], x[6:8], y[6:8], x[8:], y[8:], num_classes=2).validate()
      >>> ds.input_shape, ds.sizes()
      ((4,), {'train': 6, 'val': 2, 'test': 2})
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str = "features"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def validate(self) -> Dataset:
        """Checks shapes, label range and finiteness; raises DataError (a ValueError) naming the split."""
        if self.kind not in KINDS:
            raise DataError(f"dataset kind must be one of {KINDS}; got {self.kind!r}.")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise DataError(f"{self.name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}.")
            if x.shape[1:] != self.x_train.shape[1:]:
                raise DataError(f"{self.name}: x_{split} examples have shape {x.shape[1:]}, "
                                f"train examples {self.x_train.shape[1:]}.")
            if not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"{self.name}: y_{split} must hold integer class labels; got dtype {y.dtype}.")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(f"{self.name}: y_{split} has labels in [{y.min()}, {y.max()}], outside "
                                f"[0, {self.num_classes - 1}] for num_classes={self.num_classes}.")
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
                raise DataError(f"{self.name}: x_{split} has {bad} examples with NaN or infinite features.")
        if len(self.y_train) == 0:
            raise DataError(f"{self.name}: the training split is empty.")
        return self


def split_validation(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Splits off a stratification-free random validation set: ``(x_tr, y_tr, x_val, y_val)``.

    Args:
      x, y: the training inputs and labels.
      val_fraction: the fraction in [0, 1) that becomes the validation set.
      seed: seed of the random split (NumPy's ``default_rng``).

    Returns:
      ``(x_train, y_train, x_val, y_val)``.

    Raises:
      ValueError: `val_fraction` not a number in [0, 1).

    Examples:
      >>> import numpy as np
      >>> parts = split_validation(np.arange(10), np.arange(10), 0.2, seed=0)
      >>> [len(p) for p in parts]
      [8, 8, 2, 2]
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1); got {val_fraction!r}.")
    n = len(y)
    n_val = int(round(n * val_fraction))
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


class DeviceData(NamedTuple):
    """Dataset arrays on the device, normalised; what the jitted steps index into.

    Attributes:
      x_train, y_train, x_val, y_val, x_test, y_test: ``jax.Array`` inputs and int32 labels.

    Examples:
      >>> import numpy as np
      >>> x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.zeros(10, np.int32)
      >>> dd = to_device(Dataset("toy", x[:6], y[:6], x[6:8], y[6:8], x[8:], y[8:], num_classes=1))
      >>> xs, ys = dd.split("test")
      >>> xs.shape, ys.dtype
      ((2, 2), dtype('int32'))
    """

    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    x_test: jax.Array
    y_test: jax.Array

    def split(self, name: str) -> tuple[jax.Array, jax.Array]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test'; got {name!r}.")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


def to_device(dataset: Dataset, *, normalize: bool = True, dtype: Any = jnp.float32,
              sharding: Any = None) -> DeviceData:
    """Moves a dataset to the device and normalises it there.

    Features and images are standardised with the mean and standard deviation of the training
    split (per feature for ``features``, per channel for ``image``); token ids are left alone.

    Args:
      dataset: the host dataset.
      normalize: standardise inputs (ignored for tokens).
      dtype: floating dtype of the inputs on the device.
      sharding: optional ``jax.sharding.Sharding`` for every array (default: replicated on the
        default device).

    Returns:
      A :class:`DeviceData`.

    Examples:
      >>> import numpy as np
      >>> x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.zeros(10, np.int32)
      >>> dd = to_device(Dataset("toy", x[:6], y[:6], x[6:8], y[6:8], x[8:], y[8:], num_classes=1))
      >>> [round(float(v), 6) for v in dd.x_train.mean(0)]  # standardised with training statistics
      [0.0, 0.0]
    """
    put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
    if dataset.kind == "tokens":
        xs = [put(np.asarray(getattr(dataset, f"x_{s}"), np.int32)) for s in ("train", "val", "test")]
    else:
        xs = [put(np.asarray(getattr(dataset, f"x_{s}"), np.float32)) for s in ("train", "val", "test")]
        if normalize:
            axes = tuple(range(xs[0].ndim - 1)) if dataset.kind == "image" else (0,)
            mean = jnp.mean(xs[0], axis=axes, keepdims=True)
            std = jnp.std(xs[0], axis=axes, keepdims=True)
            std = jnp.where(std > 1e-8, std, 1.0)
            xs = [(x - mean) / std for x in xs]
        xs = [x.astype(dtype) for x in xs]
    ys = [put(np.asarray(getattr(dataset, f"y_{s}"), np.int32)) for s in ("train", "val", "test")]
    return DeviceData(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])
