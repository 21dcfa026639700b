"""The paper's Figure 5: LMC barriers across architectures, plain training vs TNA-PFN (ρ = 0.4).

MLP, the federated-learning CNN, VGG-11 (BatchNorm), ResNet-20 with BatchNorm and ResNet-20 with
LayerNorm, 4 seeds per arm (6 seed pairs), as one "grid" experiment: each architecture is a
variant trained and analysed by the "train" kind in <workdir>/variants/<name>, then aggregated
into one table and bar charts of the barriers. BatchNorm nets are reported twice: with the
interpolated running statistics and with the statistics reset at every α ("BN reset").

Two datasets (the part after the colon picks one):

* ``digits`` (default): scikit-learn's 8x8 digits, shipped offline; small widths and 30 epochs
  so that the whole grid runs on 2 CPU cores (about 10 minutes unloaded):

      python train.py --config configs/lmc_architectures.py --workdir runs/lmc_architectures

* ``cifar10``: CIFAR-10 as in the paper (32x32, crop+flip augmentation, full widths, plus
  WideResNet-16-4), which needs the dataset prepared for tensorflow-datasets (nothing is
  downloaded at run time; see configs/cifar10_resnet20.py) and an accelerator:

      python train.py --config configs/lmc_architectures.py:cifar10 --workdir runs/lmc_arch_cifar10 \\
          --config.data.data_dir=$HOME/tensorflow_datasets

Writes report.json, report.md, accuracy_barrier_bars.png and loss_barrier_bars.png.
"""

import os

import ml_collections

from tna_jax.config import default_config

DATASETS = ("digits", "cifar10")


def architectures(dataset: str) -> dict:
    """Grid variants: key (ordered by its number) -> label, model section, optimizer overrides."""
    small = dataset == "digits"
    mlp_width = 128 if small else 512
    variants = {
        "1_mlp": ("MLP", {"name": "mlp", "depth": 2, "width": mlp_width, "dtype": "float32"}, {"learning_rate": 0.05}),
        "2_cnn": ("CNN", {"name": "cnn", "width": 0.5 if small else 1.0, "hidden": 128 if small else 512,
                          "dtype": "float32"}, {"learning_rate": 0.02}),
        "3_vgg11_bn": ("VGG-11 (BN)", {"name": "vgg11", "width": 0.25 if small else 1.0, "norm": "batch",
                                       "dtype": "float32"}, {"learning_rate": 0.05}),
        "4_resnet20_bn": ("ResNet-20 (BN)", {"name": "resnet20", "width": 0.5 if small else 1.0, "norm": "batch",
                                             "dtype": "float32"}, {"learning_rate": 0.05}),
        "5_resnet20_ln": ("ResNet-20 (LN)", {"name": "resnet20", "width": 0.5 if small else 1.0, "norm": "layer",
                                             "dtype": "float32"}, {"learning_rate": 0.02}),
    }
    if not small:
        variants["6_wrn16_4"] = ("WRN-16-4", {"name": "wrn", "depth": 16, "width": 4.0, "norm": "batch",
                                              "dtype": "float32"}, {"learning_rate": 0.05})
    return variants


def get_config(dataset: str = "digits"):
    if dataset not in DATASETS:
        raise ValueError(f"configs/lmc_architectures.py:<dataset> must be one of {DATASETS}; got {dataset!r}.")
    c = default_config()
    c.name = f"lmc_architectures_{dataset}"
    c.kind = "grid"
    c.num_seeds = 4
    c.optimizer.name = "momentum"
    c.optimizer.schedule = "cosine"
    c.anchor.ratio = 0.4
    c.baseline = True
    c.analysis.max_pairs = 6
    if dataset == "digits":
        c.data.source = "digits"
        c.train.epochs = 30
        c.train.batch_size = 64
        c.train.eval_batch_size = 400
    else:
        c.data.source = "tfds:cifar10"
        c.data.data_dir = os.path.expanduser("~/tensorflow_datasets")
        c.data.augment = "crop_flip"
        c.optimizer.weight_decay = 5e-4
        c.optimizer.schedule = "warmup_cosine"
        c.optimizer.warmup_epochs = 1.0
        c.train.epochs = 60
        c.train.batch_size = 128
        c.train.eval_batch_size = 500
        c.analysis.bn_reset_examples = 5000
    c.train.checkpoint_every = 10
    variants = {}
    for key, (label, model, optimizer) in architectures(dataset).items():
        variants[key] = {"label": label, "set": {"model": model, "optimizer": optimizer}}
    c.grid = ml_collections.ConfigDict({"variants": variants})
    return c
