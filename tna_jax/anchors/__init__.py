r"""Fixed neuron anchors (TNA-PFN): anchor masks, the `fixed_anchor_mask` optax transform, and
prune-at-init.

TNA-PFN (Li et al., "Training-time Neuron Alignment through Permutation Subspace for Improving
Linear Mode Connectivity and Model Fusion", 2024; journal version "Improving Model Fusion by
Training-time Neuron Alignment with Fixed Neuron Anchors") draws a random subset of the weights,
the *anchors*, with a PRNG key that every model shares, and keeps them fixed for the whole of
training. When the anchors hold the same values in every model, they break the permutation
symmetry of hidden units the same way in each, so independently trained models land in the same
basin and their weight average works.

Why a new transform rather than `optax.masked` or `optax.transforms.freeze`: those decide per
*leaf* (a whole kernel is trained or frozen). Anchors are per *entry* of a tensor (or per output
unit), so the mask is a tree of boolean arrays shaped like the parameters.

* `tna_jax.anchors.masks`: drawing masks (`anchor_mask`, `prune_at_init`, `mask_summary`);
* `tna_jax.anchors.transform`: the optax transform (`fixed_anchor_mask`, `verify`).
"""

from tna_jax.anchors.masks import (
    GRANULARITIES,
    MASK_SCHEME,
    NAMED_SELECTIONS,
    NORM_SUFFIXES,
    anchor_mask,
    as_key,
    check_mask,
    layer_order,
    mask_summary,
    nnx_layer_order,
    prune_at_init,
    share_anchor_values,
)
from tna_jax.anchors.transform import (
    FixedAnchorMaskState,
    find_state,
    fixed_anchor_mask,
    verify,
)

__all__ = [
    "GRANULARITIES",
    "MASK_SCHEME",
    "NAMED_SELECTIONS",
    "NORM_SUFFIXES",
    "FixedAnchorMaskState",
    "anchor_mask",
    "as_key",
    "check_mask",
    "find_state",
    "fixed_anchor_mask",
    "layer_order",
    "mask_summary",
    "nnx_layer_order",
    "prune_at_init",
    "share_anchor_values",
    "verify",
]
