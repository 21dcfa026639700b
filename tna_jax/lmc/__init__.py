"""Linear mode connectivity (LMC): paths, barriers, pairwise tables, layer-wise LMC, fusion.

* `tna_jax.lmc.paths`: `interpolate`, `lmc_path`, `barriers` (and `fuse`, deprecated: use
  `tna_jax.fusion.uniform_soup`);
* `tna_jax.lmc.pairs`: which seed pairs (`select_pairs`) and the pairwise table
  (`pairwise_barriers`);
* `tna_jax.lmc.layerwise`: layer-wise LMC (Adilova et al., 2024).

Every function is called ``fn(eval_fn, models..., data, *, options)`` with an `EvalFn`
(`tna_jax.evaluation`) for one model and ``data = (x, y)``, and returns a NamedTuple
(`LMCPath`, `Barriers`, `PairwiseBarriers`, `LayerwiseLMC`). BatchNorm statistics of
interpolated models are reset with `tna_jax.norm_stats`.
"""

from typing import Any

from tna_jax.lmc.layerwise import LAYERWISE_MODES, OTHER_GROUP, LayerwiseLMC, layer_groups, layerwise_lmc
from tna_jax.lmc.pairs import (
    MAX_ALL_PAIRS,
    PAIR_MODES,
    PairwiseBarriers,
    all_pairs,
    describe_pairs,
    disjoint_pairs,
    pairwise_barriers,
    random_pairs,
    select_pairs,
)
from tna_jax.lmc.paths import (
    MAX_ALPHAS,
    Barriers,
    LMCPath,
    barriers,
    check_alphas,
    check_compatible,
    check_data,
    default_alphas,
    interpolate,
    lmc_path,
)
from tna_jax.lmc.paths import (
    fuse as fuse,  # deprecated: fusion.uniform_soup
)

__all__ = [
    "LAYERWISE_MODES", "MAX_ALL_PAIRS", "MAX_ALPHAS", "OTHER_GROUP", "PAIR_MODES", "Barriers", "LMCPath",
    "LayerwiseLMC", "PairwiseBarriers", "all_pairs", "barriers", "check_alphas", "check_compatible", "check_data",
    "default_alphas", "describe_pairs", "disjoint_pairs", "interpolate", "layer_groups", "layerwise_lmc", "lmc_path",
    "pairwise_barriers", "random_pairs", "select_pairs",
]

# Names that lived in `tna_jax.lmc` before 0.2: importable from here for one release, with a warning.
_MOVED = {
    **{n: "tna_jax.chunking" for n in ("AUTO", "Chunk", "check_chunk", "intermediate_bytes", "auto_chunk",
                                      "map_points")},
    **{n: "tna_jax.norm_stats" for n in ("reset_bn_stats", "with_bn_reset")},
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"tna_jax.lmc.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next release.",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'tna_jax.lmc' has no attribute {name!r}")
