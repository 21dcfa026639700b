"""Client data and local training: every sampled client trains at once, as one ``jax.vmap``.

Clients hold different numbers of examples. To make them one batch axis, :func:`pack_clients`
pads every client's data to the largest client, :math:`N_{\\max}`, and keeps the true sizes
:math:`n_c`. :func:`make_local_update` builds the local training of ONE client as a pure
function (a ``lax.scan`` over a fixed number of steps); ``jax.vmap`` of it trains every client
of a round in one program, with no Python loop over clients or steps.

Local epochs. With E local epochs and batch size B client c takes
:math:`E \\lceil n_c / B \\rceil` steps (the last batch of an epoch is partial, as
``drop_last=False`` in PyTorch: a client smaller than B still trains). Every client's scan runs
:math:`T = E \\lceil N_{\\max} / B \\rceil` steps; steps past the client's own count are masked
(parameters, statistics and optimizer state stay exactly as they were): padding costs the
compute of the masked steps and nothing else. (The batch order is drawn over the N_max padded
rows, so the same client packed to another N_max visits its rows in another, equally random,
order.)

Batches. Epoch e of client c visits its rows in the order of
``jax.random.permutation(order_key, N_max)`` with the padding rows moved to the end (a stable
partition), where ``order_key = split(fold_in(data_key, e))[0]``: for a client without padding
this is exactly the order of ``tna_jax.training.make_train_epoch``, so one client holding the
whole training set reproduces centralised training step for step. Positions past :math:`n_c` in a
partial batch are filled with the client's own rows from the start of the epoch (so BatchNorm
sees real data) and get zero loss weight.

With ``local_steps = K > 0`` instead, every client takes exactly K steps of B rows drawn
uniformly with replacement from its own data.

Size buckets. Under label skew client sizes spread widely (Dirichlet(0.5) over 20 MNIST-1D clients:
39 to 505 rows), so one padded cohort spends most of its steps masked. :func:`size_buckets` splits
the clients, sorted by size, into a few buckets that each pad only to their own largest client
(``federated_algorithm(client_sizes=..., size_buckets=...)`` vmaps each bucket on its own). A
bucket draws its batch order over the full :math:`N_{\\max}` (``make_local_update(order_examples=)``),
so every client visits the same rows in the same order as in the single padded cohort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax import anchors
from tna_jax.evaluation import cross_entropy
from tna_jax.steps import gradient_step

PyTree = Any

__all__ = ["ClientData", "LocalResult", "pack_clients", "local_steps_count", "make_local_update",
           "epoch_order", "size_buckets", "STEP_OVERHEAD"]

# The fixed cost of one vmapped local step in units of one client's step (the scan body's own
# work: optimizer bookkeeping, batch gathers). A rough constant, not a fit: it only stops
# size_buckets from splitting off buckets whose extra steps cost more than their padding saved.
# For the 20 Dirichlet(0.5) clients of benchmarks/federated.py any value from 0 to 4 gives the
# same 3 buckets (8 and more give 2).
STEP_OVERHEAD = 2.0


class ClientData(NamedTuple):
    """The training data of K clients, padded to a common size (a leading client axis).

    Attributes:
      x: (K, N_max, ...) inputs; rows from ``n[c]`` on are zero padding.
      y: (K, N_max) int32 labels (padding rows 0).
      n: (K,) int32 true sizes; a padding *client* (added to fill devices) has n = 0.

    Examples:
      >>> d = ClientData(np.zeros((4, 3, 2)), np.zeros((4, 3), np.int32), np.array([3, 2, 0, 0]))
      >>> d.max_examples, d.num_rows
      (3, 4)
    """

    x: Any
    y: Any
    n: Any

    @property
    def max_examples(self) -> int:
        return int(np.shape(self.y)[1])

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.n)[0])


class LocalResult(NamedTuple):
    """What one client's local training returns (a leading client axis under vmap).

    Attributes:
      params: the client's final parameters.
      model_state: its final non-parameter collections (BatchNorm statistics or ``{}``).
      loss: mean training cross-entropy over its steps (0 for a client that took none).
      accuracy: fraction of its training rows classified correctly during training.
      steps: optimizer steps it took.

    Examples:
      >>> import jax.numpy as jnp
      >>> r = LocalResult({"w": jnp.ones(2)}, {}, jnp.float32(0.7), jnp.float32(0.5), jnp.int32(4))
      >>> r._fields, int(r.steps)
      (('params', 'model_state', 'loss', 'accuracy', 'steps'), 4)
    """

    params: PyTree
    model_state: PyTree
    loss: jax.Array
    accuracy: jax.Array
    steps: jax.Array


def pack_clients(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], *, multiple: int = 1) -> ClientData:
    """Gathers each client's rows of (x, y) and pads them into one :class:`ClientData` (NumPy).

    Args:
      x: (N, ...) training inputs; y: (N,) labels.
      parts: K index arrays (a partition, see :mod:`tna_jax.federated.partition`).
      multiple: pad the client axis with empty clients (n = 0) to a multiple of this (the number
        of devices the client axis is sharded over).

    Returns:
      A :class:`ClientData` with ``x.shape == (K', N_max, ...)``, K' the padded client count.

    Raises:
      ValueError: no clients, an empty client, or indices outside the data.

    Examples:
      >>> d = pack_clients(np.arange(5.0)[:, None], np.arange(5), [np.array([0, 1, 2]), np.array([4])], multiple=4)
      >>> d.x.shape, d.n.tolist(), d.y[1].tolist()
      ((4, 3, 1), [3, 1, 0, 0], [4, 0, 0])
    """
    if len(parts) == 0:
        raise ValueError("parts must hold at least one client; got none.")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer; got {multiple!r}.")
    x, y = np.asarray(x), np.asarray(y, np.int32)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}.")
    sizes = [len(p) for p in parts]
    for c, s in enumerate(sizes):
        if s == 0:
            raise ValueError(f"client {c} has no data; every client needs at least one example.")
    n_max = max(sizes)
    k = len(parts)
    k_pad = -(-k // multiple) * multiple
    xs = np.zeros((k_pad, n_max, *x.shape[1:]), x.dtype)
    ys = np.zeros((k_pad, n_max), np.int32)
    for c, p in enumerate(parts):
        p = np.asarray(p, np.int64)
        if p.min() < 0 or p.max() >= len(y):
            raise ValueError(f"client {c} has indices outside [0, {len(y)}).")
        xs[c, : len(p)] = x[p]
        ys[c, : len(p)] = y[p]
    n = np.zeros(k_pad, np.int32)
    n[:k] = sizes
    return ClientData(xs, ys, n)


def local_steps_count(max_examples: int, batch_size: int, local_epochs: int, local_steps: int = 0) -> int:
    """T, the steps every client's scan runs: ``local_steps`` if > 0, else ``E * ceil(N_max / B)``.

    Args:
      max_examples: N_max >= 1, the padded client size.
      batch_size: B >= 1.
      local_epochs: E >= 1.
      local_steps: K >= 0 (0: epochs).

    Returns:
      T.

    Raises:
      ValueError: an argument that is not an integer in its range (named).

    Examples:
      >>> local_steps_count(100, 32, 2), local_steps_count(100, 32, 2, local_steps=5)
      (8, 5)
      >>> local_steps_count(100, 0, 1)
      Traceback (most recent call last):
      ...
      ValueError: batch_size must be an integer >= 1; got 0.
    """
    for name, v, lo in (("max_examples", max_examples, 1), ("batch_size", batch_size, 1),
                        ("local_epochs", local_epochs, 1), ("local_steps", local_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    return int(local_steps) if local_steps else int(local_epochs) * math.ceil(max_examples / batch_size)


def size_buckets(sizes: Sequence[int], *, batch_size: int, local_epochs: int = 1, max_buckets: int = 3,
                 multiple: int = 1, step_overhead: float = STEP_OVERHEAD) -> list[np.ndarray]:
    r"""Splits clients into at most `max_buckets` groups of similar size that waste the fewest steps.

    Client c takes :math:`E\lceil n_c/B\rceil` steps; a bucket of clients vmapped together runs
    :math:`T_b = E\lceil \max_{c\in b} n_c / B\rceil` steps for each of its :math:`r_b` rows
    (padded up to a multiple of `multiple`, the devices its client axis is sharded over). The buckets
    minimise :math:`\sum_b T_b (r_b + \text{step\_overhead})`, an exact dynamic programme over the
    clients sorted by size (contiguous runs of that order are optimal for this cost).

    Args:
      sizes: :math:`n_c` of the K clients (>= 1 each).
      batch_size: B; local_epochs: E.
      max_buckets: the most buckets (each is one more vmapped program in the round); 1 gives one
        bucket of every client.
      multiple: pad each bucket's row count to a multiple of this.
      step_overhead: the fixed cost of one vmapped step, in client-steps (:data:`STEP_OVERHEAD`).

    Returns:
      The buckets as arrays of client indices, smallest clients first; each bucket in ascending
      index order. Together they hold every client exactly once.

    Raises:
      ValueError: no clients, a client with no data, or an argument out of range (named).

    Examples:
      >>> [b.tolist() for b in size_buckets([500, 40, 30, 480, 35, 45], batch_size=32, max_buckets=2)]
      [[1, 2, 4, 5], [0, 3]]
      >>> [b.tolist() for b in size_buckets([64, 60, 50], batch_size=32)]  # equal steps: one bucket
      [[0, 1, 2]]
    """
    sizes = np.asarray(sizes, np.int64)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"sizes must be a non-empty list of client sizes; got shape {sizes.shape}.")
    if sizes.min() < 1:
        raise ValueError(f"client {int(np.argmin(sizes))} has no data; every client needs at least one example.")
    for name, v in (("batch_size", batch_size), ("local_epochs", local_epochs), ("max_buckets", max_buckets),
                    ("multiple", multiple)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}.")
    order = np.argsort(sizes, kind="stable")
    steps = local_epochs * -(-sizes[order] // batch_size)
    k = len(order)
    rows = lambda r: -(-r // multiple) * multiple  # noqa: E731

    def cost(i: int, j: int) -> float:  # clients order[i:j] as one bucket
        return float(steps[j - 1]) * (rows(j - i) + step_overhead)

    # best[b][j]: the cheapest split of the j smallest clients into b buckets.
    inf = float("inf")
    best = [[inf] * (k + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (k + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0.0
    for b in range(1, max_buckets + 1):
        for j in range(1, k + 1):
            for i in range(b - 1, j):
                c = best[b - 1][i] + cost(i, j)
                if c < best[b][j]:
                    best[b][j], cut[b][j] = c, i
    b = min(range(1, max_buckets + 1), key=lambda nb: (best[nb][k], nb))
    bounds, j = [], k
    while b > 0:
        i = cut[b][j]
        bounds.append((i, j))
        j, b = i, b - 1
    return [np.sort(order[i:j]) for i, j in reversed(bounds)]


def epoch_order(order_key: jax.Array, n: jax.Array, max_examples: int) -> jax.Array:
    """The rows of one epoch: a random permutation of ``range(N_max)`` with the padding rows
    (index >= n) moved, in order, behind the real ones. Without padding it is exactly
    ``jax.random.permutation(order_key, N_max)`` (the order of ``training.epoch_indices``).

    Args:
      order_key: the epoch's PRNG key.
      n: the client's true size (may be traced).
      max_examples: N_max (static).

    Returns:
      An int array of shape ``(N_max,)``: the real rows first, in random order.

    Examples:
      >>> import jax
      >>> order = epoch_order(jax.random.key(0), 3, 6)
      >>> sorted(order[:3].tolist())
      [0, 1, 2]
    """
    perm = jax.random.permutation(order_key, max_examples)
    return perm[jnp.argsort(perm >= n, stable=True)]


def make_local_update(net: Any, tx: optax.GradientTransformation, *, batch_size: int, max_examples: int,
                      local_epochs: int = 1, local_steps: int = 0, prox_mu: float = 0.0,
                      unroll: int | bool = 1, order_examples: int | None = None) -> Callable[..., LocalResult]:
    r"""Local training of ONE client as a pure function (vmap it over clients).

    ``local_update(params, model_state, global_params, mask, x, y, n, key) -> LocalResult``

    * starts from `params` / `model_state` with a fresh state of
      ``optax.chain(tx, fixed_anchor_mask(mask=mask))`` (or of `tx` when `mask` is None): the
      anchored entries never move, bit for bit;
    * minimises the cross-entropy on its rows, plus FedProx's proximal term
      :math:`\frac{\mu}{2}\lVert w - w_{\text{global}}\rVert^2` when ``prox_mu = μ > 0``
      (Li et al., 2020, "Federated Optimization in Heterogeneous Networks");
    * runs :func:`local_steps_count` steps; those past the client's own count leave everything
      unchanged (see the module docstring).

    `key` is the client's key for the round: batch order from ``fold_in(key, 0)`` (the data key),
    dropout from ``fold_in(key, 1)``.

    Args:
      net: the model (``tna_jax.models.Net``).
      tx: the client optimizer (its state is reset every round).
      batch_size: B.
      max_examples: N_max, the padded client size (static).
      local_epochs: E (ignored when `local_steps` > 0).
      local_steps: K > 0: exactly K steps of B rows drawn with replacement.
      prox_mu: μ >= 0 of FedProx.
      unroll: ``lax.scan``'s unroll of the step loop (``True`` for convolutional nets on CPU,
        see ``tna_jax.run_axis.loop_plan``).
      order_examples: draw each epoch's batch order over this many rows (>= `max_examples`; None:
        `max_examples`). A size bucket (:func:`size_buckets`) holds its clients' first
        `max_examples` rows but passes the cohort's N_max here, so its clients see the same batches
        as in the one padded cohort.

    Returns:
      The function above.

    Raises:
      ValueError: bad sizes or a negative `prox_mu`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 2)
      >>> params = net.init(jax.random.key(0))["params"]
      >>> update = make_local_update(net, optax.sgd(0.1), batch_size=2, max_examples=4)
      >>> x, y = jnp.ones((4, 4)), jnp.array([0, 1, 0, 0])
      >>> out = update(params, {}, params, None, x, y, jnp.int32(3), jax.random.key(1))
      >>> int(out.steps)
      2
    """
    steps = local_steps_count(max_examples, batch_size, local_epochs, local_steps)
    if not (isinstance(prox_mu, (int, float)) and math.isfinite(prox_mu) and prox_mu >= 0):
        raise ValueError(f"prox_mu must be a finite number >= 0; got {prox_mu!r}.")
    order_examples = max_examples if order_examples is None else order_examples
    if isinstance(order_examples, bool) or not isinstance(order_examples, (int, np.integer)) \
            or order_examples < max_examples:
        raise ValueError(f"order_examples must be an integer >= max_examples ({max_examples}); got {order_examples!r}.")
    epochs = int(local_epochs)
    spe_max = math.ceil(max_examples / batch_size)
    offsets = jnp.arange(batch_size)

    def local_update(params, model_state, global_params, mask, x, y, n, key) -> LocalResult:
        n = jnp.asarray(n, jnp.int32)
        data_key = jax.random.fold_in(key, 0)
        dropout_key = jax.random.fold_in(key, 1)
        client_tx = tx if mask is None else optax.chain(tx, anchors.fixed_anchor_mask(mask=mask))
        opt_state = client_tx.init(params)
        spe = jnp.maximum(1, (n + batch_size - 1) // batch_size)
        if local_steps:
            num_steps = jnp.where(n > 0, steps, 0)
        else:
            num_steps = jnp.where(n > 0, epochs * spe, 0)
            # The real rows come first, so the first max_examples entries hold all n of them.
            orders = jnp.stack([epoch_order(jax.random.split(jax.random.fold_in(data_key, e))[0], n,
                                            order_examples)[:max_examples] for e in range(epochs)])
            # Room for a whole last batch: positions past N_max are never valid (they wrap below).
            orders = jnp.pad(orders, ((0, 0), (0, spe_max * batch_size - max_examples)))

        def batch(t):
            if local_steps:
                rows = jax.random.randint(jax.random.fold_in(data_key, t), (batch_size,), 0, jnp.maximum(n, 1))
                return rows, jnp.ones((batch_size,), jnp.float32)
            epoch, s = t // spe, t % spe
            pos = s * batch_size + offsets
            valid = pos < n
            pos = jnp.where(valid, pos, pos % jnp.maximum(n, 1))  # fill a partial batch with real rows
            order = jax.lax.dynamic_index_in_dim(orders, jnp.minimum(epoch, epochs - 1), keepdims=False)
            return jnp.take(order, pos), valid.astype(jnp.float32)

        def step(carry, t):
            params, model_state, opt_state, loss_sum, correct, seen = carry
            rows, weight = batch(t)
            xb, yb = jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0)
            count = jnp.maximum(jnp.sum(weight), 1.0)

            def loss_fn(p):
                logits, new_state = net.apply({"params": p, **model_state}, xb, train=True,
                                              rng=jax.random.fold_in(dropout_key, t))
                ce = cross_entropy(logits, yb)
                loss = jnp.sum(ce * weight) / count
                total = loss
                if prox_mu:
                    sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(global_params)))
                    total = loss + 0.5 * prox_mu * sq
                return total, (loss, logits, new_state)

            (_, (loss, logits, new_state)), new_params, new_opt = gradient_step(
                loss_fn, client_tx, params, opt_state, has_aux=True)
            active = t < num_steps
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)  # noqa: E731
            params = keep(new_params, params)
            model_state = keep({**model_state, **new_state}, model_state)
            opt_state = keep(new_opt, opt_state)
            hits = jnp.sum(weight * (jnp.argmax(logits, -1) == yb))
            on = active.astype(jnp.float32)
            return (params, model_state, opt_state, loss_sum + on * loss, correct + on * hits,
                    seen + on * jnp.sum(weight)), None

        init = (params, model_state, opt_state, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (params, model_state, _, loss_sum, correct, seen), _ = jax.lax.scan(step, init, jnp.arange(steps),
                                                                            unroll=unroll)
        taken = jnp.maximum(num_steps, 1).astype(jnp.float32)
        return LocalResult(params, model_state, loss_sum / taken, correct / jnp.maximum(seen, 1.0),
                           num_steps.astype(jnp.int32))

    return local_update
