"""Straight-through estimator matching (Ainsworth et al. 2023, "Git Re-Basin", §3.3).

Weight matching looks at the weights only. STE matching learns the permutation from the loss of
the model it is meant for, the midpoint of A and the permuted B. It keeps free parameters
$\\tilde\\theta$ (starting at A's, whose projection below is the weight-matching permutation); every step

1. projects it onto the permutations of B: $P = \\arg\\max_P \\langle \\tilde\\theta, P\\theta_B\\rangle$
   (weight matching of $\\theta_B$ to $\\tilde\\theta$, warm-started from the previous $P$);
2. evaluates the midpoint loss $L\\big(\\tfrac12(\\theta_A + P\\theta_B)\\big)$ on a batch, with
   the straight-through estimator: the forward pass uses $P\\theta_B$, the gradient flows to
   $\\tilde\\theta$ as if the projection were the identity,
   $\\tilde\\theta + \\mathrm{sg}(P\\theta_B - \\tilde\\theta)$;
3. takes an optimiser step on $\\tilde\\theta$.

The result is the last projection $P$. Works for every model whose spec
`tna_jax.align.permutation_spec` derives (BatchNorm networks are evaluated with batch
statistics in the loss, as in training).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax.align.derive import permutation_spec
from tna_jax.align.lap import Solver
from tna_jax.align.spec import Permutation, PermutationSpec, apply_permutation, check_permutation
from tna_jax.align.weight_matching import weight_matching
from tna_jax.evaluation import cross_entropy

PyTree = Any

__all__ = ["STEResult", "ste_matching"]


class STEResult(NamedTuple):
    """What `ste_matching` returns.

    Attributes:
      perm: ``{name: index array}``: the last projection, for ``apply_permutation(spec, perm, b)``.
      losses: ``(steps,)`` midpoint loss of every step's batch (float32 array).
      changes: ``(steps,)`` how many units the projection moved at each step (int array).
      init: the weight-matching permutation the search started from.

    Examples:
      >>> STEResult._fields
      ('perm', 'losses', 'changes', 'init')
    """

    perm: Permutation
    losses: np.ndarray
    changes: np.ndarray
    init: Permutation


@functools.lru_cache(maxsize=16)
def _step_fn(net: Any, tx: optax.GradientTransformation):
    def step(free, opt_state, a, b_perm, x, y, rng):
        def loss_fn(p):
            ste = jax.tree.map(lambda f, q: f + jax.lax.stop_gradient(q - f), p, b_perm["params"])
            mid = jax.tree.map(lambda u, v: 0.5 * (u + v), a["params"], ste)
            logits, _ = net.apply({**a, "params": mid}, x, train=True, rng=rng)
            return cross_entropy(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(free)
        updates, opt_state = tx.update(grads, opt_state, free)
        return optax.apply_updates(free, updates), opt_state, loss

    return jax.jit(step)


def _check(data: Any, steps: Any, batch_size: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"data must be a pair (x, y); got {type(data).__name__}.")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"data must hold the same positive number of inputs and labels; got {x.shape[0]} "
                         f"and {y.shape[0]}.")
    return x, y


def ste_matching(net: Any, a: PyTree, b: PyTree, data: tuple[jax.Array, jax.Array], *, key: jax.Array,
                 steps: int = 200, batch_size: int = 128, optimizer: optax.GradientTransformation | None = None,
                 spec: PermutationSpec | None = None, init: Permutation | None = None, wm_max_iter: int = 10,
                 solver: str | Solver = "auto") -> STEResult:
    """Learns the permutation of B that makes the midpoint of A and B a good model (STE matching).

    Args:
      net: the model (a `tna_jax.models.Net`).
      a, b: the two models' variables.
      data: training data ``(x, y)`` for the midpoint loss.
      key: PRNG key for the batches (and dropout, if any).
      steps: optimiser steps.
      batch_size: examples per step (drawn with replacement).
      optimizer: optax transformation for the free copy (default ``optax.adam(1e-3)``).
      spec: the permutation spec (default `permutation_spec(net)`).
      init: the starting permutation (default: weight matching of B to A).
      wm_max_iter: sweeps of each step's projection (warm-started, it needs one or two).
      solver: the exact assignment solver (see `tna_jax.align.lap`).

    Returns:
      an `STEResult` ``(perm, losses, changes, init)``.

    Raises:
      TypeError: `data` is not a pair.
      ValueError: non-positive `steps` or `batch_size`, mismatched data, or `init` that does not
        fit the spec (named).

    Examples:
      >>> import jax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 4}, (6,), 3)
      >>> a, b = net.init(jax.random.key(0)), net.init(jax.random.key(1))
      >>> x, y = jax.random.normal(jax.random.key(2), (32, 6)), jax.numpy.arange(32) % 3
      >>> res = ste_matching(net, a, b, (x, y), key=jax.random.key(3), steps=2, batch_size=8)
      >>> res.losses.shape, sorted(res.perm["dense_0"].tolist())
      ((2,), [0, 1, 2, 3])
    """
    x, y = _check(data, steps, batch_size)
    spec = spec if spec is not None else permutation_spec(net)
    if init is None:
        init = weight_matching(spec, a, b, jax.random.fold_in(key, 2**31), solver=solver).perm
    check_permutation(spec, init, argument="init")
    init = {k: np.asarray(v, np.int32) for k, v in init.items()}
    tx = optimizer if optimizer is not None else optax.adam(1e-3)
    step = _step_fn(net, tx)
    perm = dict(init)
    b_perm = apply_permutation(spec, perm, b)
    free = a["params"]  # as the paper: its projection is the weight-matching permutation
    opt_state = tx.init(free)
    losses, changes = [], []
    n = int(x.shape[0])
    for s in range(int(steps)):
        k = jax.random.fold_in(key, s)
        idx = jax.random.randint(jax.random.fold_in(k, 0), (int(batch_size),), 0, n)
        free, opt_state, loss = step(free, opt_state, a, b_perm, x[idx], y[idx], jax.random.fold_in(k, 1))
        res = weight_matching(spec, {**b, "params": free}, b, k, max_iter=wm_max_iter, init=perm, solver=solver)
        changes.append(sum(int(np.sum(np.asarray(res.perm[g]) != perm[g])) for g in perm))
        if changes[-1]:
            perm = {g: np.asarray(v, np.int32) for g, v in res.perm.items()}
            b_perm = apply_permutation(spec, perm, b)
        losses.append(loss)
    return STEResult(perm=perm, losses=np.asarray(jax.device_get(losses), np.float32),
                     changes=np.asarray(changes, np.int64), init=init)
