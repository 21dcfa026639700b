"""Post-training alignment (weight matching, activation matching, REPAIR, curves) against
training-time alignment (TNA-PFN), on an MNIST-1D MLP and a ResNet-20 on 8x8 digits, plus
ResNet-20 on CIFAR-10 when that dataset is prepared for tensorflow-datasets on this machine.

    python train.py --config configs/align_compare.py --workdir runs/align
    python train.py --config configs/align_compare.py --workdir runs/align_mlp --config.align.run=mlp

Each task trains `num_seeds` models plain and with TNA-PFN (ρ = 0.4) in one program, then compares
seed pairs within each arm (see tna_jax/experiments/align_compare.py and docs/results/alignment.md).

Tasks:

* ``mlp``: MNIST-1D (5,000 generated examples), MLP 40-256-256-256-10, 30 epochs.
* ``resnet20``: scikit-learn digits (1,797 8x8 images, shipped offline), ResNet-20 at width 0.25
  (4/8/16 channels) with BatchNorm, 15 epochs. BatchNorm statistics are reset on training data
  at every point of every path and curve.
* ``cifar10`` (only when ``<tfds data dir>/cifar10`` exists; the data dir is ``$TFDS_DATA_DIR``
  or ``~/tensorflow_datasets``): ResNet-20 (width 1, BatchNorm, crop + flip) for 50 epochs,
  hours on a CPU, minutes on an accelerator. Nothing is downloaded at run time; prepare it on a
  machine with network (``pip install -e ".[tfds]" && tfds build cifar10``), copy the
  directory over, then ``--config.align.run=cifar10``.

The two default tasks take about 10 minutes of CPU time together (2 cores; more wall time when
the cores are shared).
"""

import os

import ml_collections

from tna_jax.config import default_config
from tna_jax.experiments.align_compare import align_defaults


def tfds_data_dir() -> str:
    """Where tensorflow-datasets keeps prepared datasets on this machine."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def cifar10_task(data_dir: str) -> dict:
    """The optional CIFAR-10 ResNet-20 task (the TNA-PFN paper's Figure 5 setting, shorter)."""
    return {
        "data": {"source": "tfds:cifar10", "data_dir": data_dir, "augment": "crop_flip"},
        "model": {"name": "resnet20", "width": 1, "norm": "batch"},
        "optimizer": {"learning_rate": 0.1, "weight_decay": 5e-4, "schedule": "warmup_cosine",
                      "warmup_epochs": 1.0},
        "train": {"epochs": 50, "batch_size": 128, "eval_batch_size": 500},
        "analysis": {"num_alphas": 11},
    }


def get_config():
    c = default_config()
    c.name = "align_compare"
    c.kind = "align_compare"
    c.num_seeds = 4
    c.anchor.ratio = 0.4
    c.baseline = True
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.schedule = "cosine"
    c.train.batch_size = 64
    c.train.progress = False
    c.analysis.num_alphas = 21

    c.align = align_defaults()
    c.align.max_pairs = 6
    c.align.curve_pairs = 2
    tasks = {
        "mlp": {
            "data": {"source": "mnist1d", "num_samples": 5000},
            "model": {"name": "mlp", "depth": 3, "width": 256},
            "train": {"epochs": 30},
        },
        "resnet20": {
            "data": {"source": "digits"},
            "model": {"name": "resnet20", "width": 0.25, "norm": "batch"},
            # one step per jitted call: compiling the default 8 unrolled steps of 8 vmapped ResNets
            # took minutes on 2 busy cores, longer than the whole training on 8x8 images
            "train": {"epochs": 15, "batch_size": 128, "steps_per_call": 1},
            "analysis": {"num_alphas": 11},
        },
    }
    if os.path.isdir(os.path.join(tfds_data_dir(), "cifar10")):
        tasks["cifar10"] = cifar10_task(tfds_data_dir())
    c.align.tasks = ml_collections.ConfigDict(tasks)
    return c
