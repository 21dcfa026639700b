"""Federated algorithms as pure ``init`` / ``apply`` pairs (fedjax's ``FederatedAlgorithm``).

``init(params, model_state=None) -> ServerState`` and ``apply(server_state, clients, key) ->
(server_state, metrics)``. One round of every algorithm here is

1. sample :math:`m = \\lceil qK \\rceil` of the K clients without replacement (``fold_in(key, 0)``);
2. train every sampled client from the global model :math:`\\theta^r`
   (:func:`tna_jax.federated.client.make_local_update`), all of them as ONE ``jax.vmap`` whose
   client axis is sharded over the devices of `mesh` (with ``size_buckets`` > 1 and full
   participation, one such vmap per size bucket, :func:`tna_jax.federated.client.size_buckets`,
   in the same jitted program); client c's key is
   ``fold_in(fold_in(key, 1), c)`` (its global id, so the result does not depend on where a
   client sits in the batch, on which device or process);
3. average the clients, weighted by their sizes (FedAvg, McMahan et al., 2017):
   :math:`\\bar\\theta = \\sum_c n_c \\theta_c / \\sum_c n_c`;
4. server step. Without a server optimizer :math:`\\theta^{r+1} = \\bar\\theta`. With one (an
   optax transform; Reddi et al., 2021, "Adaptive Federated Optimization"; Hsu et al., 2019 for
   FedAvgM) it is applied to the pseudo-gradient :math:`\\Delta = \\theta^r - \\bar\\theta`:
   :math:`\\theta^{r+1} = \\theta^r + \\mathrm{tx}(\\Delta)`, so SGD with learning rate 1 is FedAvg.

Methods (``method=``):

* ``"fedavg"``; ``"fedprox"``: local objective plus :math:`\\frac{\\mu}{2}\\lVert w-\\theta^r\\rVert^2`;
* ``"fedpfn"`` (Li et al., "Improving Model Fusion by Training-time Neuron Alignment with Fixed
  Neuron Anchors"): one anchor mask :math:`m` (``tna_jax.anchors.anchor_mask(params, ρ,
  anchor_key)``), drawn at ``init`` and fixed for all rounds and shared by every client; clients never
  update anchored entries, and the server keeps them at the GLOBAL model's values:
  :math:`\\theta^{r+1} \\odot m = \\theta^r \\odot m = \\theta^0 \\odot m`, bit for bit;
* ``"fedpnu"``: a fresh shared mask every round, ``anchor_mask(params, ρ, fold_in(anchor_key, r))``
  with r the round: only the unmasked part of the model is updated in round r.

The server optimizer composes with every method; masked entries get a zero pseudo-gradient and
are copied from :math:`\\theta^r` after the step (so momentum accumulated on an entry in earlier
rounds cannot move it in a FedPNU round that masks it).

BatchNorm (``bn=``): ``"average"`` averages the running statistics like the parameters;
``"local"`` is FedBN (Li et al., 2021): every client keeps its own BatchNorm parameters and
statistics across rounds (``ServerState.client_bn``), only the rest is averaged; the global
model's BatchNorm entries (used only to evaluate it) are the size-weighted mean over all clients.

The server's side (the state, the optimizer, aggregation and FedBN) is
:mod:`tna_jax.federated.server`; its names are exported here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tna_jax import anchors, deprecation
from tna_jax.federated import client as client_lib
from tna_jax.federated.client import ClientData, LocalResult, make_local_update
from tna_jax.federated.server import (
    SERVER_OPTIMIZERS,
    ServerState,
    aggregate,
    anchors_fraction,
    bn_modules,
    merge_bn,
    server_optimizer,
    split_bn,
)

PyTree = Any

__all__ = ["METHODS", "SERVER_OPTIMIZERS", "BN_MODES", "ServerState", "FederatedAlgorithm", "server_optimizer",
           "federated_algorithm", "fed_avg", "fed_prox", "fed_pfn", "fed_pnu", "cohort_size", "bn_modules",
           "anchors_fraction"]

METHODS = ("fedavg", "fedprox", "fedpfn", "fedpnu")
BN_MODES = ("average", "local")


class FederatedAlgorithm(NamedTuple):
    """``init(params, model_state=None, anchor_key=None, mask_ratio=None) -> ServerState``;
    ``apply(state, clients, key) -> (state, metrics)``.

    Attributes:
      init: builds the round-0 server state (`anchor_key` and `mask_ratio` override the
        algorithm's, e.g. one per seed or per ratio under ``jax.vmap``).
      apply: one round (jittable; ``jax.vmap`` over seeds composes with it).
      local_update: the single-client function every round vmaps (for loops and tests).
      cohort: the number of clients per round, m, and padded to the devices, m'.

    Examples:
      >>> import jax, numpy as np, optax
      >>> from tna_jax import models
      >>> from tna_jax.federated.client import pack_clients
      >>> net = models.build({"name": "mlp", "depth": 0}, (3,), 2)
      >>> alg = fed_avg(net, optax.sgd(0.1), num_clients=3, max_examples=2, batch_size=2, client_fraction=0.5)
      >>> alg.cohort  # ceil(0.5 * 3) clients per round
      (2, 2)
      >>> clients = pack_clients(np.ones((6, 3), np.float32), np.arange(6) % 2, np.split(np.arange(6), 3))
      >>> state = jax.eval_shape(alg.init, jax.eval_shape(net.init, jax.random.key(0))["params"])
      >>> new_state, metrics = jax.eval_shape(alg.apply, state, clients, jax.random.key(1))  # traced only
      >>> sorted(metrics), metrics["clients"].shape
      (['client_loss', 'clients', 'steps', 'train_accuracy', 'train_loss', 'update_norm'], (2,))
    """

    init: Callable[..., ServerState]
    apply: Callable[[ServerState, ClientData, jax.Array], tuple[ServerState, dict[str, jax.Array]]]
    local_update: Callable[..., LocalResult]
    cohort: tuple[int, int]



def cohort_size(num_clients: int, fraction: float, num_devices: int = 1) -> tuple[int, int]:
    """``(m, m')``: clients per round :math:`m = \\max(1, \\lceil qK \\rceil)` and m padded up to a
    multiple of the devices (padding slots train nothing and weigh 0).

    Args:
      num_clients: K >= 1.
      fraction: q in (0, 1].
      num_devices: the devices the client axis is sharded over.

    Returns:
      ``(m, m')``.

    Raises:
      ValueError: `fraction` outside (0, 1], K < 1.

    Examples:
      >>> cohort_size(20, 0.1, 4), cohort_size(20, 1.0, 1)
      ((2, 4), (20, 20))
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer; got {num_clients!r}.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"client fraction must be in (0, 1]; got {fraction!r}.")
    m = max(1, math.ceil(fraction * num_clients - 1e-9))
    return m, -(-m // num_devices) * num_devices



def _legacy_algorithm_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Maps the pre-0.2 keyword ``mask_ratio=`` onto ``ratio=`` (one name for ρ in the API)."""
    if "mask_ratio" in kwargs:
        deprecation.warn("federated_algorithm(..., mask_ratio=...)", "federated_algorithm(..., ratio=...)",
                         stacklevel=4)
        kwargs = dict(kwargs)
        kwargs["ratio"] = kwargs.pop("mask_ratio")
    return args, kwargs


@deprecation.legacy_call(_legacy_algorithm_call)
def federated_algorithm(net: Any, client_optimizer: optax.GradientTransformation, *, num_clients: int,
                        max_examples: int, batch_size: int, method: str = "fedavg", local_epochs: int = 1,
                        local_steps: int = 0, client_fraction: float = 1.0, prox_mu: float = 0.0,
                        ratio: float = 0.0, anchor_key: jax.Array | None = None,
                        mask_options: Mapping[str, Any] | None = None,
                        server_tx: optax.GradientTransformation | None = None, bn: str = "average",
                        mesh: Mesh | None = None, unroll: int | bool = 1,
                        client_sizes: Sequence[int] | None = None, size_buckets: int = 1) -> FederatedAlgorithm:
    """Builds a :class:`FederatedAlgorithm` (see the module docstring for the math).

    Args:
      net: the model (``tna_jax.models.Net``).
      client_optimizer: the clients' optax optimizer (state reset every round).
      num_clients: K, the real clients in the :class:`ClientData` given to ``apply`` (rows past K
        are device padding and are never sampled).
      max_examples: N_max, the padded client size of that data.
      batch_size, local_epochs, local_steps: local training (see ``make_local_update``).
      method: one of :data:`METHODS`.
      client_fraction: q in (0, 1], the fraction of clients sampled each round.
      prox_mu: FedProx's μ (used by ``"fedprox"``; must be > 0 there).
      ratio: ρ in [0, 1] for ``"fedpfn"`` / ``"fedpnu"`` (formerly ``mask_ratio``, which still
        works with a `DeprecationWarning`).
      anchor_key: the PRNG key of the masks (``"fedpfn"`` / ``"fedpnu"``; or give one to ``init``).
      mask_options: extra arguments of ``anchors.anchor_mask`` (granularity, include, exclude,
        layer_order).
      server_tx: server optimizer on the pseudo-gradient (:func:`server_optimizer`), or None.
      bn: ``"average"`` or ``"local"`` (FedBN).
      mesh: shard the client axis of each round over this mesh's first axis (None: no constraint).
      unroll: the local step loop's ``lax.scan`` unroll.
      client_sizes: the K clients' true sizes :math:`n_c` (host values, ``ClientData.n[:K]``);
        needed for `size_buckets` > 1.
      size_buckets: with full participation (q = 1) and epoch-based local training, train the
        clients in at most this many size buckets (``client.size_buckets``), each vmapped and padded
        only to its own largest client, instead of one cohort padded to N_max. Every client sees
        the same batches either way, so the round is the same up to float rounding; the data given
        to ``apply`` must then have exactly these sizes. Ignored (one cohort) with client sampling
        or ``local_steps``, where padding costs no steps.

    Returns:
      The algorithm.

    Raises:
      ValueError: an unknown method or BN mode, ρ outside [0, 1], fraction outside (0, 1], μ <= 0
        for FedProx, bad sizes; at ``init``, a missing anchor key.

    Examples:
      >>> import jax, optax
      >>> from tna_jax import models, anchors
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 2)
      >>> alg = fed_pfn(net, optax.sgd(0.1), 0.5, jax.random.key(0), num_clients=2, max_examples=4, batch_size=2)
      >>> state = alg.init(net.init(jax.random.key(1))["params"])
      >>> 0.25 < anchors.mask_summary(state.mask)["overall"] < 0.75, int(state.round)  # 58 weights, ρ = 0.5
      (True, 0)

    ``jax.jit(alg.apply)(state, clients, key)`` then runs a round (``tests/test_federated.py``
    checks that the anchored entries never move, on any client or on the server).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}; got {bn!r}.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1]; got {ratio!r}.")
    if method == "fedprox" and not prox_mu > 0:
        raise ValueError(f"fedprox needs prox_mu > 0; got {prox_mu!r}.")
    default_key = anchors.as_key(anchor_key, "anchor_key") if anchor_key is not None else None
    num_devices = mesh.devices.size if mesh is not None else 1
    m, m_pad = cohort_size(num_clients, client_fraction, num_devices)
    mu = float(prox_mu) if method == "fedprox" else 0.0
    local_update = make_local_update(net, client_optimizer, batch_size=batch_size, max_examples=max_examples,
                                     local_epochs=local_epochs, local_steps=local_steps, prox_mu=mu, unroll=unroll)
    buckets = _bucket_plan(client_sizes, size_buckets, num_clients=num_clients, max_examples=max_examples,
                           batch_size=batch_size, local_epochs=local_epochs, multiple=num_devices,
                           full_cohort=m == num_clients and not local_steps)
    bucket_updates = [make_local_update(net, client_optimizer, batch_size=batch_size, max_examples=rows,
                                        local_epochs=local_epochs, prox_mu=mu, unroll=unroll,
                                        order_examples=max_examples) for _, rows in buckets]
    plan = _Round(
        method=method, num_clients=num_clients, cohort=m, padded=m_pad, local_update=local_update,
        buckets=buckets, bucket_updates=bucket_updates,
        bucket_sizes=np.asarray(client_sizes, np.int64) if buckets else None, local_bn=bn == "local",
        server_tx=server_tx, mask_options=dict(mask_options or {}),
        clients_spec=NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])) if mesh is not None else None,
        default_key=default_key,
        default_ratio=float(ratio))

    def init(params: PyTree, model_state: PyTree | None = None, anchor_key: jax.Array | None = None,
             mask_ratio: Any = None) -> ServerState:
        return _init_server(plan, params, model_state, anchor_key, mask_ratio)

    def apply(state: ServerState, clients: ClientData, key: jax.Array) -> tuple[ServerState, dict[str, jax.Array]]:
        return _round(plan, state, clients, key)

    return FederatedAlgorithm(init, apply, local_update, (m, m_pad))


class _Round(NamedTuple):
    """What a round of a `federated_algorithm` reads besides the state, the clients and the key:
    fixed when the algorithm is built."""

    method: str
    num_clients: int  # K, the real clients
    cohort: int  # m, the clients of a round
    padded: int  # m', m padded to the devices
    local_update: Callable[..., LocalResult]
    buckets: list[tuple[np.ndarray, int]]  # size buckets: (client rows, rows kept); [] for one cohort
    bucket_updates: list[Callable[..., LocalResult]]
    bucket_sizes: np.ndarray | None  # the client sizes the buckets were planned for
    local_bn: bool  # FedBN
    server_tx: optax.GradientTransformation | None
    mask_options: dict[str, Any]
    clients_spec: NamedSharding | None  # the client axis's sharding, or None
    default_key: jax.Array | None
    default_ratio: float

    @property
    def masked(self) -> bool:
        return self.method in ("fedpfn", "fedpnu")


def _on_clients(plan: _Round, tree: PyTree) -> PyTree:
    """`tree` with its client axis constrained to the clients' sharding."""
    if plan.clients_spec is None:
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, plan.clients_spec), tree)


def _init_server(plan: _Round, params: PyTree, model_state: PyTree | None, anchor_key: jax.Array | None,
                 mask_ratio: Any) -> ServerState:
    """The round-0 server state: the server optimizer's state, FedPFN's mask, the anchor key and
    ρ (FedPFN / FedPNU; the arguments override the algorithm's), FedBN's per-client statistics."""
    model_state = dict(model_state or {})
    opt_state = plan.server_tx.init(params) if plan.server_tx is not None else ()
    key_data: Any = ()
    if plan.masked:
        if anchor_key is None and plan.default_key is None:
            raise ValueError(f"method {plan.method!r} needs anchor_key (the PRNG key of the shared mask).")
        if anchor_key is None:
            key_data = jax.random.key_data(plan.default_key)
        elif jnp.issubdtype(anchor_key.dtype, jnp.uint32):
            key_data = jnp.asarray(anchor_key)
        else:
            key_data = jax.random.key_data(anchor_key)
    ratio: Any = ()
    if plan.masked:
        ratio = jnp.asarray(plan.default_ratio if mask_ratio is None else mask_ratio, jnp.float32)
    mask = anchors.anchor_mask(params, ratio, jax.random.wrap_key_data(key_data), **plan.mask_options) \
        if plan.method == "fedpfn" else ()
    client_bn: PyTree = ()
    if plan.local_bn:
        modules = bn_modules(model_state)
        if not modules:
            raise ValueError("bn='local' (FedBN) needs a model with BatchNorm statistics; this one has none.")
        local = {"params": split_bn(params, modules), "batch_stats": model_state["batch_stats"]}
        client_bn = jax.tree.map(lambda a: jnp.broadcast_to(a, (plan.num_clients, *np.shape(a))), local)
    return ServerState(params, model_state, opt_state, jnp.zeros((), jnp.int32), mask, client_bn, key_data, ratio)


def _sample(plan: _Round, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The round's client ids, padded to m' with K (a padding row), and which rows are real."""
    m, m_pad, num_clients = plan.cohort, plan.padded, plan.num_clients
    if m == num_clients:
        idx = jnp.arange(m, dtype=jnp.int32)
    else:
        idx = jnp.sort(jax.random.choice(jax.random.fold_in(key, 0), num_clients, (m,), replace=False))
        idx = idx.astype(jnp.int32)
    valid = jnp.arange(m_pad) < m
    return jnp.concatenate([idx, jnp.full((m_pad - m,), num_clients, jnp.int32)]), valid


def _round_mask(plan: _Round, state: ServerState) -> PyTree | None:
    """The round's anchor mask: FedPFN's fixed one, FedPNU's ``fold_in(anchor_key, round)``, or None."""
    if plan.method == "fedpfn":
        return state.mask
    if plan.method == "fedpnu":
        key = jax.random.wrap_key_data(state.anchor_key)
        return anchors.anchor_mask(state.params, state.mask_ratio, jax.random.fold_in(key, state.round),
                                   **plan.mask_options)
    return None


def _round(plan: _Round, state: ServerState, clients: ClientData,
           key: jax.Array) -> tuple[ServerState, dict[str, jax.Array]]:
    """One round: sample the cohort, train it (in one padded cohort or in size buckets),
    aggregate on the server."""
    key = anchors.as_key(key, "key") if not isinstance(key, jax.core.Tracer) else key
    if jnp.issubdtype(key.dtype, jnp.uint32):
        key = jax.random.wrap_key_data(key)
    idx, valid = _sample(plan, key)
    train_key = jax.random.fold_in(key, 1)
    mask = _round_mask(plan, state)
    if not plan.buckets:
        out, n = _train_cohort(plan, state, clients, plan.local_update, idx, valid, None, mask, train_key)
    else:
        out, n = _train_buckets(plan, state, clients, idx, valid, mask, train_key)
    return aggregate(state, out, idx, n, mask, clients.n[:plan.num_clients], server_tx=plan.server_tx,
                     local_bn=plan.local_bn)


def _train_cohort(plan: _Round, state: ServerState, clients: ClientData, update: Callable[..., LocalResult],
                  rows: jax.Array, row_valid: jax.Array, length: int | None, mask: PyTree | None,
                  train_key: jax.Array) -> tuple[LocalResult, jax.Array]:
    """Trains the clients `rows` (K marks a padding row) on their first `length` rows, all in one
    vmap from the global model (FedBN: from each client's own BatchNorm entries)."""
    num_clients = plan.num_clients
    safe = jnp.minimum(rows, num_clients - 1)
    if length is None and plan.padded == plan.cohort == clients.num_rows:  # every client, in order: no gather
        x, y, n = clients.x, clients.y, clients.n
    else:
        cx, cy = (clients.x, clients.y) if length is None else (clients.x[:, :length], clients.y[:, :length])
        x, y = jnp.take(cx, safe, axis=0), jnp.take(cy, safe, axis=0)
        n = jnp.where(row_valid, jnp.take(clients.n, safe), 0)
    keys = jax.vmap(lambda c: jax.random.fold_in(train_key, c))(safe)
    x, y, n, keys = _on_clients(plan, (x, y, n, keys))
    if plan.local_bn:
        local = jax.tree.map(lambda a: jnp.take(a, safe, axis=0), state.client_bn)
        start = jax.vmap(lambda b: merge_bn(state.params, b))(local["params"])
        start_state = {**state.model_state, "batch_stats": local["batch_stats"]}
        start, start_state = _on_clients(plan, (start, start_state))
        axes = (0, 0, None, None, 0, 0, 0, 0)
    else:
        start, start_state = state.params, state.model_state
        axes = (None, None, None, None, 0, 0, 0, 0)
    return jax.vmap(update, in_axes=axes)(start, start_state, state.params, mask, x, y, n, keys), n


def _train_buckets(plan: _Round, state: ServerState, clients: ClientData, idx: jax.Array, valid: jax.Array,
                   mask: PyTree | None, train_key: jax.Array) -> tuple[LocalResult, jax.Array]:
    """Trains every client in its size bucket (each its own vmap), then puts the rows back in the
    one-cohort layout (client c in row c, padding rows after), so the average sums in the same order."""
    num_clients = plan.num_clients
    if not isinstance(clients.n, jax.core.Tracer) and not np.array_equal(np.asarray(clients.n)[:num_clients],
                                                                           plan.bucket_sizes):
        raise ValueError("size_buckets: clients.n differs from the client_sizes the algorithm was built with; "
                         "build it with the sizes of the data it trains on.")
    outs, positions, offset = [], np.zeros(plan.padded, np.int64), 0
    for (members, rows), update in zip(plan.buckets, plan.bucket_updates):
        out, _ = _train_cohort(plan, state, clients, update, jnp.asarray(members, jnp.int32),
                               jnp.asarray(members < num_clients), rows, mask, train_key)
        outs.append(out)
        real = members < num_clients
        positions[members[real]] = offset + np.flatnonzero(real)
        offset += len(members)
    out = jax.tree.map(lambda *a: jnp.take(jnp.concatenate(a), jnp.asarray(positions), axis=0), *outs)
    out = out._replace(loss=jnp.where(valid, out.loss, 0.0), accuracy=jnp.where(valid, out.accuracy, 0.0),
                       steps=jnp.where(valid, out.steps, 0))
    n = jnp.where(valid, jnp.take(clients.n, jnp.minimum(idx, num_clients - 1)), 0)
    return _on_clients(plan, out), n


def _bucket_plan(client_sizes: Sequence[int] | None, size_buckets: int, *, num_clients: int, max_examples: int,
                 batch_size: int, local_epochs: int, multiple: int, full_cohort: bool) -> list[tuple[np.ndarray, int]]:
    """The size buckets as (client rows padded to `multiple` with `num_clients`, rows kept); []
    for one padded cohort."""
    if isinstance(size_buckets, bool) or not isinstance(size_buckets, (int, np.integer)) or size_buckets < 1:
        raise ValueError(f"size_buckets must be an integer >= 1; got {size_buckets!r}.")
    if size_buckets == 1 or not full_cohort:
        return []
    if client_sizes is None:
        raise ValueError(f"size_buckets={size_buckets} needs client_sizes (the {num_clients} clients' true sizes).")
    sizes = np.asarray(client_sizes, np.int64)
    if sizes.shape != (num_clients,):
        raise ValueError(f"client_sizes must hold num_clients={num_clients} sizes; got shape {sizes.shape}.")
    if sizes.max() > max_examples:
        raise ValueError(f"client_sizes has a client of {int(sizes.max())} rows, more than max_examples={max_examples}.")
    groups = client_lib.size_buckets(sizes, batch_size=batch_size, local_epochs=local_epochs,
                                     max_buckets=int(size_buckets), multiple=multiple)
    if len(groups) == 1:
        return []
    plan = []
    for g in groups:
        padded = np.full(-(-len(g) // multiple) * multiple, num_clients, np.int64)
        padded[:len(g)] = g
        plan.append((padded, int(sizes[g].max())))
    return plan




def fed_avg(net: Any, client_optimizer: optax.GradientTransformation, **kwargs: Any) -> FederatedAlgorithm:
    """FedAvg (McMahan et al., 2017): :func:`federated_algorithm` with ``method="fedavg"``.

    Args:
      net: the model.
      client_optimizer: the clients' optimizer.
      **kwargs: the other arguments of :func:`federated_algorithm` (``num_clients``,
        ``max_examples``, ``batch_size`` are required).

    Returns:
      The :class:`FederatedAlgorithm`.

    Examples:
      >>> import optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 4}, (3,), 2)
      >>> fed_avg(net, optax.sgd(0.1), num_clients=10, max_examples=5, batch_size=2, client_fraction=0.3).cohort
      (3, 3)
    """
    return federated_algorithm(net, client_optimizer, method="fedavg", **kwargs)


def fed_prox(net: Any, client_optimizer: optax.GradientTransformation, mu: float, **kwargs: Any) -> FederatedAlgorithm:
    """FedProx (Li et al., 2020) with proximal weight ``mu`` > 0.

    Each client minimises its loss plus :math:`\\frac{\\mu}{2}\\lVert w - \\theta^r\\rVert^2`.

    Args:
      net: the model.
      client_optimizer: the clients' optimizer.
      mu: the proximal weight μ > 0.
      **kwargs: the other arguments of :func:`federated_algorithm`.

    Returns:
      The :class:`FederatedAlgorithm`.

    Raises:
      ValueError: ``mu <= 0`` and the errors of :func:`federated_algorithm`.

    Examples:
      >>> import optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 0}, (3,), 2)
      >>> fed_prox(net, optax.sgd(0.1), 0.01, num_clients=4, max_examples=5, batch_size=2).cohort
      (4, 4)
      >>> fed_prox(net, optax.sgd(0.1), 0.0, num_clients=4, max_examples=5, batch_size=2)
      Traceback (most recent call last):
      ...
      ValueError: fedprox needs prox_mu > 0; got 0.0.
    """
    return federated_algorithm(net, client_optimizer, method="fedprox", prox_mu=mu, **kwargs)


def fed_pfn(net: Any, client_optimizer: optax.GradientTransformation, ratio: float, anchor_key: jax.Array,
            **kwargs: Any) -> FederatedAlgorithm:
    """FedPFN: one shared anchor mask of ratio ρ, fixed for all rounds (see the module docstring).

    Args:
      net: the model.
      client_optimizer: the clients' optimizer.
      ratio: the mask ratio ρ in [0, 1].
      anchor_key: the PRNG key of the mask (every client and round uses the same mask).
      **kwargs: the other arguments of :func:`federated_algorithm`.

    Returns:
      The :class:`FederatedAlgorithm`; its state holds the mask (``ServerState.mask``).

    Examples:
      >>> import jax, optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 2)
      >>> alg = fed_pfn(net, optax.sgd(0.1), 0.4, jax.random.key(0), num_clients=2, max_examples=4, batch_size=2)
      >>> state = jax.eval_shape(alg.init, jax.eval_shape(net.init, jax.random.key(1))["params"])
      >>> state.mask["dense_0"]["kernel"].shape, state.mask["dense_0"]["kernel"].dtype
      ((4, 8), dtype('bool'))
    """
    return federated_algorithm(net, client_optimizer, method="fedpfn", ratio=ratio, anchor_key=anchor_key,
                               **kwargs)


def fed_pnu(net: Any, client_optimizer: optax.GradientTransformation, ratio: float, anchor_key: jax.Array,
            **kwargs: Any) -> FederatedAlgorithm:
    """FedPNU: a fresh shared mask of ratio ρ every round, ``fold_in(anchor_key, round)``.

    Args:
      net: the model.
      client_optimizer: the clients' optimizer.
      ratio: the mask ratio ρ in [0, 1].
      anchor_key: the PRNG key the round's mask is folded from.
      **kwargs: the other arguments of :func:`federated_algorithm`.

    Returns:
      The :class:`FederatedAlgorithm`; its state holds no mask, only the key and ρ.

    Examples:
      >>> import jax, optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 2)
      >>> alg = fed_pnu(net, optax.sgd(0.1), 0.4, jax.random.key(0), num_clients=2, max_examples=4, batch_size=2)
      >>> state = jax.eval_shape(alg.init, jax.eval_shape(net.init, jax.random.key(1))["params"])
      >>> state.mask, state.anchor_key.shape, state.mask_ratio.dtype
      ((), (2,), dtype('float32'))
    """
    return federated_algorithm(net, client_optimizer, method="fedpnu", ratio=ratio, anchor_key=anchor_key,
                               **kwargs)
