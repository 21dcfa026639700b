"""Small configs and helpers shared by the tests."""

import os
import struct
import subprocess
import sys

from tna_jax.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """An MNIST-1D MLP config that trains in well under a second after compilation."""
    c = default_config()
    c.name = "tiny"
    c.num_seeds = 2
    c.data.num_samples = 600
    c.model.depth = 1
    c.model.width = 32
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.train.epochs = 3
    c.train.batch_size = 64
    c.train.eval_batch_size = 256
    c.train.checkpoint_every = 1
    c.train.progress = False
    c.analysis.num_alphas = 5
    c.analysis.plots = False
    for dotted, value in overrides.items():
        node = c
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return c


def xla_flags_with_devices(count: int) -> str:
    """The session's XLA_FLAGS (conftest's compile level) with a forced host device count: a process
    a test starts with its own device count still compiles like the rest of the suite."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python process from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def tensorboard_events(logdir):
    """Every scalar of a run's tensorboardX event files as ``(tag, step, value)``, in file order,
    duplicates kept (TFRecord framing: length, crc, data, crc; a record cut by a kill ends a file)."""
    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            buf = f.read()
        pos = 0
        while pos + 12 <= len(buf):
            (length,) = struct.unpack("<Q", buf[pos:pos + 8])
            if pos + 12 + length + 4 > len(buf):
                break
            event = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            events += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return events
