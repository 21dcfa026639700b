"""Quickstart: 4 seeds of an MNIST-1D MLP trained at once, with TNA-PFN (ρ = 0.4) and without,
then the linear mode connectivity between the seeds of each arm. About a minute on 2 CPU cores.

    python train.py --config configs/quickstart.py --workdir runs/quick
"""

from tna_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "quickstart"
    c.num_seeds = 4
    c.data.source = "mnist1d"
    c.model.name = "mlp"
    c.model.depth = 2
    c.model.width = 256
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.train.epochs = 30
    c.train.batch_size = 64
    c.anchor.ratio = 0.4
    c.baseline = True
    return c
