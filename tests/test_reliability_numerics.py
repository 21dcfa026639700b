"""Numerical faults (issue 11): a diverging learning rate stops at the first non-finite loss with
a clear message and keeps the last good checkpoint; in bfloat16, with overflowing or NaN
gradients and with loss-scaling-style skipped steps, no anchored weight ever moves.
"""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from util import tiny_config

from tna_jax import anchors, data, models, optimizers, training
from tna_jax import checkpoint as ckpt_lib
from tna_jax import runs as runs_lib


@pytest.fixture(scope="module")
def dataset():
    return data.load(tiny_config().data)


def setup(config, ds, *, concrete=False):
    """The pieces fit() builds, from the public functions (for an independent re-computation);
    the initial state abstract (a restore target) unless `concrete`."""
    net = models.build(config.model, ds.input_shape, ds.num_classes)
    runs = runs_lib.make_runs(config)
    keys = runs_lib.make_run_keys(config, runs)
    spe = ds.sizes()["train"] // config.train.batch_size
    base = optimizers.make_optimizer(config.optimizer, spe, config.train.epochs)
    factory = optimizers.make_transform(base, config, net, runs_lib.arms_from_config(config))
    init_fn = lambda k: training.init_runs(net, factory, runs, k)  # noqa: E731
    init = jax.jit(init_fn)(keys) if concrete else jax.eval_shape(init_fn, keys)
    return net, runs, keys, spe, factory, init


def diverging_config():
    c = tiny_config(train__epochs=6, baseline=False, anchor__ratio=0.0)
    c.optimizer.name = "sgd"
    c.optimizer.schedule = "warmup_cosine"  # the step size grows every step: divergence comes mid-run
    c.optimizer.warmup_epochs = 3.0
    c.optimizer.learning_rate = 900.0
    c.train.steps_per_call = 4
    return c


def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, dataset,
                                                                                          reliability):
    c = diverging_config()
    net, runs, keys, spe, factory, init = setup(c, dataset)
    with pytest.raises(training.TrainingDiverged) as info:
        training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None)
    message = str(info.value)
    m = re.search(r"run (\d+) \(vanilla, seed (\d+)\) had loss (\S+) at epoch (\d+), step (\d+) of (\d+)", message)
    assert m, message
    run, epoch, step = int(m.group(1)), int(m.group(4)), int(m.group(5))
    assert "Lower config.optimizer.learning_rate (now 900.0)" in message and "last good checkpoint" in message

    # The last good checkpoint: the epoch before the one that diverged, finite, digest intact.
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    state, _, meta = ckpt.restore(init, fallback=False)
    ckpt.close()
    assert (meta["epoch"], meta["step_in_epoch"]) == (epoch - 1, 0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))

    # Independently: from that checkpoint, one step per call, the first non-finite loss of any run.
    dd = data.to_device(dataset, normalize=c.data.normalize)
    one_step = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), num_train=int(dd.x_train.shape[0]),
                                         batch_size=c.train.batch_size, num_steps=1, donate=False)
    first = None
    for e in range(meta["epoch"], c.train.epochs):
        for s in range(spe):
            state, mc = one_step(state, keys.data, keys.dropout, e, s, dd.x_train, dd.y_train)
            bad = np.flatnonzero(~np.isfinite(np.asarray(mc.loss_sum)))
            if bad.size:
                first = (int(bad[0]), e + 1, s + 1)
                break
        if first:
            break
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    finite_rows = all(np.isfinite(r["train_loss"]) for r in rows) and max(r["epoch"] for r in rows) == epoch - 1

    reliability.record("numerics.divergence", category="numerics",
                       fault="learning rate warming up to 900 (SGD): the loss overflows mid-epoch",
                       tried=1, survived=int(first == (run, epoch, step) and finite_rows),
                       check="TrainingDiverged names the run, the epoch, the step (= the first non-finite loss, "
                             "re-computed step by step from the kept checkpoint) and the fix; the last good "
                             "checkpoint restores, finite; metrics hold only the finite epochs")
    assert first == (run, epoch, step), (first, message)
    assert finite_rows


def bits(x):
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])


def anchored_entries_equal(before, after, mask):
    return all(bool(jnp.all(jnp.where(m, bits(a) == bits(b), True)))
               for a, b, m in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(mask)))


@pytest.mark.slow  # ~20 s of compiling; the transform-level bfloat16 test below runs by default
def test_bfloat16_training_never_moves_an_anchor(dataset, reliability):
    """The training step itself (what fit() jits), with bfloat16 computation and large steps."""
    c = tiny_config(train__epochs=1, baseline=True, anchor__ratio=0.5, model__dtype="bfloat16")
    c.optimizer.learning_rate = 0.5
    net, runs, keys, spe, factory, init = setup(c, dataset, concrete=True)
    dd = data.to_device(dataset, normalize=c.data.normalize)
    epoch_fn = training.make_train_epoch(net, factory(0.0, jax.random.key(0)), num_train=int(dd.x_train.shape[0]),
                                         batch_size=c.train.batch_size, donate=False)
    state = init
    for e in range(2):
        state, _ = epoch_fn(state, keys.data, keys.dropout, e, 0, dd.x_train, dd.y_train)
    mask = training.mask_of(state)
    # Anchored entries hold their values (reached in the first step, exact from the second).
    ok = anchored_entries_equal(anchors.find_state(init.opt_state).values, state.params, mask)
    ok = ok and bool(jax.vmap(anchors.verify)(state.params, state.opt_state).all())
    anchored_runs = [r.index for r in runs if r.arm.method == "anchor"]
    moved = [float(jnp.mean(jnp.where(m[i], False, p0[i] != p[i])) / jnp.mean(~m[i]))
             for i in anchored_runs
             for p0, p, m in zip(jax.tree.leaves(init.params), jax.tree.leaves(state.params), jax.tree.leaves(mask))
             if p.ndim > 2]
    reliability.record("numerics.bf16_fit", category="numerics",
                       fault="2 epochs of TNA-PFN training steps with bfloat16 computation (lr 0.5)", tried=1,
                       survived=int(ok and min(moved) > 0.9),
                       check="every anchored entry bit-identical to its anchor value; >90% of free kernel "
                             "entries moved")
    assert ok
    assert min(moved) > 0.9


GRADIENT_FAULTS = {
    "inf": lambda g: g.at[(0,) * g.ndim].set(jnp.inf).at[1].set(-jnp.inf),
    "nan": lambda g: g.at[2].set(jnp.nan),
    "overflow x 2^15 in bf16": lambda g: (g * 2.0**15 * 1e35).astype(g.dtype),
    "all nan": lambda g: jnp.full_like(g, jnp.nan),
}

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "adam": lambda: optax.adam(1e-2),
    "skip non-finite (loss-scaling style)": lambda: optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=2),
}


def test_anchors_stay_put_under_overflowing_or_nan_gradients(reliability, dtype=jnp.bfloat16):
    key = jax.random.key(7)
    params = {"dense": {"kernel": jax.random.normal(key, (16, 8), dtype), "bias": jnp.linspace(-1, 1, 8).astype(dtype)}}
    failures, tried = [], 0
    mask = anchors.anchor_mask(params, 0.5, jax.random.key(1))
    for opt_name, make in OPTIMIZERS.items():
        tx = optax.chain(make(), anchors.fixed_anchor_mask(0.5, jax.random.key(1)))
        step = jax.jit(lambda p, s, g, tx=tx: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
        for fault_name, fault in GRADIENT_FAULTS.items():
            state, p = tx.init(params), params
            for i in range(4):  # clean, faulty, clean, faulty
                g = jax.tree.map(lambda x, i=i: jnp.sin(x * 3.0 + i).astype(x.dtype), p)
                if i % 2:
                    g = jax.tree.map(fault, g)
                p, state = step(p, state, g)
            tried += 1
            if not anchored_entries_equal(params, p, mask):
                failures.append((opt_name, fault_name))
    survived = tried - len(failures)
    reliability.record(f"numerics.anchor_faults_{jnp.dtype(dtype).name}", category="numerics",
                       fault=f"{jnp.dtype(dtype).name} parameters: gradients with inf, NaN, bf16 overflow, all NaN, "
                             "through SGD, Adam and optax.apply_if_finite (skipped steps)",
                       tried=tried, survived=survived,
                       check="after 4 updates (2 faulty) every anchored entry is bit-identical to its initial value")
    assert not failures, failures
    chex.assert_trees_all_equal_shapes(params, p)
