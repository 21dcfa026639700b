"""`gradient_step`: the one SGD step every training loop of tna_jax takes (training, federated
clients, ColD fusion contributors, curve fitting)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["gradient_step"]

PyTree = Any


def gradient_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, params: PyTree,
                  opt_state: optax.OptState, *args: Any, has_aux: bool = False
                  ) -> tuple[Any, PyTree, optax.OptState]:
    """Loss, gradients, optax update and its application: one optimizer step.

    Args:
      loss_fn: ``loss_fn(params, *args)``: a scalar loss, or ``(loss, aux)`` with `has_aux`.
      tx: the optimizer.
      params: the parameters to differentiate and update.
      opt_state: `tx`'s state.
      *args: further arguments of `loss_fn` (not differentiated).
      has_aux: `loss_fn` returns ``(loss, aux)``.

    Returns:
      ``(value, new_params, new_opt_state)``; `value` is what `loss_fn` returned at `params`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.sgd(0.5)
      >>> params = {"w": jnp.array(2.0)}
      >>> loss, params, _ = gradient_step(lambda p, t: (p["w"] - t) ** 2, tx, params, tx.init(params), 1.0)
      >>> float(loss), float(params["w"])  # gradient 2 * (2 - 1) = 2: w = 2 - 0.5 * 2
      (1.0, 1.0)
    """
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return value, optax.apply_updates(params, updates), opt_state
