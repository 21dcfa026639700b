"""What an experiment trains: arms (plain, TNA-PFN at ρ, prune-at-init at ρ) x seeds, the runs
on the run axis, and their PRNG keys, one stream per purpose.

Keys are split by purpose from `config.seed`: model init, data order (and augmentation), anchor
mask, anchor values and dropout each have their own stream, so "same mask, different init" is
one setting away (`config.seeds.vary`, `config.anchor.share_mask`, `config.anchor.share_values`).
Runs of different arms with the same seed get the same keys (paired).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Arm", "Run", "RunKeys", "PURPOSES", "arms_from_config", "make_runs", "make_run_keys", "padded_runs"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training recipe: ``method`` in {"none", "anchor", "prune"} at mask ratio ``ratio``.

    Attributes:
      method: ``"none"`` (plain training), ``"anchor"`` (TNA-PFN) or ``"prune"`` (prune-at-init).
      ratio: the mask ratio ρ in [0, 1].

    Examples:
      >>> Arm("anchor", 0.4).label, Arm("none", 0.0).label, Arm("prune", 0.2).label
      ('TNA-PFN 0.4', 'vanilla', 'prune 0.2')
    """

    method: str
    ratio: float

    @property
    def label(self) -> str:
        if self.method == "none" or self.ratio == 0.0:
            return "vanilla"
        name = "TNA-PFN" if self.method == "anchor" else "prune"
        return f"{name} {self.ratio:g}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One model: an arm and a seed index; ``index`` is its place on the run axis.

    Attributes:
      index: position on the run axis (arm-major: ``arm_index * num_seeds + seed``).
      arm_index: the arm's position in :func:`arms_from_config`.
      arm: the :class:`Arm`.
      seed: the seed index within the arm.

    Examples:
      >>> Run(3, 1, Arm("anchor", 0.4), 1).describe()
      {'run': 3, 'arm': 'TNA-PFN 0.4', 'method': 'anchor', 'ratio': 0.4, 'seed': 1}
    """

    index: int
    arm_index: int
    arm: Arm
    seed: int

    def describe(self) -> dict[str, Any]:
        return {"run": self.index, "arm": self.arm.label, "method": self.arm.method,
                "ratio": self.arm.ratio, "seed": self.seed}


def arms_from_config(config: Any) -> tuple[Arm, ...]:
    """The arms an experiment trains.

    * ``config.sweep.anchor_ratios`` / ``config.sweep.prune_ratios`` non-empty: exactly those arms
      (ratio 0 in either list is the plain arm).
    * otherwise the main arm (prune-at-init when ``config.prune.ratio > 0``, else TNA-PFN at
      ``config.anchor.ratio``; ratio 0 is plain training) and, when ``config.baseline`` is set
      and the main arm is not plain, a plain arm with the same seeds.

    Args:
      config: the experiment config (:func:`tna_jax.config.default_config`).

    Returns:
      The arms, in run-axis order.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> [a.label for a in arms_from_config(c)]
      ['vanilla', 'TNA-PFN 0.4']
      >>> c.sweep.anchor_ratios, c.sweep.prune_ratios = (0.0, 0.2), (0.2,)
      >>> [a.label for a in arms_from_config(c)]
      ['vanilla', 'TNA-PFN 0.2', 'prune 0.2']
    """
    sweep_a = [float(r) for r in config.sweep.anchor_ratios]
    sweep_p = [float(r) for r in config.sweep.prune_ratios]
    if sweep_a or sweep_p:
        arms = [Arm("none" if r == 0 else "anchor", r) for r in sweep_a]
        arms += [Arm("none" if r == 0 else "prune", r) for r in sweep_p]
        seen, unique = set(), []
        for a in arms:
            key = (a.method, a.ratio)
            if key not in seen:
                seen.add(key)
                unique.append(a)
        return tuple(unique)
    if config.prune.ratio > 0:
        main = Arm("prune", float(config.prune.ratio))
    elif config.anchor.ratio > 0:
        main = Arm("anchor", float(config.anchor.ratio))
    else:
        main = Arm("none", 0.0)
    if config.baseline and main.method != "none":
        return (Arm("none", 0.0), main)
    return (main,)


def make_runs(config: Any) -> list[Run]:
    """All runs, arm-major: run ``a * num_seeds + s`` is arm ``a`` with seed ``s``.

    Args:
      config: the experiment config.

    Returns:
      One :class:`Run` per (arm, seed).

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.num_seeds = 2
      >>> [(r.index, r.arm.label, r.seed) for r in make_runs(c)]
      [(0, 'vanilla', 0), (1, 'vanilla', 1), (2, 'TNA-PFN 0.4', 0), (3, 'TNA-PFN 0.4', 1)]
    """
    arms = arms_from_config(config)
    return [Run(a * config.num_seeds + s, a, arm, s) for a, arm in enumerate(arms) for s in range(config.num_seeds)]


PURPOSES = ("init", "data", "mask", "anchor_values", "dropout")


class RunKeys(NamedTuple):
    """Raw uint32 key data per run (leading run axis), one stream per purpose.

    Attributes:
      init, data, mask, anchor_values, dropout: uint32 arrays of shape ``(runs, 2)``, one stream
        per purpose (wrap a row with ``jax.random.wrap_key_data``).

    Examples:
      >>> import jax.numpy as jnp
      >>> RunKeys(*[jnp.zeros((3, 2), jnp.uint32)] * 5)._fields
      ('init', 'data', 'mask', 'anchor_values', 'dropout')
    """

    init: jax.Array
    data: jax.Array
    mask: jax.Array
    anchor_values: jax.Array
    dropout: jax.Array


def make_run_keys(config: Any, runs: Sequence[Run]) -> RunKeys:
    """Per-run keys from ``config.seed``.

    ``seeds.vary``: "both" (default) gives each seed its own init and data order; "init" shares
    the data order; "data" shares the init. ``anchor.share_mask`` shares the mask key across
    seeds; ``anchor.share_values`` makes every seed take its anchored values from one shared
    initialisation. Runs of different arms with the same seed get the same keys (paired).

    Args:
      config: the experiment config (``seed``, ``seeds.vary``, ``anchor.share_mask``,
        ``anchor.share_values``).
      runs: the runs (:func:`make_runs`).

    Returns:
      :class:`RunKeys` with arrays of shape ``(len(runs), 2)`` (raw key data).

    Examples:
      >>> import numpy as np
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.num_seeds = 2
      >>> keys = make_run_keys(c, make_runs(c))
      >>> keys.init.shape, bool(np.array_equal(keys.mask[0], keys.mask[1]))  # one mask key for every seed
      ((4, 2), True)
    """
    root = jax.random.key(config.seed)
    purpose = {p: jax.random.fold_in(root, i) for i, p in enumerate(PURPOSES)}
    vary = config.seeds.vary

    def per_seed(name: str, seed: int, shared: bool) -> jax.Array:
        return jax.random.key_data(jax.random.fold_in(purpose[name], 0 if shared else seed + 1))

    rows = []
    for run in runs:
        s = run.seed
        rows.append(RunKeys(
            init=per_seed("init", s, vary == "data"),
            data=per_seed("data", s, vary == "init"),
            mask=per_seed("mask", s, config.anchor.share_mask),
            anchor_values=per_seed("anchor_values", s, config.anchor.share_values),
            dropout=per_seed("dropout", s, False),
        ))
    return RunKeys(*[jnp.stack(xs) for xs in zip(*rows)])


def padded_runs(runs: Sequence[Run], num_devices: int) -> list[Run]:
    """`runs` padded (with copies of the last run) to a multiple of `num_devices`.

    Args:
      runs: the runs.
      num_devices: the devices the run axis is sharded over.

    Returns:
      The runs and the padding runs (never reported), with consecutive indices.
    """
    runs = list(runs)
    pad = (-len(runs)) % num_devices
    return runs + [dataclasses.replace(runs[-1], index=len(runs) + i) for i in range(pad)]
