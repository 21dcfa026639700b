"""Post-training alignment (weight matching, activation matching, REPAIR, curves) against
training-time alignment (TNA-PFN), on an MNIST-1D MLP and a ResNet-20 on 8x8 digits.

    python train.py --config configs/align_compare.py --workdir runs/align
    python train.py --config configs/align_compare.py --workdir runs/align_mlp --config.align.run=mlp

Each task trains `num_seeds` models plain and with TNA-PFN (ρ = 0.4) in one program, then compares
seed pairs within each arm (see tna_jax/experiments/align_compare.py and docs/alignment.md).
"""

import ml_collections

from tna_jax.config import default_config
from tna_jax.experiments.align_compare import align_defaults


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
    c.align.tasks = ml_collections.ConfigDict({
        "mlp": {
            "data": {"source": "mnist1d", "num_samples": 5000},
            "model": {"name": "mlp", "depth": 3, "width": 256},
            "train": {"epochs": 30},
        },
    })
    return c
