"""The contract of `fixed_anchor_mask` as a user meets it: shared anchor values, everything the
update needs in the state, the layer order from the model's call, composition with optax
wrappers, and drawing masks without temporary memory."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from test_anchors import OPTIMIZERS, mlp_params, quadratic_loss
from util import run_python, xla_flags_with_devices

from tna_jax import anchors
from tna_jax.anchors import anchor_mask, fixed_anchor_mask


def _bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype == jnp.bfloat16 else jnp.uint32)


def _stepper(tx, dtype):
    x = jax.random.normal(jax.random.key(0), (32, 20), dtype)
    y = jax.random.normal(jax.random.key(1), (32, 4), dtype)

    @jax.jit
    def step(p, s):
        g = jax.grad(quadratic_loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shared_values_are_reached_in_one_update_and_held_bit_for_bit_from_the_second(name, dtype):
    own = mlp_params(jax.random.key(0), dtype=dtype)         # this model's init
    shared = mlp_params(jax.random.key(5), dtype=dtype)      # the values every model anchors at
    key = jax.random.key(42)
    tx = optax.chain(OPTIMIZERS[name](6.0 if dtype == jnp.bfloat16 else 1.0),
                     fixed_anchor_mask(0.4, key, values=shared))
    step = _stepper(tx, dtype)
    params, state = own, tx.init(own)
    mask = anchor_mask(own, 0.4, key)
    eps = float(jnp.finfo(dtype).eps)
    for t in range(1, 41):
        params, state = step(params, state)
        for p0, p, v, m in zip(*(jax.tree.leaves(t_) for t_ in (own, params, shared, mask))):
            assert p.dtype == dtype and bool(jnp.all(jnp.isfinite(p)))
            if t == 1:  # one rounding of the move v - p0 away at most
                err = jnp.abs(p.astype(jnp.float32) - v.astype(jnp.float32))
                bound = eps * (jnp.abs(v - p0).astype(jnp.float32) + jnp.abs(v).astype(jnp.float32))
                assert bool(jnp.all((err <= bound)[m]))
            else:
                assert bool(jnp.all((_bits(p) == _bits(v))[m])), f"step {t}: an anchored entry is not its value"
        assert bool(anchors.verify(params, state)) == (t >= 2) or t == 1
    for p0, p, m in zip(jax.tree.leaves(own), jax.tree.leaves(params), jax.tree.leaves(mask)):
        assert float((p[~m] != p0[~m]).mean()) > 0.95, "the free entries must train"


@given(steps=st.integers(2, 12), ratio=st.sampled_from([0.1, 0.5, 0.9]))
def test_anchors_equal_the_values_after_any_number_of_updates(steps, ratio):
    own, shared = mlp_params(jax.random.key(1)), mlp_params(jax.random.key(2))
    tx = optax.chain(optax.sgd(0.05, momentum=0.9), fixed_anchor_mask(ratio, jax.random.key(3), values=shared))
    step = _stepper(tx, jnp.float32)
    params, state = own, tx.init(own)
    for _ in range(steps):
        params, state = step(params, state)
    assert bool(anchors.verify(params, state))
    mask = anchors.find_state(state).mask
    chex.assert_trees_all_equal(jax.tree.map(lambda p, v, m: jnp.where(m, p, 0), params, shared, mask),
                                jax.tree.map(lambda p, v, m: jnp.where(m, v, 0), params, shared, mask))


def test_verify_catches_a_moved_anchor_and_maps_over_runs():
    params = mlp_params(jax.random.key(0))
    tx = fixed_anchor_mask(0.5, jax.random.key(1))
    state = tx.init(params)
    assert bool(anchors.verify(params, state))
    m = state.mask["dense_1"]["kernel"]
    i, j = np.argwhere(np.asarray(m))[0]
    nudged = jax.tree.map(lambda x: x, params)
    nudged["dense_1"]["kernel"] = params["dense_1"]["kernel"].at[i, j].add(1e-6)
    assert not bool(anchors.verify(nudged, state))
    i, j = np.argwhere(~np.asarray(m))[0]  # a free entry may move
    nudged["dense_1"]["kernel"] = params["dense_1"]["kernel"].at[i, j].add(1.0)
    assert bool(anchors.verify(nudged, state))
    stacked = jax.vmap(mlp_params)(jax.random.split(jax.random.key(0), 3))
    states = jax.vmap(tx.init)(stacked)
    moved = jax.tree.map(lambda x: x.at[1].multiply(2.0), stacked)
    assert np.asarray(jax.vmap(anchors.verify)(moved, states)).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="holds no fixed_anchor_mask state"):
        anchors.verify(params, optax.sgd(0.1).init(params))


def test_one_transform_object_serves_models_of_any_shape():
    tx = optax.chain(optax.adam(1e-2), fixed_anchor_mask(0.5, jax.random.key(7), include="kernel"))
    small, large = mlp_params(jax.random.key(0), sizes=(3, 4)), mlp_params(jax.random.key(1), sizes=(20, 32, 16, 4))
    for params in (large, small, large):
        state = tx.init(params)
        chex.assert_trees_all_equal(state[1].mask, anchor_mask(params, 0.5, jax.random.key(7), include="kernel"))
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        chex.assert_trees_all_equal_structs(updates, params)


def test_refresh_draws_at_the_ratio_in_the_state_not_the_update_objects():
    params = mlp_params(jax.random.key(0), sizes=(64, 64, 8))
    key = jax.random.key(9)
    state = fixed_anchor_mask(0.4, key, refresh_every=3).init(params)
    # The update of a transform built with another ratio and key, as a training loop that
    # builds one update for runs of every ratio does.
    update = jax.jit(fixed_anchor_mask(0.0, jax.random.key(0), refresh_every=3).update)
    grads = jax.tree.map(jnp.ones_like, params)
    for t in range(7):
        updates, state = update(grads, state, params)
        expected = anchor_mask(params, 0.4, jax.random.fold_in(key, t // 3))
        chex.assert_trees_all_equal(jax.tree.map(lambda u: u == 0, updates), expected)
    assert 0.35 < anchors.mask_summary(state.mask)["overall"] < 0.45


def _save_restore(state, path):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))


def test_a_state_restored_into_a_fresh_transform_refreshes_the_same_layers(tmp_path):
    params0 = mlp_params(jax.random.key(0), sizes=(8, 16, 16, 4))
    order = anchors.layer_order(lambda p: quadratic_loss(p, jnp.ones((1, 8)), 0.0), params0)
    shared = mlp_params(jax.random.key(1), sizes=(8, 16, 16, 4))
    make = lambda: optax.chain(optax.sgd(0.05), fixed_anchor_mask(  # noqa: E731
        0.5, jax.random.key(2), values=shared, include="first", layer_order=order, refresh_every=2))
    grads = lambda p: jax.grad(quadratic_loss)(p, jnp.ones((4, 8)), jnp.zeros((4, 4)))  # noqa: E731

    def steps(tx, params, state, n):
        for _ in range(n):
            updates, state = tx.update(grads(params), state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    tx = make()
    straight = steps(tx, params0, tx.init(params0), 7)
    params, state = steps(tx, params0, tx.init(params0), 3)
    restored = _save_restore(state, tmp_path / "state")
    # A new object, built without the layer selection: the state says which leaves may hold anchors.
    fresh = optax.chain(optax.sgd(0.05), fixed_anchor_mask(0.5, jax.random.key(2), values=shared, refresh_every=2))
    resumed = steps(fresh, params, restored, 4)
    chex.assert_trees_all_equal(resumed, straight)
    mask = straight[1][1].mask
    assert bool(mask["dense_0"]["kernel"].any())
    assert not any(bool(mask[f"dense_{i}"]["kernel"].any()) for i in (1, 2))


class SortedAwayLinen(nn.Module):
    """Called stem -> body -> norm -> head; sorted names say body, head, norm, stem."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="stem")(x)
        x = nn.Dense(8, name="body")(nn.relu(x))
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(3, name="head")(x)


class SortedAwayNNX(nnx.Module):
    def __init__(self, rngs):
        self.stem, self.body = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)
        self.norm, self.head = nnx.LayerNorm(8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.body(nnx.relu(self.stem(x)))))


def test_layer_order_comes_from_the_call_for_linen_and_nnx():
    x = jnp.ones((2, 4))
    params = SortedAwayLinen().init(jax.random.key(0), x)["params"]
    params = jax.jit(lambda p: p)(params)  # keys sorted, as after any JAX transformation
    order = anchors.layer_order(lambda p: SortedAwayLinen().apply({"params": p}, x), params)
    assert order == ["stem", "body", "head"]
    model = SortedAwayNNX(nnx.Rngs(0))
    assert list(nnx.state(model, nnx.Param).keys()) == ["body", "head", "norm", "stem"]
    assert anchors.nnx_layer_order(model, x) == ["stem", "body", "head"]

    # nnx.Optimizer with include="first": the stem is frozen whole, everything else trains.
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tx = optax.chain(optax.adam(0.1), fixed_anchor_mask(1.0, jax.random.key(1), include="first",
                                                       layer_order=anchors.nnx_layer_order(model, x)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(3):
        optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))
    after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, value in after.items():
        frozen = path[0] == "stem"
        assert np.array_equal(value, before[path]) == frozen, path


def test_optax_wrappers_compose_with_shared_values():
    own, shared = {"w": jax.random.normal(jax.random.key(0), (256,))}, {"w": jax.random.normal(jax.random.key(1), (256,))}
    x = jax.random.normal(jax.random.key(2), (256,))
    loss = lambda p: jnp.sum((p["w"] * x - 1.0) ** 2)  # noqa: E731
    mask = anchor_mask(own, 0.4, jax.random.key(3))
    anchor = lambda: fixed_anchor_mask(0.4, jax.random.key(3), values=shared)  # noqa: E731

    def run(tx, p, steps=12, nan_at=None):
        s = tx.init(p)
        for t in range(steps):
            g = jax.grad(loss)(p)
            if t == nan_at:
                g = {"w": g["w"].at[0].set(jnp.nan)}
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    def exact(p):
        return bool(jnp.all((p["w"] == shared["w"])[mask["w"]])) and float((p["w"] != own["w"])[~mask["w"]].mean()) > 0.9

    p, s = run(optax.MultiSteps(optax.chain(optax.adam(1e-2), anchor()), every_k_schedule=3), own)
    assert exact(p) and bool(anchors.verify(p, s))
    injected = optax.chain(optax.adam(1e-2), optax.inject_hyperparams(
        fixed_anchor_mask, static_args=("key", "values"))(ratio=0.4, key=jax.random.key(3), values=shared))
    p, s = run(injected, own)
    assert exact(p) and bool(anchors.verify(p, s))
    p, s = run(optax.apply_if_finite(optax.chain(optax.adam(1e-2), anchor()), 3), own, nan_at=4)
    assert exact(p)
    # lookahead: the slow weights average toward the fast ones, so they start at the values too.
    start = anchors.share_anchor_values(own, shared, mask)
    tx = optax.lookahead(optax.chain(optax.adam(1e-2), anchor()), sync_period=3, slow_step_size=0.5)
    lp, s = optax.LookaheadParams.init_synced(start), None
    s = tx.init(lp)
    for _ in range(12):
        u, s = tx.update(jax.grad(loss)(lp.fast), s, lp)
        lp = optax.apply_updates(lp, u)
    assert exact(lp.fast) and exact(lp.slow)
    # schedule_free: mask the base optimizer's updates (z) and the outer ones (y), start at the
    # values, and put the anchors back into the evaluation params (b1's interpolation rounds).
    tx = optax.chain(optax.contrib.schedule_free(optax.chain(optax.sgd(1e-2), fixed_anchor_mask(mask=mask)), 1e-2),
                     fixed_anchor_mask(mask=mask))
    p, s = run(tx, start)
    assert exact(p) and bool(jnp.all((s[0].z["w"] == shared["w"])[mask["w"]]))
    evaluated = anchors.share_anchor_values(optax.contrib.schedule_free_eval_params(s[0], p), shared, mask)
    assert exact(evaluated)


def test_threefry_in_jnp_equals_the_library_word_for_word():
    k = jax.random.randint(jax.random.key(0), (2,), 0, 2**31 - 1).astype(jnp.uint32)
    counters = jax.random.randint(jax.random.key(1), (2, 4096), 0, 2**31 - 1).astype(jnp.uint32)
    ours = anchors.masks.threefry_first_word(k[0], k[1], counters[0], counters[1])
    theirs = jax.extend.random.threefry_2x32(k, counters.reshape(-1))[:4096]
    assert bool(jnp.all(ours == theirs))


def test_drawing_a_mask_needs_no_memory_beyond_the_mask():
    params = {f"dense_{i}": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32),
                             "bias": jax.ShapeDtypeStruct((512,), jnp.float32)} for i in range(3)}
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    compiled = jax.jit(lambda k: anchor_mask(params, 0.4, k)).lower(jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes <= 0.5 * n, memory.temp_size_in_bytes / n  # was 16 bytes per parameter
    assert memory.output_size_in_bytes <= 1.01 * n


SHARDED_MASK = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tna_jax import anchors
mesh = Mesh(np.array(jax.devices()), ("x",))
params = {"a": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}, "b": {"kernel": jnp.ones((32, 8))}}
specs = {"a": {"kernel": P("x", None), "bias": P("x")}, "b": {"kernel": P(None, None)}}
placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
mask = anchors.anchor_mask(placed, 0.4, jax.random.key(3))
state = anchors.fixed_anchor_mask(0.4, jax.random.key(3)).init(placed)
host = anchors.anchor_mask(jax.device_get(params), 0.4, jax.random.key(3))
print(json.dumps({
    "devices": jax.device_count(),
    "same_sharding": all(m.sharding.is_equivalent_to(p.sharding, m.ndim)
                         for m, p in zip(jax.tree.leaves(mask) + jax.tree.leaves(state.mask), jax.tree.leaves(placed) * 2)),
    "shards": [len(m.addressable_shards) for m in jax.tree.leaves(mask)],
    "shard_shape": list(mask["a"]["kernel"].addressable_shards[0].data.shape),
    "same_bits": all(bool((np.asarray(m) == np.asarray(h)).all()) for m, h in zip(jax.tree.leaves(mask), jax.tree.leaves(host))),
}))
"""


def test_masks_of_sharded_params_are_drawn_sharded_like_them():
    out = run_python(SHARDED_MASK, env={"XLA_FLAGS": xla_flags_with_devices(4)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["same_sharding"] and result["same_bits"]
    assert result["shard_shape"] == [16, 32]


def test_checkpoints_record_the_mask_scheme_and_refuse_another(tmp_path):
    from tna_jax import checkpoint as ckpt_lib

    state = {"w": jnp.arange(4.0)}
    old = ckpt_lib.Checkpointer(str(tmp_path / "a"), mask_scheme="threefry-counter/1")
    old.save(1, state)
    assert old.read_meta(1)["mask_scheme"] == "threefry-counter/1"
    now = ckpt_lib.Checkpointer(str(tmp_path / "a"), mask_scheme=anchors.MASK_SCHEME)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"'threefry-counter/1'.*'threefry-counter/2'.*fresh workdir"):
        now.restore(state)
    unrecorded = ckpt_lib.Checkpointer(str(tmp_path / "b"))
    unrecorded.save(1, state)
    with pytest.raises(ckpt_lib.CheckpointError, match="none recorded"):
        ckpt_lib.Checkpointer(str(tmp_path / "b"), mask_scheme=anchors.MASK_SCHEME).restore(state)
    same = ckpt_lib.Checkpointer(str(tmp_path / "c"), mask_scheme=anchors.MASK_SCHEME)
    same.save(2, state)
    restored, _, meta = same.restore(state)
    chex.assert_trees_all_equal(restored, state)
    assert meta["mask_scheme"] == anchors.MASK_SCHEME
