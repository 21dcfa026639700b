"""Synthetic classification data of any size and shape: a Gaussian mixture or a random teacher network.

Both are generated on the host with NumPy from ``data.generation_seed`` (same seed, same data,
on every machine) and need no file and no network. Fields (``config.data.synthetic``)::

    kind = "mixture"     # mixture | teacher
    shape = (32,)        # one example: (d,) gives features, (H, W, C) gives images
    num_classes = 10
    class_sep = 3.0      # mixture: distance scale of the class means (noise std is 1)
    teacher_width = 64   # teacher: hidden width of the random tanh MLP
    teacher_depth = 1    # teacher: hidden layers
    label_noise = 0.0    # fraction of labels replaced by uniformly random classes

plus ``data.num_samples`` (examples in all, default 5000), ``data.test_fraction`` (held out for
testing, default 0.2) and ``data.generation_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["DEFAULTS", "KINDS", "synthetic", "mixture", "teacher"]

KINDS = ("mixture", "teacher")
DEFAULTS: dict[str, Any] = {"kind": "mixture", "shape": (32,), "num_classes": 10, "class_sep": 3.0,
                            "teacher_width": 64, "teacher_depth": 1, "label_noise": 0.0}


def _get(cfg: Any, field: str, default: Any) -> Any:
    return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise ValueError(f"data.synthetic.shape must be a tuple (d,) or (H, W, C) of positive integers; got {shape!r}.")
    out = tuple(shape)
    if len(out) not in (1, 3) or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                                     for s in out):
        raise ValueError(f"data.synthetic.shape must be a tuple (d,) or (H, W, C) of positive integers; got {shape!r}.")
    return tuple(int(s) for s in out)


def _smooth(z: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """For image shapes, draws `z` on a coarse grid and repeats it into blocks, so the images
    have spatial structure (convolutions and random crops then mean something). Features
    pass through unchanged."""
    if len(shape) == 1:
        return z.reshape(len(z), *shape)
    h, w, c = shape
    block = max(1, min(h, w) // 8)
    coarse = z.reshape(len(z), math.ceil(h / block), math.ceil(w / block), c)
    return np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)[:, :h, :w, :]


def _coarse_size(shape: tuple[int, ...]) -> int:
    if len(shape) == 1:
        return shape[0]
    h, w, c = shape
    block = max(1, min(h, w) // 8)
    return math.ceil(h / block) * math.ceil(w / block) * c


def mixture(rng: np.random.Generator, n: int, shape: tuple[int, ...], num_classes: int,
            class_sep: float) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian mixture with one component per class.

    Class means :math:`\\mu_k = s\\, u_k / \\lVert u_k \\rVert` with :math:`u_k \\sim N(0, I)`
    (norm `class_sep` = s whatever the dimension, so the difficulty does not depend on the
    shape), labels uniform, and :math:`x = \\mu_y + \\varepsilon`, :math:`\\varepsilon \\sim N(0, I)`.

    Args:
      rng: the NumPy generator that draws the means, labels and noise.
      n: number of examples.
      shape: one example's shape, ``(d,)`` or ``(H, W, C)`` (images are drawn on a coarse grid
        and upsampled in blocks, so they have spatial structure).
      num_classes: number of classes (mixture components).
      class_sep: the norm s of every class mean.

    Returns:
      ``(x, y)``: float32 of shape ``(n, *shape)`` and int32 of shape ``(n,)``.

    Examples:
      >>> x, y = mixture(np.random.default_rng(0), 100, (5,), 3, 3.0)
      >>> x.shape, y.shape, sorted(set(y.tolist()))
      ((100, 5), (100,), [0, 1, 2])
    """
    d = _coarse_size(shape)
    u = rng.standard_normal((num_classes, d))
    means = class_sep * u / np.linalg.norm(u, axis=1, keepdims=True)
    y = rng.integers(0, num_classes, n)
    x = means[y] + rng.standard_normal((n, d))
    return _smooth(x, shape).astype(np.float32), y.astype(np.int32)


def teacher(rng: np.random.Generator, n: int, shape: tuple[int, ...], num_classes: int, width: int,
            depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs :math:`x \\sim N(0, I)` labelled by a random tanh MLP (the teacher).

    :math:`h_0 = x`, :math:`h_{l+1} = \\tanh(W_l h_l / \\sqrt{\\dim h_l})` with standard normal
    :math:`W_l`, logits :math:`z = V h_L / \\sqrt{\\dim h_L}`, each standardised over the sample
    and shifted by a per-class bias :math:`b` fitted (100 steps at most) to make the
    classes about equally frequent; :math:`y = \\arg\\max_k (z_k + b_k)`.

    Args:
      rng: the NumPy generator that draws the inputs and the teacher's weights.
      n: number of examples.
      shape: one example's shape, ``(d,)`` or ``(H, W, C)``.
      num_classes: number of classes (teacher outputs).
      width: hidden width of the teacher.
      depth: hidden layers of the teacher (0: a linear teacher).

    Returns:
      ``(x, y)``: float32 of shape ``(n, *shape)`` and int32 of shape ``(n,)``.

    Examples:
      >>> x, y = teacher(np.random.default_rng(0), 2000, (8,), 4, 16, 1)
      >>> x.shape, int(np.bincount(y).min()) > 300
      ((2000, 8), True)
    """
    x = _smooth(rng.standard_normal((n, _coarse_size(shape))), shape)
    h = x.reshape(n, -1)
    for _ in range(depth):
        h = np.tanh(h @ rng.standard_normal((h.shape[1], width)) / math.sqrt(h.shape[1]))
    z = h @ rng.standard_normal((h.shape[1], num_classes)) / math.sqrt(h.shape[1])
    z = (z - z.mean(axis=0)) / (z.std(axis=0) + 1e-12)
    bias = np.zeros(num_classes)
    for _ in range(100):  # shift the logits until the classes are about equally frequent
        freq = np.bincount(np.argmax(z + bias, axis=1), minlength=num_classes) / n
        if np.abs(freq - 1.0 / num_classes).max() < 0.1 / num_classes:
            break
        bias -= 0.5 * (freq * num_classes - 1.0)
    return x.astype(np.float32), np.argmax(z + bias, axis=1).astype(np.int32)


def _options(cfg: Any) -> dict[str, Any]:
    section = _get(cfg, "synthetic", None) or {}
    if not isinstance(section, Mapping) and not hasattr(section, "items"):
        raise ValueError(f"data.synthetic must be a mapping of {sorted(DEFAULTS)}; got {section!r}.")
    unknown = sorted(set(section.keys()) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"data.synthetic.{unknown[0]} is not a known field; allowed: {sorted(DEFAULTS)}.")
    opts = {k: section.get(k, v) for k, v in DEFAULTS.items()}
    if opts["kind"] not in KINDS:
        raise ValueError(f"data.synthetic.kind must be one of {KINDS}; got {opts['kind']!r}.")
    opts["shape"] = _shape(opts["shape"])
    for field, lo in (("num_classes", 2), ("teacher_width", 1), ("teacher_depth", 0)):
        v = opts[field]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"data.synthetic.{field} must be an integer >= {lo}; got {v!r}.")
    sep = opts["class_sep"]
    if isinstance(sep, bool) or not isinstance(sep, (int, float)) or not (0 <= sep < 1e6):
        raise ValueError(f"data.synthetic.class_sep must be a number in [0, 1e6); got {sep!r}.")
    noise = opts["label_noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (0 <= noise <= 1):
        raise ValueError(f"data.synthetic.label_noise must be a number in [0, 1]; got {noise!r}.")
    return opts


def synthetic(cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str, dict[str, Any]]:
    """The ``"synthetic"`` data source: ``(x_train, y_train, x_test, y_test, num_classes, kind, info)``.

    Args:
      cfg: the data config: ``synthetic`` (the section of the module docstring), ``num_samples``,
        ``test_fraction``, ``generation_seed``.

    Returns:
      ``(x_train, y_train, x_test, y_test, num_classes, kind, info)``: NumPy arrays (float32
      inputs, int32 labels; the first ``round(num_samples * test_fraction)`` examples are the
      test split), the class count, ``"features"`` or ``"image"``, and the generation arguments.

    Raises:
      ValueError: a bad field of ``data.synthetic`` (named), ``data.num_samples`` or
        ``data.test_fraction``.

    Examples:
      >>> out = synthetic({"num_samples": 500, "synthetic": {"kind": "teacher", "shape": (8, 8, 1)}})
      >>> out[0].shape, out[2].shape, out[4], out[5]
      ((400, 8, 8, 1), (100, 8, 8, 1), 10, 'image')
    """
    opts = _options(cfg)
    n = _get(cfg, "num_samples", 5000)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 * opts["num_classes"]:
        raise ValueError(f"data.num_samples must be an integer >= 2 * num_classes = {2 * opts['num_classes']}; "
                         f"got {n!r}.")
    test_fraction = _get(cfg, "test_fraction", 0.2)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"data.test_fraction must be in (0, 1); got {test_fraction!r}.")
    seed = int(_get(cfg, "generation_seed", 42))
    data_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    k = opts["num_classes"]
    if opts["kind"] == "mixture":
        x, y = mixture(data_rng, int(n), opts["shape"], k, float(opts["class_sep"]))
    else:
        x, y = teacher(data_rng, int(n), opts["shape"], k, int(opts["teacher_width"]), int(opts["teacher_depth"]))
    if opts["label_noise"] > 0:
        flip = noise_rng.random(len(y)) < opts["label_noise"]
        y = np.where(flip, noise_rng.integers(0, k, len(y)), y).astype(np.int32)
    n_test = int(round(int(n) * test_fraction))
    kind = "image" if len(opts["shape"]) == 3 else "features"
    info = {"generator": f"synthetic/{opts['kind']}", "generation_seed": seed, "num_samples": int(n),
            **{k_: (list(v) if isinstance(v, tuple) else v) for k_, v in opts.items()}}
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test], k, kind, info
