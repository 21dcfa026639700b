"""The analysis API's one convention: ``fn(eval_fn, models..., data, *, options)``, typed results,
old call forms that still work with a DeprecationWarning, and compiled programs cached per
eval_fn without recompiling for an equal one or keeping a dropped one alive."""

import gc
import weakref

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax import align, evaluation, fusion, lmc, models, norm_stats
from tna_jax import report as report_lib
from tna_jax import tree as tree_lib
from tna_jax.models import Net
from tna_jax.training import TrainState


def _mlp(seed=0):
    net = models.build({"name": "mlp", "depth": 1, "width": 8}, (6,), 3)
    return net, net.init(jax.random.key(seed)), net.init(jax.random.key(seed + 1))


def _data(n=40, seed=5):
    x = jax.random.normal(jax.random.key(seed), (n, 6))
    return x, jax.random.randint(jax.random.key(seed + 1), (n,), 0, 3)


ALPHAS = [0.0, 0.25, 0.5, 1.0]


def test_old_argument_orders_warn_and_give_the_same_numbers():
    net, a, b = _mlp()
    eval_fn, d = evaluation.make_eval_fn(net, 16), _data()
    new = lmc.lmc_path(eval_fn, a, b, d, alphas=ALPHAS)
    assert isinstance(new, lmc.LMCPath) and new.loss.shape == (4,)
    with pytest.warns(DeprecationWarning, match=r"lmc_path\(eval_fn, a, b, alphas, data\) is deprecated"):
        old = lmc.lmc_path(eval_fn, a, b, ALPHAS, d)
    with pytest.warns(DeprecationWarning, match="lmc_path"):
        old_kw = lmc.lmc_path(eval_fn, a, b, ALPHAS, data=d)
    for o in (old, old_kw):
        np.testing.assert_array_equal(o.loss, new.loss)
        np.testing.assert_array_equal(o.accuracy, new.accuracy)

    lw = lmc.layerwise_lmc(eval_fn, a, b, d, groups=["dense_0"], alphas=ALPHAS)
    with pytest.warns(DeprecationWarning, match=r"layerwise_lmc\(eval_fn, a, b, groups, data\)"):
        lw_old = lmc.layerwise_lmc(eval_fn, a, b, ["dense_0"], d, alphas=ALPHAS)
    assert isinstance(lw, lmc.LayerwiseLMC) and lw.groups == lw_old.groups == ["dense_0"]
    np.testing.assert_array_equal(lw.paths.loss, lw_old.paths.loss)

    stacked = tree_lib.stack([a, b])
    rows = [[1, 0], [1, 1]]
    soups = fusion.evaluate_soups(eval_fn, stacked, d, weights=rows)
    with pytest.warns(DeprecationWarning, match=r"evaluate_soups\(eval_fn, stacked, weights, data\)"):
        soups_old = fusion.evaluate_soups(eval_fn, stacked, rows, d)
    assert isinstance(soups, evaluation.Metrics)
    np.testing.assert_array_equal(soups.loss, soups_old.loss)
    with pytest.warns(DeprecationWarning, match="held_out"):
        soup_old = fusion.uniform_soup(eval_fn, stacked, held_out=d)
    assert soup_old.held_out_loss == fusion.uniform_soup(eval_fn, stacked, d).held_out_loss


def test_results_are_named_tuples_and_dict_access_still_works_with_a_warning():
    net, a, b = _mlp()
    eval_fn, d = evaluation.make_eval_fn(net, 16), _data()
    table = lmc.pairwise_barriers(eval_fn, tree_lib.stack([a, b, a]), d, alphas=ALPHAS)
    assert isinstance(table, lmc.PairwiseBarriers) and isinstance(table.paths, lmc.LMCPath)
    assert all(isinstance(p, lmc.Barriers) for p in table.per_pair)
    # Models 0 and 2 are the same model: no barrier, the path is flat.
    assert table.per_pair[1].loss_barrier == pytest.approx(0.0, abs=1e-6)
    assert table.loss_barrier[0, 1] == table.per_pair[0].loss_barrier
    with pytest.warns(DeprecationWarning, match=r'result\["per_pair"\]'):
        assert table["per_pair"] is table.per_pair
    with pytest.warns(DeprecationWarning, match="result.items"):
        assert dict(table.per_pair[0].items())["loss_barrier"] == table.per_pair[0].loss_barrier
    assert table[0] == table.pairs  # tuple indexing is the tuple's
    with pytest.raises(KeyError):
        table["no_such_field"]


def test_fuse_is_a_deprecated_uniform_soup_with_its_old_numbers():
    net, a, b = _mlp()
    eval_fn, d = evaluation.make_eval_fn(net, 16), _data()
    stacked = tree_lib.stack([a, b, a])
    soup = fusion.uniform_soup(eval_fn, stacked, d)
    with pytest.warns(DeprecationWarning, match="fusion.uniform_soup"):
        old = lmc.fuse(eval_fn, stacked, d)
    chex.assert_trees_all_equal(old["fused"], soup.params)
    ind = [float(jax.jit(eval_fn)(m, *d)["accuracy"]) for m in (a, b, a)]
    assert old["mean_individual_accuracy"] == soup.mean_individual_accuracy == pytest.approx(np.mean(ind))
    assert old["accuracy_barrier"] == soup.accuracy_barrier == soup.mean_individual_accuracy - soup.held_out_accuracy
    assert old["fused_accuracy"] == soup.held_out_accuracy
    with pytest.warns(DeprecationWarning, match=r"uniform_soup\(eval_fn, stacked, data, weights\)"):
        weighted_old = fusion.uniform_soup(eval_fn, stacked, d, [1.0, 0.0, 1.0])
    weighted = fusion.uniform_soup(eval_fn, stacked, d, weights=[1.0, 0.0, 1.0])
    assert weighted.ingredients == weighted_old.ingredients == [0, 2]
    # A soup of a model with itself is that model.
    assert weighted.held_out_accuracy == pytest.approx(ind[0])


def test_evaluate_runs_takes_data_and_returns_metrics():
    net, a, b = _mlp()
    d = _data()
    state = TrainState(tree_lib.stack([a["params"], b["params"]]), {}, (), jnp.zeros(2, jnp.int32))
    out = evaluation.evaluate_runs(net, state, d, batch_size=16)
    assert isinstance(out, evaluation.Metrics) and out.loss.shape == (2,)
    np.testing.assert_allclose(out.loss[1], float(jax.jit(evaluation.make_eval_fn(net, 16))(b, *d)["loss"]),
                               rtol=1e-5)
    with pytest.warns(DeprecationWarning, match=r"evaluate_runs\(net, state, x, y, batch_size\)"):
        old = evaluation.evaluate_runs(net, state, d[0], d[1], 16)
    np.testing.assert_array_equal(old.accuracy, out.accuracy)


def test_an_equal_fresh_eval_fn_does_not_recompile_and_a_dropped_one_is_not_kept():
    net, a, b = _mlp(seed=3)
    d = _data(n=24)
    assert evaluation.make_eval_fn(net, 12) is evaluation.make_eval_fn(net, batch_size=12)
    with report_lib.count_compiles() as compiles:
        for _ in range(3):  # a fresh call each time, as an experiment loop would make it
            lmc.lmc_path(evaluation.make_eval_fn(net, 12), a, b, d, alphas=ALPHAS)
            fusion.uniform_soup(evaluation.make_eval_fn(net, 12), tree_lib.stack([a, b]), d)
    assert compiles["jit(compute)"] == 1, compiles
    assert compiles["jit(eval_fn)"] == 2, compiles  # the soup's vmapped and single evaluations

    x_reset = jnp.ones((8, 6))
    closure = norm_stats.with_bn_reset(_BN_NET, evaluation.make_eval_fn(_BN_NET, 12), x_reset, batch_size=4)
    bn_a, bn_b = _BN_NET.init(jax.random.key(0)), _BN_NET.init(jax.random.key(1))
    path = lmc.lmc_path(closure, bn_a, bn_b, d, alphas=ALPHAS)
    assert path.loss.shape == (4,)
    alive = weakref.ref(closure)
    del closure
    gc.collect()
    assert alive() is None  # the program cache held neither the closure nor the data it closes over


class _TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train, name="dense_0_norm")(nn.Dense(8, name="dense_0")(x))
        return nn.Dense(3, name="head")(nn.relu(x))


_BN_NET = Net("tiny_bn", _TinyBN(), (6,), 3)


def test_one_bn_reset_and_one_norm_naming_rule():
    net = models.build({"name": "mlp", "depth": 1, "width": 4}, (3,), 2)
    v = net.init(jax.random.key(0))
    with pytest.warns(DeprecationWarning, match="norm_stats.reset_bn_stats"):
        assert align.reset_batch_stats(net, v, jnp.ones((8, 3))) is v
    assert tree_lib.norm_owner("stage0/conv1_norm") == "stage0/conv1"
    assert tree_lib.norm_owner("head") is None
    params = {"dense_0": {"kernel": 1}, "dense_0_bn": {"scale": 1}}
    assert tree_lib.norm_module(params, "dense_0") == "dense_0_bn"
    names = ["params/dense_0/kernel", "params/dense_0_bn/scale", "batch_stats/dense_0_bn/mean"]
    variables = {"params": {"dense_0": {"kernel": jnp.ones((2, 2))}, "dense_0_bn": {"scale": jnp.ones(2)}},
                 "batch_stats": {"dense_0_bn": {"mean": jnp.ones(2)}}}
    groups = lmc.layer_groups(variables)
    assert [g for g, _ in groups] == ["dense_0"] and groups[0][1].tolist() == [True] * len(names)
