"""Every experiment kind over several processes (jax.distributed): ``train.py`` started once per
process on 127.0.0.1, each process with 2 CPU devices, against one process with all 4 devices.

The commands are read from docs/howto/multihost.md ("Two processes on one machine"): its
``train.py`` commands and the overrides it says the tests add; only the workdir and the port
change (test_the_commands_run_are_the_pages checks that, fast).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from doc_commands import flag_value, page_commands
from util import ROOT, xla_flags_with_devices

PAGE = "docs/howto/multihost.md"


def page_local_commands():
    """The page's "Two processes on one machine" commands: (the processes' argvs, the one-process argv)."""
    first = [c for c in page_commands(PAGE) if c.argv[:2] == ("python", "train.py") and not c.inline][:3]
    return [c.argv[1:] for c in first[:2]], first[2].argv[1:], first


def page_shrink():
    """The overrides the page says the tests add (they shrink the quickstart to seconds)."""
    with open(os.path.join(ROOT, PAGE)) as f:
        return re.search(r"`(--config\.num_seeds=[^`]+)`", f.read()).group(1).split()


TWO, ONE, _ = page_local_commands()
SHRINK = page_shrink()
# The quickstart as the page runs it (its --config), shrunk as the page says; each test sets the epochs.
QUICK = ["train.py", next(a for a in TWO[0] if a.startswith("--config=")),
         *(a for a in SHRINK if not a.startswith("--config.train.epochs="))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def process_commands(args, workdir, nproc, devices_per_process=2, port=None):
    """The argv of each of `nproc` processes running ``train.py <args>`` (one coordinator on 127.0.0.1)."""
    cmd = [*args, f"--workdir={workdir}", f"--cpu_devices={devices_per_process}"]
    if nproc == 1:
        return [cmd]
    cmd += [f"--coordinator=127.0.0.1:{port or free_port()}", f"--num_processes={nproc}"]
    return [[*cmd, f"--process_id={i}"] for i in range(nproc)]


def start_processes(args, workdir, nproc, devices_per_process=2, process_env=None):
    """:func:`process_commands` started; the Popen objects. `process_env` maps a process index to
    extra environment variables (fault injection)."""
    if process_env:  # the fault hooks are armed by the test-only entry point (tests/fault_hooks.py)
        args = ["tests/train_with_faults.py" if a == "train.py" else a for a in args]
    return [subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env={**env(), **(process_env or {}).get(i, {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, cmd in enumerate(process_commands(args, workdir, nproc, devices_per_process))]


def finish(procs, expect=0):
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == expect, err[-3000:]
    return [o for o, _ in outs]


def run_train_py(args, workdir, nproc, devices_per_process=2):
    return finish(start_processes(args, workdir, nproc, devices_per_process))


def report(workdir):
    return json.loads((workdir / "report.json").read_text(), parse_constant=pytest.fail)


def assert_same_train_report(a, b, atol=2e-3):
    """Accuracies and LMC barriers of two train reports agree within float tolerance."""
    assert [x["arm"] for x in a["arms"]] == [x["arm"] for x in b["arms"]]
    for x, y in zip(a["arms"], b["arms"]):
        np.testing.assert_allclose(x["test_accuracy_mean"], y["test_accuracy_mean"], atol=atol)
    np.testing.assert_allclose([r["test_accuracy"] for r in a["runs"]], [r["test_accuracy"] for r in b["runs"]],
                               atol=atol)
    assert a["lmc"].keys() == b["lmc"].keys()
    for arm in a["lmc"]:
        for key in ("accuracy_barrier_mean", "loss_barrier_mean", "interp_accuracy_mean"):
            np.testing.assert_allclose(a["lmc"][arm][key], b["lmc"][arm][key], atol=atol, err_msg=f"{arm} {key}")


def test_the_commands_run_are_the_pages():
    """What the first test below starts is the page's commands with the workdir and port changed
    and the page's overrides added: the same flags, the same values."""
    two, one, commands = page_local_commands()
    assert [c.background for c in commands] == [True, False, False]  # process 0 in the background
    port = flag_value(two[0], "--coordinator").rsplit(":", 1)[1]
    devices = int(flag_value(two[0], "--cpu_devices"))
    assert int(flag_value(one, "--cpu_devices")) == len(two) * devices  # the same global mesh

    def page(argv, workdir):
        return sorted([*(f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in argv), *SHRINK])

    run_two = process_commands([*QUICK, "--config.train.epochs=2"], "W2", len(two), devices, port=port)
    assert [sorted(c) for c in run_two] == [page(argv, "W2") for argv in two]
    (run_one,) = process_commands([*QUICK, "--config.train.epochs=2"], "W1", 1, len(two) * devices)
    assert sorted(run_one) == page(one, "W1")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quickstart_over_two_processes_equals_one_process_and_resumes_on_another_count(tmp_path):
    """2 processes x 2 devices train and analyse the quickstart as 1 process x 4 devices does;
    process 0 alone prints and writes the report and metrics, both write the checkpoints; a
    rerun with more epochs as 1 process resumes from the 2-process checkpoint."""
    two, one = tmp_path / "two", tmp_path / "one"
    outs = run_train_py([*QUICK, "--config.train.epochs=2"], two, nproc=len(TWO),
                        devices_per_process=int(flag_value(TWO[0], "--cpu_devices")))
    assert "| vanilla |" in outs[0] and "| vanilla |" not in outs[1]  # process 0 prints the table
    run_train_py([*QUICK, "--config.train.epochs=2"], one, nproc=1,
                 devices_per_process=int(flag_value(ONE, "--cpu_devices")))
    a, b = report(two), report(one)
    assert a["devices"] == {"backend": "cpu", "count": 4, "processes": 2}
    assert b["devices"] == {"backend": "cpu", "count": 4, "processes": 1}
    assert_same_train_report(a, b)
    assert min(r["test_accuracy"] for r in a["runs"]) > 0.15  # trained (chance: 0.1)
    rows = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert len(rows) == 2 * 4  # epochs x runs, once each: process 1 wrote nothing
    assert open(two / ".lock").read() == ""  # released
    assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
    # Resume the 2-process run with 1 process (4 devices: the same global mesh) for one more epoch.
    resumed = run_train_py([*QUICK, "--config.train.epochs=3"], two, nproc=1, devices_per_process=4)
    assert "resuming from the checkpoint of epoch 2" in resumed[0]
    run_train_py([*QUICK, "--config.train.epochs=3"], one, nproc=1, devices_per_process=4)
    assert report(two)["training"]["resumed_from"] == 2
    assert_same_train_report(report(two), report(one))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_both_and_kill_9_then_resume_on_one_process(tmp_path):
    """SIGTERM to process 1 alone (at the end of epoch 1) stops both processes at the same boundary
    with a checkpoint (exit 143); a rerun then loses process 1 to SIGKILL after the epoch-3
    checkpoint, and process 0 is killed too (as a scheduler does); one process with the same 4
    devices resumes and ends where an uninterrupted run ends."""
    work, ref = tmp_path / "work", tmp_path / "ref"
    args = [*QUICK, "--config.train.epochs=4"]
    stopped = start_processes(args, work, nproc=2, process_env={1: {"TNA_JAX_TERM_AT": "epoch_end:1"}})
    outs = finish(stopped, expect=143)
    assert "stopped by a signal to another process after epoch 1" in outs[0]
    assert "stopped by SIGTERM after epoch 1" in outs[1]
    assert len(open(work / "metrics.jsonl").readlines()) == 4  # epoch 1's runs, written once
    killed = start_processes(args, work, nproc=2, process_env={1: {"TNA_JAX_KILL_AT": "after_save:3"}})
    killed[1].wait(timeout=600)
    assert killed[1].returncode == -9
    killed[0].send_signal(signal.SIGKILL)  # the scheduler ends what is left of the job
    killed[0].wait(timeout=60)
    (resumed,) = run_train_py(args, work, nproc=1, devices_per_process=4)
    assert "resuming from the checkpoint of epoch 3" in resumed
    run_train_py(args, ref, nproc=1, devices_per_process=4)
    assert report(work)["training"]["resumed_from"] == 3
    assert_same_train_report(report(work), report(ref))


PAIRS_CODE = """
import json, sys
import jax
pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
import numpy as np
from tna_jax import data, distributed, evaluation, lmc, models, sharding
from tna_jax.lmc import pairs as pairs_lib
ds = data.load({"source": "mnist1d", "num_samples": 400})
net = models.build({"name": "mlp", "depth": 1, "width": 16}, ds.input_shape, ds.num_classes)
stacked = jax.vmap(net.init)(jax.random.split(jax.random.key(0), 4))  # 4 models, one per device
stacked = sharding.shard_runs(jax.tree.map(np.asarray, stacked), sharding.run_mesh())
x, y = np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test)
table = lmc.pairwise_barriers(evaluation.make_eval_fn(net), stacked, (x, y), alphas=np.linspace(0, 1, 3), chunk=2)
print(json.dumps({"sharded_programs": pairs_lib._sharded_pairs_program.cache_size(),
                  "spans": not jax.tree.leaves(stacked)[0].is_fully_addressable,
                  "signal_anywhere": distributed.any_process(pid == 1),
                  "loss": np.asarray(table.paths.loss).tolist(), "acc": np.asarray(table.paths.accuracy).tolist()}))
"""


def run_code(code, nproc, devices_per_process):
    """`code` in `nproc` processes of `devices_per_process` CPU devices; each one's last JSON line."""
    port = str(free_port())
    proc_env = {**env(), "XLA_FLAGS": xla_flags_with_devices(devices_per_process)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(nproc), port], cwd=ROOT, env=proc_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    return [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out in finish(procs)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pairwise_table_is_split_over_every_process_and_equals_one_process():
    """The (pair, α) points of an LMC table over models spread on 2 processes are evaluated on
    the global mesh (the sharded program is used) and give the numbers of one process."""
    two = run_code(PAIRS_CODE, nproc=2, devices_per_process=2)
    (one,) = run_code(PAIRS_CODE, nproc=1, devices_per_process=4)
    assert [o["spans"] for o in two] == [True, True] and one["spans"] is False
    assert [o["sharded_programs"] for o in two] == [1, 1] and one["sharded_programs"] == 0
    assert [o["signal_anywhere"] for o in two] == [True, True]  # process 1's flag reaches process 0
    assert np.shape(one["loss"]) == (6, 3)  # 4 models: 6 pairs x 3 alphas
    for o in two:
        assert o["acc"] == two[0]["acc"]
        np.testing.assert_allclose(o["loss"], one["loss"], rtol=1e-5)
        np.testing.assert_allclose(o["acc"], one["acc"], atol=1e-6)


# The other kinds, each with the small config of its in-process test, as 2 processes x 2 devices
# (runner.run, what train.py calls): both processes report the same numbers, process 0 writes the
# report. That 2 processes equal 1 is checked on the quickstart and the pairwise table above (the
# same code paths: fit, evaluate_runs, pairwise_barriers), which keeps CI within its budget.
KIND_CODE = """
import json, sys
import jax
pid, nproc, port, kinds, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split(","), sys.argv[5]
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
sys.path.insert(0, "tests")
import ml_collections
from util import tiny_config
from tna_jax import runner
out = {}
for kind in kinds:
  workdir = f"{root}/{kind}"
  if kind in ("grid", "layerwise"):
      c = tiny_config(kind=kind, train__epochs=1, data__num_samples=300, analysis__num_alphas=3, train__tensorboard=False)
      c.sweep.anchor_ratios = (0.0, 0.5)
      c.grid = ml_collections.ConfigDict({"variants": {"1_mlp": {"label": "MLP", "axis": "width", "x": 8,
                                                                 "set": {"model": {"name": "mlp", "width": 8}}}}})
      c.layerwise = ml_collections.ConfigDict({"modes": ("single", "from_input")})
  elif kind == "align_compare":
      from configs.align_compare import get_config
      c = get_config()
      c.num_seeds = 2
      c.align.tasks = {"mlp": {"data": {"source": "digits", "num_train": 300}, "model": {"name": "mlp", "depth": 1, "width": 16},
                               "train": {"epochs": 2, "steps_per_call": 2}}}
      c.align.update({"curve_kind": "polychain", "curve_epochs": 1, "curve_pairs": 1, "stats_examples": 100,
                      "stats_batch": 50, "repair_alphas": 3, "ste_steps": 3})
      c.analysis.num_alphas = 5
      c.train.eval_batch_size = 256
  elif kind == "soup":
      from configs.soup_vit import get_config
      c = get_config()
      c.num_seeds = 2
      c.model.depth, c.model.dim, c.model.mlp_dim = 1, 16, 32
      c.soup.update({"pretrain_epochs": 2, "finetune_epochs": 1, "candidates": 3})
  elif kind == "cold_fusion":
      from configs.cold_minilm import get_config
      c = get_config()
      c.num_seeds = 1
      c.train.batch_size, c.train.eval_batch_size = 8, 16
      c.cold.update({"num_layers": 1, "seq_len": 12, "rounds": 1, "steps": 2, "max_train": 32, "max_eval": 16})
  c.analysis.plots = False
  r = runner.run(c, workdir)
  if kind == "grid":
      numbers = [[row["test_accuracy_mean"], row["accuracy_barrier_mean"], row["loss_barrier_mean"]] for row in r["rows"]]
  elif kind == "layerwise":
      numbers = [r["layerwise"][arm][mode]["loss_barrier_mean"] for arm in r["layerwise"] for mode in r["modes"]]
  elif kind == "align_compare":
      numbers = [[row["accuracy_barrier_mean"], row["loss_barrier_mean"]] for row in r["tasks"]["mlp"]["rows"]]
  elif kind == "soup":
      numbers = [[row["uniform_soup"], row["greedy_soup"], *row["test_accuracy"]] for arm in ("vanilla", "TNA-PFN")
                 for row in r["per_repeat"][arm]]
  else:
      numbers = [[h["fused"]["mean"] for h in r["history"][arm][0]] for arm in ("vanilla", "TNA-PFN")]
  out[kind] = numbers
print(json.dumps({"processes": jax.process_count(), "numbers": out}))
"""


def run_kinds(kinds, root, nproc, devices_per_process):
    port = str(free_port())
    proc_env = {**env(), "XLA_FLAGS": xla_flags_with_devices(devices_per_process)}
    procs = [subprocess.Popen([sys.executable, "-c", KIND_CODE, str(i), str(nproc), port, ",".join(kinds), str(root)],
                              cwd=ROOT, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    return [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out in finish(procs)]


KINDS = ["grid", "layerwise", "align_compare", "soup", "cold_fusion"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_kind_runs_over_two_processes(tmp_path):
    """The five kinds one after another in one pair of processes (one start-up for all), one CPU
    device each (2 x 2 devices is the quickstart's and the pairwise table's layout above; one
    device each compiles and runs the five kinds 16% faster, which CI's budget needs)."""
    two = run_kinds(KINDS, tmp_path, nproc=2, devices_per_process=1)
    assert [o["processes"] for o in two] == [2, 2]
    for kind in KINDS:
        assert two[0]["numbers"][kind] == two[1]["numbers"][kind], kind  # every process returns the same report
        numbers = np.asarray(two[0]["numbers"][kind], np.float64)
        assert numbers.size > 0 and np.isfinite(numbers).all(), kind
        assert (tmp_path / kind / "report.json").exists() and open(tmp_path / kind / ".lock").read() == "", kind


def test_coordinator_auto_lets_jax_find_the_cluster(monkeypatch):
    """``--coordinator=auto`` (TPU pods, SLURM) calls ``jax.distributed.initialize()`` with no
    arguments, so JAX reads the cluster from the environment."""
    import jax

    import train

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    train.initialize_distributed("auto", None, None)
    train.initialize_distributed("10.0.0.1:1234", 2, 1)
    assert calls == [((), {}), ((), {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1})]
