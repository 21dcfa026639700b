r"""The `fixed_anchor_mask` optax transform: TNA-PFN as one line in any optimizer chain.

Its state (`FixedAnchorMaskState`) holds everything the update reads, so one transform object
serves any number of models and a restored state carries on in a freshly built transform.
`verify` checks, at any time, that the anchored entries hold their values.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from tna_jax import tree as tree_lib
from tna_jax.anchors.masks import (
    GRANULARITIES,
    anchor_mask,
    as_key,
    check_layer_order,
    check_mask,
    check_ratio,
    default_unit_group,
    draw_mask,
    eligible_leaves,
    is_concrete,
    mask_summary,
    threefry_first_word,
    threefry_keypair,
)

PyTree = Any


class FixedAnchorMaskState(NamedTuple):
    """State of `fixed_anchor_mask`: everything its update reads.

    Attributes:
      count: number of updates applied so far (int32).
      mask: tree of booleans shaped like the params, True = anchored.
      key: the Threefry key pair (uint32[2]) the masks are drawn from.
      ratio: the anchored fraction (float32) that refreshed masks are drawn at.
      eligible: one boolean per leaf: may the leaf hold anchors (`include` minus `exclude`,
        resolved against the layer order at `init`).
      values: the anchor values (a tree like the params, in their dtypes), or None when every
        model keeps its own values.
      digest: one uint32 per leaf, a checksum of the values the anchored entries must hold
        (what `verify` compares with).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> state = fixed_anchor_mask(0.5, jax.random.key(0)).init({"w": jnp.zeros(8)})
      >>> state.mask["w"].dtype, int(state.count), float(state.ratio), state.values
      (dtype('bool'), 0, 0.5, None)
    """

    count: chex.Array
    mask: PyTree
    key: chex.Array
    ratio: chex.Array
    eligible: PyTree
    values: PyTree | None
    digest: PyTree


def _leaf_digest(x: jax.Array, m: jax.Array) -> jax.Array:
    """A position-sensitive checksum (uint32) of the bits of `x` where `m` holds: the sum, mod
    2^32, of Threefry(bits, index) over the anchored entries. Only adds, xors and shifts: XLA:CPU
    at `--xla_backend_optimization_level=0` was seen to get some uint32 products wrong."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize * 8
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))
    if width > 32:
        words = jax.lax.bitcast_convert_type(bits, jnp.uint32)  # a trailing axis of two words
        bits = threefry_first_word(jnp.uint32(1), jnp.uint32(2), words[..., 0], words[..., 1])
    bits = bits.astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, max(x.size, 1)).reshape(x.shape) if x.shape else jnp.uint32(0)
    h = threefry_first_word(jnp.uint32(0x7A6E), jnp.uint32(0x6A61), bits, index)
    return jnp.sum(jnp.where(m, h, jnp.uint32(0)), dtype=jnp.uint32)


def _digest(tree: PyTree, mask: PyTree) -> PyTree:
    return jax.tree.map(_leaf_digest, tree, mask)


def find_state(opt_state: PyTree) -> FixedAnchorMaskState | None:
    """The `FixedAnchorMaskState` inside an optimizer state (a chain, `MultiSteps`,
    `inject_hyperparams`, an `nnx.Optimizer`'s `opt_state`), or None when there is none.

    Args:
      opt_state: any optimizer state.

    Returns:
      The first `FixedAnchorMaskState` found, or None.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> tx = optax.chain(optax.sgd(0.1), fixed_anchor_mask(0.5, jax.random.key(0)))
      >>> find_state(tx.init({"w": jnp.zeros(4)})).mask["w"].shape
      (4,)
    """
    found: list[FixedAnchorMaskState] = []

    def visit(node: Any) -> bool:
        if isinstance(node, FixedAnchorMaskState):
            found.append(node)
            return True
        return False

    jax.tree.map(lambda x: x, opt_state, is_leaf=visit)
    return found[0] if found else None


def verify(params: PyTree, opt_state: PyTree) -> jax.Array:
    """True when every anchored entry of `params` holds the value it is anchored at.

    Compares a checksum of the anchored entries with the one the transform recorded (at `init`,
    and at every refresh); costs one pass over the params and no stored copy. With `values=`
    the anchored entries reach their values in the first update and bit-exactly by the second
    (see `fixed_anchor_mask`), so check after at least two updates. Works under `jit` and
    `vmap` (a batch of runs gives a batch of answers).

    Args:
      params: the current parameters.
      opt_state: the optimizer state holding a `FixedAnchorMaskState` (or that state itself).

    Returns:
      A boolean scalar array.

    Raises:
      ValueError: `opt_state` holds no `fixed_anchor_mask` state, or `params` does not match its
        mask (the path is named).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(16)}
      >>> tx = optax.chain(optax.sgd(0.1), fixed_anchor_mask(0.5, jax.random.key(0)))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(16)}, state, params)
      >>> bool(verify(optax.apply_updates(params, updates), state))
      True
      >>> bool(verify({"w": jnp.zeros(16)}, state))
      False
    """
    state = find_state(opt_state)
    if state is None:
        raise ValueError("opt_state holds no fixed_anchor_mask state; chain anchors.fixed_anchor_mask "
                         "after your optimizer.")
    # Leaf by leaf, by name: an optimizer may wrap the state's leaves in its own node types
    # (nnx.Optimizer's OptVariable around what were Params).
    named_p, named_m = tree_lib.named_leaves(params), tree_lib.named_leaves(state.mask)
    if [n for n, _ in named_p] != [n for n, _ in named_m] or any(
            jnp.shape(p) != jnp.shape(m) for (_, p), (_, m) in zip(named_p, named_m)):
        check_mask(params, state.mask)  # names the first path that differs
    p_leaves = [p for _, p in named_p]
    m_leaves = [m for _, m in named_m]
    d_leaves = jax.tree.leaves(state.digest)
    checks = [_leaf_digest(p, m) == d for p, m, d in zip(p_leaves, m_leaves, d_leaves)]
    held = jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)
    if state.values is None:
        return held
    # With values, the anchored entries equal them exactly (until a refresh freezes a new set
    # where it stands, which the checksum records). Comparing with the values directly also
    # covers a checksum computed at init by a program that rounded its own copy of the values
    # differently (XLA promises no bit-equality between fusions).
    same = [jnp.all(jnp.where(m, p == v, True))
            for p, v, m in zip(p_leaves, jax.tree.leaves(state.values), m_leaves)]
    return held | jnp.all(jnp.stack(same))


def fixed_anchor_mask(
    ratio: float | None = None,
    key: jax.Array | None = None,
    *,
    values: PyTree | None = None,
    granularity: str = "weight",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    mask: PyTree | None = None,
    refresh_every: int | None = None,
    layer_order: Sequence[str] | None = None,
    unit_groups: Callable[[str], str] | None = None,
) -> optax.GradientTransformation:
    r"""Keeps anchored parameter entries fixed: TNA-PFN as one optax transform.

    With $m$ the anchor mask (`anchor_mask`), $u_t$ the incoming updates, $\theta_t$ the
    params and $v$ the anchor values,

    $$u'_t = (1 - m) \odot u_t + m \odot (v - \theta_t),$$

    so anchored entries move to $v$ and stay there, while every other entry gets the optimizer's
    update unchanged. Without `values` the second term is zero: each model keeps its *own*
    initial values at its anchors.

    **Share the values.** TNA-PFN needs the anchors to hold the *same* values in every model
    that will be fused: pass `values=`, typically one shared initialisation
    (`net.init(shared_key)["params"]`), while each model starts from its own init. Without
    `values=` each model keeps its own initial values at its anchors: the weaker,
    paper-as-written protocol, which in our measurements left the barrier between seeds where it
    was without anchors (the how-to "Chain the transform into your optimizer" has the numbers).

    Exactness. One floating-point addition cannot land on an arbitrary value (about a third of
    the entries of two random float32 inits round to a neighbour of $v$), so the first update
    brings anchored entries within one rounding of $v$; from the second on they equal $v$ bit
    for bit and the update there is exactly zero. Call `share_anchor_values(params, values,
    mask)` once before training to have them exact from the start. Check any time with
    `verify(params, opt_state)`.

    Chain it *last*: `optax.chain(optax.adamw(1e-3), fixed_anchor_mask(0.4, key, values=v))`,
    so that everything the optimizer adds (weight decay included) is overridden on the anchors.
    With `refresh_every=k` the mask for step $t$ is drawn from `fold_in(key, t // k)`: a fresh
    anchor set every `k` steps (FedPNU's idea in centralised training); each new set is frozen at
    its current values, and `values` applies to the first set only.

    The state holds everything the update reads (mask, key, ratio, the eligible leaves, values
    and a checksum): one transform object serves any number of models, and a state restored
    into a freshly built transform carries on exactly. The mask is stored (one byte per
    parameter) rather than redrawn every step; see `benchmarks/anchor_overhead.py`.

    Args:
      ratio: anchored fraction ρ in [0, 1] (with `key`).
      key: PRNG key shared by every model that should share the anchors.
      values: the anchor values, a tree like the params (e.g. a shared init); None: each model
        keeps its own values.
      granularity, include, exclude, layer_order, unit_groups: see `anchor_mask`.
      mask: a precomputed mask (e.g. from `prune_at_init`) instead of `ratio` and `key`.
      refresh_every: draw a new mask every this many updates (needs `ratio` and `key`, and the
        params passed to `update`).

    Returns:
      An `optax.GradientTransformation` whose state is `FixedAnchorMaskState`.

    Raises:
      ValueError: both or neither of `mask` and (`ratio`, `key`); bad `ratio`, `granularity`,
        `refresh_every`; a named selection without `layer_order`; at `init`, a mask or values
        that do not match the params (naming the path); at `update`, no params where `values`
        or `refresh_every` need them.
      TypeError: `key` is not a PRNG key.

    References:
      Li et al., Training-time Neuron Alignment through Permutation Subspace for Improving Linear
      Mode Connectivity and Model Fusion, 2024 (TNA-PFN).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> shared = {"w": jnp.zeros((4, 4))}                # the same anchor values in every model
      >>> params = {"w": jnp.ones((4, 4))}                 # this model's own init
      >>> tx = optax.chain(optax.adamw(0.1), fixed_anchor_mask(0.5, jax.random.key(0), values=shared))
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update({"w": jnp.ones((4, 4))}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> anchored = state[1].mask["w"]
      >>> bool((params["w"][anchored] == 0.0).all()), bool(verify(params, state))
      (True, True)
    """
    keypair = _checked_keypair(ratio, key, mask, refresh_every, granularity)
    check_layer_order(layer_order)
    group_of = unit_groups or default_unit_group

    def init_fn(params: PyTree) -> FixedAnchorMaskState:
        return _init_state(params, keypair, ratio, values, mask, refresh_every,
                           {"granularity": granularity, "include": include, "exclude": exclude,
                            "layer_order": layer_order, "unit_groups": unit_groups})

    def update_fn(updates: PyTree, state: FixedAnchorMaskState, params: PyTree | None = None):
        return _update(updates, state, params, refresh_every, granularity, group_of)

    return optax.GradientTransformation(init_fn, update_fn)


def _checked_keypair(ratio: Any, key: Any, mask: PyTree | None, refresh_every: Any, granularity: str) -> jax.Array:
    """The Threefry key pair of `fixed_anchor_mask`'s arguments (zeros with a precomputed mask),
    after checking that they go together."""
    if mask is not None:
        if ratio is not None or key is not None:
            raise ValueError("fixed_anchor_mask takes either mask= or (ratio, key), not both; "
                             f"got mask and ratio={ratio!r}, key={'given' if key is not None else None}.")
        if refresh_every is not None:
            raise ValueError("refresh_every needs ratio and key to draw new masks; it cannot be "
                             "used with a precomputed mask=.")
        keypair = jnp.zeros((2,), jnp.uint32)
    else:
        if ratio is None or key is None:
            raise ValueError("fixed_anchor_mask needs ratio and key (or a precomputed mask=); "
                             f"got ratio={ratio!r}, key={'given' if key is not None else None}.")
        check_ratio(ratio)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}.")
        keypair = threefry_keypair(as_key(key))
    if refresh_every is not None:
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, numbers.Integral) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive integer or None; got {refresh_every!r}.")
    return keypair


def _init_state(params: PyTree, keypair: jax.Array, ratio: Any, values: PyTree | None, mask: PyTree | None,
                refresh_every: int | None, mask_options: dict[str, Any]) -> FixedAnchorMaskState:
    """`fixed_anchor_mask`'s `init`: the mask (given, or drawn from the key pair), the values in
    the params' dtypes, and the checksum of what the anchored entries must hold."""
    eligible = eligible_leaves(params, mask_options["include"], mask_options["exclude"],
                               mask_options["layer_order"])
    if mask is not None:
        check_mask(params, mask)
        # Copies: the state may be donated to a jitted step, which must not delete the
        # caller's arrays.
        m = jax.tree.map(lambda x: jnp.array(x, dtype=bool, copy=True), mask)
        r = jnp.asarray(mask_summary(m)["overall"] if _all_concrete(m) else 0.0, jnp.float32)
    else:
        k = jax.random.wrap_key_data(keypair)
        if refresh_every is not None:  # period 0 of fold_in(key, t // refresh_every)
            k = jax.random.fold_in(k, 0)
        m = anchor_mask(params, ratio, k, **mask_options)
        r = jnp.asarray(ratio, jnp.float32)
    v = None
    if values is not None:
        tree_lib.check_same_structure(params, values, names=("params", "values"))
        v = jax.tree.map(lambda p, a: jnp.array(a, dtype=jnp.asarray(p).dtype, copy=True), params, values)
    # The digest must see the very arrays the state holds: without the barrier XLA may
    # recompute a fused producer (e.g. an init's normal draws) inside the digest's reduction,
    # where another fusion can round its last bit differently.
    held, m = jax.lax.optimization_barrier((params if v is None else v, m))
    if v is not None:
        v = held
    treedef = jax.tree.structure(params)
    return FixedAnchorMaskState(
        count=jnp.zeros([], jnp.int32), mask=m, key=jnp.array(keypair, copy=True), ratio=r,
        eligible=jax.tree.unflatten(treedef, [jnp.asarray(e) for e in eligible]),
        values=v, digest=_digest(held, m))


def _update(updates: PyTree, state: FixedAnchorMaskState, params: PyTree | None, refresh_every: int | None,
            granularity: str, group_of: Callable[[str], str]) -> tuple[PyTree, FixedAnchorMaskState]:
    """`fixed_anchor_mask`'s `update`: refresh the mask when due, then hold (or move) the
    anchored entries."""
    if params is None and (state.values is not None or refresh_every is not None):
        raise ValueError("fixed_anchor_mask with values= or refresh_every needs the params: call "
                         "tx.update(grads, state, params).")
    m, digest = state.mask, state.digest
    if refresh_every is not None:
        m, digest = _refreshed(updates, state, params, refresh_every, granularity, group_of)
    new_updates = _anchored_updates(updates, state, params, m, refresh_every)
    count = optax.safe_int32_increment(state.count)
    return new_updates, state._replace(count=count, mask=m, digest=digest)


def _refreshed(updates: PyTree, state: FixedAnchorMaskState, params: PyTree, refresh_every: int, granularity: str,
               group_of: Callable[[str], str]) -> tuple[PyTree, PyTree]:
    """The mask and checksum of this update: a new draw from ``fold_in(key, count //
    refresh_every)`` at the start of every period after the first, else the state's."""
    m, digest = state.mask, state.digest
    refresh = (state.count % refresh_every == 0) & (state.count > 0)

    def redraw():
        k = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count // refresh_every)
        new = draw_mask(updates, threefry_keypair(k), state.ratio, jax.tree.leaves(state.eligible), granularity,
                        group_of)
        return new, _digest(params, new)

    return jax.lax.cond(refresh, redraw, lambda: (m, digest))


def _anchored_updates(updates: PyTree, state: FixedAnchorMaskState, params: PyTree | None, m: PyTree,
                      refresh_every: int | None) -> PyTree:
    """The updates with the anchored entries (mask `m`) zeroed, or, with values, moved to them."""

    def anchored(u, a, p, v):
        if u is None:
            return None
        zero = jnp.zeros((), u.dtype)
        if v is None:
            return jnp.where(a, zero, u)
        move = (v - p).astype(u.dtype)
        if refresh_every is not None:  # values hold the first anchor set only
            move = jnp.where(state.count < refresh_every, move, zero)
        return jnp.where(a, move, u)

    # The move is read at every update although it is exactly zero from the second one on: a
    # lax.cond that skips it costs far more than reading the values, because XLA cannot fuse the
    # optimizer's update across a conditional (see BENCHMARKS.md, anchor_overhead).
    vals = state.values if state.values is not None else jax.tree.map(lambda _: None, m)
    ps = params if params is not None else jax.tree.map(lambda _: None, m)
    return jax.tree.map(anchored, updates, m, ps, vals, is_leaf=lambda x: x is None)


def _all_concrete(tree: PyTree) -> bool:
    return all(is_concrete(x) for x in jax.tree.leaves(tree))
