"""tna_jax: training-time neuron alignment with fixed neuron anchors (TNA-PFN) in JAX/Flax.

The public API lives in the submodules, one concern each (docs/architecture.md describes them):

* :mod:`tna_jax.anchors` — anchor masks, the ``fixed_anchor_mask`` optax transform, prune-at-init;
* :mod:`tna_jax.tree` — pytree helpers (names, structure checks, lerp, averages).
"""

from tna_jax import anchors, tree
from tna_jax.anchors import anchor_mask, fixed_anchor_mask, mask_summary, prune_at_init

__version__ = "0.1.0"

__all__ = [
    "anchors",
    "tree",
    "anchor_mask",
    "fixed_anchor_mask",
    "mask_summary",
    "prune_at_init",
    "__version__",
]
