"""Experiment kinds, one module each: `train` (arms x seeds, then LMC), `grid`, `layerwise`,
`align_compare`, `soup`, `cold_fusion`, `federated`.

Each module registers its kinds with `tna_jax.experiments.registry.register` when imported;
`registry.find(kind)` imports the one a run needs.
"""

from tna_jax.experiments.registry import BUILT_IN, KINDS, find, load_all, register

__all__ = ["BUILT_IN", "KINDS", "find", "load_all", "register"]
