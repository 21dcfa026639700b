"""Command line entry point: ``python train.py --config configs/quickstart.py --workdir runs/quick``.

Any config field can be overridden, e.g. ``--config.anchor.ratio=0.4 --config.num_seeds=8``.
Rerunning the same command on the same workdir resumes from the last checkpoint.

On a CPU-only machine the CPU is split into one JAX device per core (``--cpu_devices``), so the
seeds, which are sharded over devices, train in parallel on all cores; GPUs and TPUs are used
as they are.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from tna_jax import experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints and the report.")
flags.DEFINE_string("cpu_devices", "auto", "JAX CPU devices: 'auto' (one per core, at most 8), an integer, "
                    "or 'off' to leave XLA_FLAGS alone. Ignored when XLA_FLAGS already sets a device count.")
flags.mark_flags_as_required(["config", "workdir"])


def configure_cpu_devices(setting: str) -> None:
    """Sets XLA's host device count before JAX starts its backends (it reads XLA_FLAGS once)."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if setting == "off" or "xla_force_host_platform_device_count" in xla_flags:
        return
    if setting == "auto":
        count = min(8, os.cpu_count() or 1)
    else:
        try:
            count = int(setting)
        except ValueError:
            raise app.UsageError(f"--cpu_devices must be 'auto', 'off' or a positive integer; got {setting!r}.") from None
        if count < 1:
            raise app.UsageError(f"--cpu_devices must be a positive integer; got {count}.")
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configure_cpu_devices(FLAGS.cpu_devices)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    experiment.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
