"""Tests of tna_jax.anchors: masks, the fixed_anchor_mask transform and prune-at-init."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from tna_jax import anchors
from tna_jax.anchors import anchor_mask, fixed_anchor_mask, mask_summary, prune_at_init


def mlp_params(key, sizes=(20, 32, 16, 4), dtype=jnp.float32):
    params = {}
    keys = jax.random.split(key, len(sizes))
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"dense_{i}"] = {
            "kernel": jax.random.normal(keys[i], (a, b), dtype),
            "bias": jax.random.normal(jax.random.fold_in(keys[i], 1), (b,), dtype),
        }
    return params


def quadratic_loss(params, x, y):
    h = x
    n = len(params)
    for i in range(n):
        layer = params[f"dense_{i}"]
        h = h @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


# ---------------------------------------------------------------------------------------------
# anchor_mask
# ---------------------------------------------------------------------------------------------


# Shapes from a few sizes (1 to 64, odd and even): every new shape compiles the mask program again,
# while ratio and seed, what the property is about, stay free.
@given(
    ratio=st.floats(0.0, 1.0),
    rows=st.sampled_from([1, 3, 16, 64]),
    cols=st.sampled_from([1, 5, 32, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_realised_fraction_is_within_five_binomial_std(ratio, rows, cols, seed):
    params = {"a": {"kernel": jnp.zeros((rows, cols)), "bias": jnp.zeros((cols,))},
              "b": {"scale": jnp.zeros((7,))}}
    mask = anchor_mask(params, ratio, jax.random.key(seed))
    chex.assert_trees_all_equal_shapes(mask, params)
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(mask))
    n = rows * cols + cols + 7
    k = sum(int(m.sum()) for m in jax.tree.leaves(mask))
    std = math.sqrt(n * ratio * (1 - ratio))
    assert abs(k - n * ratio) <= 5 * std + 1e-9, (k, n, ratio)


@given(seed=st.integers(0, 2**31 - 1), ratio=st.floats(0.05, 0.95))
def test_same_key_same_mask_and_different_key_different_mask(seed, ratio):
    params = mlp_params(jax.random.key(0))
    m1 = anchor_mask(params, ratio, jax.random.key(seed))
    m2 = anchor_mask(params, ratio, jax.random.key(seed))
    m3 = anchor_mask(params, ratio, jax.random.key(seed + 1))
    chex.assert_trees_all_equal(m1, m2)
    differs = any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m3)))
    assert differs


def test_masks_are_nested_in_ratio_and_legacy_keys_agree():
    params = mlp_params(jax.random.key(0))
    key = jax.random.key(3)
    low = anchor_mask(params, 0.2, key)
    high = anchor_mask(params, 0.6, key)
    for lo, hi in zip(jax.tree.leaves(low), jax.tree.leaves(high)):
        assert bool(jnp.all(~lo | hi))
    legacy = anchor_mask(params, 0.2, jax.random.PRNGKey(3))
    chex.assert_trees_all_equal(low, legacy)


def test_mask_is_independent_of_other_leaves():
    params = mlp_params(jax.random.key(0))
    key = jax.random.key(5)
    full = anchor_mask(params, 0.5, key)
    only_first = anchor_mask({"dense_0": params["dense_0"]}, 0.5, key)
    chex.assert_trees_all_equal(full["dense_0"], only_first["dense_0"])


def test_ratio_is_traceable_so_a_ratio_sweep_is_a_vmap():
    params = mlp_params(jax.random.key(0))
    ratios = jnp.array([0.0, 0.3, 1.0])
    masks = jax.jit(jax.vmap(lambda r: anchor_mask(params, r, jax.random.key(1))))(ratios)
    fractions = [mask_summary(jax.tree.map(lambda m, i=i: m[i], masks))["overall"] for i in range(3)]
    assert fractions[0] == 0.0 and fractions[2] == 1.0
    assert 0.2 < fractions[1] < 0.4
    chex.assert_trees_all_equal(jax.tree.map(lambda m: m[1], masks),
                                anchor_mask(params, 0.3, jax.random.key(1)))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="conv1_norm")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dense(16, name="dense1")(x)
        return nn.Dense(3, name="head")(x)


def test_neuron_granularity_anchors_whole_units_of_dense_conv_and_norm():
    variables = ConvNet().init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
    params = variables["params"]
    mask = anchor_mask(params, 0.5, jax.random.key(2), granularity="neuron")
    conv_units = mask["conv1"]["kernel"]  # (3, 3, 2, 8)
    per_channel = conv_units.reshape(-1, 8)
    assert bool(jnp.all(per_channel == per_channel[:1]))  # a channel is all or nothing
    assert bool(jnp.all(mask["conv1"]["bias"] == per_channel[0]))
    assert bool(jnp.all(mask["conv1_norm"]["scale"] == per_channel[0]))
    assert bool(jnp.all(mask["conv1_norm"]["bias"] == per_channel[0]))
    dense = mask["dense1"]["kernel"]  # (8, 16)
    assert bool(jnp.all(dense == dense[:1]))
    assert bool(jnp.all(mask["dense1"]["bias"] == dense[0]))
    # Some units are anchored and some are not (8 + 16 + 3 units at ratio 0.5).
    units = jnp.concatenate([per_channel[0], dense[0], mask["head"]["bias"]])
    assert 0 < int(units.sum()) < units.size


def test_include_exclude_and_named_layer_selections():
    params = mlp_params(jax.random.key(0), sizes=(5, 6, 7, 8, 3))
    order = anchors.layer_order(lambda p: quadratic_loss(p, jnp.ones((1, 5)), 0.0), params)
    assert order == ["dense_0", "dense_1", "dense_2", "dense_3"]
    first = anchor_mask(params, 1.0, jax.random.key(0), include="first", layer_order=order)
    assert bool(first["dense_0"]["kernel"].all()) and bool(first["dense_0"]["bias"].all())
    assert not any(bool(first[f"dense_{i}"]["kernel"].any()) for i in (1, 2, 3))
    last = anchor_mask(params, 1.0, jax.random.key(0), include="last", layer_order=order)
    assert bool(last["dense_3"]["kernel"].all()) and not bool(last["dense_2"]["kernel"].any())
    middle = anchor_mask(params, 1.0, jax.random.key(0), include="middle", layer_order=order)
    assert [bool(middle[f"dense_{i}"]["kernel"].all()) for i in range(4)] == [False, True, True, False]
    no_bias = anchor_mask(params, 1.0, jax.random.key(0), exclude=r"/bias$")
    assert bool(no_bias["dense_1"]["kernel"].all()) and not bool(no_bias["dense_1"]["bias"].any())
    both = anchor_mask(params, 1.0, jax.random.key(0), include=[r"dense_[01]/"], exclude="bias")
    assert bool(both["dense_1"]["kernel"].all()) and not bool(both["dense_2"]["kernel"].any())
    assert not bool(both["dense_0"]["bias"].any())


def test_mask_summary_counts():
    mask = {"a": {"kernel": jnp.array([[True, False], [False, False]])}, "b": {"bias": jnp.array([True, True])}}
    s = mask_summary(mask)
    assert s["anchored"] == 3 and s["total"] == 6
    assert s["overall"] == pytest.approx(0.5)
    assert s["per_leaf"] == {"a/kernel": 0.25, "b/bias": 1.0}
    assert s["per_layer"] == {"a": 0.25, "b": 1.0}


# ---------------------------------------------------------------------------------------------
# fixed_anchor_mask
# ---------------------------------------------------------------------------------------------

# Learning rates are scaled by `s`: bf16 keeps 8 bits of mantissa, so its steps must be larger
# for every free entry to change within 100 steps.
OPTIMIZERS = {
    "sgd": lambda s: optax.sgd(0.05 * s),
    "momentum": lambda s: optax.sgd(0.05 * s, momentum=0.9),
    "adam": lambda s: optax.adam(1e-2 * s),
    "adamw": lambda s: optax.adamw(1e-2 * s, weight_decay=0.1),
    "lion": lambda s: optax.lion(1e-2 * s, weight_decay=0.1),
    "lamb": lambda s: optax.lamb(1e-2 * s, weight_decay=0.1),
}


def train(params, tx, steps=100, seed=0):
    x = jax.random.normal(jax.random.key(seed), (32, 20), params["dense_0"]["kernel"].dtype)
    y = jax.random.normal(jax.random.key(seed + 1), (32, 4), x.dtype)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(quadratic_loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_anchors_stay_bit_identical_after_100_steps(name, dtype):
    params0 = mlp_params(jax.random.key(0), dtype=dtype)
    key = jax.random.key(42)
    tx = optax.chain(OPTIMIZERS[name](6.0 if dtype == jnp.bfloat16 else 1.0), fixed_anchor_mask(0.4, key))
    params, state = train(params0, tx)
    mask = anchor_mask(params0, 0.4, key)
    chex.assert_trees_all_equal(state[1].mask, mask)
    for p0, p, m in zip(jax.tree.leaves(params0), jax.tree.leaves(params), jax.tree.leaves(mask)):
        assert p.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(p))), "training diverged: 'moved' would mean nothing"
        same_bits = jax.lax.bitcast_convert_type(p, jnp.uint16 if dtype == jnp.bfloat16 else jnp.uint32) == \
            jax.lax.bitcast_convert_type(p0, jnp.uint16 if dtype == jnp.bfloat16 else jnp.uint32)
        assert bool(jnp.all(same_bits[m])), "an anchored entry moved"
        moved = p[~m] != p0[~m]
        assert float(moved.mean()) > 0.95, f"only {float(moved.mean()):.2f} of the free entries moved"


def test_ratio_zero_passes_updates_through_bit_identical_and_ratio_one_freezes_all():
    params0 = mlp_params(jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.sin(p * 1e3) * 1e-7, params0)  # values with full mantissas
    tx = fixed_anchor_mask(0.0, jax.random.key(0))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params0))
    chex.assert_trees_all_equal(updates, grads)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        assert bool(jnp.all(jax.lax.bitcast_convert_type(u, jnp.uint32) == jax.lax.bitcast_convert_type(g, jnp.uint32)))
    one, _ = train(params0, optax.chain(optax.adamw(1e-2), fixed_anchor_mask(1.0, jax.random.key(0))), steps=10)
    chex.assert_trees_all_equal(one, params0)


@given(ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_updates_are_zero_exactly_on_the_mask(ratio, seed):
    params = mlp_params(jax.random.key(seed))
    tx = fixed_anchor_mask(ratio, jax.random.key(seed))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: p + 1.0, params)
    updates, _ = tx.update(grads, state)
    for u, g, m in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(state.mask)):
        assert bool(jnp.all(jnp.where(m, u == 0, u == g)))


def test_vmap_shared_mask_and_per_seed_masks():
    stacked = jax.vmap(mlp_params)(jax.random.split(jax.random.key(0), 3))
    tx = optax.chain(optax.sgd(0.1), fixed_anchor_mask(0.5, jax.random.key(7)))
    shared = jax.vmap(tx.init)(stacked)
    m = shared[1].mask["dense_0"]["kernel"]
    assert bool(jnp.all(m[0] == m[1])) and bool(jnp.all(m[1] == m[2]))

    keys = jax.random.split(jax.random.key(8), 3)
    per_seed = jax.vmap(lambda p, k: optax.chain(optax.sgd(0.1), fixed_anchor_mask(0.5, k)).init(p))(stacked, keys)
    pm = per_seed[1].mask["dense_0"]["kernel"]
    assert bool(jnp.any(pm[0] != pm[1]))
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[2], per_seed[1].mask),
                                anchor_mask(jax.tree.map(lambda x: x[2], stacked), 0.5, keys[2]))
    grads = jax.tree.map(jnp.ones_like, stacked)
    updates, _ = jax.jit(jax.vmap(tx.update))(grads, per_seed, stacked)
    chex.assert_trees_all_equal(jax.tree.map(lambda u: u == 0, updates), per_seed[1].mask)


def test_precomputed_mask_and_prune_at_init_keep_pruned_weights_at_zero():
    params0 = mlp_params(jax.random.key(0))
    pruned, mask = prune_at_init(params0, 0.6, jax.random.key(1))
    for p, m in zip(jax.tree.leaves(pruned), jax.tree.leaves(mask)):
        assert bool(jnp.all(p[m] == 0))
    params, _ = train(pruned, optax.chain(optax.adam(1e-2), fixed_anchor_mask(mask=mask)), steps=20)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
        assert bool(jnp.all(p[m] == 0)) and bool(jnp.all(p[~m] != 0))


def test_state_survives_donation_to_a_jitted_step():
    params = mlp_params(jax.random.key(0))
    _, mask = prune_at_init(params, 0.5, jax.random.key(1))
    for tx in (fixed_anchor_mask(0.5, jax.random.key(2)), fixed_anchor_mask(mask=mask)):
        step = jax.jit(lambda g, s, tx=tx: tx.update(g, s), donate_argnums=(1,))
        for _ in range(2):  # a second init after the first state was donated
            state = tx.init(params)
            step(params, state)
    assert bool(jnp.any(mask["dense_0"]["kernel"]))  # the caller's mask is still alive


def test_refresh_every_draws_a_new_mask_per_period():
    params0 = mlp_params(jax.random.key(0))
    key = jax.random.key(9)
    tx = fixed_anchor_mask(0.5, key, refresh_every=3)
    state = tx.init(params0)
    grads = jax.tree.map(jnp.ones_like, params0)
    update = jax.jit(tx.update)
    seen = []
    params = params0
    for t in range(7):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert bool(anchors.verify(params, state))  # each new set is frozen where it stands
        expected = anchor_mask(params0, 0.5, jax.random.fold_in(key, t // 3))
        chex.assert_trees_all_equal(jax.tree.map(lambda u: u == 0, updates), expected)
        seen.append(expected["dense_0"]["kernel"])
    assert bool(jnp.all(seen[0] == seen[2])) and bool(jnp.any(seen[2] != seen[3]))
    assert bool(jnp.any(seen[5] != seen[6]))


def test_works_under_multisteps_inject_hyperparams_and_multi_transform():
    params0 = mlp_params(jax.random.key(0))
    key = jax.random.key(11)
    mask = anchor_mask(params0, 0.3, key)

    def check(params):
        for p0, p, m in zip(jax.tree.leaves(params0), jax.tree.leaves(params), jax.tree.leaves(mask)):
            assert bool(jnp.all(p[m] == p0[m])) and bool(jnp.any(p[~m] != p0[~m]))

    multi = optax.MultiSteps(optax.chain(optax.adam(1e-2), fixed_anchor_mask(0.3, key)), every_k_schedule=3)
    params, _ = train(params0, multi, steps=9)
    check(params)

    injected = optax.chain(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
        optax.inject_hyperparams(fixed_anchor_mask, static_args=("key",))(ratio=0.3, key=key),
    )
    params, _ = train(params0, injected, steps=5)
    check(params)

    labels = {k: ("frozen_out" if k == "dense_2" else "anchored") for k in params0}
    sub_mask = anchor_mask({k: v for k, v in params0.items() if k != "dense_2"}, 0.3, key)
    multi_t = optax.multi_transform(
        {"anchored": optax.chain(optax.adam(1e-2), fixed_anchor_mask(0.3, key)), "frozen_out": optax.set_to_zero()},
        labels,
    )
    params, _ = train(params0, multi_t, steps=5)
    chex.assert_trees_all_equal(params["dense_2"], params0["dense_2"])
    for name in ("dense_0", "dense_1"):
        for leaf in ("kernel", "bias"):
            m = sub_mask[name][leaf]
            assert bool(jnp.all(params[name][leaf][m] == params0[name][leaf][m]))


def test_works_with_flax_nnx_optimizer():
    model = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    before = nnx.state(model, nnx.Param)
    kernel0 = np.asarray(before["kernel"][...])
    optimizer = nnx.Optimizer(model, optax.chain(optax.adam(0.1), fixed_anchor_mask(0.5, jax.random.key(1))),
                              wrt=nnx.Param)
    x = jnp.ones((4, 6))

    def loss(m):
        return jnp.mean(m(x) ** 2) + 1.0

    for _ in range(5):
        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)
    kernel = np.asarray(model.kernel[...])
    expected = anchor_mask({"kernel": jnp.asarray(kernel0), "bias": jnp.zeros(5)}, 0.5, jax.random.key(1))["kernel"]
    expected = np.asarray(expected)
    assert (kernel[expected] == kernel0[expected]).all()
    assert (kernel[~expected] != kernel0[~expected]).all()


def test_works_on_a_sharded_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("seed",))
    stacked = jax.vmap(mlp_params)(jax.random.split(jax.random.key(0), len(jax.devices())))
    stacked = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("seed")))
    tx = optax.chain(optax.adam(0.1), fixed_anchor_mask(0.5, jax.random.key(1)))
    state = jax.jit(jax.vmap(tx.init))(stacked)
    grads = jax.tree.map(jnp.ones_like, stacked)
    updates, _ = jax.jit(jax.vmap(tx.update))(grads, state, stacked)
    chex.assert_trees_all_equal(jax.tree.map(lambda u: u == 0, updates), state[1].mask)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_ratio_names_the_argument_and_value(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        anchor_mask(mlp_params(jax.random.key(0)), jax.random.key(0), ratio)
    with pytest.raises(ValueError, match="ratio"):
        fixed_anchor_mask(ratio, jax.random.key(0))


def test_bad_arguments_give_clear_errors():
    params = mlp_params(jax.random.key(0))
    with pytest.raises(TypeError, match="ratio must be a real number"):
        anchor_mask(params, "0.4", jax.random.key(0))
    with pytest.raises(ValueError, match="granularity must be one of .*'channel'"):
        anchor_mask(params, 0.4, jax.random.key(0), granularity="channel")
    with pytest.raises(ValueError, match="granularity"):
        fixed_anchor_mask(0.4, jax.random.key(0), granularity="entry")
    with pytest.raises(TypeError, match="key must be a PRNG key .* got int 3"):
        anchor_mask(params, 0.4, 3)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        fixed_anchor_mask(0.4, jnp.zeros(3, jnp.uint32))
    with pytest.raises(ValueError, match="include pattern 'conv' selects no parameter"):
        anchor_mask(params, 0.4, jax.random.key(0), include="conv")
    with pytest.raises(ValueError, match="exclude pattern 'norm' selects no parameter"):
        anchor_mask(params, 0.4, jax.random.key(0), exclude=["bias", "norm"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        anchor_mask(params, 0.4, jax.random.key(0), include="dense_(")
    with pytest.raises(ValueError, match="middle"):
        anchor_mask({"dense_0": params["dense_0"]}, 0.4, jax.random.key(0), include="middle", layer_order=["dense_0"])
    with pytest.raises(ValueError, match="include='first' needs the order in which the model calls its layers"):
        anchor_mask(params, 0.4, jax.random.key(0), include="first")
    with pytest.raises(ValueError, match="exclude='last' needs the order"):
        fixed_anchor_mask(0.4, jax.random.key(0), exclude="last").init(params)
    with pytest.raises(TypeError, match="layer_order must be a list"):
        fixed_anchor_mask(0.4, jax.random.key(0), layer_order="dense_0")
    with pytest.raises(ValueError, match="params and values have different structure: path 'dense_1/bias'"):
        fixed_anchor_mask(0.4, jax.random.key(0), values={"dense_0": params["dense_0"]}).init(params)
    tx = fixed_anchor_mask(0.4, jax.random.key(0), values=params)
    with pytest.raises(ValueError, match=r"needs the params: call tx.update\(grads, state, params\)"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="either mask= or"):
        fixed_anchor_mask(0.4, jax.random.key(0), mask=params)
    with pytest.raises(ValueError, match="needs ratio and key"):
        fixed_anchor_mask(0.4)
    with pytest.raises(ValueError, match="refresh_every must be a positive integer"):
        fixed_anchor_mask(0.4, jax.random.key(0), refresh_every=0)


def test_mask_that_does_not_match_params_names_the_path():
    params = mlp_params(jax.random.key(0))
    wrong_shape = anchor_mask(params, 0.5, jax.random.key(0))
    wrong_shape["dense_1"]["kernel"] = jnp.zeros((3, 3), bool)
    with pytest.raises(ValueError, match="'dense_1/kernel'.*\\(3, 3\\) vs \\(32, 16\\)|'dense_1/kernel'"):
        fixed_anchor_mask(mask=wrong_shape).init(params)
    missing = anchor_mask(params, 0.5, jax.random.key(0))
    del missing["dense_2"]
    with pytest.raises(ValueError, match="'dense_2/bias'"):
        fixed_anchor_mask(mask=missing).init(params)
    with pytest.raises(ValueError, match="mask"):
        anchors.share_anchor_values(params, params, missing)


def test_the_old_key_ratio_order_still_works_with_a_deprecation_warning():
    params = mlp_params(jax.random.key(0))
    with pytest.warns(DeprecationWarning, match=r"anchor_mask\(params, ratio, key\)"):
        old = anchor_mask(params, jax.random.key(3), 0.4)
    chex.assert_trees_all_equal(old, anchor_mask(params, 0.4, jax.random.key(3)))
    with pytest.warns(DeprecationWarning, match="prune_at_init"):
        pruned, _ = prune_at_init(params, jax.random.PRNGKey(3), 0.4)
    chex.assert_trees_all_equal(pruned, prune_at_init(params, 0.4, jax.random.PRNGKey(3))[0])
