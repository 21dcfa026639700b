"""Experiment kinds, one module each: `train` (arms x seeds, then LMC), `grid`, `layerwise`,
`align_compare`, `soup`, `cold_fusion`, `federated`.

Every module registers its kinds with `tna_jax.experiments.registry.register` when it is
imported; importing the package imports them all (so adding a kind means adding a module).
"""

import importlib
import pkgutil

from tna_jax.experiments.registry import KINDS, register

__all__ = ["KINDS", "register"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")
