"""Every experiment kind over several processes (jax.distributed): ``train.py`` started once per
process on 127.0.0.1, each process with 2 CPU devices, against one process with all 4 devices.

These are the commands of docs/howto/multihost.md ("Two processes on one machine").
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from util import ROOT

# The quickstart (configs/quickstart.py), sized to train in seconds: 2 arms x 2 seeds.
QUICK = ["train.py", "--config=configs/quickstart.py", "--config.num_seeds=2", "--config.data.num_samples=800",
         "--config.model.width=32", "--config.train.checkpoint_every=1", "--config.train.progress=False",
         "--config.train.tensorboard=False", "--config.analysis.plots=False", "--config.analysis.num_alphas=5"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def start_processes(args, workdir, nproc, devices_per_process=2):
    """``train.py <args>`` as `nproc` processes (one coordinator on 127.0.0.1); the Popen objects."""
    cmd = [sys.executable, *args, f"--workdir={workdir}", f"--cpu_devices={devices_per_process}"]
    if nproc == 1:
        return [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    cmd += [f"--coordinator=127.0.0.1:{free_port()}", f"--num_processes={nproc}"]
    return [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(nproc)]


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


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quickstart_over_two_processes_equals_one_process_and_resumes_on_another_count(tmp_path):
    """2 processes x 2 devices train and analyse the quickstart as 1 process x 4 devices does;
    process 0 alone prints and writes the report and metrics, both write the checkpoints; a
    rerun with more epochs as 1 process resumes from the 2-process checkpoint."""
    two, one = tmp_path / "two", tmp_path / "one"
    outs = run_train_py([*QUICK, "--config.train.epochs=2"], two, nproc=2)
    assert "| vanilla |" in outs[0] and "| vanilla |" not in outs[1]  # process 0 prints the table
    run_train_py([*QUICK, "--config.train.epochs=2"], one, nproc=1, devices_per_process=4)
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
