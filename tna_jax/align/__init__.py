"""Post-training alignment: permutation specs, weight and activation matching, REPAIR, curves."""

from tna_jax.align.derive import analyze, permutation_spec
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

__all__ = [
    "LeafLayout", "Permutation", "PermutationSpec", "apply_permutation", "check_permutation", "conv",
    "dense", "identity_permutation", "invert_permutation", "norm", "random_permutation", "spec_from_axes",
    "analyze", "permutation_spec",
]
from tna_jax.align.weight_matching import MatchResult, matching_objective, weight_matching  # noqa: E402

__all__ += ["MatchResult", "matching_objective", "weight_matching"]
from tna_jax.align.activation_matching import activation_correlations, activation_matching  # noqa: E402

__all__ += ["activation_correlations", "activation_matching"]
