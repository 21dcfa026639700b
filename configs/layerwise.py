"""Layer-wise linear mode connectivity (Adilova et al., 2024) with and without anchors: MNIST-1D
MLP with 4 hidden layers, plain training vs TNA-PFN (ρ = 0.4), 6 seeds each (15 pairs). For
every pair: each layer interpolated alone (the rest from model A), and cumulatively from the
input and from the output; one compiled program for all groups, α and modes. About 3 minutes on
2 CPU cores.

    python train.py --config configs/layerwise.py --workdir runs/layerwise

Writes report.json, report.md (one table per mode, with the full-model barrier for reference)
and layerwise_<mode>_<loss|accuracy>_barrier.png.
"""

import ml_collections

from tna_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "layerwise"
    c.kind = "layerwise"
    c.num_seeds = 6
    c.data.source = "mnist1d"
    c.data.num_samples = 8000
    c.model.name = "mlp"
    c.model.depth = 4
    c.model.width = 256
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.schedule = "cosine"
    c.train.epochs = 30
    c.train.batch_size = 64
    c.train.checkpoint_every = 10
    c.anchor.ratio = 0.4
    c.baseline = True
    c.analysis.max_pairs = 15
    c.layerwise = ml_collections.ConfigDict({"modes": ("single", "from_input", "from_output"), "groups": ""})
    return c
