"""Post-training alignment of networks, and the curves that connect them.

* `tna_jax.align.spec` — `PermutationSpec` (git-re-basin's ``perm_to_axes`` /
  ``axes_to_perm``), hand-written specs (`dense`, `conv`, `norm`), `apply_permutation`
  (parameters and BatchNorm statistics), identity/random/inverse.
* `tna_jax.align.derive` — `permutation_spec` derives the spec of any model from its
  computation (residual streams, flattened convolutions and attention heads included); its
  per-primitive linking rules are in `tna_jax.align.rules`.
* `tna_jax.align.weight_matching` — Git Re-Basin weight matching (coordinate descent, exact
  assignments; skipped solves, independent permutations together, incremental cost matrices).
* `tna_jax.align.costs` — the cost matrices: terms, jitted full builds, rank-m updates.
* `tna_jax.align.lap` — exact assignment solvers (lapx or SciPy, pluggable).
* `tna_jax.align.activation_matching` — correlation of activations + assignment.
* `tna_jax.align.ste` — straight-through estimator matching (the midpoint's loss decides).
* `tna_jax.align.merge` — MergeMany (N models to their consensus) and N models to one reference.
* `tna_jax.align.repair` — REPAIR and BatchNorm statistics reset.
* `tna_jax.align.curves` — quadratic Bezier and polygonal-chain mode-connecting curves.
* `tna_jax.align.io` — permutations as JSON, curves as orbax checkpoints.
"""

from tna_jax.align.activation_matching import activation_correlations, activation_matching
from tna_jax.align.curves import Curve, curve_point, evaluate_curve, init_curve, train_curve
from tna_jax.align.derive import Analysis, analyze, permutation_spec
from tna_jax.align.io import load_curve, load_permutation, save_curve, save_permutation
from tna_jax.align.lap import SOLVERS, get_solver, solve_assignment
from tna_jax.align.merge import MergeResult, align_to_reference, merge_many
from tna_jax.align.repair import (
    RepairPoint,
    make_repair,
    output_stats,
    repair,
    repair_points,
)
from tna_jax.align.repair import (
    reset_batch_stats as reset_batch_stats,  # deprecated: norm_stats.reset_bn_stats
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
from tna_jax.align.ste import STEResult, ste_matching
from tna_jax.align.weight_matching import (
    FIRST_SWEEPS,
    ORDERS,
    MatchResult,
    matching_objective,
    weight_matching,
)

__all__ = [
    "PermutationSpec", "LeafLayout", "Permutation", "dense", "conv", "norm", "spec_from_axes",
    "apply_permutation", "identity_permutation", "random_permutation", "invert_permutation",
    "check_permutation", "permutation_spec", "analyze", "Analysis",
    "weight_matching", "MatchResult", "matching_objective", "ORDERS", "FIRST_SWEEPS", "SOLVERS", "get_solver", "solve_assignment",
    "ste_matching", "STEResult", "merge_many", "MergeResult", "align_to_reference",
    "activation_matching", "activation_correlations",
    "repair", "make_repair", "repair_points", "RepairPoint", "output_stats",
    "Curve", "init_curve", "curve_point", "train_curve", "evaluate_curve",
    "save_permutation", "load_permutation", "save_curve", "load_curve",
]
