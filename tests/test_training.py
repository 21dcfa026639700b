"""Tests of multi-seed training, checkpoints, resume, sharding and the experiment runner."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import ROOT, run_python, tensorboard_events, tiny_config, xla_flags_with_devices

from tna_jax import anchors, data, evaluation, models, optimizers, runner, training
from tna_jax import checkpoint as ckpt_lib
from tna_jax import run_axis as run_axis_lib
from tna_jax import runs as runs_lib
from tna_jax import workdir as workdir_lib
from tna_jax.config import ConfigError, validate


@pytest.fixture(scope="module")
def dataset():
    return data.load(tiny_config().data)


def build(config, dataset):
    return models.build(config.model, dataset.input_shape, dataset.num_classes)


def init_state(config, net, runs=None):
    runs = runs if runs is not None else runs_lib.make_runs(config)
    keys = runs_lib.make_run_keys(config, runs)
    base = optimizers.make_optimizer(config.optimizer, 10, config.train.epochs)
    factory = optimizers.make_transform(base, config, net, runs_lib.arms_from_config(config))
    return jax.jit(lambda k: training.init_runs(net, factory, runs, k))(keys), keys, factory


def test_arms_and_runs_follow_the_config():
    c = tiny_config(anchor__ratio=0.4)
    assert [a.label for a in runs_lib.arms_from_config(c)] == ["vanilla", "TNA-PFN 0.4"]
    c.baseline = False
    assert [a.label for a in runs_lib.arms_from_config(c)] == ["TNA-PFN 0.4"]
    c.prune.ratio = 0.3
    assert [a.label for a in runs_lib.arms_from_config(c)] == ["prune 0.3"]
    c.sweep.anchor_ratios = (0.0, 0.2, 0.2)
    c.sweep.prune_ratios = (0.5,)
    assert [a.label for a in runs_lib.arms_from_config(c)] == ["vanilla", "TNA-PFN 0.2", "prune 0.5"]
    runs = runs_lib.make_runs(c)
    assert [(r.arm_index, r.seed) for r in runs] == [(a, s) for a in range(3) for s in range(2)]


def anchor_states(state):
    return anchors.find_state(state.opt_state)


def test_initial_masks_values_and_seed_streams(dataset):
    c = tiny_config(anchor__ratio=0.5, prune__ratio=0.0, num_seeds=3)
    net = build(c, dataset)
    state, keys, _ = init_state(c, net)
    mask = training.mask_of(state)
    runs = runs_lib.make_runs(c)
    vanilla = [r.index for r in runs if r.arm.method == "none"]
    tna = [r.index for r in runs if r.arm.method == "anchor"]
    for leaf in jax.tree.leaves(mask):
        assert not bool(leaf[np.array(vanilla)].any())
        assert bool(jnp.all(leaf[tna[0]] == leaf[tna[1]]))  # one mask shared by the seeds
    fraction = anchors.mask_summary(jax.tree.map(lambda m: m[tna[0]], mask))["overall"]
    assert 0.45 < fraction < 0.55
    # Every run starts from its own init; the anchor values live in the transform's state.
    values = net.init(jax.random.wrap_key_data(keys.anchor_values[tna[0]]))["params"]
    held = anchor_states(state).values
    for p, h, v, m in zip(*(jax.tree.leaves(t) for t in (state.params, held, values, mask))):
        for i in tna:  # shared anchor values: bit-equal across the seeds (one program) ...
            assert bool(jnp.all(h[i] == h[tna[0]]))
            # ... and the values of net.init(anchor key), computed here by another program (vmapped
            # vs not: XLA may round the last bit differently, e.g. at another optimisation level).
            np.testing.assert_allclose(h[i], v, rtol=1e-6, atol=1e-7)
        if p.ndim > 2:  # kernels (biases start at zero in every seed)
            assert bool(jnp.any(p[tna[0]][m[tna[0]]] != h[tna[0]][m[tna[0]]]))  # not there yet
            assert bool(jnp.any(p[tna[0]] != p[tna[1]]))  # seeds differ
    # Arms are paired: the vanilla run of seed s starts from seed s's init.
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[vanilla[1]], state.params),
                                jax.tree.map(lambda x: x[tna[1]], state.params))


def test_seed_options_share_or_split_streams(dataset):
    c = tiny_config(anchor__ratio=0.5, baseline=False)
    net = build(c, dataset)
    c.seeds.vary = "data"
    c.anchor.share_mask = False
    state, keys, _ = init_state(c, net)
    k = state.params["dense_0"]["kernel"]
    m = training.mask_of(state)["dense_0"]["kernel"]
    assert bool(jnp.any(m[0] != m[1]))  # one mask per seed
    assert bool(jnp.all(k[0][~m[0] & ~m[1]] == k[1][~m[0] & ~m[1]]))  # same init
    assert not bool(jnp.all(keys.data[0] == keys.data[1]))  # different data order
    c.seeds.vary = "init"
    _, keys, _ = init_state(c, net)
    assert bool(jnp.all(keys.data[0] == keys.data[1])) and not bool(jnp.all(keys.init[0] == keys.init[1]))


def test_fit_trains_every_run_and_anchors_and_pruned_weights_stay(dataset):
    c = tiny_config(sweep__anchor_ratios=(0.0, 0.5), sweep__prune_ratios=(0.5,), train__epochs=4)
    net = build(c, dataset)
    state0, _, _ = init_state(c, net)
    result = training.fit(c, net, dataset, log=lambda s: None)
    assert len(result.runs) == 6
    chex.assert_tree_shape_prefix(result.state.params, (6,))
    assert np.all(result.test["accuracy"] > 0.15), result.test["accuracy"]  # chance is 0.1 (432 examples, 4 epochs)
    for r in runs_of(result):
        losses = [h["train_loss"] for h in result.history if h["run"] == r]
        assert losses[-1] < 0.9 * losses[0], losses
    mask, runs = result.mask, result.runs
    values = anchor_states(state0).values
    assert np.asarray(jax.vmap(anchors.verify)(result.state.params, result.state.opt_state)).all()
    for p0, p, v, m in zip(*(jax.tree.leaves(t) for t in (state0.params, result.state.params, values, mask))):
        for r in runs:
            i = r.index
            assert bool(jnp.all(p[i][m[i]] == v[i][m[i]]))  # anchors hold their values bit for bit
            if r.arm.method == "prune":
                assert bool(jnp.all(p[i][m[i]] == 0)) and bool(jnp.all(p0[i][m[i]] == 0))
            assert bool(jnp.any(p[i][~m[i]] != p0[i][~m[i]]))
    assert len(result.history) == 4 * 6
    assert {"epoch", "run", "arm", "seed", "train_loss", "val_accuracy"} <= set(result.history[-1])


def test_fit_with_refresh_keeps_about_rho_anchored_and_frozen(dataset):
    c = tiny_config(anchor__ratio=0.4, anchor__refresh_every=4, baseline=False, train__epochs=3)
    net = build(c, dataset)
    state0, _, _ = init_state(c, net)
    result = training.fit(c, net, dataset, log=lambda s: None)  # 6 steps per epoch: 4 refreshes
    for i in range(c.num_seeds):
        fraction = anchors.mask_summary(jax.tree.map(lambda m, i=i: m[i], result.mask))["overall"]
        assert 0.37 < fraction < 0.43, fraction
    first = training.mask_of(state0)["dense_0"]["kernel"][0]
    assert bool(jnp.any(result.mask["dense_0"]["kernel"][0] != first))  # a new set since the start
    assert np.asarray(jax.vmap(anchors.verify)(result.state.params, result.state.opt_state)).all()


def test_a_user_loop_with_the_transform_alone_reproduces_the_shared_arm(dataset):
    """What a user writes: their own loop, their own init per seed, one shared init as `values=`,
    the transform chained last. It must train the models `fit` trains, so the same barrier."""
    import optax

    from tna_jax import lmc
    from tna_jax.data.batching import epoch_indices

    c = tiny_config(anchor__ratio=0.4, baseline=False, train__epochs=3)
    net = build(c, dataset)
    result = training.fit(c, net, dataset, log=lambda s: None)
    keys = runs_lib.make_run_keys(c, runs_lib.make_runs(c))
    dd = data.to_device(dataset)
    n, bs = int(dd.x_train.shape[0]), c.train.batch_size
    mine = []
    for seed in range(c.num_seeds):
        key = lambda stream, s=seed: jax.random.wrap_key_data(stream[s])  # noqa: E731
        params = net.init(key(keys.init))["params"]  # this seed's own init
        shared = net.init(key(keys.anchor_values))["params"]  # the same in every seed
        tx = optax.chain(optimizers.make_optimizer(c.optimizer, n // bs, c.train.epochs),
                         anchors.fixed_anchor_mask(0.4, key(keys.mask), values=shared))
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, y, tx=tx):
            loss = lambda p: evaluation.cross_entropy(net.apply({"params": p}, x, train=True)[0], y).mean()  # noqa: E731
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for epoch in range(c.train.epochs):
            order_key, _ = jax.random.split(jax.random.fold_in(key(keys.data), epoch))
            for rows in epoch_indices(order_key, n, bs):
                params, state = step(params, state, dd.x_train[rows], dd.y_train[rows])
        assert bool(anchors.verify(params, state))
        mine.append({"params": params})
    theirs = [result.state.variables(i) for i in range(c.num_seeds)]
    chex.assert_trees_all_close(mine, theirs, atol=1e-4, rtol=1e-4)
    eval_fn, test = evaluation.make_eval_fn(net), dd.split("test")
    ours = lmc.barriers(lmc.lmc_path(eval_fn, *mine, test))
    fits = lmc.barriers(lmc.lmc_path(eval_fn, *theirs, test))
    assert abs(ours.accuracy_barrier - fits.accuracy_barrier) <= 2 / test[1].shape[0]  # one example
    assert abs(ours.loss_barrier - fits.loss_barrier) <= 1e-3


def runs_of(result):
    return [r.index for r in result.runs]


def test_vmapped_runs_match_runs_trained_one_at_a_time(dataset):
    c = tiny_config(anchor__ratio=0.4)
    net = build(c, dataset)
    dd = data.to_device(dataset)
    runs = runs_lib.make_runs(c)
    state, keys, factory = init_state(c, net, runs)
    update_tx = factory(0.0, jax.random.key(0))
    epoch_fn = training.make_train_epoch(net, update_tx, num_train=dd.x_train.shape[0], batch_size=64, donate=False)
    together = state
    for e in range(2):
        together, _ = epoch_fn(together, keys.data, keys.dropout, e, 0, dd.x_train, dd.y_train)
    for i, run in enumerate(runs):
        single, k1, _ = init_state(c, net, [run])
        for e in range(2):
            single, _ = epoch_fn(single, k1.data, k1.dropout, e, 0, dd.x_train, dd.y_train)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], single.params),
                                    jax.tree.map(lambda x, i=i: x[i], together.params), atol=1e-5, rtol=1e-5)


def test_an_epoch_in_chunks_equals_the_epoch_in_one_call(dataset):
    c = tiny_config(anchor__ratio=0.4)
    net = build(c, dataset)
    dd = data.to_device(dataset)
    state, keys, factory = init_state(c, net)
    n = dd.x_train.shape[0]
    kwargs = dict(num_train=n, batch_size=64, donate=False)
    whole = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), **kwargs)
    assert n // 64 == 6
    four = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), num_steps=4, **kwargs)
    rest = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), num_steps=2, **kwargs)
    one_call, m = whole(state, keys.data, keys.dropout, 1, 0, dd.x_train, dd.y_train)
    chunked, start, total = state, 0, 0.0
    while start < n // 64:
        fn = four if start == 0 else rest
        chunked, mc = fn(chunked, keys.data, keys.dropout, 1, start, dd.x_train, dd.y_train)
        start += int(mc.steps[0])
        total = total + mc.loss_sum
    chex.assert_trees_all_equal(one_call.params, chunked.params)
    np.testing.assert_allclose(total, m.loss_sum, rtol=1e-6)
    with pytest.raises(ValueError, match="num_steps must be in"):
        training.make_train_epoch(net, factory(0.0, jax.random.key(0)), num_steps=0, **kwargs)


def test_conv_nets_on_cpu_unroll_their_steps_and_match_the_rolled_loop():
    digits = data.load({"source": "digits"})
    c = tiny_config(anchor__ratio=0.4)
    c.model = {"name": "cnn", "width": 0.25, "hidden": 16}
    net = build(c, digits)
    mlp = build(tiny_config(), digits)
    assert run_axis_lib.uses_convolutions(net) and not run_axis_lib.uses_convolutions(mlp)
    assert run_axis_lib.loop_plan(net, 24, backend="cpu") == (run_axis_lib.AUTO_UNROLL_STEPS, True)
    assert run_axis_lib.loop_plan(net, 20, backend="cpu") == (5, True)  # divides the epoch: one compile
    assert run_axis_lib.loop_plan(net, 23, backend="cpu") == (1, True)
    assert run_axis_lib.loop_plan(net, 20, backend="gpu") == (20, 1)
    assert run_axis_lib.loop_plan(net, 20, steps_per_call=5, unroll=2, backend="cpu") == (5, 2)
    assert run_axis_lib.loop_plan(mlp, 20, backend="cpu") == (20, 1)
    dd = data.to_device(digits)
    state, keys, factory = init_state(c, net)
    kwargs = dict(num_train=256, batch_size=64, donate=False, num_steps=2)
    rolled = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), **kwargs)
    unrolled = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), unroll=True, **kwargs)
    a, ma = rolled(state, keys.data, keys.dropout, 0, 0, dd.x_train, dd.y_train)
    b, mb = unrolled(state, keys.data, keys.dropout, 0, 0, dd.x_train, dd.y_train)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ma.loss_sum, mb.loss_sum, rtol=1e-5)
    assert np.all(np.asarray(ma.loss_sum) > 0)
    # The looped run axis (what fit picks for conv nets on CPU) trains the same runs.
    assert run_axis_lib.run_axis_plan(net, "cpu") == "loop" and run_axis_lib.run_axis_plan(net, "gpu") == "vmap"
    assert run_axis_lib.run_axis_plan(mlp, "cpu") == "vmap"
    vit = models.build({"name": "vit", "patch_size": 2, "dim": 16, "depth": 1, "heads": 2}, (8, 8, 1), 10)
    assert run_axis_lib.uses_convolutions(vit) and run_axis_lib.run_axis_plan(vit, "cpu") == "vmap"  # patches: a matmul
    assert run_axis_lib.loop_plan(net, 20, backend="cpu", runs_per_device=2) == (4, True)
    assert run_axis_lib.loop_plan(net, 20, backend="cpu", runs_per_device=16) == (1, True)
    looped = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), unroll=True, run_axis="loop", **kwargs)
    c_, mc = looped(state, keys.data, keys.dropout, 0, 0, dd.x_train, dd.y_train)
    chex.assert_trees_all_close(b.params, c_.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(b.opt_state, c_.opt_state, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mb.loss_sum, mc.loss_sum, rtol=1e-5)
    np.testing.assert_array_equal(mb.correct, mc.correct)
    one_at_a_time = run_axis_lib.RunGroups(looped.program, num_mapped=3, max_runs=1)  # 2 groups of 1 run
    assert one_at_a_time.group_size(2) == 1 and looped.group_size(2) is None
    d_, md = one_at_a_time(state, keys.data, keys.dropout, 0, 0, dd.x_train, dd.y_train)
    chex.assert_trees_all_equal(c_.params, d_.params)
    np.testing.assert_array_equal(mc.loss_sum, md.loss_sum)
    vm = evaluation.evaluate_runs(net, b, (dd.x_test, dd.y_test))
    np.testing.assert_allclose(jax.vmap(evaluation.make_eval_fn(net), in_axes=(0, None, None))(
        b.variables(), dd.x_test, dd.y_test)["loss"], vm.loss, rtol=1e-5)  # evaluate_runs loops here
    with pytest.raises(ValueError, match=r"run_axis must be one of \('vmap', 'loop'\); got 'pmap'"):
        training.make_train_epoch(net, factory(0.0, jax.random.key(0)), run_axis="pmap", **kwargs)


def test_eval_fn_matches_a_direct_computation(dataset):
    c = tiny_config()
    net = build(c, dataset)
    dd = data.to_device(dataset)
    variables = net.init(jax.random.key(0))
    out = jax.jit(evaluation.make_eval_fn(net, batch_size=97))(variables, dd.x_test, dd.y_test)
    logits, _ = net.apply(variables, dd.x_test)
    loss = evaluation.cross_entropy(logits, dd.y_test).mean()
    acc = (jnp.argmax(logits, -1) == dd.y_test).mean()
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["accuracy"], acc, rtol=1e-6)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    c = tiny_config(train__epochs=6, baseline=False, anchor__ratio=0.0)
    c.optimizer.name = "sgd"
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_epochs = 3.0
    c.optimizer.learning_rate = 900.0
    net = build(c, dataset)
    with pytest.raises(training.TrainingDiverged, match=r"training diverged: run \d \(vanilla, seed \d\) had loss .* at epoch (\d)"):
        training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.steps()
    last_good = ckpt.read_meta(ckpt.latest_step())["epoch"]
    assert last_good >= 1
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert max(r["epoch"] for r in lines) >= last_good
    assert all(np.isfinite(r["train_loss"]) for r in lines)


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("num_seeds", 0, "config.num_seeds must be an integer >= 1"),
    ("train.batch_size", -3, "config.train.batch_size must be an integer >= 1"),
    ("anchor.ratio", 1.5, r"config.anchor.ratio must be a number in \[0.0, 1.0\]"),
    ("anchor.granularity", "channel", "config.anchor.granularity must be one of"),
    ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate must be a finite number"),
    ("optimizer.name", "rmsprop", "config.optimizer.name must be one of"),
    ("seeds.vary", "all", "config.seeds.vary must be one of"),
    ("model.init", "pytorch", r"config.model.init must be one of \('flax', 'torch'\); got 'pytorch'"),
    ("analysis.pairs", "first", r"config.analysis.pairs must be one of \('all', 'disjoint', 'random'\); got 'first'"),
    ("analysis.pairs_seed", -1, "config.analysis.pairs_seed must be an integer >= 0"),
])
def test_bad_config_values_name_the_field(field, value, message):
    c = tiny_config()
    section, _, leaf = field.rpartition(".")
    node = c[section] if section else c
    with node.unlocked() if hasattr(node, "unlocked") else nullcontext():
        node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_unknown_config_keys_models_and_sources_are_errors(dataset):
    c = tiny_config()
    c.train.epoch = 3
    with pytest.raises(ConfigError, match=r"config.train.epoch is not a known field \(did you mean 'train.epochs'"):
        validate(c)
    with pytest.raises(ValueError, match=r"model.name must be one of \[.*'mlp'.*\]; got 'resnet99'"):
        models.build({"name": "resnet99"}, (40,), 10)
    with pytest.raises(ValueError, match=r"data.source must be one of \[.*'mnist1d'.*\]; got 'mnist2d'"):
        data.load({"source": "mnist2d"})
    c = tiny_config(train__batch_size=5000)
    with pytest.raises(ValueError, match="config.train.batch_size=5000 exceeds"):
        training.fit(c, build(c, dataset), dataset)


# ---------------------------------------------------------------------------------------------
# Workdir: resume after kill, lock, config mismatch, multi-device
# ---------------------------------------------------------------------------------------------

TRAIN_ARGS = ["--config=configs/quickstart.py", "--config.train.epochs=4", "--config.data.num_samples=600",
              "--config.model.width=32", "--config.model.depth=1", "--config.train.checkpoint_every=1",
              "--config.analysis.lmc=False", "--config.train.progress=False", "--config.num_seeds=2"]


def train_cmd(workdir, *extra):
    return [sys.executable, "train.py", *TRAIN_ARGS, *extra, f"--workdir={workdir}"]


def run_train(workdir, env=None, extra=()):
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


# Resuming after SIGKILL (at fault points, mid-checkpoint-write, at random times) and after SIGTERM
# mid-epoch, bit-identical to an uninterrupted run: tests/test_reliability_crash.py (a 4-interruption
# chain by default, 29 interruptions in the slow chain), which replaced the two single-kill tests here.


def test_second_run_on_a_locked_workdir_fails_at_once_and_stale_locks_are_taken_over(tmp_path):
    lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    try:
        t0 = time.time()
        busy = run_train(tmp_path)
        assert busy.returncode != 0
        assert f"is in use by pid {os.getpid()}" in busy.stderr
        assert time.time() - t0 < 60
    finally:
        lock.release()
    code = ("import os, signal; from tna_jax import workdir as workdir_lib; "
            f"workdir_lib.WorkdirLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    dead = run_python(code)
    assert dead.returncode == -signal.SIGKILL
    lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    assert lock.previous_holder is not None and lock.previous_holder["pid"] != os.getpid()
    lock.release()


def test_resuming_with_a_different_config_names_the_fields(tmp_path, dataset):
    c = tiny_config(train__epochs=1, analysis__lmc=False)
    runner.run(c, str(tmp_path))
    c2 = tiny_config(train__epochs=2, analysis__lmc=False)
    c2.optimizer.learning_rate = 0.01
    with pytest.raises(ValueError, match=r"different config: optimizer.learning_rate \(was 0.05, now 0.01\)"):
        runner.run(c2, str(tmp_path))
    c3 = tiny_config(train__epochs=2, analysis__lmc=False)  # more epochs is a resume
    report = runner.run(c3, str(tmp_path))
    assert report["training"]["resumed_from"] == 1


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine"])
def test_resuming_with_other_epochs_under_a_decaying_schedule_is_refused_before_writing(tmp_path, schedule):
    c = tiny_config(train__epochs=10, optimizer__schedule=schedule)
    workdir_lib.prepare_workdir(c, str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "50")  # a checkpoint of the first run
    before = (tmp_path / "config.json").read_bytes()
    longer = tiny_config(train__epochs=20, optimizer__schedule=schedule)
    with pytest.raises(ConfigError, match=(r"config.train.epochs changed from 10 to 20 .* "
                                           rf"config.optimizer.schedule='{schedule}' decays .* fresh --workdir")):
        workdir_lib.prepare_workdir(longer, str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == before
    workdir_lib.prepare_workdir(c, str(tmp_path))  # the same epochs: a resume
    constant = tiny_config(train__epochs=10)
    workdir_lib.prepare_workdir(constant, tmp_path / "constant")
    os.makedirs(tmp_path / "constant" / "checkpoints" / "50")
    workdir_lib.prepare_workdir(tiny_config(train__epochs=20), tmp_path / "constant")  # constant: may train longer


def test_a_config_json_written_before_a_field_existed_resumes_with_its_default(tmp_path):
    c = tiny_config()
    workdir_lib.prepare_workdir(c, str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "5")
    old = ckpt_lib.read_json(tmp_path / "config.json")
    del old["model"]["init"], old["analysis"]["pairs"]
    ckpt_lib.write_json(tmp_path / "config.json", old)
    workdir_lib.prepare_workdir(c, str(tmp_path))  # absent = "flax", "all": the same run
    c.model.init = "torch"
    with pytest.raises(ValueError, match=r"different config: model.init \(was 'flax', now 'torch'\)"):
        workdir_lib.prepare_workdir(c, str(tmp_path))


MULTI_DEVICE_CODE = """
import json, jax, numpy as np
import sys; sys.path.insert(0, 'tests')
from util import tiny_config
from tna_jax import data, models, training
from tna_jax import run_axis as run_axis_lib
from tna_jax import sharding as sharding_lib
c = tiny_config(num_seeds=3, anchor__ratio=0.5)
ds = data.load(c.data)
net = models.build(c.model, ds.input_shape, ds.num_classes)
res = training.fit(c, net, ds, log=lambda s: None)
# A conv net: on CPU its runs are looped, per device under shard_map when there are several.
cc = tiny_config(train__epochs=1, data__source="digits", model={"name": "cnn", "width": 0.25, "hidden": 16},
                 num_seeds=1, train__steps_per_call=1)  # one step per program: a short compile
digits = data.load(cc.data)
cnn = models.build(cc.model, digits.input_shape, digits.num_classes)
assert run_axis_lib.resolve_run_axis(cc, cnn) == "loop"
conv = training.fit(cc, cnn, digits, log=lambda s: None)
# Runs in groups, per device: 8 runs on 4 devices in groups of one run per device.
import jax.numpy as jnp
mesh = sharding_lib.run_mesh()
f = jax.jit(run_axis_lib.loop_over_runs(lambda w, s: (w * s, w.sum()), 1, mesh))
w = sharding_lib.shard_runs(jnp.arange(16.0).reshape(8, 2), mesh)
doubled, sums = run_axis_lib.RunGroups(f, 1, mesh, max_runs=1)(w, 2.0)
assert doubled.tolist() == (2 * np.arange(16.0).reshape(8, 2)).tolist(), doubled
assert sums.tolist() == np.arange(16.0).reshape(8, 2).sum(1).tolist(), sums
# A federated round sampling 2 of 4 clients: on 4 devices the cohort is padded to 4 rows, as many
# as the data has, and must still train only the 2 sampled clients.
import optax
from tna_jax.federated import algorithms, client, driver
dd = data.to_device(ds)
packed = client.pack_clients(np.asarray(dd.x_train)[:200], np.asarray(dd.y_train)[:200],
                             np.array_split(np.arange(200), 4), multiple=mesh.devices.size)
alg = algorithms.fed_avg(net, optax.sgd(0.1), num_clients=4, max_examples=packed.max_examples, batch_size=16,
                         client_fraction=0.5, mesh=mesh)
fed, fed_metrics = jax.jit(alg.apply)(driver.replicated(alg.init(net.init(jax.random.key(0))["params"]), mesh),
                                      driver.place_clients(packed, mesh), jax.random.key(3))
print(json.dumps({"devices": jax.device_count(), "acc": res.test["accuracy"].tolist(),
                  "fed": np.asarray(fed.params["head"]["kernel"]).ravel()[::5].tolist(),
                  "fed_clients": np.asarray(fed_metrics["clients"]).tolist(),
                  "kernel": np.asarray(res.state.params["dense_0"]["kernel"]).ravel()[::97].tolist(),
                  "conv_acc": conv.test["accuracy"].tolist(),
                  "conv_head": np.asarray(conv.state.params["head"]["kernel"]).ravel()[::7].tolist()}))
"""


def test_four_devices_match_one_device():
    one = run_python(MULTI_DEVICE_CODE)
    four = run_python(MULTI_DEVICE_CODE, env={"XLA_FLAGS": xla_flags_with_devices(4)})
    assert one.returncode == 0, one.stderr[-2000:]
    assert four.returncode == 0, four.stderr[-2000:]
    a = json.loads(one.stdout.strip().splitlines()[-1])
    b = json.loads(four.stdout.strip().splitlines()[-1])
    assert a["devices"] == 1 and b["devices"] == 4
    assert len(b["acc"]) == 6  # 6 runs padded to 8 on 4 devices; padding is not reported
    np.testing.assert_allclose(a["kernel"], b["kernel"], atol=1e-5)
    np.testing.assert_allclose(a["acc"], b["acc"], atol=2e-3)
    assert len(b["conv_acc"]) == 2  # 2 arms x 1 seed, padded to one run per device
    np.testing.assert_allclose(a["conv_head"], b["conv_head"], atol=1e-4)
    np.testing.assert_allclose(a["conv_acc"], b["conv_acc"], atol=3e-3)
    assert len(a["fed_clients"]) == 2 and b["fed_clients"] == a["fed_clients"] + [4, 4]  # 2 padding rows
    np.testing.assert_allclose(a["fed"], b["fed"], atol=1e-5)


def read_tensorboard_scalars(logdir):
    """``{tag: {step: value}}`` of a run's tensorboardX event files."""
    out = {}
    for tag, step, value in tensorboard_events(logdir):
        out.setdefault(tag, {})[step] = value
    return out


def test_tensorboard_events_match_metrics_jsonl(tmp_path, dataset):
    c = tiny_config(train__epochs=2, anchor__ratio=0.3)
    training.fit(c, build(c, dataset), dataset, workdir=str(tmp_path), log=lambda s: None)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["TNA-PFN_0.3", "vanilla"]
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard" / "TNA-PFN_0.3" / "seed_1")
    mine = [r for r in rows if r["arm"] == "TNA-PFN 0.3" and r["seed"] == 1]
    assert sorted(scalars["train/loss"]) == [1, 2]
    for r in mine:
        assert scalars["train/loss"][r["epoch"]] == pytest.approx(r["train_loss"], rel=1e-6)
        assert scalars["val/accuracy"][r["epoch"]] == pytest.approx(r["val_accuracy"], rel=1e-6)
