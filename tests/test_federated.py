"""Tests of tna_jax.federated: partitions, vmapped local training, the algorithms, FedBN, the
experiment kind, resume after SIGKILL and the multi-process run."""

import json
import os
import socket
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from util import ROOT

from tna_jax import anchors, data, models, runner, training
from tna_jax import sharding as sharding_lib
from tna_jax import tree as tree_lib
from tna_jax.config import ConfigError, default_config, federated_config, validate
from tna_jax.federated import algorithms, client, driver, partition
from tna_jax.models.base import Net

BATCH = 32


@pytest.fixture(scope="module")
def problem():
    ds = data.load({"source": "mnist1d", "num_samples": 600})
    net = models.build({"name": "mlp", "depth": 1, "width": 16}, ds.input_shape, ds.num_classes)
    d = data.to_device(ds)
    x, y = np.asarray(d.x_train), np.asarray(d.y_train)
    parts = partition.dirichlet(y[:240], 6, 0.5, seed=0, min_size=3)
    packed = client.pack_clients(x[:240], y[:240], parts)
    params = net.init(jax.random.key(0))["params"]
    return {"net": net, "x": x, "y": y, "parts": parts, "clients": packed, "params": params}


@pytest.fixture(scope="module")
def pfn(problem):
    """FedPFN with FedAvgM, half the clients per round; its jitted apply is shared by two tests."""
    alg = build(problem, "fedpfn", server_tx=algorithms.server_optimizer("fedavgm"), client_fraction=0.5)
    return alg, jax.jit(alg.apply)


def build(problem, method="fedavg", **kw):
    c = problem["clients"]
    kw.setdefault("anchor_key", jax.random.key(7) if method in ("fedpfn", "fedpnu") else None)
    if "mask_ratio" not in kw:  # the pre-0.2 name, tested on its own
        kw.setdefault("ratio", 0.4 if method in ("fedpfn", "fedpnu") else 0.0)
    return algorithms.federated_algorithm(problem["net"], optax.sgd(0.1, momentum=0.9), num_clients=len(problem["parts"]),
                                          max_examples=c.max_examples, batch_size=BATCH, method=method, **kw)


# ---------------------------------------------------------------------------------------------
# Partitions.
# ---------------------------------------------------------------------------------------------

labels_strategy = st.integers(20, 400).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 9), min_size=n, max_size=n), st.integers(1, 10), st.integers(0, 2**20)))


@given(labels_strategy, st.sampled_from(["iid", "dirichlet", "shards"]), st.sampled_from([0.1, 0.5, 1.0, 100.0]))
def test_every_example_goes_to_exactly_one_nonempty_client(case, method, alpha):
    labels, k, seed = case
    y = np.asarray(labels, np.int32)
    try:
        parts = partition.partition(y, k, method, alpha=alpha, shards_per_client=2, seed=seed)
    except ValueError as err:  # a Dirichlet draw that cannot give every client data is an error, never a bad split
        assert method == "dirichlet" and "min_size" in str(err)
        return
    assert len(parts) == k
    flat = np.concatenate(parts)
    assert np.array_equal(np.sort(flat), np.arange(len(y)))  # each example exactly once
    assert min(len(p) for p in parts) >= 1
    again = partition.partition(y, k, method, alpha=alpha, shards_per_client=2, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # a function of the seed
    if method == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_label_skew_grows_as_alpha_shrinks_and_shards_hold_few_classes():
    y = np.repeat(np.arange(10), 200)

    def classes_per_client(parts):
        hist = partition.label_histogram(y, parts, 10)
        return float(np.mean((hist / hist.sum(1, keepdims=True) > 0.05).sum(1)))

    skewed = classes_per_client(partition.dirichlet(y, 20, 0.1, seed=1))
    mild = classes_per_client(partition.dirichlet(y, 20, 100.0, seed=1))
    assert skewed < 4.0 < 9.0 < mild
    shard_parts = partition.shards(y, 20, 2, seed=0)
    assert max(len(np.unique(y[p])) for p in shard_parts) <= 2


@pytest.mark.parametrize("call, message", [
    (lambda y: partition.dirichlet(y, 4, 0.0), "alpha must be a finite number > 0"),
    (lambda y: partition.dirichlet(y, 4, -1.0), "alpha must be a finite number > 0"),
    (lambda y: partition.iid(y, 11), "num_clients=11 is more than the 10 training examples"),
    (lambda y: partition.dirichlet(y, 10, 0.01, min_size=1, max_tries=3), "some client still has fewer"),
    (lambda y: partition.shards(y, 6, 2), "12 shards is more than the 10 examples"),
    (lambda y: partition.partition(y, 2, "bogus"), "method must be one of"),
    (lambda y: client.pack_clients(np.zeros((10, 2)), y, [np.arange(10), np.array([], np.int64)]),
     "client 1 has no data"),
    (lambda y: algorithms.cohort_size(10, 0.0), r"client fraction must be in \(0, 1\]"),
    (lambda y: algorithms.cohort_size(10, 1.5), r"client fraction must be in \(0, 1\]"),
])
def test_bad_federations_are_errors_before_training(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.arange(10) % 3)


def test_bad_algorithm_arguments_are_errors(problem):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]; got 1.5"):
        build(problem, "fedpfn", ratio=1.5)
    with pytest.warns(DeprecationWarning, match=r"federated_algorithm\(..., ratio=...\)"):
        old = build(problem, "fedpfn", mask_ratio=0.5)
    assert isinstance(old, algorithms.FederatedAlgorithm)
    with pytest.raises(ValueError, match="fedprox needs prox_mu > 0"):
        build(problem, "fedprox")
    with pytest.raises(ValueError, match="needs anchor_key"):
        build(problem, "fedpnu", anchor_key=None).init(problem["params"])
    with pytest.raises(ValueError, match="bn must be one of"):
        build(problem, bn="shared")
    with pytest.raises(ValueError, match="server optimizer must be one of"):
        algorithms.server_optimizer("fedsgd")


@pytest.mark.parametrize("field, value, message", [
    ("alpha", 0.0, r"config.federated.alpha must be a number in \(0.0"),
    ("client_fraction", 0.0, r"config.federated.client_fraction must be a number in \(0.0, 1.0\]"),
    ("client_fraction", 1.2, r"config.federated.client_fraction must be a number in \(0.0, 1.0\]"),
    ("ratio", -0.1, r"config.federated.ratio must be a number in \[0.0, 1.0\]"),
    ("algorithms", ("fedavg", "scaffold"), "config.federated.algorithms must be a non-empty tuple"),
    ("sweep_ratios", (0.2, 1.5), "config.federated.sweep_ratios must be a tuple of ratios"),
    ("num_clent", 3, "config.federated.num_clent is not a known field \\(did you mean 'federated.num_clients'\\?\\)"),
])
def test_bad_federated_config_values_name_the_field(field, value, message):
    c = default_config()
    c.federated = federated_config()
    c.federated[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_the_old_config_name_mask_ratio_still_works_with_a_warning(tmp_path):
    from tna_jax.config import rename_fields
    from tna_jax.workdir import config_dict, prepare_workdir

    c = default_config()
    c.federated = federated_config()
    del c.federated["ratio"]
    c.federated.mask_ratio = 0.25
    with pytest.warns(DeprecationWarning, match=r"config.federated.mask_ratio is deprecated; use config.federated.ratio"):
        validate(c)
    assert c.federated.ratio == 0.25 and "mask_ratio" not in c.federated
    del c.federated["ratio"]
    c.federated.mask_ratio = 1.5  # a bad value under the old name is named under the new one
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match=r"config.federated.ratio must be a number"):
        validate(c)
    c = default_config()
    c.federated = federated_config()
    c.federated.ratio, c.federated.mask_ratio = 0.2, 0.3
    with pytest.raises(ConfigError, match="set only config.federated.ratio"):
        rename_fields(c)
    # A workdir written before the rename resumes with the new name.
    c = default_config()
    c.federated = federated_config()
    c.federated.ratio = 0.3
    old = config_dict(c)
    old["federated"]["mask_ratio"] = old["federated"].pop("ratio")
    workdir = tmp_path / "old"
    os.makedirs(workdir / "checkpoints" / "1")
    with open(workdir / "config.json", "w") as f:
        json.dump(old, f)
    prepare_workdir(c, str(workdir))  # no "config differs" error
    c.federated.ratio = 0.4
    with pytest.raises(ValueError, match=r"federated.ratio \(was 0.3, now 0.4\)"):
        prepare_workdir(c, str(workdir))


# ---------------------------------------------------------------------------------------------
# Local training and the algorithms.
# ---------------------------------------------------------------------------------------------


def test_fedpfn_anchors_never_move_on_any_client_or_on_the_server(problem, pfn):
    alg, apply = pfn
    state = alg.init(problem["params"])
    mask = state.mask
    assert 0.35 < anchors.mask_summary(mask)["overall"] < 0.45
    c = problem["clients"]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(c.num_rows))
    local = jax.jit(jax.vmap(alg.local_update, in_axes=(None, None, None, None, 0, 0, 0, 0)))(
        state.params, {}, state.params, mask, c.x, c.y, c.n, keys)
    for p, p0, m in zip(jax.tree.leaves(local.params), jax.tree.leaves(state.params), jax.tree.leaves(mask)):
        for k in range(c.num_rows):
            assert bool(jnp.all(p[k][m] == p0[m]))  # every client keeps the global model's anchors
            assert bool(jnp.any(p[k][~m] != p0[~m]))
    s = state
    for r in range(3):  # FedAvgM momentum builds up over rounds; anchors still stay bit-exact
        s, _ = apply(s, c, jax.random.key(r))
    for p, p0, m in zip(jax.tree.leaves(s.params), jax.tree.leaves(state.params), jax.tree.leaves(mask)):
        assert bool(jnp.all(p[m] == p0[m]))
        assert bool(jnp.any(p[~m] != p0[~m]))


def test_fedpnu_leaves_each_rounds_masked_entries_unchanged(problem):
    alg = build(problem, "fedpnu", server_tx=algorithms.server_optimizer("fedavgm"))
    s = alg.init(problem["params"])
    apply = jax.jit(alg.apply)
    masks = []
    for r in range(3):
        mask = anchors.anchor_mask(s.params, 0.4, jax.random.fold_in(jax.random.key(7), r))
        new, metrics = apply(s, problem["clients"], jax.random.key(10 + r))
        assert float(metrics["masked_fraction"]) == pytest.approx(anchors.mask_summary(mask)["overall"], abs=1e-6)
        for p, p0, m in zip(jax.tree.leaves(new.params), jax.tree.leaves(s.params), jax.tree.leaves(mask)):
            assert bool(jnp.all(p[m] == p0[m]))  # also with momentum from earlier rounds
            assert bool(jnp.any(p[~m] != p0[~m]))
        masks.append(mask)
        s = new
    assert int(s.round) == 3
    k0, k1 = masks[0]["dense_0"]["kernel"], masks[1]["dense_0"]["kernel"]
    assert 0.1 < float(jnp.mean(k0 != k1))  # a fresh mask every round


def test_fedavg_with_one_client_equals_centralised_training(problem):
    """One client holding the data, full participation, one round of E epochs = E epochs of
    tna_jax.training's trainer with the same optimizer, batch order and data."""
    net, n = problem["net"], 192  # a multiple of the batch size: the trainer drops partial batches
    x, y = problem["x"][:n], problem["y"][:n]
    tx = optax.sgd(0.1, momentum=0.9)
    alg = algorithms.fed_avg(net, tx, num_clients=1, max_examples=n, batch_size=BATCH, local_epochs=3)
    state = alg.init(problem["params"])
    round_key = jax.random.key(5)
    new, _ = jax.jit(alg.apply)(state, client.pack_clients(x, y, [np.arange(n)]), round_key)
    client_key = jax.random.fold_in(jax.random.fold_in(round_key, 1), 0)  # the client's key (its id is 0)
    data_key = jax.random.key_data(jax.random.fold_in(client_key, 0))[None]
    dropout_key = jax.random.key_data(jax.random.fold_in(client_key, 1))[None]
    epoch = training.make_train_epoch(net, tx, num_train=n, batch_size=BATCH)
    ts = jax.tree.map(lambda a: a[None], training.TrainState(problem["params"], {}, tx.init(problem["params"]),
                                                             jnp.zeros((), jnp.int32)))
    for e in range(3):
        ts, _ = epoch(ts, data_key, dropout_key, e, 0, jnp.asarray(x), jnp.asarray(y))
    chex.assert_trees_all_close(new.params, tree_lib.index(ts.params, 0), atol=1e-6, rtol=1e-6)


def test_vmapped_clients_equal_a_python_loop_over_clients(problem):
    alg = build(problem, "fedprox", prox_mu=0.1, client_fraction=0.5)
    state = alg.init(problem["params"])
    c = problem["clients"]
    key = jax.random.key(11)
    new, metrics = jax.jit(alg.apply)(state, c, key)
    chosen = np.asarray(metrics["clients"])
    assert len(chosen) == alg.cohort[1] == 3 and len(set(chosen.tolist())) == 3
    one = jax.jit(alg.local_update)
    outs = []
    for cid in chosen:
        k = jax.random.fold_in(jax.random.fold_in(key, 1), int(cid))
        outs.append(one(state.params, {}, state.params, None, c.x[cid], c.y[cid], c.n[cid], k))
    mean = tree_lib.weighted_mean(tree_lib.stack([o.params for o in outs]), c.n[chosen].astype(np.float32))
    chex.assert_trees_all_close(new.params, mean, atol=1e-6)
    np.testing.assert_allclose(metrics["client_loss"], [float(o.loss) for o in outs], rtol=1e-5)
    # Uneven sizes: E * ceil(n / B) steps each (a client smaller than B still trains), an empty one none.
    assert [int(o.steps) for o in outs] == [-(-int(c.n[cid]) // BATCH) for cid in chosen]
    assert np.asarray(metrics["steps"]).tolist() == [int(o.steps) for o in outs]
    assert c.max_examples > 2 * BATCH and min(int(c.n[cid]) for cid in range(6)) < BATCH
    empty = one(state.params, {}, state.params, None, c.x[0], c.y[0], 0, key)
    assert int(empty.steps) == 0
    chex.assert_trees_all_equal(empty.params, state.params)


@given(st.lists(st.integers(1, 600), min_size=1, max_size=40), st.integers(1, 64), st.integers(1, 3),
       st.integers(1, 5), st.sampled_from([1, 2, 4]))
def test_size_buckets_hold_every_client_once_and_never_cost_more_than_one_cohort(sizes, batch, epochs, most, devices):
    buckets = client.size_buckets(sizes, batch_size=batch, local_epochs=epochs, max_buckets=most, multiple=devices)
    assert 1 <= len(buckets) <= most
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(sizes)))
    steps = [epochs * -(-s // batch) for s in sizes]
    cost = lambda b: max(steps[c] for c in b) * (-(-len(b) // devices) * devices + client.STEP_OVERHEAD)  # noqa: E731
    assert sum(cost(b) for b in buckets) <= cost(range(len(sizes))) + 1e-9
    # Sorted by size: every client of a bucket is at most as large as any client of the next.
    for small, large in zip(buckets, buckets[1:]):
        assert max(sizes[c] for c in small) <= min(sizes[c] for c in large)


@pytest.mark.parametrize("method, kw", [("fedavg", {}), ("fedpfn", {"server_tx": algorithms.server_optimizer("fedavgm")})])
def test_size_buckets_train_the_same_round_as_one_padded_cohort(problem, method, kw):
    c = problem["clients"]
    k = len(problem["parts"])
    sizes = c.n[:k]
    assert len(client.size_buckets(sizes, batch_size=BATCH, max_buckets=3)) > 1  # the case is really bucketed
    one = build(problem, method, **kw)
    bucketed = build(problem, method, client_sizes=sizes, size_buckets=3, **kw)
    s_one, s_b = one.init(problem["params"]), bucketed.init(problem["params"])
    for r in range(2):
        key = jax.random.key(20 + r)
        s_one, m_one = jax.jit(one.apply)(s_one, c, key)
        s_b, m_b = jax.jit(bucketed.apply)(s_b, c, key)
        chex.assert_trees_all_close(s_b.params, s_one.params, atol=2e-6)
        assert np.asarray(m_b["steps"]).tolist() == np.asarray(m_one["steps"]).tolist() \
            == [-(-int(n) // BATCH) for n in sizes]
        np.testing.assert_allclose(m_b["client_loss"], m_one["client_loss"], rtol=1e-5)
        np.testing.assert_allclose(m_b["train_accuracy"], m_one["train_accuracy"], rtol=1e-6)
    if method == "fedpfn":
        anchored = jax.tree.map(lambda msk, a, b: bool(jnp.all(jnp.where(msk, a == b, True))), s_b.mask,
                                s_b.params, problem["params"])
        assert all(jax.tree.leaves(anchored))


def test_bad_size_bucket_arguments_name_the_argument(problem):
    sizes = problem["clients"].n[: len(problem["parts"])]
    with pytest.raises(ValueError, match="size_buckets must be an integer >= 1; got 0"):
        build(problem, size_buckets=0)
    with pytest.raises(ValueError, match="size_buckets=3 needs client_sizes"):
        build(problem, size_buckets=3)
    with pytest.raises(ValueError, match=r"client_sizes must hold num_clients=6 sizes; got shape \(5,\)"):
        build(problem, size_buckets=3, client_sizes=sizes[:5])
    with pytest.raises(ValueError, match="more than max_examples"):
        build(problem, size_buckets=3, client_sizes=sizes + 1000)
    with pytest.raises(ValueError, match="order_examples must be an integer >= max_examples"):
        client.make_local_update(problem["net"], optax.sgd(0.1), batch_size=4, max_examples=8, order_examples=4)
    bucketed = build(problem, size_buckets=3, client_sizes=sizes)
    other = client.ClientData(problem["clients"].x, problem["clients"].y, np.roll(problem["clients"].n, 1))
    with pytest.raises(ValueError, match="clients.n differs from the client_sizes"):
        bucketed.apply(bucketed.init(problem["params"]), other, jax.random.key(0))
    # Client sampling keeps one padded cohort (bucketing would need the round's sizes at trace time).
    assert build(problem, size_buckets=3, client_sizes=sizes, client_fraction=0.5).cohort == (3, 3)


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8, name="dense_0")(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="dense_0_norm")(x)
        return nn.Dense(10, name="head")(nn.relu(x))


def test_fedbn_keeps_batchnorm_local_and_averaging_mode_shares_it(problem):
    net = Net(name="bn_test", module=_BNNet(), input_shape=(40,), num_classes=10)
    variables = net.init(jax.random.key(0))
    params, model_state = variables.pop("params"), variables
    c = problem["clients"]
    common = dict(num_clients=len(problem["parts"]), max_examples=c.max_examples, batch_size=BATCH)
    local = algorithms.fed_avg(net, optax.sgd(0.1), bn="local", client_fraction=0.5, **common)
    s0 = local.init(params, model_state)
    s1, metrics = jax.jit(local.apply)(s0, c, jax.random.key(1))
    chosen = set(np.asarray(metrics["clients"]).tolist())
    stats0, stats1 = s0.client_bn["batch_stats"], s1.client_bn["batch_stats"]
    for k in range(len(problem["parts"])):
        same = bool(jnp.array_equal(stats1["dense_0_norm"]["mean"][k], stats0["dense_0_norm"]["mean"][k]))
        assert same == (k not in chosen)  # only the sampled clients' own statistics change
    weights = c.n[: len(problem["parts"])].astype(np.float32)
    expected = tree_lib.weighted_mean(s1.client_bn["params"], weights)
    chex.assert_trees_all_close(s1.params["dense_0_norm"], expected["dense_0_norm"], atol=1e-6)
    averaged = algorithms.fed_avg(net, optax.sgd(0.1), bn="average", **common)
    a1, _ = jax.jit(averaged.apply)(averaged.init(params, model_state), c, jax.random.key(1))
    assert a1.client_bn == ()
    assert not bool(jnp.array_equal(a1.model_state["batch_stats"]["dense_0_norm"]["var"],
                                    model_state["batch_stats"]["dense_0_norm"]["var"]))
    with pytest.raises(ValueError, match="needs a model with BatchNorm"):
        algorithms.fed_avg(problem["net"], optax.sgd(0.1), bn="local", **common).init(problem["params"])
    # FedBN in size buckets (full participation): every client's own BatchNorm is gathered into
    # its bucket and scattered back to its row, as in one padded cohort.
    sizes = c.n[: len(problem["parts"])]
    one = algorithms.fed_avg(net, optax.sgd(0.1), bn="local", **common)
    buckets = algorithms.fed_avg(net, optax.sgd(0.1), bn="local", client_sizes=sizes, size_buckets=3, **common)
    o1, _ = jax.jit(one.apply)(one.init(params, model_state), c, jax.random.key(2))
    b1, _ = jax.jit(buckets.apply)(buckets.init(params, model_state), c, jax.random.key(2))
    chex.assert_trees_all_close(b1.client_bn, o1.client_bn, atol=2e-6)
    chex.assert_trees_all_close((b1.params, b1.model_state), (o1.params, o1.model_state), atol=2e-6)


def test_seeds_vmapped_and_sharded_rounds_match_one_seed_at_a_time(problem, pfn):
    alg, apply = pfn
    mesh = sharding_lib.run_mesh()
    keys = driver.seed_keys(0, 2, share_mask=False)
    states = driver.init_states(alg, problem["net"], keys, mesh)
    placed = driver.place_clients(problem["clients"], mesh)
    rounds = driver.make_rounds(alg, mesh, donate=False)
    for r in range(2):
        states, _ = rounds(states, placed, driver.round_keys(keys, r))
    for s in range(2):
        variables = problem["net"].init(jax.random.wrap_key_data(keys.init[s]))
        one = alg.init(variables["params"], anchor_key=keys.mask[s])
        for r in range(2):
            one, _ = apply(one, problem["clients"], jax.random.wrap_key_data(driver.round_keys(keys, r)[s]))
        chex.assert_trees_all_close(tree_lib.index(states.params, s), one.params, atol=1e-6)
    assert not bool(jnp.array_equal(states.mask["head"]["kernel"][0], states.mask["head"]["kernel"][1]))


# ---------------------------------------------------------------------------------------------
# A split of the clients per seed (federated.partition_per_seed).
# ---------------------------------------------------------------------------------------------


def test_each_seed_draws_its_own_split_and_the_shared_split_is_unchanged():
    from tna_jax.experiments.federated import make_clients, partition_seed_of

    c = default_config()
    c.federated = federated_config()
    c.federated.num_clients, c.federated.partition_seed = 6, 3
    y = np.arange(600) % 10
    shared = make_clients(c, y, None)
    today = partition.partition(y, 6, "dirichlet", alpha=0.5, min_size=2, seed=3)  # before the option existed
    assert all(np.array_equal(a, b) for a, b in zip(shared, today, strict=True))
    own = [make_clients(c, y, None, seed_index=s) for s in range(3)]
    sizes = [[len(p) for p in parts] for parts in (shared, *own)]
    assert len({tuple(v) for v in sizes}) == 4  # four different splits
    for parts in own:  # each is still a partition of every example
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(600))
    assert len({partition_seed_of(3, s) for s in range(100)} | {3}) == 101


def test_seeds_on_their_own_splits_train_as_each_seed_alone_on_its_split(problem):
    from tna_jax.experiments.federated import partition_seed_of

    net, x, y = problem["net"], problem["x"][:240], problem["y"][:240]
    splits = [partition.dirichlet(y, 4, 0.5, seed=partition_seed_of(0, s), min_size=3) for s in range(2)]
    n_max = max(len(p) for parts in splits for p in parts)
    mesh = sharding_lib.run_mesh()
    packed = []
    for parts in splits:
        d = client.pack_clients(x, y, parts, multiple=mesh.devices.size)
        pad = n_max - d.max_examples
        packed.append(client.ClientData(np.pad(d.x, [(0, 0), (0, pad), (0, 0)]), np.pad(d.y, [(0, 0), (0, pad)]), d.n))
    stacked = client.ClientData(*(np.stack([getattr(d, k) for d in packed]) for k in ("x", "y", "n")))
    alg = algorithms.fed_avg(net, optax.sgd(0.1), num_clients=4, max_examples=n_max, batch_size=BATCH, mesh=mesh)
    keys = driver.seed_keys(0, 2)
    rounds = driver.make_rounds(alg, mesh, donate=False, per_seed_clients=True)
    states, metrics = rounds(driver.init_states(alg, net, keys, mesh), driver.place_clients(stacked, mesh, seed_axis=True),
                             driver.round_keys(keys, 0))
    chex.assert_shape(metrics["client_loss"], (2, 4))
    shared = driver.make_rounds(alg, mesh, donate=False)
    for s in range(2):  # seed s of the per-seed run == seed s of a run where every seed has split s
        alone, _ = shared(driver.init_states(alg, net, keys, mesh), driver.place_clients(packed[s], mesh),
                          driver.round_keys(keys, 0))
        chex.assert_trees_all_close(tree_lib.index(states.params, s), tree_lib.index(alone.params, s), atol=1e-6)
        other, _ = shared(driver.init_states(alg, net, keys, mesh), driver.place_clients(packed[1 - s], mesh),
                          driver.round_keys(keys, 0))
        assert not np.allclose(states.params["head"]["kernel"][s], other.params["head"]["kernel"][s])


def test_federated_kind_with_a_split_per_seed_reports_it(tmp_path):
    import importlib.util

    from PIL import Image


    spec = importlib.util.spec_from_file_location("fed_cfg", os.path.join(ROOT, "configs", "fed_mnist1d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.num_seeds, c.data.num_samples, c.model.depth, c.model.width = 2, 600, 1, 16
    c.train.progress, c.train.tensorboard = False, False
    f = c.federated
    f.algorithms, f.server_optimizers, f.num_clients, f.rounds, f.eval_every = ("fedavg",), ("none",), 4, 2, 1
    f.partition_per_seed = True
    report = runner.run(c, str(tmp_path))
    fed = report["federation"]
    assert fed["partition_draw"] == "per_seed" and sorted(fed["clients"]) == ["0.5/seed_0", "0.5/seed_1"]
    assert fed["clients"]["0.5/seed_0"]["sizes"] != fed["clients"]["0.5/seed_1"]["sizes"]
    assert sum(fed["clients"]["0.5/seed_1"]["sizes"]) == report["data"]["sizes"]["train"]
    assert "a new split of the clients for every seed" in report["markdown"]
    assert "mean ± sample std over 2 seeds" in report["markdown"]
    assert json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)["arms"][0]["seeds"] == 2
    caption = Image.open(tmp_path / "accuracy_vs_round.png").text["Description"]
    assert caption == "Lines: mean, bands: ± sample std over 2 seeds; a new client split per seed."


# ---------------------------------------------------------------------------------------------
# The experiment: resume after SIGKILL, and several processes.
# ---------------------------------------------------------------------------------------------

# Resuming a federated run after SIGKILL / SIGTERM (13 interruptions, bit-identical to an
# uninterrupted run): tests/test_reliability_crash.py::test_federated_crash_chain_resumes_bit_identical.


MULTIPROCESS_CODE = """
import json, sys
import jax
pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
import numpy as np
from tna_jax import data, models, training
from tna_jax import sharding as sharding_lib
from tna_jax.checkpoint import tree_digest
from tna_jax.federated import algorithms, client, driver, partition
import optax
ds = data.load({"source": "mnist1d", "num_samples": 600})
d = data.to_device(ds)
x, y = np.asarray(d.x_train), np.asarray(d.y_train)
net = models.build({"name": "mlp", "depth": 1, "width": 16}, ds.input_shape, ds.num_classes)
parts = partition.dirichlet(y, 8, 0.5, seed=0)
mesh = sharding_lib.run_mesh()
packed = client.pack_clients(x, y, parts, multiple=mesh.devices.size)
mine = driver.client_rows_of_process(packed.num_rows, mesh)
others = np.setdiff1d(np.arange(packed.num_rows), mine)
local = client.ClientData(packed.x.copy(), packed.y.copy(), packed.n.copy())
local.x[others] = np.nan  # this process never reads the clients of the other process
placed = driver.place_clients(local, mesh)
alg = algorithms.fed_pfn(net, optax.sgd(0.05, momentum=0.9), 0.4, None, num_clients=8, max_examples=packed.max_examples,
                         batch_size=16, client_fraction=0.5, server_tx=algorithms.server_optimizer("fedavgm"), mesh=mesh)
keys = driver.seed_keys(0, 2)
states = driver.init_states(alg, net, keys, mesh)
rounds = driver.make_rounds(alg, mesh)
for r in range(3):
    states, metrics = rounds(states, placed, driver.replicated(driver.round_keys(keys, r), mesh))
params = driver.to_host(states.params)
print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(), "rows": mine.tolist(),
                  "digest": tree_digest(params), "kernel": params["head"]["kernel"].ravel()[::7].tolist(),
                  "loss": driver.to_host(metrics["train_loss"]).tolist()}))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_each_read_only_their_own_clients_and_agree():
    """Each process blanks (NaN) the client rows of the other: a finite result proves that no
    process reads another's clients. That 2 processes equal 1 is checked through train.py below
    (test_train_py_over_two_processes_matches_one_process_and_resumes)."""
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", MULTIPROCESS_CODE, str(i), "2", port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["processes"] for o in outs] == [2, 2]
    assert outs[0]["devices"] == outs[1]["devices"] == 2
    assert outs[0]["rows"] == [0, 1, 2, 3] and outs[1]["rows"] == [4, 5, 6, 7]  # clients split across processes
    assert outs[0]["digest"] == outs[1]["digest"]  # every process holds the same global model
    assert np.isfinite(outs[0]["loss"]).all() and np.isfinite(outs[0]["kernel"]).all()  # no NaN row was read
    assert len(set(outs[0]["loss"])) > 1  # 2 seeds, really trained


TRAIN_FED_ARGS = ["train.py", "--config=configs/fed_mnist1d.py", "--config.num_seeds=2", "--config.data.num_samples=600",
                  "--config.model.depth=1", "--config.model.width=16", "--config.federated.num_clients=6",
                  "--config.federated.alpha=0.1",
                  "--config.federated.eval_every=1", "--config.federated.checkpoint_every=2",
                  "--config.federated.algorithms=('fedavg','fedpfn')", "--config.federated.server_optimizers=('none',)",
                  "--config.federated.client_fraction=1.0", "--config.train.progress=False",
                  "--config.train.tensorboard=False", "--config.analysis.plots=False",
                  "--config.optimizer.learning_rate=0.1", "--config.federated.local_epochs=3"]


def train_py_processes(workdir, rounds, nproc):
    """``train.py`` as `nproc` processes on 127.0.0.1 (one CPU device each); their outputs."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, *TRAIN_FED_ARGS, f"--config.federated.rounds={rounds}", f"--workdir={workdir}",
           "--cpu_devices=1", f"--coordinator=127.0.0.1:{port}", f"--num_processes={nproc}"]
    procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_py_over_two_processes_matches_one_process_and_resumes(tmp_path):
    """The command line across 2 processes: process 0 alone writes the report and metrics, both
    write the orbax checkpoints; rerunning with more rounds resumes from the 2-process checkpoint,
    and the result equals one process with 2 devices doing all the rounds in one go."""
    two = tmp_path / "two"
    first = train_py_processes(two, rounds=2, nproc=2)
    assert "FedAvg" in first[0] and "FedAvg" not in first[1]  # the table is printed by process 0 only
    assert sorted(os.listdir(two / "checkpoints")) == ["2"]
    resumed = train_py_processes(two, rounds=3, nproc=2)
    assert "resuming from the checkpoint of round 2" in resumed[0]
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, *TRAIN_FED_ARGS, "--config.federated.rounds=3", f"--workdir={one}",
                             "--cpu_devices=2"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (json.load(open(d / "report.json")) for d in (two, one))
    assert a["devices"]["processes"] == 2 and b["devices"]["processes"] == 1
    # Full participation: the clients train in size buckets, gathered across the two processes.
    buckets = a["federation"]["clients"]["0.1"]["buckets"]
    assert len(buckets) > 1 and sorted(sum(buckets, [])) == list(range(6))
    assert a["devices"]["count"] == b["devices"]["count"] == 2
    assert a["curves"].keys() == b["curves"].keys() and len(a["curves"]) == 2
    for arm in a["curves"]:  # rounds 1-2 from the first invocation's metrics, round 3 after the resume
        assert a["curves"][arm]["rounds"] == b["curves"][arm]["rounds"] == [1, 2, 3]
        np.testing.assert_allclose(a["curves"][arm]["accuracy"], b["curves"][arm]["accuracy"], atol=2e-3)
        assert min(acc[-1] for acc in a["curves"][arm]["accuracy"]) > 0.15  # trained (chance: 0.1)
    rows = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert len(rows) == 3 * 2 * 2  # rounds x arms x seeds, once each: process 1 wrote nothing
    assert open(two / ".lock").read() == ""  # released cleanly


def test_rounds_are_awaited_one_arm_at_a_time_only_on_several_cpu_devices():
    """XLA:CPU can deadlock with several programs' collectives in flight (an all-gather rendezvous
    of the 21-arm sweep on two CPU devices never completed): there each arm's round is awaited
    before the next is dispatched; one device (no collectives) keeps asynchronous dispatch."""
    from util import run_python, xla_flags_with_devices

    from tna_jax.experiments.federated import _one_program_at_a_time

    assert not _one_program_at_a_time(sharding_lib.run_mesh(jax.devices()[:1]))
    code = ("import jax\nfrom tna_jax import sharding\n"
            "from tna_jax.experiments.federated import _one_program_at_a_time\n"
            "assert jax.device_count() == 2\n"
            "print(_one_program_at_a_time(sharding.run_mesh()), _one_program_at_a_time(sharding.run_mesh(jax.devices()[:1])))")
    out = run_python(code, env={"XLA_FLAGS": xla_flags_with_devices(2)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]
