"""Linear mode connectivity: paths, barriers, layer-wise LMC, BatchNorm reset, experiment kinds."""

import json
import os

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.util import tiny_config
from tna_jax import chunking, evaluation, lmc, models, norm_stats, runner
from tna_jax import report as report_lib
from tna_jax import tree as tree_lib
from tna_jax.models import Net


class BNMLP(nn.Module):
    """dense_0 -> BN -> relu -> dense_1 -> BN -> relu -> head (BatchNorm named <layer>_norm)."""

    width: int = 16
    num_classes: int = 10
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        for i in range(2):
            x = nn.Dense(self.width, name=f"dense_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name=f"dense_{i}_norm")(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="head")(x)


@models.register("test_bn_mlp")
def _bn_mlp(cfg, input_shape, num_classes):
    return BNMLP(width=cfg.get("width", 16), num_classes=num_classes), jnp.float32


def mlp_pair(width=16, depth=2, seed=0):
    net = models.build({"name": "mlp", "depth": depth, "width": width}, (40,), 10)
    return net, net.init(jax.random.key(seed)), net.init(jax.random.key(seed + 1))


def data(n=200, seed=7):
    x = jax.random.normal(jax.random.key(seed), (n, 40))
    y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 10)
    return x, y


@pytest.fixture(scope="module")
def setup():
    net, a, b = mlp_pair()
    return net, a, b, evaluation.make_eval_fn(net, 64), data()


# ---------------------------------------------------------------------------------------------
# Paths and barriers.
# ---------------------------------------------------------------------------------------------


def test_path_endpoints_are_the_endpoint_models_and_vmap_chunks_and_loop_agree(setup):
    net, a, b, eval_fn, (x, y) = setup
    alphas = lmc.default_alphas(9)
    path = lmc.lmc_path(eval_fn, a, b, (x, y), alphas=alphas)
    chex.assert_shape([path.loss, path.accuracy], (9,))
    ea, eb = jax.jit(eval_fn)(a, x, y), jax.jit(eval_fn)(b, x, y)
    for key in ("loss", "accuracy"):
        assert getattr(path, key)[0] == ea[key] and getattr(path, key)[-1] == eb[key]
    loop = [jax.jit(eval_fn)(lmc.interpolate(a, b, float(t)), x, y) for t in alphas]
    np.testing.assert_allclose(path.loss, [p["loss"] for p in loop], rtol=1e-6)
    np.testing.assert_array_equal(path.accuracy, [p["accuracy"] for p in loop])
    for chunk in (1, 4, 100):
        chunked = lmc.lmc_path(eval_fn, a, b, (x, y), alphas=alphas, chunk=chunk)
        np.testing.assert_allclose(chunked.loss, path.loss, rtol=1e-6)
        np.testing.assert_array_equal(chunked.accuracy, path.accuracy)
    # The pairwise table (vmapped over pairs and α) agrees with single paths.
    stacked = jax.tree.map(lambda *v: jnp.stack(v), a, b, mlp_pair(seed=5)[1])
    table = lmc.pairwise_barriers(eval_fn, stacked, (x, y), alphas=alphas, chunk=5)
    assert table.pairs == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(table.paths.loss[0], path.loss, rtol=1e-6)
    assert table.loss_barrier[0, 1] == table.loss_barrier[1, 0] == table.per_pair[0].loss_barrier


def test_auto_chunk_fits_the_budget_and_gives_the_same_numbers(setup):
    net, a, b, eval_fn, (x, y) = setup
    alphas = lmc.default_alphas(9)
    full = lmc.lmc_path(eval_fn, a, b, (x, y), alphas=alphas, chunk=None)
    auto = lmc.lmc_path(eval_fn, a, b, (x, y), alphas=alphas)  # the default is "auto"
    np.testing.assert_allclose(auto.loss, full.loss, rtol=1e-6)
    np.testing.assert_array_equal(auto.accuracy, full.accuracy)

    def point(alpha):
        return eval_fn(lmc.interpolate(a, b, alpha), x, y)

    per_point = chunking.intermediate_bytes(jax.make_jaxpr(point)(jnp.float32(0.5)).jaxpr)
    # The activations of 200 examples through a 16-wide MLP are part of the count.
    assert per_point >= 200 * 16 * 4
    alphas_arr = jnp.asarray(alphas)
    assert chunking.auto_chunk(point, alphas_arr, budget_bytes=3 * per_point) == 3
    assert chunking.auto_chunk(point, alphas_arr, budget_bytes=per_point // 2) == 1  # never below one point
    assert chunking.auto_chunk(point, alphas_arr, budget_bytes=1 << 40) == 9  # never above the point count


def test_intermediate_bytes_counts_a_scan_body_once():
    body_only = jax.make_jaxpr(lambda v: jnp.sin(v) * 2.0)(jnp.ones(100)).jaxpr

    def scanned(v):
        return jax.lax.scan(lambda c, _: (jnp.sin(c) * 2.0, None), v, None, length=50)[0]

    scan_bytes = chunking.intermediate_bytes(jax.make_jaxpr(scanned)(jnp.ones(100)).jaxpr)
    assert chunking.intermediate_bytes(body_only) == 2 * 100 * 4
    # The body's buffers once (not 50 times), plus the scan's own output.
    assert 2 * 100 * 4 <= scan_bytes <= 4 * 100 * 4


def test_a_model_with_itself_has_zero_barrier(setup):
    _, a, _, eval_fn, d = setup
    b = lmc.barriers(lmc.lmc_path(eval_fn, a, a, d, alphas=lmc.default_alphas(7)))
    # (1 - α) θ + α θ is θ up to one rounding, so the loss barrier is zero up to float32 rounding.
    assert abs(b.loss_barrier) <= 1e-6 and b.accuracy_barrier == 0.0
    assert b.interp_accuracy == b.avg_endpoint_accuracy


def product_eval(v, x, y):
    """f(x) = w2 w1 x with squared error; 'correct' when |f(x) − y| < 0.5."""
    pred = v["l2"]["kernel"] * v["l1"]["kernel"] * x
    return {"loss": jnp.mean((pred - y) ** 2), "accuracy": jnp.mean(jnp.abs(pred - y) < 0.5)}


def test_an_analytic_non_convex_path_has_the_known_barrier():
    # A = (1, 1) and B = (−1, −1) both fit y = x exactly; on the line w1 = w2 = 1 − 2α the loss is
    # ((1 − 2α)² − 1)², 0 at both ends and 1 at α = 0.5: loss barrier exactly 1. Accuracy is 1
    # where (1 − 2α)² > 0.5, i.e. |1 − 2α| > 1/√2, and 0 in between: accuracy barrier 1.
    a = {"l1": {"kernel": jnp.array(1.0)}, "l2": {"kernel": jnp.array(1.0)}}
    b = jax.tree.map(jnp.negative, a)
    alphas = lmc.default_alphas(25)
    path = lmc.lmc_path(product_eval, a, b, (jnp.ones(3), jnp.ones(3)), alphas=alphas)
    expected = ((1 - 2 * alphas) ** 2 - 1) ** 2
    np.testing.assert_allclose(path.loss, expected, atol=1e-6)
    np.testing.assert_array_equal(path.accuracy, (np.abs(1 - 2 * alphas) > 2 ** -0.5).astype(np.float32))
    out = lmc.barriers(path)
    assert out.loss_barrier == pytest.approx(1.0, abs=1e-6)
    assert out.argmax_alpha_loss == 0.5
    assert out.accuracy_barrier == 1.0 and out.interp_accuracy == 0.0
    # Extrapolation (α outside [0, 1]) is allowed: α = 1.5 is (−2, −2), prediction 4, loss 9.
    ext = lmc.lmc_path(product_eval, a, b, (jnp.ones(3), jnp.ones(3)), alphas=[-0.5, 0.0, 1.0, 1.5])
    np.testing.assert_allclose(ext.loss, [9.0, 0.0, 0.0, 9.0], rtol=1e-6)


finite = st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False, allow_infinity=False)


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=5), elements=finite),
       hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=5), elements=finite))
def test_interpolation_endpoints_are_exact(x, y):
    y = np.resize(y, x.shape)
    a, b = {"w": jnp.asarray(x), "step": jnp.int32(3)}, {"w": jnp.asarray(y), "step": jnp.int32(9)}
    at0, at1 = lmc.interpolate(a, b, 0.0), lmc.interpolate(a, b, 1.0)
    np.testing.assert_array_equal(np.asarray(at0["w"]), x)
    np.testing.assert_array_equal(np.asarray(at1["w"]), y)
    assert int(at0["step"]) == 3 and int(at1["step"]) == 9
    assert at0["w"].dtype == jnp.float32


@given(st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_barriers_are_non_negative_and_bound_the_gap(k, seed):
    rng = np.random.default_rng(seed)
    alphas = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, k - 2)]))
    path = {"alpha": alphas, "loss": rng.uniform(0, 5, k), "accuracy": rng.uniform(0, 1, k)}
    out = lmc.barriers(path)
    assert out.loss_barrier >= 0.0 and out.accuracy_barrier >= 0.0
    i0, i1 = 0, k - 1
    chord = (1 - alphas) * path["loss"][i0] + alphas * path["loss"][i1]
    assert out.loss_barrier == pytest.approx(max(0.0, float(np.max(path["loss"] - chord))))


# ---------------------------------------------------------------------------------------------
# Layer-wise LMC.
# ---------------------------------------------------------------------------------------------


def test_layerwise_with_all_layers_equals_full_lmc_exactly(setup):
    net, a, b, eval_fn, d = setup
    alphas = lmc.default_alphas(7)
    full = lmc.lmc_path(eval_fn, a, b, d, alphas=alphas)
    one = lmc.layerwise_lmc(eval_fn, a, b, d, groups=[".*"], alphas=alphas)
    np.testing.assert_array_equal(one.paths.loss[0], full.loss)
    np.testing.assert_array_equal(one.paths.accuracy[0], full.accuracy)
    for mode in ("from_input", "from_output"):
        cum = lmc.layerwise_lmc(eval_fn, a, b, d, alphas=alphas, mode=mode, layer_order=net.layer_order())
        assert len(cum.groups) == 3
        np.testing.assert_array_equal(cum.paths.loss[-1], full.loss)
        assert cum.per_group[-1] == lmc.barriers(full)
    single = lmc.layerwise_lmc(eval_fn, a, b, d, alphas=alphas, chunk=4)
    assert single.groups == ["dense_0", "dense_1", "head"]
    assert single.members[0] == ["params/dense_0/bias", "params/dense_0/kernel"]
    chex.assert_shape(single.paths.loss, (3, 7))
    # Each single-group path starts at A and ends at A with that layer from B.
    a_loss = float(jax.jit(eval_fn)(a, *d)["loss"])
    hybrid = {"params": {**a["params"], "head": b["params"]["head"]}}
    np.testing.assert_allclose(single.paths.loss[:, 0], a_loss, rtol=1e-6)
    np.testing.assert_allclose(single.paths.loss[2, -1], jax.jit(eval_fn)(hybrid, *d)["loss"], rtol=1e-6)


def test_layer_groups_take_norms_and_batch_stats_with_their_layer_and_accept_regexes_and_lists():
    net = Net("bn", BNMLP(width=4), (40,), 10)
    v = net.init(jax.random.key(0))
    groups = dict(lmc.layer_groups(v, layer_order=net.layer_order()))
    names = [n for n, _ in tree_lib.named_leaves(v)]
    chosen = [n for n, s in zip(names, groups["dense_1"]) if s]
    assert chosen == ["batch_stats/dense_1_norm/mean", "batch_stats/dense_1_norm/var", "params/dense_1/bias",
                      "params/dense_1/kernel", "params/dense_1_norm/bias", "params/dense_1_norm/scale"]
    custom = lmc.layer_groups(v, {"hidden": ["dense_0", "dense_1"], "out": r"^head/"})
    assert [n for n, _ in custom] == ["hidden", "out"]
    assert custom[0][1].sum() == 12 and custom[1][1].sum() == 2


def test_errors_name_the_argument_and_the_value(setup):
    net, a, b, eval_fn, d = setup
    _, wide, _ = mlp_pair(width=32)
    with pytest.raises(ValueError, match="differ in shape at path 'params/dense_0/bias'"):
        lmc.lmc_path(eval_fn, a, wide, d)
    _, deep, _ = mlp_pair(depth=3)
    with pytest.raises(ValueError, match="path 'params/dense_2/bias' is in model b but not in model a"):
        lmc.layerwise_lmc(eval_fn, a, deep, d)
    with pytest.raises(ValueError, match="data is empty"):
        lmc.lmc_path(eval_fn, a, b, (d[0][:0], d[1][:0]))
    with pytest.raises(TypeError, match="data must be a pair"):
        lmc.lmc_path(eval_fn, a, b, d[0])
    with pytest.raises(ValueError, match="chunk must be a positive integer, None .* or 'auto'; got 0"):
        lmc.pairwise_barriers(eval_fn, jax.tree.map(lambda *t: jnp.stack(t), a, b), d, chunk=0)
    with pytest.raises(ValueError, match="group 'conv' selects no leaf; the leaves are: dense_0/bias, dense_0/kernel"):
        lmc.layerwise_lmc(eval_fn, a, b, d, groups=["conv"])
    with pytest.raises(ValueError, match="groups entry 'dense_7' names no layer or leaf"):
        lmc.layerwise_lmc(eval_fn, a, b, d, groups=[["dense_7"]])
    with pytest.raises(ValueError, match="mode must be one of"):
        lmc.layerwise_lmc(eval_fn, a, b, d, mode="cumulative")
    with pytest.raises(ValueError, match="alphas must be finite"):
        lmc.lmc_path(eval_fn, a, b, d, alphas=[0.0, float("nan")])
    with pytest.raises(ValueError, match="needs a path that contains alpha = 0 and alpha = 1"):
        lmc.barriers({"alpha": [0.2, 0.5], "loss": [1, 1], "accuracy": [1, 1]})
    with pytest.raises(ValueError, match="needs variables with 'batch_stats'"):
        norm_stats.reset_bn_stats(net, a, d[0])
    with pytest.raises(ValueError, match="with_bn_reset needs a net with BatchNorm"):
        norm_stats.with_bn_reset(net, eval_fn, d[0])


# ---------------------------------------------------------------------------------------------
# Which seed pairs (analysis.pairs) and the sample std over them.
# ---------------------------------------------------------------------------------------------


@given(n=st.integers(0, 40), k=st.integers(0, 60), seed=st.integers(0, 2**31 - 1))
def test_pair_selections_are_disjoint_or_seeded_unique_subsets_of_all_pairs(n, k, seed):
    every = lmc.all_pairs(n)
    disjoint = lmc.disjoint_pairs(n)
    members = [i for pair in disjoint for i in pair]
    assert len(disjoint) == n // 2 and len(set(members)) == len(members)  # no model in two pairs
    assert set(disjoint) <= set(every)
    drawn = lmc.random_pairs(n, k, seed)
    assert drawn == lmc.random_pairs(n, k, seed) == sorted(drawn)  # seeded, in order
    assert len(drawn) == len(set(drawn)) == min(k, len(every)) and set(drawn) <= set(every)
    assert lmc.select_pairs(n, "random", k or None, seed) == (drawn if k else every)
    assert lmc.select_pairs(n, "all", k or None) == (every[:k] if k else every)
    assert lmc.select_pairs(n, "disjoint", k or None) == (disjoint[:k] if k else disjoint)


def test_random_pairs_spread_over_the_seeds_where_the_first_pairs_all_hold_seed_0():
    first = lmc.select_pairs(8, "all", 10)
    assert sum(0 in p for p in first) == 7  # the issue: 7 of the first 10 of 28 pairs share seed 0
    counts = np.zeros(8)
    for seed in range(200):
        for p in lmc.select_pairs(8, "random", 10, seed):
            counts[list(p)] += 1
    # each seed is in 7 of the 28 pairs, so in 10 * 7 / 28 = 2.5 of 10 drawn pairs on average
    np.testing.assert_allclose(counts / 200, 2.5, atol=0.25)
    assert lmc.select_pairs(8, "random", 10, 0) != lmc.select_pairs(8, "random", 10, 1)
    assert lmc.describe_pairs("random", 10, 8, 3) == "10 random pairs of 28 (pairs_seed 3)"
    assert lmc.describe_pairs("all", 6, 4) == "all 6 pairs (overlapping)"
    with pytest.raises(ValueError, match=r"pairs mode must be one of \('all', 'disjoint', 'random'\); got 'first'"):
        lmc.select_pairs(4, "first")


@given(st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=12))
def test_mean_std_is_the_sample_std_and_none_when_undefined(values):
    import statistics

    mean, std = report_lib.mean_std(values)
    if not values:
        assert (mean, std) == (None, None)
        return
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-9)
    if len(values) < 2:
        assert std is None
    else:
        assert std == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics reset.
# ---------------------------------------------------------------------------------------------


def test_reset_bn_stats_recovers_the_true_batch_statistics():
    net = Net("bn", BNMLP(width=8), (40,), 10)
    v = net.init(jax.random.key(0))
    v = {**v, "params": jax.tree.map(lambda p: p + 0.3, v["params"])}  # non-trivial BN scale/bias
    x = jax.random.normal(jax.random.key(1), (250, 40)) * 2.0 + 1.0
    bs, nb = 60, 4  # 240 of the 250 examples are used; the last 10 are dropped
    new = norm_stats.reset_bn_stats(net, v, x, batch_size=bs)
    # Reference 1: a copy of the net whose BatchNorm has momentum 0 stores each batch's exact
    # statistics after one training-mode step.
    exact = Net("bn0", BNMLP(width=8, momentum=0.0), (40,), 10)
    per_batch = [exact.apply(v, x[i * bs:(i + 1) * bs], train=True)[1]["batch_stats"] for i in range(nb)]
    for layer in ("dense_0_norm", "dense_1_norm"):
        means = np.stack([p[layer]["mean"] for p in per_batch])
        variances = np.stack([p[layer]["var"] for p in per_batch])
        mean = means.mean(0)
        population = (variances + means**2).mean(0) - mean**2
        np.testing.assert_allclose(new["batch_stats"][layer]["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["batch_stats"][layer]["var"], population, rtol=1e-4, atol=1e-6)
        torch_like = norm_stats.reset_bn_stats(net, v, x, batch_size=bs, variance="pytorch")["batch_stats"][layer]["var"]
        np.testing.assert_allclose(torch_like, (variances * bs / (bs - 1)).mean(0), rtol=1e-4, atol=1e-6)
    # Reference 2: the first BatchNorm's input is x W + b, so its statistics are plain numpy.
    h = np.asarray(x[: nb * bs], np.float64) @ np.asarray(v["params"]["dense_0"]["kernel"], np.float64) \
        + np.asarray(v["params"]["dense_0"]["bias"], np.float64)
    np.testing.assert_allclose(new["batch_stats"]["dense_0_norm"]["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["dense_0_norm"]["var"], h.var(0), rtol=1e-4)
    chex.assert_trees_all_equal(new["params"], v["params"])
    # Inside vmap over α (the BN-reset path) it matches a loop over α.
    b = net.init(jax.random.key(3))
    eval_fn = norm_stats.with_bn_reset(net, evaluation.make_eval_fn(net, 100), x, batch_size=bs)
    y = jnp.zeros(250, jnp.int32)
    path = lmc.lmc_path(eval_fn, v, b, (x, y), alphas=[0.0, 0.5, 1.0])
    loop = [jax.jit(eval_fn)(lmc.interpolate(v, b, t), x, y)["loss"] for t in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(path.loss, loop, rtol=1e-5)
    with pytest.raises(ValueError, match="num_batches=9 exceeds the 4 full batches of 60"):
        norm_stats.reset_bn_stats(net, v, x, batch_size=bs, num_batches=9)


# ---------------------------------------------------------------------------------------------
# Experiment kinds (smoke, in-process, a few seconds).
# ---------------------------------------------------------------------------------------------


def test_grid_and_layerwise_kinds_run_and_report(tmp_path):
    c = tiny_config(kind="grid", train__epochs=1, data__num_samples=300, analysis__num_alphas=3,
                    train__tensorboard=False)
    c.sweep.anchor_ratios = (0.0, 0.5)
    c.sweep.prune_ratios = (0.5,)
    c.analysis.plots = True
    c.analysis.bn_reset_examples = 128
    c.model.init = "torch"  # a protocol choice of the grid: kept by variants that replace the model
    # Variants run in key order (ml_collections sorts keys); labels name them in tables.
    c.grid = ml_collections.ConfigDict({"variants": {
        "1_bn": {"label": "BN-MLP", "axis": "width", "x": 8, "set": {"model": {"name": "test_bn_mlp", "width": 8}}},
    }})
    report = runner.run(c, str(tmp_path / "grid"))
    # 3 arms, each with and without the BatchNorm statistics reset.
    assert [r["arm"] for r in report["rows"]] == ["vanilla", "vanilla (BN reset)", "TNA-PFN 0.5",
                                                  "TNA-PFN 0.5 (BN reset)", "prune 0.5", "prune 0.5 (BN reset)"]
    assert all(r["pairs"] == 1 and r["accuracy_barrier_mean"] >= 0 and r["label"] == "BN-MLP" for r in report["rows"])
    assert report["variants"]["1_bn"]["training"]["epoch_compiles"] == 1  # 3 arms, one compiled epoch
    sub = json.load(open(tmp_path / "grid" / "variants" / "1_bn" / "report.json"))
    assert set(sub["lmc"]["vanilla"]["bn_reset"]) >= {"accuracy_barrier_mean", "curve", "fusion"}
    assert sub["model"]["init"] == "torch" and sub["lmc"]["vanilla"]["pairs_note"] == "1 pair"
    assert all(r["accuracy_barrier_std"] is None for r in report["rows"])  # one pair: no sample std
    assert "mean ± sample std over 1 pair of seeds per arm" in report["markdown"]
    for name in ("report.md", "accuracy_barrier_vs_width.png", "variants/1_bn/ratio_sweep.png",
                 "variants/1_bn/ratio_sweep_bn_reset.png", "variants/1_bn/lmc_paths.png"):
        assert os.path.getsize(tmp_path / "grid" / name) > 0
    c.grid.variants = ml_collections.ConfigDict({"bad": {"set": {"optimizer": {"name": "rmsprop"}}}})
    with pytest.raises(ValueError, match=r"config.grid.variants.bad: config.optimizer.name must be one of"):
        runner.run(c, str(tmp_path / "grid2"))

    c = tiny_config(kind="layerwise", train__epochs=1, data__num_samples=300, analysis__num_alphas=3,
                    train__tensorboard=False)
    c.layerwise = ml_collections.ConfigDict({"modes": ("single", "from_input")})
    report = runner.run(c, str(tmp_path / "lw"))
    lw = report["layerwise"]
    assert list(lw) == ["vanilla", "TNA-PFN 0.4"] and report["layerwise_compiles"] == {"jit(compute)": 1}
    for arm, by_mode in lw.items():
        assert by_mode["single"]["groups"] == ["dense_0", "head"]
        # The last cumulative group is the whole model: its barrier is the full LMC barrier.
        full = report["train"]["lmc"][arm]["loss_barrier_mean"]
        assert by_mode["from_input"]["loss_barrier_mean"][-1] == pytest.approx(full, abs=1e-6)
    text = open(tmp_path / "lw" / "report.md").read()
    assert "### mode `from_input`" in text and "Mean ± sample std over 1 pair of seeds per arm." in text


def test_named_leaves_names_each_structure_and_returns_the_given_leaves():
    """Names are cached per tree structure: a tree of the same structure gets the same names with
    its own leaves, another structure its own names."""
    a = {"dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "head": [jnp.ones(1), jnp.ones(2)]}
    b = jax.tree.map(lambda x: x + 1, a)
    first, second = tree_lib.named_leaves(a), tree_lib.named_leaves(b)
    assert [n for n, _ in first] == [n for n, _ in second] == ["dense_0/bias", "dense_0/kernel", "head/0", "head/1"]
    assert all(x is y for (_, x), y in zip(second, jax.tree.leaves(b), strict=True))
    other = tree_lib.named_leaves({"dense_0": {"kernel": 1.0}, "tail": (2.0,)})
    assert other == [("dense_0/kernel", 1.0), ("tail/0", 2.0)]
