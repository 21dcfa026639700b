"""The paper's Figure 4: LMC barriers of MNIST-1D MLPs against the number of hidden layers h
(width 128) and against the width w (2 hidden layers), plain training vs TNA-PFN (ρ = 0.4),
6 seeds per arm (15 seed pairs). One "grid" experiment: each variant is trained and analysed
by the "train" kind in runs/<workdir>/variants/<name>, then aggregated. About 8 minutes on 2 CPU
cores.

    python train.py --config configs/lmc_depth_width.py --workdir runs/lmc_depth_width

Writes report.json, report.md, accuracy_barrier_vs_depth.png, accuracy_barrier_vs_width.png
(and the loss-barrier versions).
"""

import ml_collections

from tna_jax.config import default_config

DEPTHS = (1, 2, 3, 4, 6)
WIDTHS = (32, 64, 128, 256, 512)


def get_config():
    c = default_config()
    c.name = "lmc_depth_width"
    c.kind = "grid"
    c.num_seeds = 6
    c.data.source = "mnist1d"
    c.data.num_samples = 8000
    c.model.name = "mlp"
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.schedule = "cosine"
    c.train.epochs = 30
    c.train.batch_size = 64
    c.train.checkpoint_every = 10
    c.anchor.ratio = 0.4
    c.baseline = True
    c.analysis.max_pairs = 15
    variants = {}
    for h in DEPTHS:
        variants[f"depth_{h}"] = {"axis": "hidden layers", "x": h, "label": f"h={h}, w=128",
                                  "set": {"model": {"name": "mlp", "depth": h, "width": 128}}}
    for w in WIDTHS:
        variants[f"width_{w:04d}"] = {"axis": "width", "x": w, "label": f"h=2, w={w}",
                                      "set": {"model": {"name": "mlp", "depth": 2, "width": w}}}
    c.grid = ml_collections.ConfigDict({"variants": variants})
    return c
