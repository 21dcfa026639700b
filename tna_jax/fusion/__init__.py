"""Fusing trained models: model soups (`tna_jax.fusion.soups`: `uniform_soup`, `greedy_soup`,
typed `SoupResult`s) and ColD fusion (`tna_jax.fusion.cold`)."""

from tna_jax.fusion.cold import (
    PAD_LOGIT,
    ColdTasks,
    cold_fusion,
    cold_masks,
    make_cold_round,
    merge_head,
    pad_head,
    split_head,
    stack_tasks,
)
from tna_jax.fusion.soups import (
    SoupResult,
    evaluate_candidates,
    evaluate_soups,
    greedy_soup,
    num_candidates,
    stack_candidates,
    uniform_soup,
)

__all__ = [
    "PAD_LOGIT", "ColdTasks", "SoupResult", "cold_fusion", "cold_masks", "evaluate_candidates", "evaluate_soups",
    "greedy_soup", "make_cold_round", "merge_head", "num_candidates", "pad_head", "split_head", "stack_candidates",
    "stack_tasks", "uniform_soup",
]
