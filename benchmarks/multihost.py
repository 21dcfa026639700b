"""Scaling over processes (jax.distributed), simulated on one machine: the same sweep as 1, 2 and
4 local processes of ``train.py`` (one CPU device each, a coordinator on 127.0.0.1).

Each process brings one device, as a host brings its accelerators, so the figure to read is
``runs_per_s_per_process``: how much of its own throughput a process keeps when the run axis is
split over more processes (the rest goes to collectives, the per-call metric gather and the
barrier tables' gather). Wall time is the slowest process's, set-up and compilation excluded
(the ``training.seconds`` of the report).

    python benchmarks/multihost.py [--quick] [--out DIR]

Each process is pinned to one core (``taskset``; process ``i`` on core ``i mod cores``), the single
process too, so that a process stands for a host of fixed compute. ``efficiency`` is the per-process
rate over the single process's rate (1.0: perfect scaling). With more processes than cores the
processes share cores (``oversubscribed``) and their rate falls for that reason alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import print_table, write_json  # noqa: E402

PROCESSES = (1, 2, 4)


def sweep_args(quick: bool) -> list[str]:
    """A ratio sweep of the quickstart: 4 arms x 4 seeds (16 runs, a multiple of 4 processes)."""
    epochs = 2 if quick else 10
    return ["train.py", "--config=configs/quickstart.py", "--config.num_seeds=4",
            "--config.sweep.anchor_ratios=(0.0,0.2,0.4,0.6)", f"--config.train.epochs={epochs}",
            "--config.train.progress=False", "--config.train.tensorboard=False", "--config.analysis.plots=False",
            "--config.analysis.lmc=False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(nproc: int, quick: bool) -> dict:
    """The sweep as `nproc` processes of one CPU device each; its report."""
    workdir = tempfile.mkdtemp(prefix=f"multihost_{nproc}_")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, *sweep_args(quick), f"--workdir={workdir}", "--cpu_devices=1"]
    if nproc > 1:
        cmd += [f"--coordinator=127.0.0.1:{free_port()}", f"--num_processes={nproc}"]
        cmds = [[*cmd, f"--process_id={i}"] for i in range(nproc)]
    else:
        cmds = [cmd]
    if shutil.which("taskset"):
        cores = os.cpu_count() or 1
        cmds = [["taskset", "-c", str(i % cores), *c] for i, c in enumerate(cmds)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{nproc} processes: exit {p.returncode}: {err[-2000:]}")
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f)


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Each row plus ``efficiency``: its run-epochs/s per process over the one-process row's (1.0: a
    process loses nothing to the others)."""
    base = rows[0]["runs_per_s_per_process"]
    return [{**r, "efficiency": round(r["runs_per_s_per_process"] / base, 3)} for r in rows]


def scaling_ratios(rows: list[dict]) -> dict[str, float]:
    """``per_process_rate_<n>_over_1``: the efficiency of each row after the first (run_all.py
    tabulates these)."""
    return {f"per_process_rate_{r['processes']}_over_1": r["efficiency"] for r in with_efficiency(rows)[1:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs instead of 10")
    parser.add_argument("--out", default=None, help="directory for multihost.json (default benchmarks/results)")
    args = parser.parse_args(argv)
    rows = []
    for nproc in PROCESSES:
        report = run_processes(nproc, args.quick)
        runs, seconds = report["training"]["runs"], report["training"]["seconds"]
        epochs = report["training"]["epochs"]
        rows.append({"processes": nproc, "devices": report["devices"]["count"], "runs": runs, "epochs": epochs,
                     "train_seconds": round(seconds, 2), "runs_per_s": round(runs * epochs / seconds, 3),
                     "runs_per_s_per_process": round(runs * epochs / seconds / nproc, 3),
                     "oversubscribed": nproc > (os.cpu_count() or 1)})
    rows = with_efficiency(rows)
    table = print_table(rows, list(rows[0]))
    note = ("runs/s counts run-epochs per second of training wall time (set-up and compilation excluded); "
            "each process pinned to one core; efficiency = per-process rate / the one-process rate")
    print(note)
    ratios = scaling_ratios(rows)
    write_json("multihost", {"rows": rows, "ratios": ratios, "table": table, "note": note, "quick": args.quick},
               args.out)


if __name__ == "__main__":
    main()
