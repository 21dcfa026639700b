"""The report of ``kind="federated"``: accuracy curves per arm, the summary table (final
accuracy, mean ± sample std over seeds, the paired difference to FedAvg), its Markdown and the
figures (`tna_jax.experiments.federated` runs the rounds)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tna_jax import report as report_lib

__all__ = ["NAMES", "curves", "summaries", "markdown", "plots"]

# How the report writes the algorithms and server optimizers.
NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedpfn": "FedPFN", "fedpnu": "FedPNU",
         "none": "", "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi"}


def curves(arms: Sequence[Any], rows: Sequence[dict[str, Any]], split: str) -> dict[str, dict[str, Any]]:
    """The accuracy of the global model per evaluated round, arm and seed, from the metrics rows.

    Args:
      arms: the arms (`tna_jax.experiments.federated.FedArm`), in report order.
      rows: the metrics rows (one per evaluated round, arm and seed).
      split: the evaluation split (the rows hold ``<split>_accuracy``).

    Returns:
      ``{arm label: {"rounds": [...], "accuracy": [[per round] per seed]}}`` for the arms with rows.

    Examples:
      >>> from types import SimpleNamespace
      >>> rows = [{"arm": "FedAvg", "seed": s, "round": r, "test_accuracy": r / 10 + s} for r in (1, 2) for s in (0, 1)]
      >>> curves([SimpleNamespace(label="FedAvg")], rows, "test")
      {'FedAvg': {'rounds': [1, 2], 'accuracy': [[0.1, 0.2], [1.1, 1.2]]}}
    """
    by_arm: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for r in rows:
        if f"{split}_accuracy" in r:
            by_arm.setdefault(r["arm"], {}).setdefault(r["seed"], []).append((r["round"], r[f"{split}_accuracy"]))
    out = {}
    for a in arms:
        seeds = by_arm.get(a.label, {})
        if seeds:
            rounds_seen = [rd for rd, _ in seeds[0]]
            out[a.label] = {"rounds": rounds_seen, "accuracy": [[acc for _, acc in seeds[s]] for s in sorted(seeds)]}
    return out


def summaries(arms: Sequence[Any], final: dict[str, np.ndarray], curves: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary row per arm: final accuracy over the seeds, the mean of the last five and the
    best evaluations, and the paired difference to FedAvg with the same server optimizer and α.

    Args:
      arms: the arms, in report order.
      final: each arm's (by slug) final accuracy per seed.
      curves: what `curves` returned.

    Returns:
      The rows of ``report["arms"]``.
    """
    rows = []
    for arm in arms:
        acc = final[arm.slug]
        base = next((a for a in arms if a.algorithm == "fedavg" and a.server == arm.server and a.alpha == arm.alpha),
                    None)
        row = {"arm": arm.label, "algorithm": arm.algorithm, "server": arm.server, "alpha": arm.alpha,
               "ratio": arm.ratio, "seeds": int(acc.size), "final_accuracy": acc.tolist()}
        row["final_accuracy_mean"], row["final_accuracy_std"] = report_lib.mean_std(acc)
        curve = curves.get(arm.label)
        if curve is not None and len(curve["rounds"]):
            ys = np.asarray(curve["accuracy"])  # (seeds, evals)
            tail = ys[:, -min(5, ys.shape[1]):].mean(1)
            row["last5_accuracy_mean"], row["last5_accuracy_std"] = report_lib.mean_std(tail)
            row["best_accuracy_mean"] = float(ys.max(1).mean())
        if base is not None and base is not arm:
            diff = acc - final[base.slug]
            row["vs_fedavg"] = base.label
            row["diff_mean"], row["diff_std"] = report_lib.mean_std(diff)
            row["seeds_better"] = int((diff > 0).sum())
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report's head line and table as Markdown (``report.md``).

    Args:
      report: the report (``"arms"``, ``"federation"``, ``"model"``, ``"data"``, ``"eval_split"``,
        ``"training"``).

    Returns:
      The Markdown text.
    """
    rows = []
    for r in report["arms"]:
        rows.append({"arm": r["arm"], "seeds": r["seeds"],
                     "final": report_lib.pm(r["final_accuracy_mean"], r["final_accuracy_std"]),
                     "last5": report_lib.pm(r.get("last5_accuracy_mean"), r.get("last5_accuracy_std")),
                     "best": report_lib.pm(r.get("best_accuracy_mean"), 0.0).split(" ±")[0],
                     "diff": (report_lib.pm(r["diff_mean"], r["diff_std"]) + f" ({r['seeds_better']}/{r['seeds']} seeds)")
                     if "diff_mean" in r else "—"})
    f = report["federation"]
    split = ("a new split of the clients for every seed" if f.get("partition_draw") == "per_seed"
             else "one split of the clients shared by every seed")
    alphas = sorted({r["alpha"] for r in report["arms"] if r.get("alpha") is not None})
    alpha = (f", α ∈ {{{', '.join(f'{a:g}' for a in alphas)}}}" if len(alphas) > 1 else f", α={f['alpha']}")
    head = (f"{f['num_clients']} clients ({f['partition']}" + (alpha if f["partition"] == "dirichlet" else "")
            + f"; {split}), {f['cohort'][0]} of them per round, {f['local_epochs']} local epoch(s) of batch "
            f"{f['batch_size']}, {f['rounds']} rounds; {report['model']['name']} on {report['data']['name']}. "
            f"Accuracy of the global model on the {report['eval_split']} split, mean ± sample std over "
            f"{report['training']['seeds']} seeds.")
    table = report_lib.markdown_table(rows, [("arm", "arm"), ("seeds", "seeds"), ("final", "final acc %"),
                                          ("last5", "mean of last 5 evals %"), ("best", "best acc %"),
                                          ("diff", "final − FedAvg (same server opt, paired) pp")])
    return head + "\n\n" + table


def plots(config: Any, workdir: str, report: dict[str, Any], arms: Sequence[Any]) -> list[str]:
    """The figures: accuracy per round (one file per α) and, for sweeps over ρ, final accuracy
    against ρ (ρ = 0: FedAvg).

    Args:
      config: the experiment config (``name``, ``num_seeds``, ``federated``).
      workdir: where the PNG files go.
      report: the report (``"curves"``, ``"arms"``, ``"federation"``, ``"eval_split"``).
      arms: the arms, in report order.

    Returns:
      The paths of the files written.
    """
    from tna_jax import plotting

    files = []
    alphas = list(dict.fromkeys(a.alpha for a in arms))
    split = ("a new client split per seed" if report["federation"].get("partition_draw") == "per_seed"
             else "one client split shared by every seed")
    caption = f"Lines: mean, bands: ± sample std over {config.num_seeds} seeds; {split}."
    for alpha in alphas:
        series = {}
        for arm in arms:
            curve = report["curves"].get(arm.label)
            if arm.alpha == alpha and curve and len(curve["rounds"]):
                series[arm.label] = {"x": curve["rounds"], "y": curve["accuracy"]}
        suffix = "" if len(alphas) == 1 else f"_alpha_{alpha:g}"
        where = "" if alpha is None else f", Dirichlet α={alpha:g}"
        files.append(plotting.plot_curves(series, os.path.join(workdir, f"accuracy_vs_round{suffix}.png"),
                                          xlabel="round", ylabel=f"{report['eval_split']} accuracy (global model)",
                                          title=f"{config.name}: {config.federated.num_clients} clients{where}",
                                          caption=caption))
    if len(config.federated.sweep_ratios):
        series = {}
        for r in report["arms"]:
            if r["algorithm"] in ("fedpfn", "fedpnu"):
                key = (f"α={r['alpha']:g} " if r["alpha"] is not None and len(alphas) > 1 else "") + \
                    NAMES[r["algorithm"]] + (f" + {NAMES[r['server']]}" if r["server"] != "none" else "")
                s = series.setdefault(key, {"x": [], "y": [], "std": []})
                s["x"].append(r["ratio"])
                s["y"].append(r["final_accuracy_mean"])
                s["std"].append(r["final_accuracy_std"])
        for r in report["arms"]:
            if r["algorithm"] == "fedavg":
                for key, s in series.items():
                    same_alpha = len(alphas) == 1 or key.startswith(f"α={r['alpha']:g} ")
                    same_server = (r["server"] == "none") == ("+" not in key) and \
                        (r["server"] == "none" or key.endswith(NAMES[r["server"]]))
                    if same_alpha and same_server:  # ρ = 0 is FedAvg
                        s["x"].insert(0, 0.0)
                        s["y"].insert(0, r["final_accuracy_mean"])
                        s["std"].insert(0, r["final_accuracy_std"])
        if series:
            files.append(plotting.plot_curves(series, os.path.join(workdir, "sweep_ratio.png"), xlabel="mask ratio ρ",
                                              ylabel="final accuracy", title=f"{config.name}: accuracy vs ρ (ρ=0: FedAvg)",
                                              caption=caption))
    return files
