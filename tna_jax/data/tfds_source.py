"""``data.source = "tfds:<name>"``: a dataset prepared for tensorflow-datasets, read from disk.

Any supervised tfds dataset works (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
``svhn_cropped``, ``name:version``, ``name/config``...). Nothing is ever downloaded: the
dataset must already be prepared in ``data.data_dir`` (default: tfds's own,
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). When it is not, loading fails within seconds
with :class:`DatasetNotPrepared`, whose message says how to prepare it on a machine with network.

Two readers, chosen by the format the dataset was prepared in:

* ``"tf_data"`` (needs TensorFlow, the ``tfds`` extra): the split through ``tf.data``, read
  into NumPy in batches; reads the default TFRecord format of ``tfds build``.
* ``"data_source"`` (no TensorFlow needed): tfds's random-access ``data_source``, which reads
  datasets prepared with ``tfds build NAME --file_format=array_record`` (or parquet); also the
  fallback when TensorFlow is not installed.

Images become float32 in [0, 1] of shape (H, W, C) (``kind="image"``), other numeric inputs
float32 features; labels int32. Fields: ``data.data_dir``, ``data.train_split`` (default
``"train"``) and ``data.test_split`` (default ``"test"``); tfds split slicing such as
``"train[:10%]"`` is allowed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["load", "check", "DatasetNotPrepared", "READERS", "prepare_hint"]

READERS = ("auto", "tf_data", "data_source")
_CHUNK = 4096  # examples per tf.data batch
_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


class DatasetNotPrepared(FileNotFoundError):
    """The tfds dataset is not prepared in the data directory (and is never downloaded here)."""


def _get(cfg: Any, field: str, default: Any) -> Any:
    return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("data.source='tfds:...' needs tensorflow-datasets: pip install -e \".[tfds]\" "
                          f"(import failed: {err}).") from None
    return tfds


def _has_tensorflow() -> bool:
    # find_spec, not import: importing TensorFlow takes seconds, and an unprepared dataset
    # should fail before that.
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def prepare_hint(name: str, data_dir: str) -> str:
    """How to prepare dataset `name` for ``data_dir`` (the advice in :class:`DatasetNotPrepared`).

    Args:
      name: the tfds name (``"cifar10"``, ``"cifar10:3.0.2"``; the version is dropped).
      data_dir: the directory that was searched.

    Returns:
      One paragraph: the ``tfds build`` command to run on a machine with network, and the flag
      that points tna_jax at the copied directory.

    Examples:
      >>> hint = prepare_hint("cifar10:3.0.2", "/data/tfds")
      >>> "tfds build cifar10 --data_dir" in hint, "(now '/data/tfds')" in hint
      (True, True)
    """
    base = name.split(":")[0]
    return (f"On a machine with network: pip install -e \".[tfds]\" && tfds build {base} --data_dir "
            f"~/tensorflow_datasets (add --file_format=array_record to read it without TensorFlow); then copy "
            f"~/tensorflow_datasets here and pass --config.data.data_dir=/path/to/tensorflow_datasets "
            f"(now {data_dir!r}). tna_jax never downloads data at run time.")


def _builder(tfds: Any, name: str, data_dir: str | None) -> Any:
    try:
        # try_gcs=False: no lookup in Google's bucket, so nothing here touches the network.
        return tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"data.source='tfds:{name}': tensorflow-datasets has no dataset {name!r} ({first}). "
                         "Names are listed by tfds.list_builders(); e.g. mnist, fashion_mnist, cifar10, "
                         "cifar100, svhn_cropped.") from None


def _not_prepared(name: str, builder: Any) -> DatasetNotPrepared:
    where = str(getattr(builder, "data_dir", "?"))
    root = str(getattr(builder, "_data_dir_root", os.path.dirname(os.path.dirname(where))))
    return DatasetNotPrepared(f"tfds dataset {name!r} is not prepared in {root} (no {where}). "
                              + prepare_hint(name, root))


def _supervised_keys(builder: Any, name: str) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"data.source='tfds:{name}' has no (input, label) supervised keys (got {keys!r}); "
                         "only supervised classification datasets can be used.")
    return keys[0], keys[1]


def _read_tf_data(builder: Any, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:  # tfds signals "no data in data_dir" with an assertion
        raise _not_prepared(name, builder) from None
    # Batches rather than batch_size=-1: that one trusts the split's recorded size.
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(_CHUNK)):
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    if not xs:
        raise ValueError(f"tfds dataset {name!r}: split {split!r} is empty.")
    return np.concatenate(xs), np.concatenate(ys)


def _read_data_source(builder: Any, split: str, name: str, keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    try:
        source = builder.as_data_source(split=split)
    except (NotImplementedError, AssertionError, ValueError, FileNotFoundError) as err:
        # An unprepared dataset shows up as "format not supported" (the code's default format).
        if not builder.is_prepared():
            raise _not_prepared(name, builder) from None
        if isinstance(err, NotImplementedError):
            raise ValueError(f"tfds dataset {name!r} in {builder.data_dir} is stored as "
                             f"{builder.info.file_format}, which the TensorFlow-free reader cannot open: install "
                             "TensorFlow (pip install -e \".[tfds]\") or rebuild it with `tfds build "
                             f"{name.split(':')[0]} --file_format=array_record`. ({err})") from None
        raise
    n = len(source)
    xs, ys = [], []
    for i in range(n):
        example = source[i]
        xs.append(np.asarray(example[keys[0]]))
        ys.append(np.asarray(example[keys[1]]))
    if not xs:
        raise ValueError(f"tfds dataset {name!r}: split {split!r} is empty.")
    return np.stack(xs), np.asarray(ys)


def _as_inputs(x: np.ndarray, name: str, split: str) -> tuple[np.ndarray, str]:
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise ValueError(f"tfds dataset {name!r}: split {split!r} has non-numeric inputs of dtype {x.dtype}; "
                         "only image or numeric-feature datasets are supported.")
    if x.ndim == 4:
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        return x.astype(np.float32) / scale, "image"
    if x.ndim == 3:  # (N, H, W) grayscale without a channel axis
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        return (x.astype(np.float32) / scale)[..., None], "image"
    return x.reshape(len(x), -1).astype(np.float32), "features"


def _name_and_dir(cfg: Any) -> tuple[str, str | None]:
    source = str(_get(cfg, "source", ""))
    name = source[len("tfds:"):] if source.startswith("tfds:") else source
    if not name:
        raise ValueError(f"data.source must be 'tfds:<name>' with a dataset name; got {source!r}.")
    data_dir = _get(cfg, "data_dir", "") or None
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
    return name, data_dir


def check(cfg: Any) -> None:
    """Checks, without reading any example, that :func:`load` can read ``cfg``'s dataset.

    Args:
      cfg: the data config (``source="tfds:<name>"``, ``data_dir``).

    Raises:
      ImportError: tensorflow-datasets is not installed.
      ValueError: no dataset of that name.
      DatasetNotPrepared: its files are not in the data directory (the message says how to
        prepare them); the directory is not created.
    """
    name, data_dir = _name_and_dir(cfg)
    builder = _builder(_import_tfds(), name, data_dir)
    if not builder.is_prepared():
        raise _not_prepared(name, builder)


def load(cfg: Any, *, reader: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str,
                                                     dict[str, Any]]:
    """Reads ``tfds:<name>`` from ``data.data_dir``: ``(x_train, y_train, x_test, y_test, num_classes, kind, info)``.

    Args:
      cfg: the data config (``source``, ``data_dir``, ``train_split``, ``test_split``).
      reader: ``"auto"`` (``"data_source"`` for array_record/parquet data or without
        TensorFlow, else ``"tf_data"``), ``"tf_data"`` or ``"data_source"``.

    Returns:
      ``(x_train, y_train, x_test, y_test, num_classes, kind, info)``: float32 inputs (images
      scaled to [0, 1], shape (H, W, C)), int32 labels, the class count, ``"image"`` or
      ``"features"``, and ``{"source", "data_dir", "version", "reader", "splits"}``.

    Raises:
      DatasetNotPrepared: the dataset is not in the data directory (within seconds; nothing is
        downloaded); the message says how to prepare it.
      ImportError: tensorflow-datasets (or, for ``reader="tf_data"``, TensorFlow) is missing.
      ValueError: an unknown dataset name, a dataset without supervised keys or with
        non-numeric inputs, or a bad `reader`.

    Examples:
      Random stand-in data from tfds's own mock, so it runs without MNIST on disk:

      >>> import tensorflow_datasets as tfds
      >>> with tfds.testing.mock_data(num_examples=8):
      ...     x_train, y_train, x_test, y_test, num_classes, kind, info = load({"source": "tfds:mnist"},
      ...                                                                      reader="data_source")
      >>> x_train.shape, x_train.dtype, num_classes, kind
      ((8, 28, 28, 1), dtype('float32'), 10, 'image')
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}; got {reader!r}.")
    name, data_dir = _name_and_dir(cfg)
    train_split = _get(cfg, "train_split", "train") or "train"
    test_split = _get(cfg, "test_split", "test") or "test"
    tfds = _import_tfds()
    if reader == "tf_data" and not _has_tensorflow():
        raise ImportError("the tf_data reader needs TensorFlow: pip install -e \".[tfds]\".")
    builder = _builder(tfds, name, data_dir)
    if reader == "auto":
        fmt = getattr(getattr(builder.info, "file_format", None), "value", None)
        random_access = fmt in _RANDOM_ACCESS_FORMATS  # as_dataset() cannot read these
        reader = "data_source" if random_access or not _has_tensorflow() else "tf_data"
    keys = _supervised_keys(builder, name)
    label = builder.info.features[keys[1]]
    num_classes = getattr(label, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"tfds dataset {name!r}: label feature {keys[1]!r} is not a class label "
                         f"(num_classes={num_classes!r}).")
    arrays = {}
    for role, split in (("train", train_split), ("test", test_split)):
        if reader == "tf_data":
            x, y = _read_tf_data(builder, split, name)
        else:
            x, y = _read_data_source(builder, split, name, keys)
        x, kind = _as_inputs(x, name, split)
        arrays[role] = (x, y.astype(np.int32))
    info = {"source": f"tfds:{name}", "data_dir": str(getattr(builder, "_data_dir_root", data_dir)),
            "version": str(builder.info.version), "reader": reader, "splits": [train_split, test_split]}
    return (*arrays["train"], *arrays["test"], int(num_classes), kind, info)
