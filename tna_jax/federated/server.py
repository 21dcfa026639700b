"""The server's side of a federated round: its state, its optimizer, and the aggregation.

The round's clients are averaged, weighted by their sizes (FedAvg):
:math:`\\bar\\theta = \\sum_c n_c \\theta_c / \\sum_c n_c`. Without a server optimizer
:math:`\\theta^{r+1} = \\bar\\theta`; with one (an optax transform) it is applied to the
pseudo-gradient :math:`\\Delta = \\theta^r - \\bar\\theta`,
:math:`\\theta^{r+1} = \\theta^r + \\mathrm{tx}(\\Delta)`.
Masked (anchored) entries get a zero pseudo-gradient and are copied from :math:`\\theta^r`
after the step. With FedBN (``bn="local"``) every client keeps its own
BatchNorm parameters and statistics; the global model's are their size-weighted mean.
`tna_jax.federated.algorithms` builds the rounds that end here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax import tree as tree_lib
from tna_jax.federated.client import LocalResult

PyTree = Any

__all__ = ["SERVER_OPTIMIZERS", "ServerState", "server_optimizer", "aggregate", "bn_modules", "split_bn", "merge_bn",
           "anchors_fraction"]

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")


class ServerState(NamedTuple):
    """The server's state between rounds.

    Attributes:
      params: the global model's parameters :math:`\\theta^r`.
      model_state: its non-parameter collections (``{"batch_stats": ...}`` or ``{}``).
      opt_state: the server optimizer's state (``()`` without one).
      round: rounds done, r (int32).
      mask: FedPFN's fixed anchor mask (True = anchored), or ``()`` for the other methods.
      client_bn: FedBN's per-client BatchNorm ``{"params": ..., "batch_stats": ...}`` with a
        leading client axis, or ``()``.
      anchor_key: raw uint32 data of the anchor key (FedPFN / FedPNU), or ``()``.
      mask_ratio: ρ of FedPFN / FedPNU (float32; a traced value, so arms that differ only in ρ
        share one compiled program), or ``()``.

    Examples:
      >>> import jax, optax
      >>> from tna_jax import models
      >>> from tna_jax.federated.algorithms import fed_avg
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 2)
      >>> params = jax.eval_shape(net.init, jax.random.key(0))["params"]
      >>> alg = fed_avg(net, optax.sgd(0.1), num_clients=2, max_examples=4, batch_size=2,
      ...               server_tx=server_optimizer("fedavgm"))
      >>> state = jax.eval_shape(alg.init, params)  # shapes only
      >>> state.round.shape, state.mask, state.params["dense_0"]["kernel"].shape
      ((), (), (4, 8))
    """

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    round: jax.Array
    mask: PyTree
    client_bn: PyTree
    anchor_key: Any
    mask_ratio: Any


def server_optimizer(name: str, learning_rate: float | None = None, *, momentum: float = 0.9, b1: float = 0.9,
                     b2: float = 0.99, eps: float = 1e-3) -> optax.GradientTransformation | None:
    """The server optimizer on the pseudo-gradient: None for ``"none"`` (plain averaging), or

    * ``"fedavgm"``: ``optax.sgd(lr, momentum)`` (default lr 1.0; Hsu et al., 2019);
    * ``"fedadam"``: ``optax.adam(lr, b1, b2, eps)`` (default lr 0.01, ε = τ = 1e-3 as in Reddi et al.);
    * ``"fedyogi"``: ``optax.yogi(lr, b1, b2, eps)`` (default lr 0.01).

    Args:
      name: one of :data:`SERVER_OPTIMIZERS`.
      learning_rate: the server learning rate (None: the default above).
      momentum: FedAvgM's momentum in [0, 1).
      b1, b2, eps: FedAdam's / FedYogi's moment decays and ε (τ).

    Returns:
      An optax transform for ``federated_algorithm(server_tx=...)``, or None for ``"none"``.

    Raises:
      ValueError: an unknown name (listing :data:`SERVER_OPTIMIZERS`) or a learning rate <= 0.

    Examples:
      >>> server_optimizer("none") is None, type(server_optimizer("fedadam")).__name__
      (True, 'GradientTransformationExtraArgs')
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}; got {name!r}.")
    if name == "none":
        return None
    lr = (1.0 if name == "fedavgm" else 0.01) if learning_rate is None else float(learning_rate)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server learning_rate must be a finite number > 0; got {learning_rate!r}.")
    if name == "fedavgm":
        if not 0 <= momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1); got {momentum!r}.")
        return optax.sgd(lr, momentum=momentum or None)
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return optax.yogi(lr, b1=b1, b2=b2, eps=eps)


def bn_modules(model_state: PyTree) -> set[str]:
    """Module paths that hold BatchNorm statistics (``batch_stats``), e.g. ``{"conv1_norm"}``.

    Args:
      model_state: a model's non-parameter collections (``{}`` for nets without BatchNorm).

    Returns:
      The set of module paths (``"stage0_block0/conv1_norm"``), empty without BatchNorm.

    Examples:
      >>> bn_modules({"batch_stats": {"conv1_norm": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}})
      {'conv1_norm'}
    """
    stats = model_state.get("batch_stats", {}) if isinstance(model_state, Mapping) else {}
    return {name.rsplit("/", 1)[0] for name in tree_lib.leaf_names(stats)}


def split_bn(params: PyTree, modules: set[str]) -> PyTree:
    """The BatchNorm part of a params dict, as a nested dict.

    Args:
      params: a model's parameters (nested dicts).
      modules: the BatchNorm module paths (`bn_modules`).

    Returns:
      The entries of `params` under those modules, nested as in `params`.
    """

    def walk(node: Any, prefix: str) -> Any:
        out = {}
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if path in modules:
                out[k] = v
            elif isinstance(v, Mapping):
                sub = walk(v, path)
                if sub:
                    out[k] = sub
        return out

    return walk(params, "")


def merge_bn(params: PyTree, bn_params: PyTree) -> PyTree:
    """`params` with the BatchNorm entries of `bn_params` (`split_bn`'s layout) put back.

    Args:
      params: a model's parameters (nested dicts).
      bn_params: BatchNorm parameters nested as in `params`.

    Returns:
      A new dict; `params` itself is not changed.
    """
    out = dict(params)
    for k, v in bn_params.items():
        out[k] = merge_bn(params[k], v) if isinstance(v, Mapping) and not _is_module_leafdict(v) else v
    return out


def _is_module_leafdict(node: Mapping[str, Any]) -> bool:
    return all(not isinstance(v, Mapping) for v in node.values())


def anchors_fraction(mask: PyTree) -> jax.Array:
    """Fraction of entries that `mask` anchors (jittable).

    Args:
      mask: a tree of boolean arrays (True = anchored).

    Returns:
      A float scalar array in [0, 1] (0 for an empty mask).

    Examples:
      >>> float(anchors_fraction({"a": jnp.array([True, False]), "b": jnp.array([True, True])}))
      0.75
    """
    leaves = jax.tree.leaves(mask)
    total = sum(int(np.size(m)) for m in leaves)
    return sum(jnp.sum(m) for m in leaves) / max(total, 1)




def aggregate(state: ServerState, out: LocalResult, idx: jax.Array, n: jax.Array, mask: PyTree | None,
              all_sizes: jax.Array, *, server_tx: optax.GradientTransformation | None,
              local_bn: bool) -> tuple[ServerState, dict[str, jax.Array]]:
    """Ends a round: the size-weighted mean of the clients, the server step, the mask and FedBN.

    Args:
      state: the server state the round started from, :math:`\\theta^r`.
      out: the cohort's local results (a leading client axis).
      idx: the cohort's client ids (the number of clients marks a padding row).
      n: the cohort's sizes, the averaging weights (0 for padding rows).
      mask: the round's anchor mask (True = held at :math:`\\theta^r`), or None.
      all_sizes: every client's size (FedBN's global BatchNorm is their weighted mean).
      server_tx: the server optimizer on the pseudo-gradient, or None (plain averaging).
      local_bn: FedBN: every client keeps its own BatchNorm entries (``state.client_bn``).

    Returns:
      ``(state after the round, metrics)``: size-weighted training loss and accuracy, every
      client's loss, the client ids, local steps, the norm of the update (and the masked fraction).
    """
    weights = n.astype(jnp.float32)
    mean = tree_lib.weighted_mean(out.params, weights)
    old = state.params
    if mask is not None:
        mean = jax.tree.map(lambda msk, o, a: jnp.where(msk, o, a), mask, old, mean)
    if server_tx is None:
        new_params, opt_state = mean, state.opt_state
    else:
        delta = jax.tree.map(lambda o, a: o - a, old, mean)
        updates, opt_state = server_tx.update(delta, state.opt_state, old)
        new_params = optax.apply_updates(old, updates)
    if mask is not None:
        new_params = jax.tree.map(lambda msk, o, a: jnp.where(msk, o, a), mask, old, new_params)
    model_state = state.model_state
    client_bn = state.client_bn
    if model_state and not local_bn:
        model_state = {**model_state, **tree_lib.weighted_mean(out.model_state, weights)}
    if local_bn:
        modules = bn_modules(state.model_state)
        local = {"params": split_bn(out.params, modules), "batch_stats": out.model_state["batch_stats"]}
        client_bn = jax.tree.map(lambda all_, new: all_.at[idx].set(new, mode="drop"), client_bn, local)
        # The global model's BatchNorm (used only to evaluate it): the size-weighted mean over all clients.
        avg = tree_lib.weighted_mean(client_bn, all_sizes.astype(jnp.float32))
        new_params = merge_bn(new_params, avg["params"])
        model_state = {**model_state, "batch_stats": avg["batch_stats"]}
    total = jnp.maximum(jnp.sum(weights), 1.0)
    metrics = {
        "train_loss": jnp.sum(out.loss * weights) / total,
        "train_accuracy": jnp.sum(out.accuracy * weights) / total,
        "client_loss": out.loss,
        "clients": idx,
        "steps": out.steps,
        "update_norm": optax.tree.norm(jax.tree.map(lambda a, b: a - b, new_params, old)),
    }
    if mask is not None:
        metrics["masked_fraction"] = anchors_fraction(mask)
    return ServerState(new_params, model_state, opt_state, state.round + 1, state.mask, client_bn,
                       state.anchor_key, state.mask_ratio), metrics
