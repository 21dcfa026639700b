"""The paper's Figure 2: LMC of TNA-PFN and of random pruning at initialisation against the mask
ratio ρ ∈ {0, 0.1, ..., 0.9}, MNIST-1D MLP, 6 seeds per ratio (15 seed pairs).

Every arm (10 anchor ratios + 9 pruning ratios, 19 x 6 = 114 models) is one run on the run axis
with its ratio traced, so the whole sweep trains as ONE compiled program (report.json records
``training.epoch_compiles``). About 6 minutes on 2 CPU cores.

    python train.py --config configs/lmc_ratio_sweep.py --workdir runs/lmc_ratio_sweep

Writes report.json, report.md, ratio_sweep.png ("Avg. Acc." vs "Interp. Acc." against ρ, the
accuracy barrier shaded) and lmc_paths.png (accuracy and loss along α for ρ = 0, 0.4, 0.8).
"""

from tna_jax.config import default_config

RATIOS = tuple(round(0.1 * i, 1) for i in range(10))


def get_config():
    c = default_config()
    c.name = "lmc_ratio_sweep"
    c.num_seeds = 6
    c.data.source = "mnist1d"
    c.data.num_samples = 8000
    c.model.name = "mlp"
    c.model.depth = 2
    c.model.width = 256
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.schedule = "cosine"
    c.train.epochs = 30
    c.train.batch_size = 64
    c.train.checkpoint_every = 10
    c.sweep.anchor_ratios = RATIOS
    c.sweep.prune_ratios = RATIOS[1:]
    c.analysis.max_pairs = 15
    c.analysis.plot_ratios = (0.0, 0.4, 0.8)
    return c
