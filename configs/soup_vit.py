"""Model soups (Wortsman et al., 2022) of a small ViT with and without TNA-PFN fine-tuning.

The ViT (patch 2, width 64, 4 blocks) is pretrained on scikit-learn's digits 0-4 and saved with
orbax; K = 6 copies are fine-tuned on digits 5-9 (a new head shared by all copies) with learning
rates (1e-4, 3e-4, 1e-3) x weight decays (0, 0.1) and their own seeds, plainly and with TNA-PFN
(ρ = 0.4 of the body's weights fixed at their pretrained values; the new head is not anchored),
3 repeats. Best single model, uniform soup and greedy soup on the test split, mean ± std over
repeats. A few minutes on 2 CPU cores:

    python train.py --config configs/soup_vit.py --workdir runs/soup_vit

Writes report.json, report.md, soups.png and the pretrained checkpoint in <workdir>/pretrained.
"""

import ml_collections

from tna_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "soup_vit"
    c.kind = "soup"
    c.seed = 0
    c.num_seeds = 3  # repeats of the whole K-candidate fine-tuning
    c.data.source = "digits"
    c.data.val_fraction = 0.2
    c.data.normalize = False  # digits are already in [0, 1]; pretraining and fine-tuning see the same pixels
    c.model = ml_collections.ConfigDict({"name": "vit", "patch_size": 2, "dim": 64, "depth": 4, "heads": 4,
                                         "mlp_dim": 128, "dropout": 0.1, "dtype": "float32",
                                         "init": "flax"})
    c.optimizer.name = "adamw"  # pretraining
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.schedule = "cosine"
    c.train.batch_size = 32
    c.train.eval_batch_size = 500
    c.train.unroll = 1  # the only convolution is the patch embedding: keep the step loop rolled
    c.train.progress = False
    c.train.tensorboard = False
    c.anchor.ratio = 0.4
    c.anchor.exclude = "head"
    c.baseline = True
    c.soup = ml_collections.ConfigDict({
        "pretrain_classes": (0, 1, 2, 3, 4), "finetune_classes": (5, 6, 7, 8, 9), "pretrain_epochs": 30,
        "finetune_epochs": 10, "candidates": 6, "learning_rates": (1e-4, 3e-4, 1e-3), "weight_decays": (0.0, 0.1),
    })
    return c
