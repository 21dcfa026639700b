"""MNIST-1D MLP (the paper's MLP setting): 8 seeds, TNA-PFN ρ = 0.4 and plain training.

    python train.py --config configs/mnist1d_mlp.py --workdir runs/mnist1d_mlp
    python train.py --config configs/mnist1d_mlp.py --workdir runs/w512 --config.model.width=512
"""

from tna_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "mnist1d_mlp"
    c.num_seeds = 8
    c.data.source = "mnist1d"
    c.data.num_samples = 10000
    c.model.name = "mlp"
    c.model.depth = 2
    c.model.width = 256
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.schedule = "cosine"
    c.train.epochs = 40
    c.train.batch_size = 64
    c.anchor.ratio = 0.4
    c.baseline = True
    c.analysis.max_pairs = 28
    return c
