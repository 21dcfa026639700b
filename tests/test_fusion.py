"""Model soups and ColD fusion (tna_jax.fusion) on tiny models with real numbers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tna_jax import evaluation, fusion, models
from tna_jax import tree as tree_lib

IN, CLASSES = 8, 3


def _data(seed, n=96):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLASSES, IN)) * 2
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, IN))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


NET = models.build({"name": "mlp", "depth": 1, "width": 16}, (IN,), CLASSES)
EVAL = evaluation.make_eval_fn(NET, 64)


def _candidates(k, seed, scale=0.5):
    """K models around one trained-ish model: a shared init plus per-candidate noise."""
    base = NET.init(jax.random.key(seed))
    noise = [jax.tree.map(lambda p, i=i: p + scale * jax.random.normal(jax.random.key(1000 + seed * 31 + i), p.shape),
                          base) for i in range(k)]
    return fusion.stack_candidates(noise)


def _loop_eval(stacked, data):
    one = jax.jit(EVAL)
    rows = [one(v, *data) for v in tree_lib.unstack(stacked)]
    return np.array([float(r["accuracy"]) for r in rows]), np.array([float(r["loss"]) for r in rows])


def test_uniform_soup_is_the_mean():
    stacked = _candidates(4, 0)
    soup = fusion.uniform_soup(EVAL, stacked, _data(1))
    mean = jax.tree.map(lambda x: np.mean(np.asarray(x, np.float64), axis=0), stacked)
    chex.assert_trees_all_close(soup.params, mean, atol=1e-6)
    np.testing.assert_allclose(soup.weights, np.full(4, 0.25))
    assert soup.ingredients == [0, 1, 2, 3]
    direct = jax.jit(EVAL)(soup.params, *_data(1))
    assert soup.held_out_accuracy == pytest.approx(float(direct["accuracy"]))


def test_vmapped_evaluation_equals_the_loop():
    stacked = _candidates(5, 2)
    data = _data(3)
    out = fusion.evaluate_candidates(EVAL, stacked, data)
    acc, loss = _loop_eval(stacked, data)
    np.testing.assert_allclose(out.accuracy, acc, atol=1e-6)
    np.testing.assert_allclose(out.loss, loss, rtol=1e-5)
    chunked = fusion.evaluate_candidates(EVAL, stacked, data, chunk=2)
    np.testing.assert_allclose(chunked.loss, loss, rtol=1e-5)
    # soups as weight rows: one-hot rows are the candidates, a row of ones the uniform soup
    rows = np.vstack([np.eye(5), np.ones((1, 5)), [[1, 0, 2, 0, 0]]])
    soups = fusion.evaluate_soups(EVAL, stacked, data, weights=rows, chunk=3)
    np.testing.assert_allclose(soups.loss[:5], loss, rtol=1e-5)
    uniform = jax.jit(EVAL)(tree_lib.weighted_mean(stacked), *data)
    weighted = jax.jit(EVAL)(tree_lib.weighted_mean(stacked, jnp.array([1.0, 0, 2, 0, 0])), *data)
    assert soups.loss[5] == pytest.approx(float(uniform["loss"]), rel=1e-5)
    assert soups.loss[6] == pytest.approx(float(weighted["loss"]), rel=1e-5)


def _greedy_loop(stacked, data):
    """Wortsman et al.'s Algorithm 1 written as a plain Python loop (the reference)."""
    acc, _ = _loop_eval(stacked, data)
    order = np.argsort(-acc, kind="stable")
    cands = tree_lib.unstack(stacked)
    soup = [int(order[0])]
    best = acc[order[0]]
    for c in order[1:]:
        trial = fusion.stack_candidates([cands[i] for i in soup + [int(c)]])
        a = float(jax.jit(EVAL)(tree_lib.weighted_mean(trial), *data)["accuracy"])
        if a >= best:
            soup.append(int(c))
            best = a
    return soup, best


@settings(max_examples=6)
@given(k=st.integers(1, 6), seed=st.integers(0, 50), scale=st.sampled_from([0.05, 0.5, 2.0]))
def test_greedy_soup_properties_and_loop_equivalence(k, seed, scale):
    stacked = _candidates(k, seed, scale)
    held_out = _data(seed + 7)
    soup = fusion.greedy_soup(EVAL, stacked, held_out)
    best = int(np.argmax(soup.individual_accuracy))
    assert soup.ingredients[0] == best == soup.best_index  # includes the best model, first
    assert soup.held_out_accuracy >= soup.individual_accuracy[best] - 1e-7  # never lower than it
    assert len(soup.trials) == k - 1
    np.testing.assert_allclose(soup.weights.sum(), 1.0)
    np.testing.assert_allclose(soup.weights[soup.ingredients], 1.0 / len(soup.ingredients))
    # the soup's params are the mean of its ingredients, and its reported accuracy is real
    mean = tree_lib.weighted_mean(tree_lib.index(stacked, jnp.asarray(soup.ingredients)))
    chex.assert_trees_all_close(soup.params, mean, atol=1e-5)
    direct = float(jax.jit(EVAL)(soup.params, *held_out)["accuracy"])
    assert soup.held_out_accuracy == pytest.approx(direct, abs=1e-6)
    ingredients, acc = _greedy_loop(stacked, held_out)
    assert soup.ingredients == ingredients
    assert soup.held_out_accuracy == pytest.approx(acc, abs=1e-6)


def test_soup_errors():
    with pytest.raises(ValueError, match="at least one model"):
        fusion.stack_candidates([])
    a = NET.init(jax.random.key(0))
    b = models.build({"name": "mlp", "depth": 2, "width": 16}, (IN,), CLASSES).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"candidate 0 and candidate 1 .*dense_1"):
        fusion.stack_candidates([a, b])
    c = models.build({"name": "mlp", "depth": 1, "width": 8}, (IN,), CLASSES).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"candidate 1 differ in shape at path 'params/dense_0/bias'"):
        fusion.stack_candidates([a, c])
    with pytest.raises(ValueError, match="empty list; a soup needs at least one candidate"):
        fusion.greedy_soup(EVAL, [], _data(0))
    with pytest.raises(TypeError, match=r"a list of 2 models: stack them with fusion.stack_candidates"):
        fusion.uniform_soup(EVAL, [a, a], _data(0))
    with pytest.raises(ValueError, match=r"candidate 0 and candidate 1 differ in shape"):
        fusion.greedy_soup(EVAL, fusion.stack_candidates([a, c]), _data(0))
    empty = jax.tree.map(lambda x: x[:0], fusion.stack_candidates([a]))
    with pytest.raises(ValueError, match="0 candidates"):
        fusion.greedy_soup(EVAL, empty, _data(0))
    with pytest.raises(ValueError, match=r"shape \(num_soups, 2\)"):
        fusion.evaluate_soups(EVAL, fusion.stack_candidates([a, a]), _data(0), weights=np.ones(2))
    with pytest.raises(ValueError, match="row 1"):
        fusion.evaluate_soups(EVAL, fusion.stack_candidates([a, a]), _data(0), weights=[[1, 0], [0, 0]])


# --------------------------------------------------------------------------------------------
# ColD fusion.
# --------------------------------------------------------------------------------------------


def _tasks():
    """Three tasks with 3, 2 and 2 classes on the same 8-d inputs (different labelings)."""
    x, y = _data(11, 120)
    x2, y2 = _data(12, 80)
    x3, _ = _data(13, 100)
    parity = (np.asarray(x3)[:, 0] > 0).astype(np.int32)
    return [(np.asarray(x), np.asarray(y), 3), (np.asarray(x2), (np.asarray(y2) == 0).astype(np.int32), 2),
            (np.asarray(x3), parity, 2)]


def _heads(num_classes, seed=5):
    return [models.build({"name": "mlp", "depth": 1, "width": 16}, (IN,), k).init(jax.random.key(seed + i))["params"]["head"]
            for i, k in enumerate(num_classes)]


def test_pad_head_keeps_padded_classes_dead():
    tasks = fusion.stack_tasks(_tasks(), names=["a", "b", "c"])
    chex.assert_shape(tasks.x, (3, 120, IN))
    assert tasks.n.tolist() == [120, 80, 100] and tasks.max_classes == 3
    pretrained = NET.init(jax.random.key(0))["params"]
    out = fusion.cold_fusion(NET, optax.adamw(0.05, weight_decay=0.1), pretrained, _heads([3, 2, 2]), tasks,
                             rounds=2, steps=5, batch_size=16, key=jax.random.key(1))
    heads = out["heads"]
    # tasks b and c have 2 classes: their third logit is frozen at PAD_LOGIT with a zero column
    np.testing.assert_array_equal(np.asarray(heads["bias"])[1:, 2], fusion.PAD_LOGIT)
    np.testing.assert_array_equal(np.asarray(heads["kernel"])[1:, :, 2], 0.0)
    assert np.all(np.asarray(heads["kernel"])[0, :, 2] != 0.0)  # task a uses all three


def test_cold_round_shared_model_is_the_average_of_contributors():
    tasks = fusion.stack_tasks(_tasks())
    pretrained = NET.init(jax.random.key(0))["params"]
    body, _ = fusion.split_head(pretrained)
    padded = [fusion.pad_head(h, 3) for h in _heads([3, 2, 2])]
    heads = fusion.stack_candidates([p for p, _ in padded])
    frozen = fusion.stack_candidates([f for _, f in padded])
    round_fn = fusion.make_cold_round(NET, optax.sgd(0.1), steps=4, batch_size=8)
    body_mask, masks = fusion.cold_masks(body, frozen, None, 0.0, 0)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(3), c) for c in range(3)])
    shared, new_heads, contributors, losses = round_fn(body, heads, body_mask, masks, jnp.asarray(tasks.x),
                                                       jnp.asarray(tasks.y), jnp.asarray(tasks.n), keys)
    bodies, c_heads = fusion.split_head(contributors)
    mean = jax.tree.map(lambda b: np.mean(np.asarray(b, np.float64), axis=0), bodies)
    chex.assert_trees_all_close(shared, mean, atol=1e-6)
    chex.assert_trees_all_equal(new_heads, c_heads)
    chex.assert_shape(losses, (3,))
    # the contributors really moved, and differently
    moved = [float(jnp.abs(tree_lib.index(bodies, c)["dense_0"]["kernel"] - body["dense_0"]["kernel"]).max())
             for c in range(3)]
    assert min(moved) > 1e-3
    assert float(jnp.abs(bodies["dense_0"]["kernel"][0] - bodies["dense_0"]["kernel"][1]).max()) > 1e-4


@pytest.mark.parametrize("refresh", [False, True])
def test_cold_fusion_with_anchors(refresh):
    tasks = fusion.stack_tasks(_tasks())
    pretrained = NET.init(jax.random.key(0))["params"]
    shared_per_round, masks_per_round = [], []

    def evaluate(r, shared, heads, contributors):
        shared_per_round.append(shared)
        return {"round": r}

    out = fusion.cold_fusion(NET, optax.adam(0.05), pretrained, _heads([3, 2, 2]), tasks, rounds=3, steps=4,
                             batch_size=16, key=jax.random.key(2), ratio=0.4, refresh_mask=refresh,
                             evaluate=evaluate)
    assert [h["round"] for h in out["history"]] == [0, 1, 2, 3]
    body0, _ = fusion.split_head(pretrained)
    anchor_key = jax.random.fold_in(jax.random.key(2), 2**31 - 1)
    for r in range(1, 4):
        mask, _ = fusion.cold_masks(body0, fusion.stack_candidates([{"m": jnp.zeros(1, bool)}]), anchor_key, 0.4,
                                    r - 1, refresh=refresh)
        masks_per_round.append(mask)
        before, after = shared_per_round[r - 1], shared_per_round[r]
        for name, m, b, a in zip(tree_lib.leaf_names(mask), jax.tree.leaves(mask), jax.tree.leaves(before),
                                 jax.tree.leaves(after)):
            m, b, a = np.asarray(m), np.asarray(b), np.asarray(a)
            np.testing.assert_array_equal(a[m], b[m], err_msg=f"anchored entries of {name} moved in round {r}")
            assert np.mean(a[~m] != b[~m]) > 0.9, name  # the free entries were trained
        fraction = np.mean(np.concatenate([np.ravel(x) for x in jax.tree.leaves(mask)]))
        assert 0.3 < fraction < 0.5
    if not refresh:  # one mask for all rounds: anchored entries equal the pretrained values at the end
        final = out["shared"]
        for m, p, f in zip(jax.tree.leaves(masks_per_round[0]), jax.tree.leaves(body0), jax.tree.leaves(final)):
            np.testing.assert_array_equal(np.asarray(f)[np.asarray(m)], np.asarray(p)[np.asarray(m)])
    else:
        same = [np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(masks_per_round[0]), jax.tree.leaves(masks_per_round[1]))]
        assert not all(same)


def test_cold_fusion_errors():
    tasks = fusion.stack_tasks(_tasks())
    pretrained = NET.init(jax.random.key(0))["params"]
    with pytest.raises(ValueError, match="heads has 2 entries for 3 tasks"):
        fusion.cold_fusion(NET, optax.sgd(0.1), pretrained, _heads([3, 2]), tasks, rounds=1, steps=1, batch_size=4,
                           key=jax.random.key(0))
    with pytest.raises(ValueError, match="head 1 has 3 classes; task 'task_1' has 2"):
        fusion.cold_fusion(NET, optax.sgd(0.1), pretrained, _heads([3, 3, 2]), tasks, rounds=1, steps=1,
                           batch_size=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="labels in"):
        fusion.stack_tasks([(np.zeros((3, IN)), np.array([0, 1, 2]), 2)])
    with pytest.raises(ValueError, match="at least one"):
        fusion.stack_tasks([])
    with pytest.raises(ValueError, match="max_classes must be an integer >= the head's 3 classes"):
        fusion.pad_head(_heads([3])[0], 2)
    with pytest.raises(ValueError, match="head='out' is not a top-level module"):
        fusion.split_head(pretrained, "out")
