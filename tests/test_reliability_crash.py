"""Crash anywhere, preemption, concurrent runs and determinism of `train.py` runs (issue 11).

A tiny config (MNIST-1D subset, a one-layer MLP of width 16, 2 seeds x 2 arms, 3 epochs of 6
steps, 2 steps per jitted call, a checkpoint every epoch) is run by `crash_harness` many times:
killed with SIGKILL at fault points and at random times, preempted with SIGTERM, killed while
writing a checkpoint or a report, and rerun with the same command each time. What it leaves must
be bit-identical to an uninterrupted run, and nothing may ever be half-written.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from crash_harness import (
    ExecLauncher,
    ForkLauncher,
    Kill,
    base_env,
    checkpoint_steps,
    crash_chain,
    cut_metrics_line,
    differences,
    fingerprint,
    run_command,
    temporaries,
)
from util import ROOT

from tna_jax import checkpoint as ckpt_lib
from tna_jax import data, models, optimizers, training
from tna_jax import runs as runs_lib

ARGS = ["--config=configs/quickstart.py", "--config.train.epochs=3", "--config.data.num_samples=600",
        "--config.model.width=16", "--config.model.depth=1", "--config.num_seeds=2",
        "--config.train.checkpoint_every=1", "--config.train.steps_per_call=2", "--config.analysis.num_alphas=3",
        "--config.analysis.plots=False", "--config.train.tensorboard=False", "--config.train.progress=False"]
STEPS_PER_EPOCH = 6  # 432 training examples / batch 64


def command(workdir, devices=1):
    return [sys.executable, "tests/train_with_faults.py", *ARGS, f"--cpu_devices={devices}", f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def launcher(cache_dir):
    server = ForkLauncher(base_env(cache_dir), ROOT)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(launcher, cache_dir, tmp_path_factory):
    """An uninterrupted run: the fingerprint every interrupted run must reproduce."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    (attempt,) = crash_chain(command(workdir), workdir, [], cwd=ROOT, env=launcher.env, launcher=launcher)
    assert attempt.outcome == "finished", attempt.tail
    return workdir, fingerprint(workdir)


class StepVerifier:
    """Restores every complete checkpoint step with the run's explicit abstract state (orbax
    target and digest checked by the Checkpointer); each step directory is checked once."""

    def __init__(self):
        self.seen = set()
        self.count = 0
        self._target = None

    def target(self, workdir):
        if self._target is None:
            config = ml_collections.ConfigDict(ckpt_lib.read_json(os.path.join(workdir, "config.json")))
            ds = data.load(config.data)
            net = models.build(config.model, ds.input_shape, ds.num_classes)
            runs = runs_lib.make_runs(config)
            base = optimizers.make_optimizer(config.optimizer, STEPS_PER_EPOCH, config.train.epochs)
            factory = optimizers.make_transform(base, config, net, runs_lib.arms_from_config(config))
            keys = runs_lib.make_run_keys(config, runs)
            self._target = jax.eval_shape(lambda k: training.init_runs(net, factory, runs, k), keys)
        return self._target

    def __call__(self, workdir, step):
        directory = os.path.join(workdir, "checkpoints", str(step))
        stat = os.stat(directory)
        key = (directory, stat.st_ino, stat.st_mtime_ns)
        if key in self.seen:
            return
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
        try:
            ckpt.restore(self.target(workdir), step=step, fallback=False)
        finally:
            ckpt.close()
        self.seen.add(key)
        self.count += 1


def full_schedule(seed=11):
    """29 interruptions spread over the whole run, in the order the run reaches them. Timed
    kills (random delays from a seeded generator) carry a fault point as a fallback so that
    the process is dead before the next interruption's point."""
    rng = random.Random(seed)
    return [
        Kill(point="write:config.json"),
        Kill(after_s=rng.uniform(0.2, 1.2), point="write:metrics.jsonl"),
        Kill(point="write:metrics.jsonl"),
        Kill(point="chunk_end:0.2"),
        Kill(term="chunk_end:0.4", point="during_save:0.4", files=3),
        Kill(term="chunk_end:0.4"),
        Kill(point="chunk_end:0.6", damage=cut_metrics_line),
        Kill(point="epoch_end:1"),
        Kill(point="before_save:1"),
        Kill(point="during_save:1", files=1),
        Kill(point="during_save:1", files=12),
        Kill(point="after_save:1"),
        Kill(after_s=rng.uniform(0.5, 2.5), signal=signal.SIGTERM, point="chunk_end:1.4"),
        Kill(point="chunk_end:1.4"),
        Kill(point="epoch_end:2", damage=cut_metrics_line),
        Kill(point="during_save:2", files=2),
        Kill(point="after_save:2"),
        Kill(point="chunk_end:2.2"),
        Kill(after_s=rng.uniform(0.5, 3.0), point="chunk_end:2.4"),
        Kill(term="chunk_end:2.4", point="after_save:2.4"),
        Kill(point="chunk_end:2.6"),
        Kill(point="epoch_end:3"),
        Kill(point="before_save:3"),
        Kill(point="during_save:3", files=2),
        Kill(point="after_save:3"),
        Kill(point="write:metrics.jsonl"),
        Kill(after_s=rng.uniform(0.3, 1.5), signal=signal.SIGTERM, point="write:report.json"),
        Kill(point="write:report.json"),
        Kill(point="write:report.md"),
    ]


def smoke_schedule(seed=5):
    """The default-run subset: one of each kind of interruption."""
    rng = random.Random(seed)
    return [
        Kill(point="during_save:1", files=3),
        Kill(term="chunk_end:1.4", point="during_save:1.4", files=2),
        Kill(after_s=rng.uniform(0.5, 2.5), point="epoch_end:2", damage=cut_metrics_line),
        Kill(point="write:report.json"),
    ]


KINDS = {  # reliability-report rows: which kills count as which fault
    "sigkill_point": ("crash", "SIGKILL at a step/epoch boundary or around a checkpoint (or the fallback "
                               "point of a timed signal that had not fired yet)"),
    "sigkill_during_save": ("crash", "SIGKILL while orbax writes a checkpoint (temporary files on disk)"),
    "sigkill_during_write": ("crash", "SIGKILL between an atomic write and its rename (config, metrics, report)"),
    "sigkill_timed": ("crash", "SIGKILL at a random time (seeded delays)"),
    "sigterm": ("preemption", "SIGTERM (preemption notice) at a step boundary or at a random time"),
    "sigkill_in_preemption_save": ("preemption", "SIGKILL while or right after writing the SIGTERM checkpoint"),
    "cut_metrics_line": ("crash", "metrics.jsonl line cut in the middle (kill mid-append)"),
}


def kind_of(attempt):
    """What actually interrupted the process: a timed signal counts as timed only if it fired
    before the fallback point did."""
    kill = attempt.kill
    if kill.term and kill.point:
        return "sigkill_in_preemption_save"
    if kill.term:
        return "sigterm"
    if kill.after_s is not None and attempt.outcome != "killed at point":
        return "sigterm" if kill.signal == signal.SIGTERM else "sigkill_timed"
    if kill.point.startswith("during_save"):
        return "sigkill_during_save"
    if kill.point.startswith("write:"):
        return "sigkill_during_write"
    return "sigkill_point"


def check_chain(attempts, reference_fp, workdir, verifier, reliability, prefix, test_label):
    """Asserts what every chain must satisfy and records it in the reliability report."""
    final = attempts[-1]
    ok = final.outcome == "finished" and not differences(reference_fp, fingerprint(workdir))
    per_kind = {}
    for a in attempts[:-1]:
        kind = kind_of(a)
        tried, survived = per_kind.get(kind, (0, 0))
        per_kind[kind] = (tried + 1, survived + int(ok and not a.problems))
        if a.damage:
            t, s = per_kind.get("cut_metrics_line", (0, 0))
            per_kind["cut_metrics_line"] = (t + 1, s + int(ok and not a.problems))
    check = (f"rerun of the same command ({test_label}) ends bit-identical to an uninterrupted run "
             "(SHA-256 of every array, report.json, report.md, metrics.jsonl); after every kill each JSON "
             "parses and every complete checkpoint step restores with its digest")
    for kind, (tried, survived) in per_kind.items():
        category, fault = KINDS[kind]
        reliability.record(f"{prefix}.{kind}", category=category, fault=fault, tried=tried, survived=survived,
                           check=check)

    problems = [(a.kill.describe(), p) for a in attempts for p in a.problems]
    assert not problems, problems
    assert final.outcome == "finished", final.tail
    assert differences(reference_fp, fingerprint(workdir)) == []
    assert temporaries(workdir) == []  # orbax and atomic-write leftovers are cleaned up on resume
    assert verifier.count >= 3
    for a in attempts[:-1]:
        if a.kill.point and a.kill.point.startswith("during_save") and a.outcome == "killed at point":
            assert any(".orbax-checkpoint-tmp" in t for t in a.left_behind), (a.kill.describe(), a.left_behind)
        if a.kill.point and a.kill.point.startswith("write:") and a.outcome == "killed at point" \
                and a.kill.after_s is None:
            name = a.kill.point.split(":", 1)[1]
            assert any(t.startswith(f".{name}.") for t in a.left_behind), (a.kill.describe(), a.left_behind)
    return per_kind


def run_chain(schedule, workdir, launcher, verifier):
    return crash_chain(command(workdir), workdir, schedule, cwd=ROOT, env=launcher.env, launcher=launcher,
                       verify=verifier, log=print)


def test_crash_smoke_one_of_each_interruption_resumes_bit_identical(tmp_path, launcher, reference, reliability):
    workdir = str(tmp_path / "run")
    verifier = StepVerifier()
    attempts = run_chain(smoke_schedule(), workdir, launcher, verifier)
    outcomes = [a.outcome for a in attempts]
    check_chain(attempts, reference[1], workdir, verifier, reliability, "crash_smoke", "4 interruptions")
    assert outcomes[1] == "killed at point"  # SIGTERM noticed, then killed while saving the preemption checkpoint
    check_lock_takeovers(attempts, reliability, "concurrency.stale_lock_smoke")


def check_lock_takeovers(attempts, reliability, key):
    """Every run after a SIGKILL at a fault point (the lock is held by then) takes the dead run's lock
    over at once and says whose it was; after a clean exit (finished, preempted) nothing is taken over."""
    tried = ok = 0
    for before, after in zip(attempts, attempts[1:]):
        message = f"took over the lock of pid {before.pid} on"
        if before.outcome == "killed at point":
            tried += 1
            ok += int(message in after.output)
        elif before.outcome in ("finished", "preempted"):
            tried += 1
            ok += int("took over the lock" not in after.output)
    reliability.record(key, category="concurrency", fault="lock left by a SIGKILLed run (the holder is dead), "
                       "or released by a clean exit", tried=tried, survived=ok,
                       check="the next run takes a dead holder's lock over at once and names its pid and host; "
                             "after a clean exit (finished, exit 143) the lock file is empty and nothing is taken over")
    assert ok == tried


@pytest.mark.slow
def test_crash_anywhere_29_interruptions_resume_bit_identical(tmp_path, launcher, reference, reliability):
    workdir = str(tmp_path / "run")
    verifier = StepVerifier()
    schedule = full_schedule()
    t0 = time.time()
    attempts = run_chain(schedule, workdir, launcher, verifier)
    per_kind = check_chain(attempts, reference[1], workdir, verifier, reliability, "crash_anywhere",
                           f"{len(schedule)} interruptions in one chain")
    check_lock_takeovers(attempts, reliability, "concurrency.stale_lock")
    kills = [a for a in attempts[:-1] if a.returncode in (-signal.SIGKILL, -signal.SIGTERM, 143)]
    assert len(schedule) >= 20 and len(kills) == len(schedule)
    assert sum(t for k, (t, _) in per_kind.items() if k.startswith("sigkill")) >= 20
    print(f"{len(attempts)} processes in {time.time() - t0:.0f}s; outcomes: "
          + json.dumps({o: sum(a.outcome == o for a in attempts) for o in {a.outcome for a in attempts}}))


# ---------------------------------------------------------------------------------------------
# Two runs on one workdir, stale locks.
# ---------------------------------------------------------------------------------------------


def test_second_run_on_a_busy_workdir_fails_at_once_naming_the_holder(tmp_path, launcher, reference, reliability):
    workdir = str(tmp_path / "run")
    # The first run stops itself (SIGSTOP) after its first epoch, holding the lock, until we let it go.
    first = subprocess.Popen(command(workdir), cwd=ROOT, env={**launcher.env, "TNA_JAX_STOP_AT": "epoch_end:1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    try:
        t0 = time.time()
        second = run_command(command(workdir), launcher.env, Kill(), cwd=ROOT, launcher=launcher)
        second_seconds = time.time() - t0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_out, _ = first.communicate(timeout=300)
    busy = second[0] == 2 and f"is in use by pid {first.pid} on" in second[2] and "Traceback" not in second[2]
    same = first.returncode == 0 and differences(reference[1], fingerprint(workdir)) == []
    reliability.record("concurrency.second_run", category="concurrency",
                       fault="a second train.py started on a workdir a live run holds",
                       tried=1, survived=int(busy and same),
                       check="the second exits 2 at once with one line naming the holder's pid and host; the "
                             "first run is unaffected and ends bit-identical to the reference")
    assert busy, second[2]
    assert "train.py: error: workdir" in second[2]
    assert second_seconds < 60  # it never waits for the lock
    assert same, first_out[-3000:]


# ---------------------------------------------------------------------------------------------
# Determinism: two runs, and 1 vs 4 devices.
# ---------------------------------------------------------------------------------------------

# 4 forced CPU devices shard the run axis (one run per device); XLA then compiles per-device
# programs for a batch of 1 instead of 4, which may fuse and vectorise reductions differently,
# so float32 rounding differs. Measured on this tiny config: max |Δparam| = 6e-8 after 18 steps,
# test accuracy identical (docs/reliability.md); the bound leaves two orders of magnitude of headroom.
DEVICE_PARAM_ATOL = 1e-5
DEVICE_ACCURACY_ATOL = 1 / 120 + 1e-9  # at most one test example (of 120) may flip


def final_params(workdir, target):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, _, _ = ckpt.restore(target, fallback=False)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state.params)


@pytest.mark.slow
def test_two_runs_are_bit_identical_and_four_devices_agree_within_tolerance(tmp_path, launcher, reference,
                                                                            reliability):
    ref_dir, ref_fp = reference
    fresh = str(tmp_path / "fresh")  # a fresh process without the compilation cache
    rc, _, tail, _ = run_command(command(fresh), base_env(None), Kill(), cwd=ROOT, launcher=ExecLauncher())
    assert rc == 0, tail
    four = str(tmp_path / "four")  # a fresh process: XLA_FLAGS set before JAX starts
    rc, _, tail, _ = run_command(command(four, devices=4), launcher.env, Kill(), cwd=ROOT, launcher=ExecLauncher())
    assert rc == 0, tail
    identical = differences(ref_fp, fingerprint(fresh))
    target = StepVerifier().target(ref_dir)
    a, b = final_params(ref_dir, target), final_params(four, target)
    param_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    rep_a = json.load(open(os.path.join(ref_dir, "report.json")))
    rep_b = json.load(open(os.path.join(four, "report.json")))
    assert rep_b["devices"]["count"] == 4 and rep_a["devices"]["count"] == 1
    acc_diff = max(abs(x["test_accuracy"] - y["test_accuracy"]) for x, y in zip(rep_a["runs"], rep_b["runs"]))
    reliability.record("determinism.two_runs", category="determinism",
                       fault="the same command twice on CPU (one from the compilation cache, one compiled afresh)",
                       tried=1, survived=int(not identical),
                       check="bit-identical: SHA-256 of every array, report.json, report.md, metrics.jsonl")
    reliability.record("determinism.four_devices", category="determinism",
                       fault="1 vs 4 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)",
                       tried=1, survived=int(param_diff <= DEVICE_PARAM_ATOL and acc_diff <= DEVICE_ACCURACY_ATOL),
                       check=f"max |Δparam| = {param_diff:.1e} (tolerance {DEVICE_PARAM_ATOL:g}); max |Δtest "
                             f"accuracy| = {acc_diff:.4f} (tolerance one example of 120)")
    assert identical == []
    assert param_diff <= DEVICE_PARAM_ATOL
    assert acc_diff <= DEVICE_ACCURACY_ATOL


# ---------------------------------------------------------------------------------------------
# The same guarantees for a federated run (rounds instead of epochs).
# ---------------------------------------------------------------------------------------------

FED_ARGS = ["--config=configs/fed_mnist1d.py", "--config.num_seeds=2", "--config.data.num_samples=600",
            "--config.model.depth=1", "--config.model.width=16", "--config.federated.num_clients=6",
            "--config.federated.rounds=6", "--config.federated.eval_every=2", "--config.federated.checkpoint_every=2",
            "--config.federated.algorithms=('fedavg','fedpnu')", "--config.federated.server_optimizers=('fedavgm',)",
            "--config.federated.client_fraction=0.5", "--config.train.progress=False",
            "--config.train.tensorboard=False"]


def fed_command(workdir):
    return [sys.executable, "tests/train_with_faults.py", *FED_ARGS, "--cpu_devices=1", f"--workdir={workdir}"]


def fed_schedule(seed=3):
    """13 interruptions of a 6-round federated run (checkpoints after rounds 2, 4, 6), in the order
    the resumed runs reach them, one or two of each kind: a kill at a round end (with a metrics line
    cut), before/during/after a checkpoint write, between an atomic write and its rename, SIGTERM at
    a round end (checkpoint at once, exit 143), a kill while writing that preemption checkpoint, and
    seeded random times. (The training chain above is the long one: 29 interruptions.)"""
    rng = random.Random(seed)
    return [
        Kill(point="write:config.json"),
        Kill(after_s=rng.uniform(0.2, 1.5), point="round_end:1"),
        Kill(point="round_end:2", damage=cut_metrics_line),
        Kill(point="during_save:2", files=2),
        Kill(point="after_save:2"),
        Kill(term="round_end:3"),
        Kill(point="round_end:4"),
        Kill(term="round_end:5", point="during_save:5", files=2),
        Kill(after_s=rng.uniform(0.5, 3.0), point="round_end:5"),
        Kill(point="during_save:6", files=1),
        Kill(point="after_save:6"),
        Kill(point="write:report.json"),
        Kill(point="write:report.md"),
    ]


class MetaVerifier:
    """Every complete checkpoint step's metadata reads and carries the state's digest (the
    arrays themselves are compared at the end through the final step's digest)."""

    def __init__(self):
        self.count = 0

    def __call__(self, workdir, step):
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
        try:
            meta = ckpt.read_meta(step)
        finally:
            ckpt.close()
        assert meta["round"] == step and len(meta["state_digest"]) == 64, meta
        self.count += 1


def test_federated_crash_chain_resumes_bit_identical(tmp_path, launcher, reliability):
    reference_dir = str(tmp_path / "reference")
    (straight,) = crash_chain(fed_command(reference_dir), reference_dir, [], cwd=ROOT, env=launcher.env,
                              launcher=launcher)
    assert straight.outcome == "finished", straight.tail
    workdir = str(tmp_path / "run")
    verifier = MetaVerifier()
    schedule = fed_schedule()
    attempts = crash_chain(fed_command(workdir), workdir, schedule, cwd=ROOT, env=launcher.env, launcher=launcher,
                           verify=verifier, log=print)
    per_kind = check_chain(attempts, fingerprint(reference_dir), workdir, verifier, reliability, "fed_crash",
                           f"federated run, {len(schedule)} interruptions in one chain")
    preempted = [a for a in attempts if a.outcome == "preempted"]
    assert preempted and "stopped by SIGTERM after round 3 of 6; checkpoint saved" in preempted[0].output
    assert attempts[-1].resumed_from is not None  # the last run resumed rather than starting over
    assert sum(t for k, (t, _) in per_kind.items() if k.startswith("sigkill")) >= 10
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert [r["arm"] for r in report["arms"]] == ["FedAvg + FedAvgM", "FedPNU ρ=0.4 + FedAvgM"]
    assert report["curves"]["FedAvg + FedAvgM"]["rounds"] == [2, 4, 6]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["round"] for r in lines] == [r for r in (2, 4, 6) for _ in range(4)]
    assert "final − FedAvg" in open(os.path.join(workdir, "report.md")).read()
    assert os.path.exists(os.path.join(workdir, "accuracy_vs_round.png"))


def test_kill_chain_leaves_tensorboard_complete_and_at_most_keep_checkpoints(tmp_path, launcher):
    """Issue 21: after kill -9 chains the TensorBoard event files hold exactly the points of
    metrics.jsonl (lost buffered points rewritten on resume, none twice), and no more checkpoint
    steps remain than ``train.keep_checkpoints`` (2)."""
    from test_harness import metrics_points, tensorboard_points

    workdir = str(tmp_path / "run")
    args = [a.replace("tensorboard=False", "tensorboard=True") for a in ARGS]
    cmd = [sys.executable, "tests/train_with_faults.py", *args, "--cpu_devices=1", f"--workdir={workdir}"]
    kills = [Kill(point="epoch_end:1"), Kill(point="epoch_end:2"), Kill(point="during_save:3", files=2),
             Kill(point="write:report.json")]
    attempts = crash_chain(cmd, workdir, kills, cwd=ROOT, env=launcher.env, launcher=launcher, log=print)
    assert [a.outcome for a in attempts] == ["killed at point"] * 4 + ["finished"], attempts[-1].tail
    assert [a.resumed_from for a in attempts[1:]] == [None, "epoch 1", "epoch 2", "epoch 3"]
    for arm in ("vanilla", "TNA-PFN_0.4"):
        for seed in (0, 1):
            points = tensorboard_points(os.path.join(workdir, "tensorboard", arm, f"seed_{seed}"))
            assert len(points) == len(set(points)) == 3 * 4  # 3 epochs x 4 scalars, no duplicates
            assert sorted(points) == metrics_points(workdir, arm.replace("_", " "), seed)
    assert len(checkpoint_steps(workdir)) == 2
