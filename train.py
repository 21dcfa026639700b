"""Command line entry point: ``python train.py --config configs/quickstart.py --workdir runs/quick``.

Any config field can be overridden, e.g. ``--config.anchor.ratio=0.4 --config.num_seeds=8``.
Rerunning the same command on the same workdir resumes from the last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from tna_jax import experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    experiment.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
