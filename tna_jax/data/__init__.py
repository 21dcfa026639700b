"""Datasets: offline sources, splits, on-device arrays, batching and client partitions.

``load(data_config) -> Dataset`` reads ``data_config.source``: ``"mnist1d"`` (default,
generated offline), ``"digits"`` (scikit-learn), ``"synthetic"`` or ``"tfds:<name>"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tna_jax.data import sources, synthetic
from tna_jax.data.base import KINDS, DataError, Dataset, DeviceData, split_validation, to_device

__all__ = ["Dataset", "DataError", "DeviceData", "KINDS", "load", "to_device", "split_validation", "SOURCES", "register"]

SOURCES: dict[str, Callable[[Any], sources.SourceOutput]] = {
    "mnist1d": sources.mnist1d,
    "digits": sources.digits,
    "synthetic": synthetic.synthetic,
}


def register(name: str):
    """Decorator that adds a data source to :data:`SOURCES`.

    A source is ``fn(data_config) -> (x_train, y_train, x_test, y_test, num_classes, kind, info)``
    with NumPy arrays; :func:`load` splits off the validation set and validates the result.

    Args:
      name: the ``data.source`` value that selects it.

    Returns:
      The decorator (it returns the function unchanged).

    Examples:
      >>> import numpy as np
      >>> @register("test_doc_toy")
      ... def toy(cfg):
      ...     x, y = np.zeros((20, 3), np.float32), np.arange(20, dtype=np.int32) % 2
      ...     return x[:16], y[:16], x[16:], y[16:], 2, "features", {}
      >>> load({"source": "test_doc_toy", "val_fraction": 0.25}).sizes()
      {'train': 12, 'val': 4, 'test': 4}
    """

    def deco(fn):
        SOURCES[name] = fn
        return fn

    return deco


def _get(cfg: Any, field: str, default: Any) -> Any:
    return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


def _source_fn(source: str) -> Callable[[Any], sources.SourceOutput]:
    if isinstance(source, str) and source.startswith("tfds:"):
        from tna_jax.data import tfds_source  # optional dependency, imported on demand

        return tfds_source.load
    if source not in SOURCES:
        known = sorted(SOURCES) + ["tfds:<name>"]
        raise ValueError(f"data.source must be one of {known}; got {source!r}.")
    return SOURCES[source]


def load(data_config: Any) -> Dataset:
    """Loads, splits and checks the dataset that `data_config` names.

    Fields: ``source`` (default ``"mnist1d"``), ``val_fraction`` (default 0.1 of the training
    data), ``num_train`` (0 = all; otherwise a random subset of that size), ``split_seed``
    (default 0), plus the source's own fields.

    Args:
      data_config: ``config.data`` (a ``ConfigDict`` or a mapping).

    Returns:
      The validated :class:`Dataset`.

    Raises:
      ValueError: unknown source (listing the known ones), bad fields, labels out of range,
        NaN features.

    Examples:
      >>> ds = load({"source": "digits"})
      >>> ds.input_shape, ds.num_classes, ds.kind
      ((8, 8, 1), 10, 'image')
    """
    source = _get(data_config, "source", "mnist1d")
    x, y, x_test, y_test, num_classes, kind, info = _source_fn(source)(data_config)
    for split, (xs, ys) in (("train", (x, y)), ("test", (x_test, y_test))):
        if len(xs) != len(ys):  # checked before splitting, which would silently drop the extra rows
            raise DataError(f"{source}: x_{split} has {len(xs)} rows but y_{split} has {len(ys)}.")
    split_seed = _get(data_config, "split_seed", 0)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"data.split_seed must be a non-negative integer; got {split_seed!r}.")
    num_train = _get(data_config, "num_train", 0)
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 0:
        raise ValueError(f"data.num_train must be a non-negative integer (0 = all); got {num_train!r}.")
    x_tr, y_tr, x_val, y_val = split_validation(x, y, _get(data_config, "val_fraction", 0.1), split_seed)
    if num_train:
        if num_train > len(y_tr):
            raise ValueError(f"data.num_train={num_train} exceeds the {len(y_tr)} training examples of {source}.")
        keep = np.random.default_rng(split_seed + 1).permutation(len(y_tr))[:num_train]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return Dataset(name=str(source), x_train=x_tr, y_train=y_tr, x_val=x_val, y_val=y_val,
                   x_test=x_test, y_test=y_test, num_classes=num_classes, kind=kind, info=info).validate()
