"""The loop harness (stop signals, checkpoint cadence, hooks), `gradient_step`, and the loop points
of issue 21: TensorBoard flushed at every checkpoint and rewritten on resume, SIGTERM in the last
epoch honoured, the checkpoint keep-limit after a kill."""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from util import tensorboard_events, tiny_config

from tna_jax import checkpoint as ckpt_lib
from tna_jax import data, harness, hooks, logs, models, training
from tna_jax.steps import gradient_step


@pytest.fixture(scope="module")
def dataset():
    return data.load(tiny_config().data)


def build(config, dataset):
    return models.build(config.model, dataset.input_shape, dataset.num_classes)


def tensorboard_points(logdir):
    """Every scalar event of a run's event files, as (tag, step) pairs (duplicates kept)."""
    return [(tag, step) for tag, step, _ in tensorboard_events(logdir)]


def metrics_points(workdir, arm, seed):
    rows = logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return sorted((f"{k.split('_')[0]}/{k.split('_')[1]}", r["epoch"]) for r in rows
                  if r["arm"] == arm and r["seed"] == seed for k in logs.SCALARS if k in r)


# ---------------------------------------------------------------------------------------------
# The harness itself.
# ---------------------------------------------------------------------------------------------


def test_loop_saves_on_its_cadence_calls_hooks_in_order_and_stops_after_a_signal(tmp_path):
    seen, saved = [], []
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)

    def hook(point, directory):
        seen.append((point, directory))
        if point == "iteration_end:2":
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(harness.Preempted, match=r"stopped by SIGTERM after round 2 of 5; checkpoint saved in "):
        with harness.Loop(5, start=0, unit="round", checkpointer=ckpt, checkpoint_every=3, hooks=[hook]) as loop:
            for i in loop.iterations():
                loop.point(f"iteration_end:{i + 1}")
                loop.end_iteration(i + 1, lambda d=i + 1: saved.append(d))
    assert saved == [2]  # not on the cadence (3), but the stop saves
    assert [p for p, _ in seen] == ["iteration_end:1", "iteration_end:2", "before_save:2", "during_save:2",
                                    "after_save:2"]
    assert dict(seen)["during_save:2"] == ckpt.directory and dict(seen)["before_save:2"] is None
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are restored


def test_hooks_installed_for_a_block_reach_loops_and_atomic_writes(tmp_path):
    seen = []
    with hooks.installed([lambda point, directory: seen.append(point)]):
        ckpt_lib.write_json(str(tmp_path / "r.json"), {"a": 1})
        with harness.Loop(1) as loop:
            for i in loop.iterations():
                loop.point(f"end:{i}")
    ckpt_lib.write_json(str(tmp_path / "s.json"), {"a": 1})  # outside: no hook
    assert seen == ["write:r.json", "end:0"]


def test_resume_trims_steps_past_the_restored_one_and_beyond_keep(tmp_path):
    three = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2, 3):
        three.save(step, {"w": jnp.full(2, float(step))}, meta={"step": step})
    three.close()
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    state, meta = harness.resume(ckpt, {"w": jnp.zeros(2)}, lambda m: m["step"])
    assert meta["step"] == 3 and state["w"].tolist() == [3.0, 3.0]
    assert ckpt.steps() == [2, 3]
    assert harness.resume(None, {"w": jnp.zeros(2)}, lambda m: m["step"]) is None


def test_gradient_step_is_the_hand_written_step_bit_for_bit():
    params = {"w": jax.random.normal(jax.random.key(0), (5, 3)), "b": jnp.arange(3.0)}
    x = jax.random.normal(jax.random.key(1), (7, 5))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(p, x):
        out = x @ p["w"] + p["b"]
        return jnp.mean(out**2), out

    (loss, out), new_params, new_state = jax.jit(
        lambda p, s, x: gradient_step(loss_fn, tx, p, s, x, has_aux=True))(params, opt_state, x)
    (ref_loss, ref_out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
    updates, ref_state = tx.update(grads, opt_state, params)
    ref_params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((ref_params, ref_state))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(jnp.abs(new_params["w"] - params["w"]).max()) > 1e-3  # it moved


# ---------------------------------------------------------------------------------------------
# fit through the harness: issue 21's loop points.
# ---------------------------------------------------------------------------------------------


def test_a_sigterm_in_the_last_epoch_stops_with_a_checkpoint_and_the_rerun_finishes(tmp_path, dataset):
    c = tiny_config(train__epochs=2)
    net = build(c, dataset)

    def term_in_last_epoch(point, directory):
        if point == "chunk_end:1.1":  # the first step of the last epoch
            os.kill(os.getpid(), signal.SIGTERM)

    c.train.steps_per_call = 1
    with pytest.raises(training.Preempted, match=r"stopped by SIGTERM at step 1 of 6 in epoch 2; checkpoint saved"):
        training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None, hooks=[term_in_last_epoch])
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.read_meta(ckpt.latest_step())["step_in_epoch"] == 1

    def term_at_last_epoch_end(point, directory):
        if point == "epoch_end:2":
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(training.Preempted, match=r"stopped by SIGTERM after epoch 2; checkpoint saved"):
        training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None, hooks=[term_at_last_epoch_end])
    assert ckpt.latest_step() == 2 * 6 and ckpt.read_meta(12)["epoch"] == 2
    ckpt.close()
    result = training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None, hooks=[])
    assert result.resumed_from == 2 and len(result.history) == 2 * len(result.runs)


def test_tensorboard_is_flushed_at_every_checkpoint(tmp_path, dataset):
    c = tiny_config(train__epochs=3, num_seeds=1, anchor__ratio=0.0, baseline=False)
    on_disk = {}

    def count(point, directory):
        if point.startswith("after_save:"):
            on_disk[point] = len(tensorboard_points(tmp_path / "tensorboard" / "vanilla" / "seed_0"))

    training.fit(c, build(c, dataset), dataset, workdir=str(tmp_path), log=lambda s: None, hooks=[count])
    assert on_disk == {"after_save:1": 4, "after_save:2": 8, "after_save:3": 12}  # 4 scalars per epoch


def test_resume_rewrites_the_tensorboard_points_a_kill_lost_and_keeps_two_checkpoints(tmp_path, dataset):
    c = tiny_config(train__epochs=3, num_seeds=1, anchor__ratio=0.0, baseline=False)
    net = build(c, dataset)
    logdir = tmp_path / "tensorboard" / "vanilla" / "seed_0"
    training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None, hooks=[])
    # What a kill leaves: event files that lost their buffered points (here: all of them), and
    # one checkpoint too many (killed after orbax finalised a step, before it deleted the oldest).
    for name in os.listdir(logdir):
        with open(logdir / name, "wb"):
            pass
    steps_dir = tmp_path / "checkpoints"
    assert sorted(int(s) for s in os.listdir(steps_dir) if s.isdigit()) == [12, 18]
    shutil.copytree(steps_dir / "12", steps_dir / "6")
    result = training.fit(c, net, dataset, workdir=str(tmp_path), log=lambda s: None, hooks=[])
    assert result.resumed_from == 3
    points = tensorboard_points(logdir)
    assert len(points) == len(set(points)) == 12
    assert sorted(points) == metrics_points(tmp_path, "vanilla", 0)
    assert sorted(int(s) for s in os.listdir(steps_dir) if s.isdigit()) == [12, 18]


# ---------------------------------------------------------------------------------------------
# A new experiment kind needs no loop scaffolding of its own.
# ---------------------------------------------------------------------------------------------


def toy_kind(config, workdir):
    """Linear regression by SGD: the kind's own code is the step and its rows; checkpoints,
    resume, signals, metrics and hooks come from the harness."""
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    tx = optax.sgd(0.1)
    params = {"w": jnp.zeros(3)}
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) if workdir else None
    resumed = harness.resume(ckpt, {"params": params, "opt": tx.init(params)}, lambda meta: meta["epoch"])
    state, start = (resumed[0], resumed[1]["epoch"]) if resumed else ({"params": params, "opt": tx.init(params)}, 0)
    metrics = logs.MetricsLog(workdir, [{"run": 0, "arm": "toy", "seed": 0}], start, tensorboard=False)
    step = jax.jit(lambda s: gradient_step(lambda p: jnp.mean((x @ p["w"] - y) ** 2), tx, s["params"], s["opt"]))
    epochs = int(config.train.epochs)
    with harness.Loop(epochs, start=start, checkpointer=ckpt, metrics=metrics) as loop:
        for epoch in loop.iterations():
            loss, params, opt = step(state)
            state = {"params": params, "opt": opt}
            loop.log([{"epoch": epoch + 1, "run": 0, "arm": "toy", "seed": 0, "train_loss": float(loss)}])
            loop.point(f"epoch_end:{epoch + 1}")
            loop.end_iteration(epoch + 1, lambda e=epoch + 1, s=state: ckpt.save(e, s, meta={"epoch": e}))
    return {"w": np.asarray(state["params"]["w"]).tolist(), "resumed_from": start}


def test_a_toy_kind_on_the_harness_resumes_after_a_sigterm_bit_identical(tmp_path):
    from tna_jax import runner
    from tna_jax.experiments import registry

    registry.register("test_toy_harness")(toy_kind)
    c = tiny_config(kind="test_toy_harness", train__epochs=5)
    straight = runner.run(c, str(tmp_path / "straight"))

    def term(point, directory):
        if point == "epoch_end:2":
            os.kill(os.getpid(), signal.SIGTERM)

    with hooks.installed([term]), pytest.raises(harness.Preempted, match="after epoch 2 of 5"):
        runner.run(c, str(tmp_path / "stopped"))
    resumed = runner.run(c, str(tmp_path / "stopped"))
    assert resumed["resumed_from"] == 2 and resumed["w"] == straight["w"]
    assert abs(straight["w"][0] - 1.0) < 0.5  # it learns
    rows = logs.read_metrics(str(tmp_path / "stopped" / "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
