"""Crash-anywhere harness: kill a run at chosen points, rerun the same command until it finishes,
and compare what it leaves with an uninterrupted run.

It drives any command that trains through tna_jax's fault points and checkpoints: ``python
train.py --config configs/x.py --workdir W [--config.a=b]`` for every experiment kind. Each
:class:`Kill` is one interruption of one process:

* ``point``: the process SIGKILLs itself at that fault point (``tests/fault_hooks.py``, armed in ``tests/train_with_faults.py``; e.g.
  ``"after_save:2"``, ``"during_save:1"`` with ``files`` temporary checkpoint files written,
  ``"write:report.json"`` between an atomic write and its rename);
* ``term``: it sends itself SIGTERM at that point (a preemption notice: it must checkpoint and exit
  143); ``term`` and ``point`` together kill it while it writes the preemption checkpoint;
* ``after_s``: the harness sends ``signal`` (SIGKILL by default) after that many seconds, wherever
  the process is (import, restore, a step, a write); ``point`` then is a fallback so the process
  dies before it gets past where the next kill expects it;
* ``damage``: called with the workdir after the process ended, to add what a kill cannot produce
  deterministically (a metrics line cut in the middle).

After every process the harness inspects the workdir: every JSON file parses, every complete
checkpoint step passes ``verify`` (default: its metadata reads), and it lists the temporaries a
kill left (proof that it landed mid-write; they must be gone at the end).

To point it at another kind (e.g. the federated one), pass its command and its own kill points
(the names its loop gives its hook points, e.g. ``"round_end:3"``), and a
``verify`` that restores a step with the kind's abstract state; :func:`fingerprint` works as is for
any kind that checkpoints with ``tna_jax.checkpoint.Checkpointer`` into ``<workdir>/checkpoints``
and writes ``report.json`` / ``report.md`` / ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

# Report keys that legitimately differ between an interrupted and an uninterrupted run.
VOLATILE_KEYS = ("seconds", "seconds_total", "resumed_from", "epoch_compiles")

ORBAX_TMP = ".orbax-checkpoint-tmp"
ATOMIC_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


@dataclasses.dataclass(frozen=True)
class Kill:
    """One interruption of one process (see the module docstring)."""

    point: str | None = None
    term: str | None = None
    files: int = 1
    after_s: float | None = None
    signal: int = signal.SIGKILL
    damage: Callable[[str], str] | None = None
    label: str = ""

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = []
        if self.after_s is not None:
            parts.append(f"{signal.Signals(self.signal).name} after {self.after_s:.1f}s")
        if self.term:
            parts.append(f"SIGTERM at {self.term}")
        if self.point:
            parts.append(f"SIGKILL at {self.point}" + (f" ({self.files} files)" if "during" in self.point else ""))
        return " then ".join(parts) or "no fault"


@dataclasses.dataclass
class Attempt:
    """What one process of a chain did."""

    kill: Kill
    returncode: int
    seconds: float
    outcome: str  # killed at point | killed by timer | preempted | terminated | finished | failed
    resumed_from: str | None
    left_behind: list[str]
    problems: list[str]
    damage: str | None
    tail: str
    output: str = ""
    pid: int | None = None

    def row(self) -> dict[str, Any]:
        return {"fault": self.kill.describe(), "outcome": self.outcome, "rc": self.returncode,
                "resumed_from": self.resumed_from, "left_behind": len(self.left_behind),
                "problems": self.problems, "seconds": round(self.seconds, 1)}


def base_env(cache_dir: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of every process: CPU, quiet, and (with `cache_dir`) JAX's persistent
    compilation cache, so that the N-th rerun of a command loads its programs instead of
    compiling them again (the same executables, so the same bits)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TNA_JAX_KILL") and k not in ("TNA_JAX_TERM_AT", "TNA_JAX_STOP_AT")
           and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}  # only `cache_dir`'s
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
    if cache_dir:
        env.update({"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    env.update(extra)
    return env


class ExecLauncher:
    """Starts every command as a fresh process (``subprocess.Popen``): the most faithful, and
    the slowest (each process imports JAX again)."""

    last_pid: int | None = None

    def run(self, cmd: Sequence[str], env: dict[str, str], cwd: str, out_path: str, after_s: float | None,
            sig: int, timeout: float) -> tuple[int, bool]:
        with open(out_path, "w") as out:
            proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            self.last_pid = proc.pid
            fired = False
            try:
                if after_s is not None:
                    try:
                        proc.wait(timeout=after_s)
                    except subprocess.TimeoutExpired:
                        proc.send_signal(sig)
                        fired = True
                return proc.wait(timeout=timeout), fired
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise

    def close(self) -> None:
        pass


class ForkLauncher:
    """Runs ``python script.py args...`` commands as children forked from a server process that
    imported JAX, Flax, orbax and tna_jax once (before any JAX backend exists, so forking is
    safe). Each child is a real process, killed for real; only the imports are shared. About
    4x cheaper per run than :class:`ExecLauncher` for a tiny model.

    Args:
      env: the server's environment (JAX reads its settings, e.g. the compilation cache, when
        imported); every command must run with this environment plus fault variables.
      preload: modules the server imports before forking.
    """

    last_pid: int | None = None
    PRELOAD = ("jax", "flax", "optax", "orbax.checkpoint", "absl.app", "ml_collections.config_flags",
               "tna_jax.experiment", "tna_jax.training", "tna_jax.lmc", "tna_jax.data", "tna_jax.models")

    def __init__(self, env: dict[str, str], cwd: str, preload: Sequence[str] = PRELOAD):
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import crash_harness; crash_harness._serve({list(preload)!r})"
        self.env = dict(env)
        self._proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=self.env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, request: dict[str, Any], timeout: float | None) -> dict[str, Any] | None:
        if request:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def run(self, cmd: Sequence[str], env: dict[str, str], cwd: str, out_path: str, after_s: float | None,
            sig: int, timeout: float) -> tuple[int, bool]:
        if len(cmd) < 2 or not cmd[1].endswith(".py"):
            raise ValueError(f"ForkLauncher runs 'python script.py ...' commands; got {list(cmd)[:2]}.")
        delta = {k: v for k, v in env.items() if self.env.get(k) != v}
        gone = [k for k in self.env if k not in env]
        pid = self._ask({"argv": list(cmd[1:]), "cwd": cwd, "env": delta, "unset": gone, "out": out_path}, 60)["pid"]
        self.last_pid = pid
        fired = False
        reply = self._ask({}, after_s) if after_s is not None else None
        if after_s is not None and reply is None:
            os.kill(pid, sig)
            fired = True
        if reply is None:
            reply = self._ask({}, timeout)
        if reply is None:
            os.kill(pid, signal.SIGKILL)
            self._ask({}, 60)
            raise subprocess.TimeoutExpired(cmd, timeout)
        return reply["rc"], fired

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)


def _serve(preload: Sequence[str]) -> None:
    """The fork server's loop (see :class:`ForkLauncher`): one JSON request per line on stdin."""
    import importlib
    import runpy

    for name in preload:
        importlib.import_module(name)
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: becomes `python argv...`
            code = 1
            try:
                fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(request["env"])
                for k in request["unset"]:
                    os.environ.pop(k, None)
                os.chdir(request["cwd"])
                sys.argv = list(request["argv"])
                sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # noqa: BLE001 (reported like an uncaught exception)
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


def run_command(cmd: Sequence[str], env: dict[str, str], kill: Kill, *, cwd: str, timeout: float = 300,
                launcher: Any = None, full: bool = False) -> tuple[int, float, str, bool]:
    """Runs `cmd` once under `kill`; returns ``(returncode, seconds, output tail, timer fired)``
    (the whole output with `full`). The process id is ``launcher.last_pid`` afterwards."""
    env = dict(env)
    if kill.point:
        env["TNA_JAX_KILL_AT"] = kill.point
        env["TNA_JAX_KILL_FILES"] = str(kill.files)
    if kill.term:
        env["TNA_JAX_TERM_AT"] = kill.term
    launcher = launcher or ExecLauncher()
    fd, out_path = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    try:
        t0 = time.time()
        rc, fired = launcher.run(cmd, env, cwd, out_path, kill.after_s, kill.signal, timeout)
        seconds = time.time() - t0
        with open(out_path) as f:
            text = f.read()
    finally:
        os.remove(out_path)
    lines = [ln for ln in text.splitlines() if not ln.startswith(("W0000", "I0000", "WARNING: All log"))]
    return rc, seconds, "\n".join(lines if full else lines[-25:]), fired


def temporaries(workdir: str) -> list[str]:
    """Temporaries of interrupted writes: orbax step directories and atomic-write files."""
    found = []
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            if ORBAX_TMP in name or ATOMIC_TMP.match(name):
                found.append(os.path.relpath(os.path.join(root, name), workdir))
    return sorted(found)


def checkpoint_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def inspect(workdir: str, verify: Callable[[str, int], None] | None = None) -> list[str]:
    """Problems with what a run left in `workdir`: a JSON file that does not parse, a
    metrics line cut anywhere but at the end, a complete checkpoint step that ``verify``
    rejects (default: its metadata must read)."""
    problems = []
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if d != "checkpoints" and ORBAX_TMP not in d]
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".json") and not ATOMIC_TMP.match(name):
                try:
                    with open(path) as f:
                        json.load(f)
                except (OSError, ValueError) as err:
                    problems.append(f"{os.path.relpath(path, workdir)} is not valid JSON ({err})")
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines[:-1]):
            try:
                json.loads(line)
            except ValueError:
                if i < len(lines) - 2:  # only the very last line may be cut by a kill
                    problems.append(f"metrics.jsonl line {i + 1} is damaged: {line[:60]!r}")
    for step in checkpoint_steps(workdir):
        try:
            if verify is not None:
                verify(workdir, step)
            else:
                from tna_jax import checkpoint as ckpt_lib

                ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).read_meta(step)
        except Exception as err:  # any failure to read a finalised step is a finding
            problems.append(f"checkpoint step {step} does not restore: {type(err).__name__}: {err}")
    return problems


_RESUMED = re.compile(r"resuming from the checkpoint of ([^\n]*?) in ")


def _outcome(kill: Kill, rc: int, fired: bool) -> str:
    if rc == 0:
        return "finished"
    if rc == 143:
        return "preempted"
    if rc == -signal.SIGKILL:
        return "killed by timer" if fired and kill.signal == signal.SIGKILL else "killed at point"
    if rc == -signal.SIGTERM:
        return "terminated"
    return "failed"


def crash_chain(cmd: Sequence[str], workdir: str, kills: Sequence[Kill], *, cwd: str,
                env: dict[str, str] | None = None, verify: Callable[[str, int], None] | None = None,
                timeout: float = 300, log: Callable[[str], None] | None = None,
                launcher: Any = None) -> list[Attempt]:
    """Runs `cmd` once per kill, then once more without one (it must finish); returns every
    attempt. The command is the same every time: resuming is the command's own business."""
    env = env if env is not None else base_env()
    launcher = launcher or ExecLauncher()
    attempts = []
    for kill in [*kills, Kill(label="final run, no fault")]:
        rc, seconds, output, fired = run_command(cmd, env, kill, cwd=cwd, timeout=timeout, launcher=launcher,
                                                 full=True)
        tail = "\n".join(output.splitlines()[-25:])
        resumed = _RESUMED.search(output)
        left = temporaries(workdir)
        problems = inspect(workdir, verify)
        expected_death = kill.point is not None or kill.term is not None
        outcome = _outcome(kill, rc, fired)
        if expected_death and outcome == "finished":
            problems.append(f"{kill.describe()}: the fault never fired (the run finished)")
        if outcome == "failed":
            problems.append(f"{kill.describe()}: exit code {rc}:\n{tail}")
        note = kill.damage(workdir) if kill.damage is not None and outcome != "finished" else None
        attempt = Attempt(kill, rc, seconds, outcome, resumed.group(1) if resumed else None, left, problems,
                          note, tail, output, launcher.last_pid)
        attempts.append(attempt)
        if log is not None:
            log(f"{kill.describe():55s} -> {outcome:16s} rc={rc:4d} {seconds:5.1f}s resumed_from={attempt.resumed_from} "
                f"left={left} problems={problems}")
    return attempts


def _drop_volatile(obj: Any, volatile: Sequence[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_volatile(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_drop_volatile(v, volatile) for v in obj]
    return obj


def fingerprint(workdir: str, volatile: Sequence[str] = VOLATILE_KEYS) -> dict[str, Any]:
    """What must be bit-identical between runs: the final checkpoint's step and digests (SHA-256
    of every array), ``report.json`` without timing keys, ``report.md``, ``metrics.jsonl``."""
    from tna_jax import checkpoint as ckpt_lib

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    meta = ckpt.read_meta(step)
    ckpt.close()
    out: dict[str, Any] = {"step": step, "state_digest": meta["state_digest"],
                           "extras_digest": meta.get("extras_digest")}
    for name in ("report.json", "report.md", "metrics.jsonl"):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            out[name] = None
            continue
        with open(path) as f:
            text = f.read()
        if name == "report.json":
            out[name] = _drop_volatile(json.loads(text), volatile)
        elif name == "metrics.jsonl":
            out[name] = [json.loads(line) for line in text.splitlines()]
        else:
            out[name] = text
    return out


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths where two fingerprints differ (empty = bit-identical)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{prefix}{i}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {str(a)[:80]} != {str(b)[:80]}"]


def cut_metrics_line(workdir: str) -> str:
    """Damage for a :class:`Kill`: appends half a JSON line to ``metrics.jsonl``, what a kill
    in the middle of an append would leave."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"epoch": 99, "train_loss": 0.12')
    return "half a line appended to metrics.jsonl"
