"""Tests of tna_jax.align: specs, permutations, weight/activation matching, REPAIR, curves, IO."""

import itertools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.util import tiny_config
from tna_jax import align, evaluation, lmc, models, norm_stats, runner, training
from tna_jax import data as data_lib
from tna_jax.align.weight_matching import order_generator
from tna_jax.models.base import Net
from tna_jax.tree import map_with_names

# ---------------------------------------------------------------------------------------------
# Tiny architectures. Zoo models come from tna_jax.models (every registered name that has a tiny
# config here); the local modules cover the patterns the derivation must handle on its own:
# BatchNorm + a flatten into a dense layer, residual streams with projection shortcuts, and
# multi-head attention.
# ---------------------------------------------------------------------------------------------

ZOO = {  # every registered model (test_zoo_covers_the_registry), small enough to compile in seconds
    "mlp": ({"name": "mlp", "depth": 2, "width": 8}, (40,)),
    "mlp_layernorm": ({"name": "mlp", "depth": 3, "width": 6, "norm": "layer", "activation": "gelu"}, (40,)),
    "cnn": ({"name": "cnn", "width": 0.125, "hidden": 8}, (8, 8, 1)),
    "vgg11": ({"name": "vgg11", "width": 1 / 32}, (4, 4, 1)),
    "vgg16": ({"name": "vgg16", "width": 1 / 32, "norm": "none"}, (4, 4, 1)),
    "resnet20": ({"name": "resnet20", "width": 0.125}, (4, 4, 1)),
    "wrn_layernorm": ({"name": "wrn", "depth": 10, "width": 0.25, "norm": "layer"}, (4, 4, 1)),
    "vit": ({"name": "vit", "patch_size": 2, "dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8}, (4, 4, 1)),
    "transformer": ({"name": "transformer", "vocab_size": 12, "hidden": 8, "layers": 1, "heads": 2,
                     "intermediate": 8, "max_len": 8, "dropout": 0.0}, (5,)),
}


class TinyCNN(nn.Module):
    """conv-BN-relu-pool, conv-BN-relu, flatten, dense, head."""

    @nn.compact
    def __call__(self, x, train=False):
        for i, c in enumerate((4, 6)):
            x = nn.Conv(c, (3, 3), name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"conv{i}_norm")(x)
            x = nn.relu(x)
            if i == 0:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(5, name="fc")(x))
        return nn.Dense(3, name="head")(x)


class Block(nn.Module):
    channels: int
    stride: int
    norm: str

    def _norm(self, name, train):
        if self.norm == "batch":
            return nn.BatchNorm(use_running_average=not train, name=name)
        return nn.LayerNorm(name=name)

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), use_bias=False, name="conv1")(x)
        y = nn.relu(self._norm("conv1_norm", train)(y))
        y = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv2")(y)
        y = self._norm("conv2_norm", train)(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False, name="shortcut")(x)
            x = self._norm("shortcut_norm", train)(x)
        return nn.relu(x + y)


class TinyResNet(nn.Module):
    """Stem, two stages of two blocks (projection shortcut into stage 2), global pool, head."""

    norm: str = "batch"

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="conv1_norm")(x) if self.norm == "batch" \
            else nn.LayerNorm(name="conv1_norm")(x)
        x = nn.relu(x)
        for s, (c, stride) in enumerate(((4, 1), (6, 2))):
            for b in range(2):
                x = Block(c, stride if b == 0 else 1, self.norm, name=f"block{s + 1}_{b}")(x, train)
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


class TinyEncoder(nn.Module):
    """Token embedding + learned positions, one pre-LN transformer block, mean pool, head."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Embed(11, 8, name="embed")(x) + self.param("pos", nn.initializers.normal(0.02), (x.shape[1], 8))
        y = nn.LayerNorm(name="ln1")(h)
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, name="attn")(y, y)
        h = h + y
        y = nn.LayerNorm(name="ln2")(h)
        y = nn.Dense(4, name="fc1")(nn.gelu(nn.Dense(12, name="fc0")(y)))
        h = h + nn.Dense(8, name="proj")(y)
        return nn.Dense(3, name="head")(nn.LayerNorm(name="ln_f")(h).mean(axis=1))


LOCAL = {
    "local_cnn_bn_flatten": lambda: Net("cnn", TinyCNN(), (8, 8, 1), 3),
    "local_resnet_bn": lambda: Net("resnet", TinyResNet("batch"), (8, 8, 3), 3),
    "local_resnet_ln": lambda: Net("resnet", TinyResNet("layer"), (8, 8, 3), 3),
    "local_encoder": lambda: Net("encoder", TinyEncoder(), (5,), 3, input_dtype=jnp.int32),
}


def make_net(name):
    if name in LOCAL:
        return LOCAL[name]()
    cfg, shape = ZOO[name]
    return models.build(cfg, shape, 3)


ARCHS = [n for n, (cfg, _) in ZOO.items() if cfg["name"] in models.REGISTRY] + list(LOCAL)


def perturbed(net, seed):
    """Random variables of `net` drawn with NumPy (no compilation): kernels with 1/sqrt(fan-in)
    scale, biases, norms and BatchNorm statistics all non-trivial."""
    rng = np.random.default_rng(int(seed))
    shapes = jax.eval_shape(net.init, jax.random.key(0))

    def one(name, s):
        leaf = name.split("/")[-1]
        if leaf in ("kernel", "embedding") or len(s.shape) > 1:
            fan_in = int(np.prod(s.shape[:-1])) if leaf == "kernel" else 1
            x = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), s.shape)
        elif leaf == "var":
            x = rng.uniform(0.5, 1.5, s.shape)
        elif leaf == "scale":
            x = 1.0 + 0.3 * rng.normal(size=s.shape)
        else:
            x = 0.3 * rng.normal(size=s.shape)
        return jnp.asarray(x, s.dtype)

    return map_with_names(one, shapes)


def inputs(net, key, n=6):
    if net.input_dtype == jnp.int32:
        return jax.random.randint(key, (n, *net.input_shape), 0, 11)
    return jax.random.normal(key, (n, *net.input_shape))


def leaves_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Specs and permutations.
# ---------------------------------------------------------------------------------------------


def test_zoo_covers_the_registry():
    # Other test modules register helper models named "test_*" in the same process.
    library = {name for name in models.REGISTRY if not name.startswith("test_")}
    assert {cfg["name"] for cfg, _ in ZOO.values()} == library


# The zoo's resnet20 (BatchNorm) and wrn (LayerNorm) stand for the two local ResNets here.
@pytest.mark.parametrize("arch", [a for a in ARCHS if not a.startswith("local_resnet")])
def test_permuted_model_computes_the_same_function(arch):
    net = make_net(arch)
    spec = align.permutation_spec(net)
    assert len(spec) >= 2, spec.describe()
    v = perturbed(net, 0)
    x = inputs(net, jax.random.key(1))
    perm = align.random_permutation(spec, jax.random.key(2))
    pv = align.apply_permutation(spec, perm, v)
    chex.assert_trees_all_equal_shapes(v, pv)
    apply = jax.jit(lambda v_: net.apply(v_, x)[0])
    ref, out = apply(v), apply(pv)
    assert float(jnp.max(jnp.abs(ref - out))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(ref))))
    assert not leaves_equal(v, pv)  # the permutation really moved units
    # leaving one array of the spec unpermuted breaks the function: the spec is not vacuous (the
    # array read last, since a deep tiny net at random init barely depends on its first layers)
    path = spec.layouts[-1][0]
    partial = map_with_names(lambda name, a, b: a if name == path else b, v, pv)
    assert float(jnp.max(jnp.abs(apply(partial) - ref))) > 1e-3


def test_derived_mlp_spec_equals_the_hand_written_one():
    net = models.build({"name": "mlp", "depth": 2, "width": 8, "norm": "layer"}, (40,), 10)
    v = jax.eval_shape(net.init, jax.random.key(0))
    hand = align.spec_from_axes({
        **align.dense("dense_0", None, "dense_0"), **align.norm("dense_0_norm", "dense_0"),
        **align.dense("dense_1", "dense_0", "dense_1"), **align.norm("dense_1_norm", "dense_1"),
        **align.dense("head", "dense_1", None),
    }, v)
    derived = align.permutation_spec(net, v)
    assert derived.size == hand.size == {"dense_0": 8, "dense_1": 8}
    assert {k: sorted(x) for k, x in derived.perm_to_axes.items()} == \
        {k: sorted(x) for k, x in hand.perm_to_axes.items()}
    assert derived.axes_to_perm["params/dense_1/kernel"] == ("dense_0", "dense_1")


def test_residual_streams_share_one_permutation_and_bn_statistics_are_permuted():
    spec = align.permutation_spec(make_net("local_resnet_bn"))
    p2a = spec.perm_to_axes
    stream1 = {path for path, _ in p2a["conv1"]}  # stem and every block of stage 1
    assert {"params/block1_0/conv2/kernel", "params/block1_1/conv2/kernel", "batch_stats/conv1_norm/mean",
            "params/block2_0/shortcut/kernel"} <= stream1
    stage2 = [n for n in spec.names if "params/block2_1/conv2/kernel" in {p for p, _ in p2a[n]}
              and n != spec.axes_to_perm["params/block2_1/conv2/kernel"][2]]
    assert spec.axes_to_perm["params/block2_0/shortcut/kernel"][3] in stage2
    # stem, two stages, and one hidden permutation inside each of the four blocks
    assert len(spec) == 1 + 1 + 4


def test_attention_head_dimensions_are_nested_in_the_heads():
    spec = align.permutation_spec(make_net("local_encoder"))
    q = spec.axes_to_perm["params/attn/query/kernel"]
    heads, qk = q[1], q[2]
    assert spec.parent[qk] == heads and spec.size[heads] == 2 and spec.size[qk] == 3
    vo = spec.axes_to_perm["params/attn/out/kernel"]
    assert vo[0] == heads and spec.parent[vo[1]] == heads and vo[1] != qk
    assert spec.shape_of(qk) == (2, 3)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**20), arch=st.sampled_from(["local_encoder", "local_resnet_bn", "local_cnn_bn_flatten"]))
def test_apply_permutation_is_invertible(seed, arch):
    net = make_net(arch)
    spec = align.permutation_spec(net)
    v = perturbed(net, seed)
    perm = align.random_permutation(spec, jax.random.key(seed + 1))
    back = align.apply_permutation(spec, align.invert_permutation(spec, perm), align.apply_permutation(spec, perm, v))
    assert leaves_equal(back, v)


def test_flat_jaxpr_interpreter_reproduces_the_model():
    net = make_net("local_encoder")
    v = perturbed(net, 0)
    x = inputs(net, jax.random.key(1), n=2)
    closed, names, _ = align.derive.flat_jaxpr(net, v, 2)
    assert not any(e.primitive.name in ("pjit", "jit", "custom_jvp_call") for e in closed.jaxpr.eqns)
    assert names[0].startswith("params/") and len(names) == len(jax.tree.leaves(v))
    run = jax.jit(lambda leaves, x: align.derive.eval_flat(closed.jaxpr, closed.consts, [*leaves, x])[0][0])
    np.testing.assert_allclose(run(jax.tree.leaves(v), x), jax.jit(net.apply)(v, x)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Weight matching.
# ---------------------------------------------------------------------------------------------


@settings(max_examples=4)
@given(seed=st.integers(0, 2**20))
def test_weight_matching_recovers_a_random_permutation_exactly(seed):
    net = models.build({"name": "mlp", "depth": 3, "width": 24}, (40,), 10)
    spec = align.permutation_spec(net)
    a = perturbed(net, seed)
    true = align.random_permutation(spec, jax.random.key(seed + 1))
    b = align.apply_permutation(spec, true, a)
    res = align.weight_matching(spec, a, b, jax.random.key(seed + 2))
    assert res.converged and res.iterations >= 2
    inv = align.invert_permutation(spec, true)
    assert all(np.array_equal(res.perm[k], inv[k]) for k in spec.names)
    assert leaves_equal(align.apply_permutation(spec, res.perm, b), a)


def test_weight_matching_nested_heads_recovers_the_permutation():
    net = make_net("local_encoder")
    spec = align.permutation_spec(net)
    a = perturbed(net, 3)
    true = align.random_permutation(spec, jax.random.key(4))
    b = align.apply_permutation(spec, true, a)
    res = align.weight_matching(spec, a, b, jax.random.key(5))
    assert leaves_equal(align.apply_permutation(spec, res.perm, b), a)


def test_weight_matching_one_layer_equals_brute_force():
    """With one hidden layer the problem is a single assignment: compare with all 5! orders."""
    net = models.build({"name": "mlp", "depth": 1, "width": 5}, (7,), 3)
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 0), perturbed(net, 1)
    res = align.weight_matching(spec, a, b, jax.random.key(2))
    best = max(itertools.permutations(range(5)),
               key=lambda p: align.matching_objective(spec, {"dense_0": np.array(p)}, a, b))
    assert tuple(res.perm["dense_0"]) == best
    assert res.objective[-1] >= res.objective[0]


def test_weight_matching_objective_never_decreases_between_independent_models():
    net = models.build({"name": "mlp", "depth": 3, "width": 16}, (40,), 10)
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 0), perturbed(net, 1)
    res = align.weight_matching(spec, a, b, jax.random.key(2), max_iter=50)
    obj = np.asarray(res.objective)
    assert np.all(np.diff(obj) >= -1e-4 * np.abs(obj[:-1])) and obj[-1] > obj[0]
    capped = align.weight_matching(spec, a, b, jax.random.key(2), max_iter=1)
    assert capped.iterations == 1
    # The history after the first entry is kept from the solved cost matrices; it agrees with the
    # objective recomputed from the weights, after the first sweep and at the end.
    assert res.iterations > 2
    np.testing.assert_allclose(obj[1], align.matching_objective(spec, capped.perm, a, b), rtol=1e-5)
    np.testing.assert_allclose(obj[-1], align.matching_objective(spec, res.perm, a, b), rtol=1e-5)
    assert obj[1] > obj[0] + 1e-3 * abs(obj[0])


# ---------------------------------------------------------------------------------------------
# Activation matching.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp_layernorm", "local_encoder", "local_resnet_bn"])
def test_activation_matching_finds_the_permutation_of_a_copy(arch):
    net = make_net(arch)
    spec = align.permutation_spec(net)
    a = perturbed(net, 0)
    true = align.random_permutation(spec, jax.random.key(1))
    b = align.apply_permutation(spec, true, a)
    res = align.activation_matching(net, a, b, inputs(net, jax.random.key(2), n=64), batch_size=32)
    assert isinstance(res, align.MatchResult) and res.iterations == 1 and res.converged
    perm = res.perm
    inv = align.invert_permutation(spec, true)
    analysis = align.analyze(net)
    matched = [k for k in spec.names if analysis.features[k] or spec.children(k)]
    assert matched and all(np.array_equal(perm[k], inv[k]) for k in matched)
    # a copy's matched units are perfectly correlated: the objective is the number of matched units
    before, after = res.objective
    assert after > before and res.solves >= len(matched)


# ---------------------------------------------------------------------------------------------
# REPAIR, BatchNorm reset and curves on a trained pair.
# ---------------------------------------------------------------------------------------------


class BNMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        for i in range(2):
            x = nn.Dense(32, name=f"dense_{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"dense_{i}_norm")(x))
        return nn.Dense(10, name="head")(x)


@models.register("test_align_bn_mlp")
def _bn_mlp(cfg, input_shape, num_classes):
    del cfg, input_shape, num_classes  # digits: 10 classes, as BNMLP's head
    return BNMLP(), jnp.float32


def train_pair():
    """Two BatchNorm MLPs trained from different seeds on scikit-learn's digits (one fit call)."""
    cfg = tiny_config(anchor__ratio=0.0, baseline=False, train__epochs=6, data__source="digits")
    dataset = data_lib.load(cfg.data)
    net = Net("bn_mlp", BNMLP(), dataset.input_shape, dataset.num_classes)
    result = training.fit(cfg, net, dataset, log=lambda s: None)
    return net, result.state.variables(0), result.state.variables(1), data_lib.to_device(dataset)


def test_repair_bn_reset_and_curve_training_on_a_trained_pair():
    """One trained pair (training dominates the cost) for REPAIR, BN reset and curve training."""
    net, a, b_raw, data = train_pair()
    spec = align.permutation_spec(net)
    b = align.apply_permutation(spec, align.weight_matching(spec, a, b_raw, jax.random.key(0)).perm, b_raw)
    eval_fn = evaluation.make_eval_fn(net, 500)
    ev = jax.jit(eval_fn)
    x_test, y_test = data.split("test")

    # REPAIR and BN reset improve the midpoint of the aligned pair
    mid = lmc.interpolate(a, b, 0.5)
    plain = ev(mid, x_test, y_test)
    reset = ev(norm_stats.reset_bn_stats(net, mid, data.x_train), x_test, y_test)
    repaired = ev(align.repair(net, a, b, 0.5, data.x_train), x_test, y_test)
    print({"plain": plain, "reset": reset, "repair": repaired})
    assert float(reset["loss"]) < float(plain["loss"])
    assert float(repaired["loss"]) < float(plain["loss"])
    assert float(repaired["accuracy"]) >= float(plain["accuracy"])

    # REPAIR: the repaired midpoint's pre-activation statistics are the average of the endpoints'
    xs = data.x_train[:500].reshape(2, 250, *data.x_train.shape[1:])
    rep = align.repair(net, a, b, 0.5, data.x_train[:500], batch_size=250)
    got, sa, sb = (align.output_stats(net, v, xs, ["dense_1_norm"])["dense_1_norm"] for v in (rep, a, b))
    np.testing.assert_allclose(got[1], (sa[1] + sb[1]) / 2, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got[0], (sa[0] + sb[0]) / 2, atol=1e-3)

    # BN reset: the running statistics become the statistics of the data
    x = data.x_train[:400]
    r = norm_stats.reset_bn_stats(net, a, x, batch_size=400)
    h = x.reshape(400, -1) @ a["params"]["dense_0"]["kernel"] + a["params"]["dense_0"]["bias"]
    np.testing.assert_allclose(r["batch_stats"]["dense_0_norm"]["mean"], h.mean(0), atol=1e-4)
    np.testing.assert_allclose(r["batch_stats"]["dense_0_norm"]["var"], h.var(0), rtol=1e-3, atol=1e-4)

    # curve training between the unaligned endpoints lowers the loss in the middle of the curve
    curve = align.init_curve(a, b_raw)
    ts = [0.0, 0.5, 1.0]
    before = align.evaluate_curve(eval_fn, curve, data.split("test"), ts)
    trained, hist = align.train_curve(net, curve, (data.x_train, data.y_train), key=jax.random.key(0), epochs=3,
                                      batch_size=64, optimizer=optax.adam(3e-3))
    after = align.evaluate_curve(eval_fn, trained, data.split("test"), ts)
    print(before["loss"], after["loss"], hist)
    assert after["loss"][1] < before["loss"][1]
    np.testing.assert_allclose(after["loss"][[0, 2]], before["loss"][[0, 2]], atol=1e-6)  # endpoints fixed
    assert len(hist) == 3


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_curve_endpoints_are_the_endpoints(kind):
    net = make_net("mlp")
    a, b = perturbed(net, 0), perturbed(net, 1)
    curve = align.init_curve(a, b, kind).replace(control=perturbed(net, 2))
    assert leaves_equal(align.curve_point(curve, 0.0), a)
    assert leaves_equal(align.curve_point(curve, 1.0), b)
    mid = align.curve_point(curve, 0.5)
    expected = curve.control if kind == "polychain" else jax.tree.map(
        lambda x, c, y: 0.25 * x + 0.5 * c + 0.25 * y, a, curve.control, b)
    chex.assert_trees_all_close(mid, expected, atol=1e-5)
    straight = align.init_curve(a, b, kind)  # the initial control point is the midpoint: a line
    chex.assert_trees_all_close(align.curve_point(straight, 0.3), lmc.interpolate(a, b, 0.3), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Saving and loading.
# ---------------------------------------------------------------------------------------------


def test_permutation_and_curve_round_trip(tmp_path):
    net = make_net("local_encoder")
    spec = align.permutation_spec(net)
    perm = align.random_permutation(spec, jax.random.key(0))
    path = align.save_permutation(str(tmp_path / "perm.json"), spec, perm, meta={"pair": [0, 1]})
    loaded = align.load_permutation(path, spec)
    assert all(np.array_equal(loaded[k], perm[k]) for k in spec.names)
    assert json.load(open(path))["meta"] == {"pair": [0, 1]}
    other = align.permutation_spec(make_net("mlp"))
    with pytest.raises(ValueError, match="another permutation spec"):
        align.load_permutation(path, other)
    a, b = perturbed(net, 1), perturbed(net, 2)
    curve = align.init_curve(a, b, "polychain")
    align.save_curve(str(tmp_path / "curve"), curve)
    back = align.load_curve(str(tmp_path / "curve"), a)
    assert back.kind == "polychain" and leaves_equal(back.control, curve.control) and leaves_equal(back.b, b)
    assert not any(f.endswith((".pkl", ".pickle")) for _, _, fs in os.walk(tmp_path) for f in fs)


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    net = models.build({"name": "mlp", "depth": 2, "width": 8}, (40,), 10)
    spec = align.permutation_spec(net)
    v = perturbed(net, 0)
    wide = perturbed(models.build({"name": "mlp", "depth": 2, "width": 9}, (40,), 10), 0)
    with pytest.raises(ValueError, match=r"shape \(40, 9\) at 'params/dense_0/kernel'.*expects \(40, 8\)"):
        align.apply_permutation(spec, align.identity_permutation(spec), wide)
    renamed = {"params": {("layer_0" if k == "dense_0" else k): x for k, x in v["params"].items()}}
    with pytest.raises(ValueError, match="names 'params/dense_0/kernel' but b has no such array"):
        align.weight_matching(spec, v, renamed, jax.random.key(0))
    with pytest.raises(ValueError, match="'params/dense_x/kernel'"):
        align.spec_from_axes({"params/dense_x/kernel": (None, "P")}, v)
    with pytest.raises(ValueError, match="different sizes"):
        align.spec_from_axes({**align.dense("dense_0", None, "P"), "params/head/kernel": (None, "P")}, v)
    with pytest.raises(ValueError, match="2 entries but the array has 1 axes"):
        align.spec_from_axes({"params/dense_0/bias": ("P", None)}, v)
    bad = align.identity_permutation(spec)
    bad["dense_0"] = np.zeros(8, np.int32)
    with pytest.raises(ValueError, match="'dense_0'.* not a permutation"):
        align.apply_permutation(spec, bad, v)
    with pytest.raises(ValueError, match=r"missing \['dense_1'\]"):
        align.apply_permutation(spec, {"dense_0": np.arange(8)}, v)
    with pytest.raises(ValueError, match="max_iter"):
        align.weight_matching(spec, v, v, jax.random.key(0), max_iter=0)
    with pytest.raises(ValueError, match="too small for activation statistics.*'dense_0' has 8 units"):
        align.activation_matching(net, v, v, jnp.ones((4, 40)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        align.activation_matching(net, v, v, jnp.ones((1, 40)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        align.repair(net, v, v, 0.5, jnp.ones((1, 40)))
    with pytest.raises(ValueError, match="kind must be one of"):
        align.init_curve(v, v, "spline")
    with pytest.raises(ValueError, match="path 'params/dense_0/bias'"):
        align.init_curve(v, {"params": {k: x for k, x in v["params"].items() if k != "dense_0"}})


# ---------------------------------------------------------------------------------------------
# The experiment kind, in a tiny smoke mode.
# ---------------------------------------------------------------------------------------------


def test_align_compare_smoke(tmp_path):
    from configs.align_compare import get_config

    c = get_config()
    c.num_seeds = 2
    # one BatchNorm task (the statistics reset at every point is the longest code path; the
    # MLP without norms is the same path without it); ResNet-20 itself takes minutes to compile
    c.align.tasks = {"bn": {"data": {"source": "digits", "num_train": 300}, "model": {"name": "test_align_bn_mlp"},
                            "train": {"epochs": 2, "steps_per_call": 2}}}
    c.align.curve_kind = "polychain"  # the same compiled evaluation as the line
    c.align.curve_epochs = 1
    c.align.curve_pairs = 1
    c.align.stats_examples = 100
    c.align.stats_batch = 50
    c.align.repair_alphas = 3
    c.align.ste_steps = 3
    c.analysis.num_alphas = 5
    c.train.eval_batch_size = 256
    report = runner.run(c, str(tmp_path))
    assert list(report["tasks"]) == ["bn"] and report["tasks"]["bn"]["model"]["batch_norm"]
    for task, t in report["tasks"].items():
        assert [(r["arm"], r["method"]) for r in t["rows"]] == [
            (arm, m) for arm in ("vanilla", "TNA-PFN 0.4") for m in ("none", "WM", "AM", "STE", "WM + REPAIR")]
        assert [r["name"] for r in t["rows"]][:6] == ["vanilla", "WM", "AM", "STE", "WM + REPAIR", "TNA-PFN 0.4"]
        assert [sp["arm"] for sp in t["soups"]] == ["vanilla", "TNA-PFN 0.4"]
        for sp in t["soups"]:
            assert sp["models"] == 2 and 0.0 <= sp["merged_accuracy"] <= 1.0 and sp["iterations"] >= 1
        for r in t["rows"]:
            assert r["pairs"] == 1 and 0.0 <= r["accuracy_barrier_mean"] <= 1.0
            assert np.isfinite(r["loss_barrier_mean"])
        assert [it["arm"] for it in t["wm_iterations"]] == ["vanilla", "TNA-PFN 0.4"]
        assert all(it["iterations_mean"] >= 1 for it in t["wm_iterations"])
        assert {c_["arm"] for c_ in t["curves"]} == {"vanilla", "TNA-PFN 0.4"}
        for c_ in t["curve_pairs"]:
            for method in ("none", "WM"):
                assert 0.0 <= c_[method]["curve_min_accuracy"] <= c_[method]["curve_avg_accuracy"] <= 1.0
        assert {"train", "matching", "paths", "repair", "merge", "curves", "total", "cpu"} <= set(t["seconds"])
        for name in ("lmc_{}.png", "curves_{}.png", "{}/metrics.jsonl"):
            assert (tmp_path / name.format(task)).exists(), name.format(task)
    text = (tmp_path / "report.md").read_text()
    assert "WM sweeps to converge" in text and "BatchNorm statistics are reset" in text and "MergeMany soup" in text
    assert json.loads((tmp_path / "report.json").read_text())["tasks"]["bn"]["rows"][0]["name"] == "vanilla"
    with pytest.raises(ValueError, match="config.align.bogus is not a known field"):
        c.align.bogus = 1
        runner.run(c, None)


def test_repair_in_one_pass_equals_layer_by_layer():
    """Data in one batch: one forward pass; in two batches: one pass per layer. Same statistics,
    same result (conv + BatchNorm points, and a dense layer without a norm)."""
    net = make_net("local_cnn_bn_flatten")
    a, b = perturbed(net, 0), perturbed(net, 1)
    x = inputs(net, jax.random.key(2), n=64)
    assert [p.target for p in align.repair_points(net)] == ["conv0_norm", "conv1_norm", "fc"]
    one = jax.jit(align.make_repair(net, a, b, x, batch_size=64))(0.3)
    layered = jax.jit(align.make_repair(net, a, b, x, batch_size=32))(0.3)
    chex.assert_trees_all_close(one, layered, rtol=2e-4, atol=2e-5)
    assert not leaves_equal(one, lmc.interpolate(a, b, 0.3))


def test_align_compare_config_tasks_are_valid():
    """Every task of configs/align_compare.py, and the optional CIFAR-10 one, is a valid config."""
    from configs import align_compare as cfg_module
    from tna_jax.experiments.align_compare import task_config

    c = cfg_module.get_config()
    assert {"mlp", "resnet20"} <= set(c.align.tasks)
    c.align.tasks.cifar10 = cfg_module.cifar10_task("/nonexistent")
    for name in c.align.tasks:
        cfg = task_config(c, name)
        assert cfg.kind == "train" and "align" not in cfg
    cifar = task_config(c, "cifar10")
    assert (cifar.data.source, cifar.model.name, cifar.model.width) == ("tfds:cifar10", "resnet20", 1)
    assert task_config(c, "resnet20").model.name == "resnet20"
    assert task_config(c, "mlp").model.depth == 3


# ---------------------------------------------------------------------------------------------
# Fast weight matching: exactness, solvers, STE, MergeMany and many-to-one.
# ---------------------------------------------------------------------------------------------


def fresh_costs(spec, perm, a, b, group, leave_out=frozenset()):
    """C_group from the weights, in float64 NumPy (independent of tna_jax.align.costs), without
    the terms of arrays that also carry a permutation in `leave_out`."""
    n = spec.size[group]
    c = np.zeros((n, n))
    named_a, named_b = dict(map_with_names_list(a)), dict(map_with_names_list(b))
    for path, lay in spec.layouts:
        if not path.startswith("params/"):
            continue
        for ax in lay.axes_of(group):
            x = np.asarray(named_a[path], np.float64).reshape(lay.factors)
            y = np.asarray(named_b[path], np.float64).reshape(lay.factors)
            if any(p in leave_out for other, p in enumerate(lay.perms) if other != ax):
                continue
            for other, p in enumerate(lay.perms):
                if p is not None and other != ax:
                    y = np.take(y, np.asarray(perm[p]), axis=other)
            c += np.moveaxis(x, ax, 0).reshape(n, -1) @ np.moveaxis(y, ax, 0).reshape(n, -1).T
    return c


def map_with_names_list(v):
    from tna_jax.tree import named_leaves

    return named_leaves(v)


def reference_matching(spec, a, b, key, max_iter=100, tol=1e-9, first_sweep="standard"):
    """Sequential coordinate descent with fresh float64 costs, in the order weight_matching's
    order="random" visits (plain permutations only). ``first_sweep="forward"``: the first sweep
    visits the permutations in the spec's order, each against the neighbours visited before it."""
    perm = align.identity_permutation(spec)
    names = [g for g, _ in spec.groups()]
    orders = order_generator(key)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        progress, forward = False, first_sweep == "forward" and it == 1
        visited = set()
        for g in names if forward else [names[int(i)] for i in orders.permutation(len(names))]:
            c = fresh_costs(spec, perm, a, b, g, leave_out=set(names) - visited - {g} if forward else frozenset())
            visited.add(g)
            old = c[np.arange(len(c)), perm[g]].sum()
            cols, value = align.solve_assignment(c, "scipy")
            if value > old + tol * max(1.0, abs(old)):
                perm[g], progress = cols, True
        if not progress and not forward:
            break
    return perm, it


def assert_local_optimum(spec, perm, a, b, rtol=1e-6):
    """Every permutation is an exact assignment optimum given the others (fresh float64 costs)."""
    total = align.matching_objective(spec, perm, a, b)
    for g in spec.names:
        c = fresh_costs(spec, perm, a, b, g)
        current = c[np.arange(len(c)), perm[g]].sum()
        best = align.solve_assignment(c, "scipy")[1]
        assert best - current <= rtol * abs(total), (g, best, current)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.sampled_from([12, 24, 40]), order=st.sampled_from(align.ORDERS),
       backend=st.sampled_from(("host", "device")))
def test_fast_weight_matching_ends_at_an_exact_local_optimum(seed, width, order, backend):
    net = models.build({"name": "mlp", "depth": 3, "width": width}, (20,), 5)
    spec = align.permutation_spec(net)
    a, b = perturbed(net, seed), perturbed(net, seed + 1)
    res = align.weight_matching(spec, a, b, jax.random.key(seed), order=order, incremental=True, refresh=3,
                                cost_backend=backend)
    assert res.converged and res.solves <= res.iterations * len(spec)
    assert_local_optimum(spec, res.perm, a, b)
    # the paper's order without incremental costs is the plain sequential algorithm, step for step,
    # with the paper's first sweep or the forward one
    if order == "random":
        for first_sweep in ("standard", "forward"):  # forward last: the default, as `res`
            ref, sweeps = reference_matching(spec, a, b, jax.random.key(seed), first_sweep=first_sweep)
            plain = align.weight_matching(spec, a, b, jax.random.key(seed), incremental=False, first_sweep=first_sweep)
            assert plain.iterations == sweeps and all(np.array_equal(plain.perm[k], ref[k]) for k in spec.names)
        obj_ref = align.matching_objective(spec, ref, a, b)
        assert res.objective[-1] >= obj_ref - 1e-3 * abs(obj_ref)


def test_fast_weight_matching_on_a_resnet_skips_solves_and_is_a_local_optimum():
    net = make_net("resnet20")
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 0), perturbed(net, 1)
    res = align.weight_matching(spec, a, b, jax.random.key(0), incremental=True, cost_backend="device")
    assert res.converged and res.solves < res.iterations * len(spec)  # clean permutations were skipped
    assert_local_optimum(spec, res.perm, a, b)
    classes = align.weight_matching(spec, a, b, jax.random.key(0), order="classes", incremental=True)
    assert_local_optimum(spec, classes.perm, a, b)


@pytest.mark.parametrize("name", ["resnet20", "mlp"])
def test_host_cost_backend_takes_the_same_steps_as_the_device(name):
    net = make_net("resnet20") if name == "resnet20" else models.build({"name": "mlp", "depth": 3, "width": 24}, (30,), 5)
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 7), perturbed(net, 8)
    host = align.weight_matching(spec, a, b, jax.random.key(3), cost_backend="host")
    device = align.weight_matching(spec, a, b, jax.random.key(3), cost_backend="device", incremental=False)
    assert host.converged and (host.iterations, host.solves) == (device.iterations, device.solves)
    assert all(np.array_equal(host.perm[k], device.perm[k]) for k in spec.names)
    np.testing.assert_allclose(host.objective, device.objective, rtol=1e-5)
    assert host.objective[-1] > host.objective[0]
    assert_local_optimum(spec, host.perm, a, b)
    # arrays in host memory (JAX on CPU) take the host path by default: the same result again
    auto = align.weight_matching(spec, a, b, jax.random.key(3))
    assert all(np.array_equal(auto.perm[k], host.perm[k]) for k in spec.names)
    assert auto.objective == host.objective


def test_device_rebuilds_reuse_the_programs_of_the_first_build():
    """Tracked terms recomputed from the weights (every other update with refresh=1) run the jitted
    program their first build compiled: nothing is compiled per seed once each is built."""
    from tna_jax.align import costs as costs_lib

    net = models.build({"name": "mlp", "depth": 3, "width": 24}, (30,), 5)
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 4), perturbed(net, 5)
    costs_lib.build_fn.cache_clear()
    align.weight_matching(spec, a, b, jax.random.key(1), max_iter=1, cost_backend="device", incremental=True,
                          first_sweep="standard")
    programs = costs_lib.build_fn.cache_info().misses  # the first sweep built every matrix once
    plans = costs_lib.plan_groups(spec, [p for p in spec.leaves if p.startswith("params/")])
    # each permutation's constant part and one term per neighbour (an MLP's middle layer has two)
    assert programs == sum(1 + len(p.single) for p in plans.values()) == 7
    res = align.weight_matching(spec, a, b, jax.random.key(1), cost_backend="device", incremental=True, refresh=1,
                                first_sweep="standard")
    assert res.converged and res.solves > 2 * len(spec)  # past the first builds: rebuilds and updates ran
    assert costs_lib.build_fn.cache_info().misses == programs
    # the forward first sweep builds a subset of the same parts: nothing new to compile either
    assert align.weight_matching(spec, a, b, jax.random.key(1), cost_backend="device", incremental=True).converged
    assert costs_lib.build_fn.cache_info().misses == programs
    assert_local_optimum(spec, res.perm, a, b)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       loop_slice=st.sampled_from((0, 1 << 30)), loop_max=st.sampled_from((1, 64)),
       dtype=st.sampled_from((np.float32, np.float64, np.int32)))
def test_contract_all_but_equals_the_transposed_product(shape, data, loop_slice, loop_max, dtype):
    """Every route of `contract_all_but` (one GEMM with the axis first or last, GEMMs accumulated per
    leading index, a transposed copy, NumPy for dtypes BLAS lacks) gives the product of the arrays
    with the axis moved first, C-ordered, in their dtype."""
    from tna_jax.align import costs as costs_lib

    axis = data.draw(st.integers(0, len(shape) - 1))
    rng = np.random.default_rng(len(shape) * 7 + axis)
    x, y = ((4 * rng.standard_normal(shape)).astype(dtype) for _ in range(2))
    n = shape[axis]
    expected = np.moveaxis(x, axis, 0).reshape(n, -1).astype(np.float64) @ np.moveaxis(y, axis, 0).reshape(n, -1).T
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(costs_lib, "_MIN_GEMM_LOOP_SLICE", loop_slice)
        patch.setattr(costs_lib, "_MAX_GEMM_LOOP", loop_max)
        got = costs_lib.contract_all_but(x, y, axis)
    chex.assert_shape(got, (n, n))
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_host_cost_backend_tracks_convolution_terms_to_a_local_optimum():
    """The host path with every term tracked (rank-m corrections of convolution kernels whose
    permuted axis sits between the taps and the other channels) ends where the device path does."""
    net = make_net("resnet20")
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 2), perturbed(net, 3)
    from tna_jax.align import costs as costs_lib

    original, updates = costs_lib.rank_update, []

    def counted(*args):  # the rank-m corrections, by the number of moved units
        updates.append(len(args[4]))
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(costs_lib, "rank_update", counted)
        host = align.weight_matching(spec, a, b, jax.random.key(5), incremental=True, cost_backend="host", refresh=2)
    assert updates, "no rank-m correction ran"
    device = align.weight_matching(spec, a, b, jax.random.key(5), incremental=False, cost_backend="device")
    assert host.converged and host.solves < host.iterations * len(spec)
    assert_local_optimum(spec, host.perm, a, b)
    np.testing.assert_allclose(host.objective[-1], align.matching_objective(spec, host.perm, a, b), rtol=1e-5)
    np.testing.assert_allclose(host.objective[-1], device.objective[-1], rtol=1e-3)


def test_permutation_spec_hash_is_computed_once_and_matches_equality():
    import dataclasses

    spec = align.permutation_spec(make_net("resnet20"))
    twin = dataclasses.replace(spec)
    assert twin == spec and hash(twin) == hash(spec) and twin is not spec
    assert spec.__dict__["_hash"] == hash((spec.sizes, spec.parents, spec.layouts))
    other = dataclasses.replace(spec, sizes=spec.sizes[:-1])
    assert other != spec and hash(other) != hash(spec)


def test_host_cost_backend_refuses_nested_permutations():
    net = make_net("local_encoder")
    spec = align.permutation_spec(net)
    v = perturbed(net, 0)
    with pytest.raises(ValueError, match="cost_backend='host' supports plain permutations only"):
        align.weight_matching(spec, v, v, jax.random.key(0), cost_backend="host")


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**16), ties=st.booleans())
def test_lap_solvers_are_exact_in_float64(n, seed, ties):
    pytest.importorskip("lap")
    if "lapx" not in align.SOLVERS or align.get_solver("auto") is align.get_solver("scipy"):
        pytest.skip("lapx is not installed")
    rng = np.random.default_rng(seed)
    c = rng.integers(-3, 4, (n, n)).astype(np.float64) if ties else rng.normal(size=(n, n)) * 1e6
    c += 1e-9 * rng.normal(size=(n, n))  # differences far below float32 resolution must count
    cols_x, v_x = align.solve_assignment(c, "lapx")
    cols_s, v_s = align.solve_assignment(c, "scipy")
    assert sorted(cols_x.tolist()) == list(range(n))
    assert abs(v_x - v_s) <= 1e-9 * max(1.0, abs(v_s))


def trained_trio():
    """Three plain MLPs (digits, 64-64 hidden) trained from different seeds in one fit call."""
    cfg = tiny_config(anchor__ratio=0.0, baseline=False, num_seeds=3, train__epochs=8, data__source="digits",
                      model__depth=2, model__width=48)
    dataset = data_lib.load(cfg.data)
    net = models.build(cfg.model, dataset.input_shape, dataset.num_classes)
    result = training.fit(cfg, net, dataset, log=lambda s: None)
    return net, [result.state.variables(i) for i in range(3)], data_lib.to_device(dataset)


def test_ste_and_merge_many_on_trained_mlps():
    net, (a, b, c), data = trained_trio()
    spec = align.permutation_spec(net)
    ev = jax.jit(evaluation.make_eval_fn(net, 500))
    train = (data.x_train, data.y_train)

    # STE: the learnt permutation's midpoint has a lower loss than weight matching's
    res = align.ste_matching(net, a, b, train, key=jax.random.key(0), steps=150, batch_size=128,
                             optimizer=optax.adam(3e-3))
    chex.assert_shape(res.losses, (150,))
    mid = {name: ev(lmc.interpolate(a, align.apply_permutation(spec, p, b), 0.5), *train)["loss"]
           for name, p in (("wm", res.init), ("ste", res.perm))}
    print(mid, res.changes.sum())
    assert res.changes.sum() > 0 and float(mid["ste"]) < float(mid["wm"])

    # MergeMany: the merged model beats the unaligned average
    merged = align.merge_many(spec, [a, b, c], jax.random.key(2))
    assert merged.converged and merged.objective[-1] >= merged.objective[0]
    chex.assert_shape(merged.perm[spec.names[0]], (3, spec.size[spec.names[0]]))
    x_test, y_test = data.split("test")
    plain = ev(tree_lib_mean([a, b, c]), x_test, y_test)
    fused = ev(merged.merged, x_test, y_test)
    print(plain, fused)
    assert float(fused["accuracy"]) > float(plain["accuracy"]) + 0.05


def tree_lib_mean(vs):
    from tna_jax import tree as tree_lib

    return tree_lib.weighted_mean(tree_lib.stack(vs))


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.integers(3, 20), n=st.integers(2, 4))
def test_merge_many_and_align_to_reference_recover_hidden_permutations(seed, width, n):
    from tna_jax import tree as tree_lib

    net = models.build({"name": "mlp", "depth": 2, "width": width}, (9,), 4)
    spec = align.permutation_spec(net)
    base = perturbed(net, seed)
    hidden = [align.random_permutation(spec, jax.random.key(seed + i)) for i in range(n)]
    copies = [align.apply_permutation(spec, p, base) for p in hidden]
    res = align.align_to_reference(spec, base, tree_lib.stack(copies), jax.random.key(seed))
    assert res.converged and len(res.objective[-1]) == n
    for i, p in enumerate(hidden):
        inv = align.invert_permutation(spec, p)
        assert all(np.array_equal(res.perm[k][i], inv[k]) for k in spec.names)
    merged = align.merge_many(spec, copies, jax.random.key(seed))
    aligned = [align.apply_permutation(spec, {k: v[i] for k, v in merged.perm.items()}, copies[i]) for i in range(n)]
    assert merged.converged and all(leaves_equal(x, aligned[0]) for x in aligned[1:])
    chex.assert_trees_all_close(merged.merged, aligned[0], atol=1e-6)


def test_align_to_reference_equals_one_matching_per_model():
    from tna_jax import tree as tree_lib

    net = models.build({"name": "mlp", "depth": 3, "width": 10}, (9,), 4)
    spec = align.permutation_spec(net)
    a = perturbed(net, 0)
    bs = [perturbed(net, i) for i in (1, 2, 3)]
    res = align.align_to_reference(spec, a, tree_lib.stack(bs), jax.random.key(5))
    for i, b in enumerate(bs):
        one = align.weight_matching(spec, a, b, jax.random.key(5), incremental=False)
        assert all(np.array_equal(res.perm[k][i], one.perm[k]) for k in spec.names)
        np.testing.assert_allclose(res.objective[-1][i], one.objective[-1], rtol=1e-5)


def test_matching_errors_name_the_argument():
    net = models.build({"name": "mlp", "depth": 2, "width": 8}, (40,), 10)
    spec = align.permutation_spec(net)
    v = perturbed(net, 0)
    with pytest.raises(ValueError, match="solver must be one of"):
        align.weight_matching(spec, v, v, jax.random.key(0), solver="hungarian")
    with pytest.raises(ValueError, match="order must be one of"):
        align.weight_matching(spec, v, v, jax.random.key(0), order="forward")
    with pytest.raises(ValueError, match="incremental must be"):
        align.weight_matching(spec, v, v, jax.random.key(0), incremental="yes")
    with pytest.raises(ValueError, match="refresh must be an integer >= 1; got 0"):
        align.weight_matching(spec, v, v, jax.random.key(0), refresh=0)
    with pytest.raises(ValueError, match=r"cost_backend must be one of \('auto', 'host', 'device'\); got 'gpu'"):
        align.weight_matching(spec, v, v, jax.random.key(0), cost_backend="gpu")
    for fn in (align.weight_matching, align.align_to_reference):
        with pytest.raises(ValueError, match=r"first_sweep must be one of \('auto', 'forward', 'standard'\); got 'greedy'"):
            fn(spec, v, v if fn is align.weight_matching else jax.tree.map(lambda x: x[None], v), jax.random.key(0),
               first_sweep="greedy")
    with pytest.raises(ValueError, match="at least 2 models; got 1"):
        align.merge_many(spec, [v], jax.random.key(0))
    with pytest.raises(ValueError, match="steps must be a positive integer; got 0"):
        align.ste_matching(net, v, v, (jnp.ones((4, 40)), jnp.zeros(4, jnp.int32)), key=jax.random.key(0), steps=0)
    with pytest.raises(TypeError, match="data must be a pair"):
        align.ste_matching(net, v, v, jnp.ones((4, 40)), key=jax.random.key(0))


def test_a_forward_first_sweep_never_ends_the_descent_by_itself():
    """Solves against some neighbours only are not a convergence check: with nothing to move, a
    forward sweep is followed by a full one, and only that one ends the descent."""
    net = models.build({"name": "mlp", "depth": 3, "width": 16}, (40,), 10)
    spec = align.permutation_spec(net)
    a = perturbed(net, 0)
    res = align.weight_matching(spec, a, a, jax.random.key(0))
    # sweep 2 solves again the two solved without a neighbour; the last of the forward sweep saw both of its
    assert res.converged and res.iterations == 2 and res.solves == len(spec) + 2
    assert all(np.array_equal(res.perm[k], np.arange(spec.size[k])) for k in spec.names)
    capped = align.weight_matching(spec, a, a, jax.random.key(0), max_iter=1)
    assert capped.iterations == 1 and not capped.converged


@pytest.mark.parametrize("name,backend", [("mlp", "host"), ("mlp", "device"), ("resnet20", "host"),
                                          ("local_resnet_bn", "device"), ("vit", "auto"), ("transformer", "auto")])
def test_the_objective_after_a_forward_sweep_is_the_models(name, backend):
    """After the forward sweep the objective is summed from the matrices solved (every array enters
    the one of the later of its permutations) or, with nested or shared terms (the ViT's heads),
    computed from the weights: either way it is the matching objective of the permutation reached."""
    net = make_net(name)
    spec = align.permutation_spec(net)
    a, b = perturbed(net, 3), perturbed(net, 4)
    one = align.weight_matching(spec, a, b, jax.random.key(0), max_iter=1, first_sweep="forward", cost_backend=backend)
    assert len(one.objective) == 2 and one.objective[1] > one.objective[0]
    np.testing.assert_allclose(one.objective[1], align.matching_objective(spec, one.perm, a, b), rtol=1e-5)
    full = align.weight_matching(spec, a, b, jax.random.key(0), first_sweep="forward", cost_backend=backend)
    assert full.objective[:2] == one.objective and full.converged
    np.testing.assert_allclose(full.objective[-1], align.matching_objective(spec, full.perm, a, b), rtol=1e-5)


def test_a_forward_first_sweep_never_leaves_the_objective_below_the_identity():
    """Two hidden units built so that the first layer alone asks for a swap that the second layer
    pays for: the forward sweep's result (objective 1) is worse than the identity (200), so the
    descent restarts from the identity, and the history never dips below its start."""
    net = models.build({"name": "mlp", "depth": 2, "width": 2}, (1,), 1)
    spec = align.permutation_spec(net)
    zeros = jax.tree.map(jnp.zeros_like, net.init(jax.random.key(0)))

    def model(first):
        params = {**zeros["params"], "dense_0": {"kernel": jnp.asarray([first]), "bias": jnp.zeros(2)},
                  "dense_1": {"kernel": jnp.asarray([[10.0, 0.0], [0.0, -10.0]]), "bias": jnp.zeros(2)}}
        return {**zeros, "params": params}

    a, b = model([1.0, 0.0]), model([0.0, 1.0])
    swap = {"dense_0": np.array([1, 0]), "dense_1": np.array([0, 1])}
    assert align.matching_objective(spec, swap, a, b) == pytest.approx(1.0)  # where a forward pass lands
    res = align.weight_matching(spec, a, b, jax.random.key(0), first_sweep="forward")
    np.testing.assert_allclose(res.objective, [200.0] * len(res.objective), rtol=1e-6)
    assert res.converged and all(np.array_equal(res.perm[k], [0, 1]) for k in spec.names)
    from tna_jax import tree as tree_lib

    many = align.align_to_reference(spec, a, tree_lib.stack([b, b]), jax.random.key(0))
    np.testing.assert_allclose(np.stack(many.objective), 200.0, rtol=1e-6)
