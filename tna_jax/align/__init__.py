"""Post-training alignment of networks, and the curves that connect them.

* :mod:`~tna_jax.align.spec` — :class:`PermutationSpec` (git-re-basin's ``perm_to_axes`` /
  ``axes_to_perm``), hand-written specs (:func:`dense`, :func:`conv`, :func:`norm`),
  :func:`apply_permutation` (parameters and BatchNorm statistics), identity/random/inverse.
* :mod:`~tna_jax.align.derive` — :func:`permutation_spec` derives the spec of any model from its
  computation (residual streams, flattened convolutions and attention heads included).
* :mod:`~tna_jax.align.weight_matching` — Git Re-Basin weight matching (coordinate descent,
  exact assignments, jitted cost matrices).
* :mod:`~tna_jax.align.activation_matching` — correlation of activations + assignment.
* :mod:`~tna_jax.align.repair` — REPAIR and BatchNorm statistics reset.
* :mod:`~tna_jax.align.curves` — quadratic Bezier and polygonal-chain mode-connecting curves.
* :mod:`~tna_jax.align.io` — permutations as JSON, curves as orbax checkpoints.
"""

from tna_jax.align.activation_matching import activation_correlations, activation_matching
from tna_jax.align.curves import Curve, curve_point, evaluate_curve, init_curve, train_curve
from tna_jax.align.derive import Analysis, analyze, permutation_spec
from tna_jax.align.io import load_curve, load_permutation, save_curve, save_permutation
from tna_jax.align.repair import (
    RepairPoint,
    make_repair,
    output_stats,
    repair,
    repair_points,
    reset_batch_stats,
)
from tna_jax.align.spec import (
    LeafLayout,
    Permutation,
    PermutationSpec,
    apply_permutation,
    check_permutation,
    conv,
    dense,
    identity_permutation,
    invert_permutation,
    norm,
    random_permutation,
    spec_from_axes,
)
from tna_jax.align.weight_matching import MatchResult, matching_objective, weight_matching

__all__ = [
    "PermutationSpec", "LeafLayout", "Permutation", "dense", "conv", "norm", "spec_from_axes",
    "apply_permutation", "identity_permutation", "random_permutation", "invert_permutation",
    "check_permutation", "permutation_spec", "analyze", "Analysis",
    "weight_matching", "MatchResult", "matching_objective",
    "activation_matching", "activation_correlations",
    "repair", "make_repair", "repair_points", "RepairPoint", "output_stats", "reset_batch_stats",
    "Curve", "init_curve", "curve_point", "train_curve", "evaluate_curve",
    "save_permutation", "load_permutation", "save_curve", "load_curve",
]
