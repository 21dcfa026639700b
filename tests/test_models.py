"""Tests of the model zoo (tna_jax.models): the Net contract for every registered model, parameter
counts against known numbers, layer names and neuron groups, dropout and BatchNorm modes, dtypes,
config errors, and the BERT-style encoder against a NumPy reference written from Hugging Face's
BertModel.

Compile time dominates on CPU, so each model is compiled once: one jitted function per model
computes the vmapped init over two seeds and every apply the contract needs. Shape-only checks
use ``jax.eval_shape`` (tracing, no compilation).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from tna_jax import anchors, models
from tna_jax import tree as tree_lib
from tna_jax.models.vgg import VGG_CONFIGS

NUM_CLASSES = 3
BATCH = 2

# Every registered model at a size that compiles in a second or two.
TINY = {
    "mlp": ({"name": "mlp", "depth": 1, "width": 8}, (4, 4, 1)),
    "cnn": ({"name": "cnn", "width": 0.125, "hidden": 8}, (8, 8, 1)),
    "vgg11": ({"name": "vgg11", "width": 1 / 32}, (4, 4, 1)),
    "vgg16": ({"name": "vgg16", "width": 1 / 32, "norm": "none"}, (4, 4, 1)),
    "resnet20": ({"name": "resnet20", "width": 0.125}, (4, 4, 1)),
    "wrn": ({"name": "wrn", "depth": 10, "width": 0.25, "dropout": 0.5}, (4, 4, 1)),
    "vit": ({"name": "vit", "patch_size": 2, "dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8,
             "dropout": 0.5}, (4, 4, 1)),
    "transformer": ({"name": "transformer", "vocab_size": 20, "hidden": 8, "layers": 1, "heads": 2,
                     "intermediate": 8, "max_len": 8, "dropout": 0.5}, (6,)),
}
HAS_BATCHNORM = {"vgg11", "resnet20", "wrn"}
HAS_DROPOUT = {"wrn", "vit", "transformer"}


def tiny_net(name, **overrides):
    cfg, shape = TINY[name]
    return models.build({**cfg, **overrides}, shape, NUM_CLASSES)


def example_input(net, key=jax.random.key(42)):
    shape = (BATCH, *net.input_shape)
    if net.input_dtype == jnp.int32:  # token ids in [1, vocab) and trailing padding (id 0)
        ids = jax.random.randint(key, shape, 1, net.module.vocab_size, jnp.int32)
        return ids.at[1, shape[1] // 2:].set(0)
    return jax.random.normal(key, shape)


def abstract_params(net):
    return jax.eval_shape(net.init, jax.random.key(0))["params"]


@functools.cache
def contract_run(name):
    """Compiles and runs, once per model, everything the contract test asserts on."""
    net = tiny_net(name)
    x = example_input(net)

    def run(keys, rng_a, rng_b):
        stacked = jax.vmap(net.init)(keys)

        def one(variables):
            eval_out, eval_state = net.apply(variables, x)
            eval_rng_out, _ = net.apply(variables, x, rng=rng_a)
            train_a, train_state = net.apply(variables, x, train=True, rng=rng_a)
            train_b, _ = net.apply(variables, x, train=True, rng=rng_b)
            return dict(eval=eval_out, eval_state=eval_state, eval_rng=eval_rng_out,
                        train_a=train_a, train_b=train_b, train_state=train_state)

        return stacked, jax.vmap(one)(stacked)

    keys = jax.random.split(jax.random.key(0), 2)
    stacked, out = jax.jit(run)(keys, jax.random.key(1), jax.random.key(2))
    return net, x, stacked, out


def test_tiny_covers_the_registry():
    # Other test modules register helper models named "test_*" in the same process.
    library_models = {name for name in models.REGISTRY if not name.startswith("test_")}
    assert set(TINY) == library_models


@pytest.mark.parametrize("name", sorted(TINY))
def test_net_contract(name):
    net, x, stacked, out = contract_run(name)
    # vmap(init) over two keys: a stacked tree, two different models.
    single = jax.eval_shape(net.init, jax.random.key(0))
    chex.assert_tree_shape_prefix(stacked, (2,))
    chex.assert_trees_all_equal_shapes(jax.tree.map(lambda a: a[0], stacked), single)
    kernels = [v for n, v in tree_lib.named_leaves(stacked["params"]) if n.endswith("kernel")]
    assert not np.allclose(kernels[0][0], kernels[0][1])
    # Parameters are float32 whatever the computation dtype.
    assert {leaf.dtype for leaf in jax.tree.leaves(stacked["params"])} == {jnp.dtype(jnp.float32)}
    # Logits: (batch, num_classes), float32, finite, and different for the two seeds.
    for k in ("eval", "eval_rng", "train_a", "train_b"):
        chex.assert_shape(out[k], (2, BATCH, NUM_CLASSES))
        assert out[k].dtype == jnp.float32
        chex.assert_tree_all_finite(out[k])
    assert not np.allclose(out["eval"][0], out["eval"][1])
    # Evaluation returns no state and ignores a dropout rng.
    assert out["eval_state"] == {}
    np.testing.assert_array_equal(out["eval"], out["eval_rng"])
    if name in HAS_BATCHNORM:
        assert set(out["train_state"]) == {"batch_stats"}
        chex.assert_trees_all_equal_shapes(out["train_state"]["batch_stats"], stacked["batch_stats"])
        for (path, new), (_, old) in zip(tree_lib.named_leaves(out["train_state"]["batch_stats"]),
                                         tree_lib.named_leaves(stacked["batch_stats"]), strict=True):
            assert not np.allclose(new, old), path
    else:
        assert "batch_stats" not in stacked
        assert out["train_state"] == {}
    if name in HAS_DROPOUT:  # training draws from the dropout rng
        assert not np.allclose(out["train_a"], out["train_b"])
    else:
        np.testing.assert_array_equal(out["train_a"], out["train_b"])
    if name not in HAS_DROPOUT | HAS_BATCHNORM:  # nothing differs between the modes
        np.testing.assert_allclose(out["train_a"], out["eval"], rtol=1e-6, atol=1e-6)
    if name in HAS_DROPOUT and name not in HAS_BATCHNORM:
        assert not np.allclose(out["train_a"], out["eval"])


@pytest.mark.parametrize("name", sorted(HAS_DROPOUT))
def test_dropout_in_training_needs_an_rng(name):
    net = tiny_net(name)
    variables = jax.eval_shape(net.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((BATCH, *net.input_shape), net.input_dtype)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: net.apply(v, x, train=True), variables, x)


# ---------------------------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------------------------


def count(cfg, input_shape, num_classes=10):
    return models.build(cfg, input_shape, num_classes).param_count()


def cnn_count(height, width, channels, c1, c2, hidden, num_classes):
    for _ in range(2):  # a pool halves both sides unless one is already below 2
        if height >= 2 and width >= 2:
            height, width = height // 2, width // 2
    return ((25 * channels * c1 + c1) + (25 * c1 * c2 + c2) + (height * width * c2 * hidden + hidden)
            + (hidden * num_classes + num_classes))


def test_param_counts_match_known_architectures():
    # He et al. (2016) CIFAR ResNet-20, "0.27M": 1x1 projection shortcuts with BatchNorm, no conv
    # biases. Worked out by hand: stem 432 + 32; stage 0: 3 x (2 x 2304 + 64); stage 1: 14,528 +
    # 2 x 18,560; stage 2: 57,728 + 2 x 73,984; head 650.
    assert count({"name": "resnet20"}, (32, 32, 3)) == 272_474
    assert count({"name": "resnet20", "norm": "layer"}, (32, 32, 3)) == 272_474
    # McMahan et al. (2017): the MNIST CNN has 1,663,370 parameters.
    assert count({"name": "cnn"}, (28, 28, 1)) == 1_663_370
    assert count({"name": "cnn"}, (32, 32, 3)) == cnn_count(32, 32, 3, 32, 64, 512, 10) == 2_156_490
    # Zagoruyko & Komodakis (2016), Table 1: WRN-16-4 2.7M, WRN-28-10 36.5M.
    assert count({"name": "wrn", "depth": 16, "width": 4}, (32, 32, 3)) == 2_748_890
    assert count({"name": "wrn", "depth": 28, "width": 10}, (32, 32, 3)) == 36_479_194
    # all-MiniLM-L6-v2's BertModel has 22,713,216 parameters, 147,840 of them in the pooler
    # (not used by mean pooling, so absent here); plus a 384 -> 2 head.
    assert count({"name": "transformer"}, (128,), 2) == 22_713_216 - 147_840 + 384 * 2 + 2


@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_vgg_param_count_is_analytic(name, norm):
    total, c_in = 0, 3
    for spec in VGG_CONFIGS[name]:
        if spec != "M":
            total += 9 * c_in * spec + 2 * spec if norm == "batch" else 9 * c_in * spec + spec
            c_in = spec
    total += 512 * 10 + 10
    assert count({"name": name, "norm": norm}, (32, 32, 3)) == total
    assert name != "vgg16" or norm != "batch" or total == 14_724_042  # the usual "14.7M"


@settings(max_examples=8)
@given(height=st.integers(1, 12), width=st.integers(1, 12), channels=st.integers(1, 3),
       multiplier=st.sampled_from([0.01, 0.1, 0.25, 0.5]), hidden=st.integers(1, 16),
       num_classes=st.integers(1, 5))
def test_cnn_shapes_and_count_for_any_image(height, width, channels, multiplier, hidden, num_classes):
    net = models.build({"name": "cnn", "width": multiplier, "hidden": hidden}, (height, width, channels),
                       num_classes)
    c1, c2 = max(1, round(32 * multiplier)), max(1, round(64 * multiplier))
    assert net.param_count() == cnn_count(height, width, channels, c1, c2, hidden, num_classes)
    variables = jax.eval_shape(net.init, jax.random.key(0))
    logits, _ = jax.eval_shape(net.apply, variables, jax.ShapeDtypeStruct((3, height, width, channels),
                                                                           jnp.float32))
    chex.assert_shape(logits, (3, num_classes))


@settings(max_examples=8)
@given(depth=st.integers(0, 4), width=st.integers(1, 32), features=st.integers(1, 20),
       norm=st.sampled_from(["none", "layer"]), num_classes=st.integers(1, 5))
def test_mlp_shapes_and_count(depth, width, features, norm, num_classes):
    net = models.build({"name": "mlp", "depth": depth, "width": width, "norm": norm}, (features,), num_classes)
    sizes = [features] + [width] * depth + [num_classes]
    expected = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    expected += 2 * width * depth if norm == "layer" else 0
    assert net.param_count() == expected
    variables = jax.eval_shape(net.init, jax.random.key(0))
    logits, _ = jax.eval_shape(net.apply, variables, jax.ShapeDtypeStruct((2, features), jnp.float32))
    chex.assert_shape(logits, (2, num_classes))


# ---------------------------------------------------------------------------------------------
# Names and neuron groups.
# ---------------------------------------------------------------------------------------------


def modules_of(params):
    return {name.rsplit("/", 1)[0] for name in tree_lib.leaf_names(params)}


# Norms that normalise a residual stream rather than one layer's outputs, so they have no layer
# to pair with: WRN's pre-activation norms and final norms.
STREAM_NORMS = ("pre_norm", "final_norm")


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_norm_pairs_with_the_layer_whose_units_it_normalises(name):
    params = abstract_params(tiny_net(name, **({"norm": "batch"} if name == "vgg16" else {})))
    modules = modules_of(params)
    named = dict(tree_lib.named_leaves(params))
    for module in modules:
        if not module.endswith("_norm"):
            continue
        layer = module[: -len("_norm")]
        if layer in modules:
            assert named[f"{module}/scale"].shape[-1] == named[f"{layer}/kernel"].shape[-1], module
        else:
            assert module.endswith(STREAM_NORMS), f"{module} has no layer {layer}"
    assert "head" in modules
    order = tiny_net(name).layer_order()  # input to output, whatever the sorted dict keys say
    assert order[-1] == "head" and set(order) <= modules


def test_resnet20_layer_names_and_order():
    net = models.build({"name": "resnet20"}, (32, 32, 3), 10)
    params = abstract_params(net)
    order = net.layer_order()
    assert order[0] == "conv_stem" and order[-1] == "head"
    assert len([n for n in order if n.endswith(("conv1", "conv2"))]) == 18
    assert [n for n in order if "shortcut" in n] == ["stage1_block0/shortcut", "stage2_block0/shortcut"]
    modules = modules_of(params)
    assert {"conv_stem_norm", "stage1_block0/shortcut_norm", "stage2_block2/conv2_norm"} <= modules
    assert "stage0_block0/shortcut" not in modules
    chex.assert_shape(params["stage1_block0"]["conv1"]["kernel"], (3, 3, 16, 32))
    chex.assert_shape(params["stage1_block0"]["shortcut"]["kernel"], (1, 1, 16, 32))
    assert "bias" not in params["stage1_block0"]["conv1"]


def test_neuron_anchors_fix_a_channel_with_its_norm_in_resnet20():
    params = abstract_params(tiny_net("resnet20"))  # 2, 4 and 8 channels
    mask = jax.jit(lambda key: anchors.anchor_mask(params, 0.5, key, granularity="neuron"))(jax.random.key(0))
    for layer in ("conv_stem", "stage0_block1/conv1", "stage1_block0/conv2", "stage2_block0/shortcut"):
        block, _, leaf = layer.rpartition("/")
        node = mask[block] if block else mask
        units = np.asarray(node[leaf]["kernel"])  # (3, 3, in, out): one decision per output channel
        per_channel = units.reshape(-1, units.shape[-1])
        assert (per_channel == per_channel[:1]).all(), layer
        for leaf_name in ("scale", "bias"):
            np.testing.assert_array_equal(np.asarray(node[f"{leaf}_norm"][leaf_name]), per_channel[0])
    # Different layers draw their units independently.
    a = np.asarray(mask["stage2_block0"]["conv1"]["kernel"][0, 0, 0])
    b = np.asarray(mask["stage2_block0"]["conv2"]["kernel"][0, 0, 0])
    assert (a != b).any()


def test_transformer_names_mirror_bert_and_post_norms_share_the_unit_draw():
    net = models.build({"name": "transformer"}, (16,), 2)
    params = abstract_params(net)
    chex.assert_shape(params["embeddings"]["word_embeddings"]["embedding"], (30522, 384))
    chex.assert_shape(params["embeddings"]["position_embeddings"]["embedding"], (512, 384))
    chex.assert_shape(params["embeddings"]["token_type_embeddings"]["embedding"], (2, 384))
    layer = params["layer_5"]
    for proj in ("query", "key", "value", "out"):
        chex.assert_shape(layer["attention"][proj]["kernel"], (384, 384))
    chex.assert_shape(layer["intermediate"]["kernel"], (384, 1536))
    chex.assert_shape(layer["output"]["kernel"], (1536, 384))
    assert set(layer) == {"attention", "intermediate", "output", "output_norm"}
    assert set(layer["attention"]) == {"query", "key", "value", "out", "out_norm"}
    assert "layer_6" not in params

    tiny = abstract_params(tiny_net("transformer"))
    mask = jax.jit(lambda key: anchors.anchor_mask(tiny, 0.5, key, granularity="neuron"))(jax.random.key(3))
    m = mask["layer_0"]
    np.testing.assert_array_equal(m["attention"]["out_norm"]["scale"], m["attention"]["out"]["bias"])
    np.testing.assert_array_equal(m["output_norm"]["bias"], m["output"]["bias"])


def test_vit_names():
    params = abstract_params(tiny_net("vit", depth=2))
    for block in ("block0", "block1"):
        assert set(params[block]) == {"ln1", "attn", "ln2", "mlp"}
        assert set(params[block]["attn"]) == {"query", "key", "value", "out"}
        chex.assert_shape(params[block]["attn"]["query"]["kernel"], (8, 8))
        chex.assert_shape(params[block]["mlp"]["fc1"]["kernel"], (8, 8))
    chex.assert_shape(params["patch_embed"]["kernel"], (2, 2, 1, 8))
    chex.assert_shape(params["embed"]["pos_embedding"], (1 + 4, 8))
    assert {"final_norm", "head"} <= set(params)


# ---------------------------------------------------------------------------------------------
# Computation dtype.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_bfloat16_computation_with_float32_params_and_logits(name):
    net = tiny_net(name, dtype="bfloat16")
    variables = jax.eval_shape(net.init, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    x = jax.ShapeDtypeStruct((BATCH, *net.input_shape), net.input_dtype)
    jaxpr = str(jax.make_jaxpr(lambda v, x: net.apply(v, x, train=True, rng=jax.random.key(0)))(variables, x))
    assert "bf16" in jaxpr
    logits, _ = jax.eval_shape(lambda v, x: net.apply(v, x, train=True, rng=jax.random.key(0)), variables, x)
    assert logits.dtype == jnp.float32


def test_bfloat16_logits_are_close_to_float32():
    f32, bf16 = tiny_net("cnn"), tiny_net("cnn", dtype="bfloat16")
    x = example_input(f32)

    @jax.jit
    def run(key):
        variables = f32.init(key)
        return f32.apply(variables, x)[0], bf16.apply(variables, x)[0]

    a, b = run(jax.random.key(0))
    assert b.dtype == jnp.float32
    assert not np.array_equal(a, b)  # the computation really ran in bfloat16
    np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(a).max()) + 1e-3)


# ---------------------------------------------------------------------------------------------
# The BERT-style encoder against a NumPy reference of Hugging Face's BertModel.
# ---------------------------------------------------------------------------------------------


def bert_reference(params, ids, *, heads, eps):
    """BertModel (post-LN, erf GELU, additive -inf mask) + mean pooling + head, in NumPy float64."""
    p = {n: np.asarray(v, np.float64) for n, v in tree_lib.named_leaves(params)}

    def dense(name, x):
        return x @ p[f"{name}/kernel"] + p[f"{name}/bias"]

    def layer_norm(name, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p[f"{name}/scale"] + p[f"{name}/bias"]

    batch, length = ids.shape
    mask = (ids != 0).astype(np.float64)
    x = (p["embeddings/word_embeddings/embedding"][ids] + p["embeddings/position_embeddings/embedding"][:length]
         + p["embeddings/token_type_embeddings/embedding"][0])
    x = layer_norm("embeddings/norm", x)
    hidden = x.shape[-1]
    d = hidden // heads
    extended = (1.0 - mask)[:, None, None, :] * np.finfo(np.float64).min
    i = 0
    while f"layer_{i}/output/kernel" in p:
        pre = f"layer_{i}"

        def heads_of(t):
            return t.reshape(batch, length, heads, d).transpose(0, 2, 1, 3)

        q, k, v = (heads_of(dense(f"{pre}/attention/{n}", x)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + extended
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = layer_norm(f"{pre}/attention/out_norm", dense(f"{pre}/attention/out", context) + x)
        h = dense(f"{pre}/intermediate", x)
        h = 0.5 * h * (1.0 + scipy.special.erf(h / math.sqrt(2.0)))
        x = layer_norm(f"{pre}/output_norm", dense(f"{pre}/output", h) + x)
        i += 1
    pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    return pooled, dense("head", pooled)


def test_transformer_matches_the_bert_reference_and_ignores_padding():
    cfg = {"name": "transformer", "vocab_size": 30, "hidden": 12, "layers": 2, "heads": 3,
           "intermediate": 20, "max_len": 10, "layer_norm_eps": 1e-12}
    net = models.build(cfg, (7,), 4)
    params = jax.jit(net.init)(jax.random.key(0))["params"]
    # Move LayerNorm scales and all biases away from 1 and 0 so that every parameter matters.
    rng = np.random.default_rng(0)
    params = tree_lib.map_with_names(
        lambda n, v: v + 0.1 * rng.standard_normal(v.shape, np.float32) if n.endswith(("bias", "scale")) else v,
        params)
    ids = np.array([[5, 9, 2, 7, 11, 3, 8], [4, 6, 12, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], np.int32)
    short = models.build(cfg, (3,), 4)

    @jax.jit
    def run(variables):
        logits, _ = net.apply(variables, ids)
        alone = models.sentence_embedding(short, variables, ids[1:2, :3])
        return logits, models.sentence_embedding(net, variables, ids), alone

    logits, embedding, alone = run({"params": params})
    ref_pooled, ref_logits = bert_reference(params, ids, heads=3, eps=1e-12)
    chex.assert_shape(embedding, (3, 12))
    np.testing.assert_allclose(embedding, ref_pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    # Trailing padding changes nothing: the second sentence alone, without its padding.
    np.testing.assert_allclose(alone[0], embedding[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config errors.
# ---------------------------------------------------------------------------------------------


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"model.name must be one of \[.*'resnet20'.*'vit'.*\]; got 'resnet99'"):
        models.build({"name": "resnet99"}, (32, 32, 3), 10)


@pytest.mark.parametrize("cfg, shape, field", [
    ({"name": "cnn", "width": -1.0}, (8, 8, 1), "width"),
    ({"name": "cnn", "hidden": 0}, (8, 8, 1), "hidden"),
    ({"name": "vgg11", "norm": "layer"}, (8, 8, 1), "norm"),
    ({"name": "vgg16", "width": 0}, (8, 8, 1), "width"),
    ({"name": "resnet20", "norm": "group"}, (8, 8, 1), "norm"),
    ({"name": "resnet20", "width": -0.5}, (8, 8, 1), "width"),
    ({"name": "resnet20", "dtype": "float16"}, (8, 8, 1), "dtype"),
    ({"name": "wrn", "depth": 15}, (8, 8, 1), "depth"),
    ({"name": "wrn", "dropout": 1.0}, (8, 8, 1), "dropout"),
    ({"name": "vit", "patch_size": 3}, (8, 8, 1), "patch_size"),
    ({"name": "vit", "dim": 10, "heads": 4}, (8, 8, 1), "heads"),
    ({"name": "vit", "dropout": -0.1}, (8, 8, 1), "dropout"),
    ({"name": "transformer", "max_len": 4}, (8,), "max_len"),
    ({"name": "transformer", "hidden": 10, "heads": 4}, (8,), "heads"),
    ({"name": "transformer", "layer_norm_eps": 0.0}, (8,), "layer_norm_eps"),
    ({"name": "mlp", "dtype": "float64"}, (8,), "dtype"),
    ({"name": "mlp", "init": "pytorch"}, (8,), "init"),
    ({"name": "resnet20", "init": None}, (8, 8, 1), "init"),
])
def test_bad_fields_name_the_field(cfg, shape, field):
    with pytest.raises(ValueError, match=rf"model\.{field} must .*; got"):
        models.build(cfg, shape, 10)


@pytest.mark.parametrize("name", ["cnn", "vgg11", "resnet20", "wrn", "vit"])
def test_image_models_reject_flat_inputs(name):
    with pytest.raises(ValueError, match=r"needs image inputs of shape \(H, W, C\)"):
        models.build({"name": name}, (40,), 10)


def test_transformer_rejects_image_inputs():
    with pytest.raises(ValueError, match=r"token-id inputs of shape \(seq_len,\)"):
        models.build({"name": "transformer"}, (8, 8, 1), 10)


# ---------------------------------------------------------------------------------------------
# model.init="torch": PyTorch's nn.Linear / nn.Conv2d defaults.
# ---------------------------------------------------------------------------------------------


def _layers(params):
    """``[(path, kernel, bias or None, fan_in)]`` of every Dense/Conv layer of a params tree."""
    out = []

    def walk(node, path):
        if "kernel" in node and not isinstance(node["kernel"], dict):
            k = np.asarray(node["kernel"])
            out.append((path, k, None if "bias" not in node else np.asarray(node["bias"]), math.prod(k.shape[:-1])))
            return
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}/{key}")

    walk(params, "")
    return out


def _norms(params):
    return [(n, np.asarray(v)) for n, v in tree_lib.named_leaves(params)
            if "norm" in n.split("/")[-2] or n.split("/")[-2].startswith("ln")]


@pytest.mark.parametrize("name", sorted(TINY))
def test_torch_init_draws_every_layer_within_pytorchs_bound_and_leaves_norms_and_embeddings(name):
    cfg, shape = TINY[name]
    torch_net = models.build({**cfg, "init": "torch"}, shape, NUM_CLASSES)
    params = jax.device_get(jax.jit(torch_net.init)(jax.random.key(3))["params"])
    flax_params = jax.eval_shape(tiny_net(name).init, jax.random.key(3))["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(flax_params, params)
    if name in ("vit", "transformer"):  # the values of what "torch" leaves alone
        flax_params = jax.device_get(jax.jit(tiny_net(name).init)(jax.random.key(3))["params"])
    if name in models.OWN_INIT:  # BERT's own init under both values
        chex.assert_trees_all_equal(flax_params, params)
        return
    layers = _layers(params)
    assert layers
    for path, kernel, bias, fan_in in layers:
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound, path
        assert np.abs(kernel).max() > 0.5 * bound, path  # the bound of this fan_in, not of a larger one
        if bias is not None:  # PyTorch draws biases too; Flax's are zeros
            assert np.abs(bias).max() <= bound and np.count_nonzero(bias) == bias.size, path
    for path, value in _norms(params):  # LayerNorm/BatchNorm: scale 1, bias 0 in both libraries
        np.testing.assert_array_equal(value, np.ones_like(value) if path.endswith("scale") else np.zeros_like(value))
    if name == "vit":  # not layers: the model's own init, as a PyTorch ViT sets them by hand
        np.testing.assert_array_equal(params["embed"]["cls_token"], flax_params["embed"]["cls_token"])
        np.testing.assert_array_equal(params["embed"]["pos_embedding"], flax_params["embed"]["pos_embedding"])


def test_flax_init_is_unchanged_bit_for_bit_and_torch_init_is_per_seed():
    cfg, shape = {"name": "mlp", "depth": 1, "width": 8, "norm": "layer"}, (5,)
    default, flax_net, torch_net = (models.build(c, shape, NUM_CLASSES)
                                    for c in (cfg, {**cfg, "init": "flax"}, {**cfg, "init": "torch"}))
    keys = jax.random.split(jax.random.key(0), 2)

    def module_only(k):  # what Net.init did before model.init existed
        return dict(default.module.init(dict(zip(("params", "dropout"), jax.random.split(k))), jnp.zeros((1, *shape)),
                                        train=False))

    ref, a, b, t1, t2 = jax.jit(lambda ks: tuple(jax.vmap(f)(ks) for f in (
        module_only, default.init, flax_net.init, torch_net.init, torch_net.init)))(keys)
    chex.assert_trees_all_equal(a, ref)
    chex.assert_trees_all_equal(b, ref)
    chex.assert_trees_all_equal(t1, t2)  # reproducible
    chex.assert_trees_all_equal(t1["params"]["dense_0_norm"], ref["params"]["dense_0_norm"])
    kernel = t1["params"]["dense_0"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # seeds differ
    assert not np.allclose(kernel[0], ref["params"]["dense_0"]["kernel"][0])


def _uniform_moments_ok(values, bound, sigmas=5.0):
    """Mean 0 and variance bound^2/3 of U(±bound) within `sigmas` standard errors."""
    v = np.asarray(values, np.float64).ravel()
    n = v.size
    var = bound**2 / 3
    se_mean = math.sqrt(var / n)
    se_var = math.sqrt((bound**4 / 5 - var**2) / n)  # Var(X^2) = E[X^4] - E[X^2]^2 = 4 b^4 / 45
    assert abs(v.mean()) < sigmas * se_mean, (v.mean(), se_mean)
    assert abs(v.var() - var) < sigmas * se_var, (v.var(), var, se_var)
    assert np.abs(v).max() <= bound


def test_torch_init_moments_match_the_formulas_for_dense_and_conv():
    dense = models.build({"name": "mlp", "depth": 1, "width": 512, "init": "torch"}, (300,), 10)
    conv = models.build({"name": "vgg11", "width": 0.25, "norm": "none", "init": "torch"}, (8, 8, 16), 10)
    p_dense, p_conv = jax.jit(lambda k: (dense.init(k)["params"], conv.init(k)["params"]))(jax.random.key(7))
    # Dense kernel (in, out) = (300, 512): fan_in 300. Conv kernel (3, 3, in, out): fan_in 9 * in.
    _uniform_moments_ok(p_dense["dense_0"]["kernel"], 1 / math.sqrt(300))
    _uniform_moments_ok(p_dense["dense_0"]["bias"], 1 / math.sqrt(300))
    chex.assert_shape(p_conv["conv_3"]["kernel"], (3, 3, 64, 64))
    _uniform_moments_ok(p_conv["conv_3"]["kernel"], 1 / math.sqrt(9 * 64))
    _uniform_moments_ok(p_conv["conv_0"]["kernel"], 1 / math.sqrt(9 * 16))


def test_torch_init_has_the_distribution_of_pytorchs_own_linear_and_conv2d():
    torch = pytest.importorskip("torch")
    import scipy.stats

    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(300, 512), torch.nn.Conv2d(64, 64, 3)
    dense = models.build({"name": "mlp", "depth": 1, "width": 512, "init": "torch"}, (300,), 10)
    vgg = models.build({"name": "vgg11", "width": 0.25, "norm": "none", "init": "torch"}, (8, 8, 16), 10)
    p_dense, p_conv = jax.jit(lambda k: (dense.init(k)["params"], vgg.init(k)["params"]))(jax.random.key(11))
    ours_theirs = [(p_dense["dense_0"]["kernel"], linear.weight), (p_dense["dense_0"]["bias"], linear.bias),
                   (p_conv["conv_3"]["kernel"], conv.weight), (p_conv["conv_3"]["bias"], conv.bias)]
    for ours, theirs in ours_theirs:
        ours, theirs = np.asarray(ours).ravel(), theirs.detach().numpy().ravel()
        assert ours.size == theirs.size
        assert scipy.stats.ks_2samp(ours, theirs).pvalue > 1e-3  # the same distribution
        assert np.abs(ours).max() <= np.abs(theirs).max() * (1 + 2 / math.sqrt(ours.size)) + 1e-7
        if ours.size > 1000:
            np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.02)


@settings(max_examples=10)
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_torch_default_init_bounds_every_kernel_by_its_fan_in_property(shape, bias, seed):
    from tna_jax.models.layers import torch_default_init

    node = {"kernel": jnp.zeros(shape)} | ({"bias": jnp.zeros(shape[-1])} if bias else {})
    params = {"block": {"layer": node, "layer_norm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}}
    new = torch_default_init(params, jax.random.key(seed))
    bound = 1 / math.sqrt(math.prod(shape[:-1]))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
    assert float(jnp.abs(new["block"]["layer"]["kernel"]).max()) <= bound
    if bias:
        assert float(jnp.abs(new["block"]["layer"]["bias"]).max()) <= bound
    chex.assert_trees_all_equal(new["block"]["layer_norm"], params["block"]["layer_norm"])
