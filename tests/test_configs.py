"""Every config in configs/ builds and passes the schema; grid configs also per variant."""

import glob
import importlib.util
import os

import pytest

from tests.util import ROOT
from tna_jax.config import validate
from tna_jax.experiments import grid

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_validates(path):
    config = load(path)
    validate(config)
    if config.kind == "grid":
        assert len(grid.variant_configs(config)) >= 2


def test_lmc_architectures_covers_figure_5_on_both_datasets():
    path = os.path.join(ROOT, "configs", "lmc_architectures.py")
    for dataset, source, extra in (("digits", "digits", set()), ("cifar10", "tfds:cifar10", {"wrn"})):
        config = load(path, dataset)
        variants = grid.variant_configs(config)
        assert config.data.source == source and config.anchor.ratio == 0.4 and config.baseline
        models = {(sub.model.name, sub.model.get("norm", "")) for _, _, sub in variants}
        assert {("mlp", ""), ("cnn", ""), ("vgg11", "batch"), ("resnet20", "batch"), ("resnet20", "layer")} <= models
        assert {m for m, _ in models} - {"mlp", "cnn", "vgg11", "resnet20"} == extra
    with pytest.raises(ValueError, match="must be one of"):
        load(path, "imagenet")
