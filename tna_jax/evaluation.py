"""Evaluation: the loss, the `EvalFn` every analysis takes, and evaluating all runs at once.

An `EvalFn` is `eval_fn(variables, x, y) -> {"loss": scalar, "accuracy": scalar}` (means over
the batch). `lmc`, `fusion` and `align` take one and never build their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from tna_jax import deprecation, distributed
from tna_jax.data.batching import eval_indices, gather
from tna_jax.models import Net
from tna_jax.run_axis import loop_over_runs, run_axis_plan

PyTree = Any
EvalFn = Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]]

__all__ = ["EvalFn", "Metrics", "cross_entropy", "make_eval_fn", "evaluate_runs"]


@deprecation.legacy_item_access
class Metrics(NamedTuple):
    """Loss and accuracy of several models (runs, candidates, soups) on one split.

    Attributes:
      loss: (N,) mean cross-entropy per model (NumPy).
      accuracy: (N,) fraction correct per model (NumPy).
    """

    loss: np.ndarray
    accuracy: np.ndarray


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels (and optional label smoothing).

    Args:
      logits: ``(..., classes)`` logits (computed in float32).
      labels: integer labels of shape ``logits.shape[:-1]``.
      label_smoothing: the smoothing factor in [0, 1).

    Returns:
      The per-example losses, shape ``labels.shape``.

    Examples:
      >>> import jax.numpy as jnp
      >>> [round(float(v), 4) for v in cross_entropy(jnp.array([[0.0, 0.0], [10.0, 0.0]]), jnp.array([0, 0]))]
      [0.6931, 0.0]
    """
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_eval_fn(net: Net, batch_size: int = 1000) -> EvalFn:
    """``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for ONE model over a whole split.

    Pure and jittable: it scans over batches of at most `batch_size` examples (padding is masked
    out), so ``jax.vmap`` over models, α or pairs composes with it. This is the evaluation every
    analysis in tna_jax uses (LMC paths, fusion, federated rounds). Equal ``(net, batch_size)``
    give the same function object, so the analyses' compiled programs (cached per `eval_fn`)
    are reused rather than compiled again.

    Args:
      net: the model.
      batch_size: the largest batch one evaluation step sees (memory, not the result).

    Returns:
      ``eval_fn(variables, x, y)`` returning the mean cross-entropy ``"loss"`` and the fraction
      ``"accuracy"`` of correctly classified examples (float32 scalars).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from tna_jax import models
      >>> from tna_jax.training import TrainState
      >>> net = models.build({"name": "mlp", "depth": 0}, (4,), 3)  # a linear model
      >>> variables = {"params": {"head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}}
      >>> eval_fn = jax.jit(make_eval_fn(net, batch_size=4))  # 10 examples: 3 batches, the last padded
      >>> out = eval_fn(variables, jnp.ones((10, 4)), jnp.zeros(10, jnp.int32))
      >>> round(float(out["loss"]), 4), float(out["accuracy"])  # uniform logits: loss log 3
      (1.0986, 1.0)
    """

    try:
        return _cached_eval_fn(net, int(batch_size))
    except TypeError:  # a net that cannot be hashed (a module with a list field): not cached
        return _eval_fn_for(net, int(batch_size))


def _eval_fn_for(net: Net, batch_size: int) -> EvalFn:
    def eval_fn(variables: PyTree, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        n = x.shape[0]
        rows, valid = eval_indices(n, batch_size)
        rows, valid = jnp.asarray(rows), jnp.asarray(valid)

        def body(carry, inputs):
            loss_sum, correct_sum = carry
            idx, ok = inputs
            logits, _ = net.apply(variables, gather(x, idx), train=False)
            yb = gather(y, idx)
            loss = jnp.where(ok, cross_entropy(logits, yb), 0.0)
            correct = jnp.where(ok, jnp.argmax(logits, -1) == yb, False)
            return (loss_sum + loss.sum(), correct_sum + correct.sum()), None

        (loss_sum, correct_sum), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros((), jnp.int32)), (rows, valid))
        return {"loss": loss_sum / n, "accuracy": correct_sum / n}

    return eval_fn


_cached_eval_fn = functools.lru_cache(maxsize=64)(_eval_fn_for)


@functools.lru_cache(maxsize=32)
def _batched_eval(net: Net, batch_size: int, run_axis: str, mesh: Mesh | None):
    eval_fn = make_eval_fn(net, batch_size)
    if run_axis == "vmap":
        return jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None)))
    return jax.jit(loop_over_runs(eval_fn, 1, mesh, unrolled=False))


def _run_mesh_of(tree: PyTree) -> Mesh | None:
    """The mesh a run-sharded tree lives on (None when it is not split over several devices)."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 and tuple(sharding.spec)[:1] == ("runs",):
        return sharding.mesh
    return None


def _legacy_runs_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Maps the pre-0.2 ``evaluate_runs(net, state, x, y, batch_size)`` onto the new order."""
    if len(args) >= 4 or "y" in kwargs or "x" in kwargs:
        deprecation.warn("evaluate_runs(net, state, x, y, batch_size)",
                         "evaluate_runs(net, state, (x, y), batch_size=...)", stacklevel=4)
        kwargs = dict(kwargs)
        rest = list(args[2:])
        x = kwargs.pop("x") if "x" in kwargs else rest.pop(0)
        y = kwargs.pop("y") if "y" in kwargs else rest.pop(0)
        if rest:
            kwargs["batch_size"] = rest.pop(0)
        args = (*args[:2], (x, y))
    return args, kwargs


@deprecation.legacy_call(_legacy_runs_call)
def evaluate_runs(net: Net, state: Any, data: tuple[jax.Array, jax.Array], *, batch_size: int = 1000) -> Metrics:
    """Loss and accuracy of every run on ``data = (x, y)``, in one call.

    The jitted, vmapped :func:`make_eval_fn` is cached per ``(net, batch_size)``, so repeated
    evaluations (every epoch) compile once. Convolutional nets on CPU map the runs with a
    ``lax.map`` (per device, when the runs are sharded) instead: XLA:CPU's batched convolutions
    are several times slower (:func:`run_axis_plan`).

    Args:
      net: the model.
      state: the runs' state (leading run axis).
      data: ``(x, y)``, one split's inputs and int labels (shared by every run).
      batch_size: evaluation batch size.

    Returns:
      :class:`Metrics` of (runs,) NumPy arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> from tna_jax import models
      >>> from tna_jax.training import TrainState
      >>> net = models.build({"name": "mlp", "depth": 0}, (4,), 3)
      >>> head = {"kernel": jnp.zeros((2, 4, 3)), "bias": jnp.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])}
      >>> state = TrainState({"head": head}, {}, (), jnp.zeros(2, jnp.int32))  # two runs
      >>> evaluate_runs(net, state, (jnp.ones((6, 4)), jnp.zeros(6, jnp.int32))).accuracy
      array([1., 0.], dtype=float32)
    """
    x, y = data
    variables = state.variables()
    out = _batched_eval(net, batch_size, run_axis_plan(net), _run_mesh_of(variables))(variables, x, y)
    out = distributed.to_host(dict(out))  # gathered from every process's devices
    return Metrics(loss=np.asarray(out["loss"]), accuracy=np.asarray(out["accuracy"]))
