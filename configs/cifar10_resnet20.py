"""CIFAR-10 with ResNet-20 (BatchNorm), 4 seeds, TNA-PFN ρ = 0.4 and plain training (the paper's Figure 5 setting).

Needs CIFAR-10 prepared for tensorflow-datasets (nothing is downloaded at run time): on a machine
with network, `pip install -e ".[tfds]" && tfds build cifar10 --data_dir ~/tensorflow_datasets`,
then copy that directory to this machine and pass it:

    python train.py --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20 \\
        --config.data.data_dir=$HOME/tensorflow_datasets
"""

import os

import ml_collections

from tna_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "cifar10_resnet20"
    c.num_seeds = 4
    c.data.source = "tfds:cifar10"
    c.data.data_dir = os.path.expanduser("~/tensorflow_datasets")
    c.data.augment = "crop_flip"
    c.model = ml_collections.ConfigDict({"name": "resnet20", "width": 1, "norm": "batch", "dtype": "float32",
                                         "init": "flax"})
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_epochs = 1.0
    c.train.epochs = 100
    c.train.batch_size = 128
    c.train.eval_batch_size = 500
    c.anchor.ratio = 0.4
    c.baseline = True
    return c
