"""``train.py --dry_run``: every check a run makes before it trains, and nothing else.

A dry run validates the config, finds its kind, runs the preflight checks (model, data source,
tfds data prepared, workdir writable), compares the config with the workdir's ``config.json``
when it holds one (as a resume would), then builds each problem of the run abstractly: the
dataset is loaded (the offline sources are generated or read from their cache; a ``tfds:``
dataset is only checked to be prepared, not read), the model is built for its shapes, the
anchor patterns are matched against the parameters, and the parameters are counted with
``jax.eval_shape``, so nothing is computed, compiled or trained and nothing is written to the
workdir. The docs' commands are checked this way in the tests (tests/test_doc_commands.py).
"""

from __future__ import annotations

import os
from typing import Any

from tna_jax import config as config_lib
from tna_jax import preflight

__all__ = ["dry_run", "problems"]


def problems(config: Any, kind: str) -> list[tuple[str, Any]]:
    """``[(label, config), ...]``: the (data, model) problems a run of `kind` trains.

    Args:
      config: the experiment config (valid by `tna_jax.config.validate`).
      kind: its ``config.kind``.

    Returns:
      One entry for most kinds (label ``""``); one per variant for ``grid`` and per task chosen by
      ``align.run`` for ``align_compare``; none for ``cold_fusion`` (its model is the pretrained
      checkpoint, loaded only by a real run).

    Raises:
      tna_jax.config.ConfigError: a grid variant or an alignment task that does not apply.

    Examples:
      >>> from tna_jax.config import default_config
      >>> [label for label, _ in problems(default_config(), "train")]
      ['']
    """
    if kind == "cold_fusion":
        return []
    if kind == "grid":
        from tna_jax.experiments.grid import variant_configs

        return [(name, cfg) for name, _, cfg in variant_configs(config)]
    if kind == "align_compare":
        from tna_jax.experiments import align_compare

        opts = config.align
        names = list(opts.tasks.keys()) or ["main"]
        wanted = [t.strip() for t in str(opts.get("run", "")).split(",") if t.strip()] or names
        return [(name, align_compare.task_config(config, name)) for name in wanted]
    return [("", config)]


def _describe(label: str, cfg: Any, top: Any) -> str:
    """One problem built abstractly: its data shapes and its parameter count (`top`: the whole
    config, already checked)."""
    import jax
    import numpy as np

    from tna_jax.experiments.train import load_problem

    prefix = f"{label}: " if label else ""
    if cfg is not top:  # a variant or task may name its own model and data
        preflight.check_config(cfg)
    source = str(cfg.data.source)
    if source.startswith("tfds:"):  # preflight found it prepared; reading it is the run's work
        return f"{prefix}model {cfg.model.name} on {source} (prepared; not read by a dry run)"
    dataset, net, _ = load_problem(cfg)
    shapes = jax.eval_shape(net.init, jax.random.key(0))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes.get("params", shapes)))
    sizes = dataset.sizes()
    return (f"{prefix}model {net.name} on {source} {tuple(dataset.input_shape)} -> {dataset.num_classes} classes "
            f"({sizes['train']} train / {sizes['val']} val / {sizes['test']} test): {count:,} parameters")


def dry_run(config: Any, workdir: str | None = None) -> list[str]:
    """Checks that `config` would run on this machine (and in `workdir`), without running it.

    Args:
      config: the experiment config (``config.kind`` picks the kind).
      workdir: the run directory, or None; it is checked (writable, its ``config.json`` compatible),
        never created or written.

    Returns:
      Lines describing what would run: the kind, each problem's data and parameter count, and
      whether the workdir would be created or resumed.

    Raises:
      tna_jax.config.ConfigError: what `tna_jax.runner.run` would raise before training: an
        invalid config, an unknown kind, model or data source, an unprepared dataset, anchor
        patterns that select nothing, a workdir holding another config.
      tna_jax.preflight.WorkdirError: a workdir that cannot be created or written.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.num_samples, c.model.width = 200, 8
      >>> print("\\n".join(dry_run(c)))
      kind 'train'
      model mlp on mnist1d (40,) -> 10 classes (144 train / 16 val / 40 test): 490 parameters
    """
    from tna_jax.experiments.registry import find, load_all

    config_lib.validate(config)
    kind = config.get("kind", "train") if hasattr(config, "get") else "train"
    if find(kind) is None:
        raise config_lib.ConfigError(f"config.kind must be one of {sorted(load_all())}; got {kind!r}.")
    preflight.check_config(config)
    lines = [f"kind {kind!r}"]
    for label, cfg in problems(config, kind):
        lines.append(_describe(label, cfg, config))
    if kind == "cold_fusion":
        lines.append("model: the pretrained checkpoint (loaded by the run, not by a dry run)")
    if workdir is not None:
        from tna_jax import workdir as workdir_lib

        preflight.check_workdir(workdir)
        workdir_lib.check_resume(config, workdir)
        resumes = os.path.exists(os.path.join(workdir, "config.json"))
        lines.append(f"workdir {workdir}: " + ("would resume (its config.json matches)" if resumes
                                               else "would be created" if not os.path.exists(workdir)
                                               else "exists; the run would start in it"))
    return lines
