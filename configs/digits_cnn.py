"""scikit-learn digits (8x8 images, shipped offline) with the federated-CIFAR CNN, 6 seeds,
TNA-PFN ρ = 0.4 and plain training.

    python train.py --config configs/digits_cnn.py --workdir runs/digits_cnn
"""

import ml_collections

from tna_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "digits_cnn"
    c.num_seeds = 6
    c.data.source = "digits"
    c.model = ml_collections.ConfigDict({"name": "cnn", "width": 0.5, "hidden": 128, "dtype": "float32",
                                         "init": "flax"})
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.02
    c.optimizer.schedule = "cosine"
    c.train.epochs = 40
    c.train.batch_size = 64
    c.anchor.ratio = 0.4
    c.baseline = True
    return c
