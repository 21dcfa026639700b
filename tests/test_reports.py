"""What reports and figures say (issue 22): strict JSON everywhere (null, never a bare NaN), the
"±" of every table and figure named (sample std over N seeds or which pairs), no empty panels,
bands left visible on long curves; and the reproduction protocol end to end (PyTorch init,
disjoint pairs, no validation split)."""

import json
import math
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from util import tiny_config

from tna_jax import checkpoint as ckpt_lib
from tna_jax import logs, plotting, runner


def strict_load(text):
    """json.loads that fails on NaN / Infinity tokens (what strict parsers do)."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


NASTY = {"nan": float("nan"), "inf": float("inf"), "ninf": -np.inf, "f32": np.float32("nan"),
         "array": np.array([1.0, np.nan, np.inf]), "nested": [{"x": (np.float64(np.nan), 2)}], "ok": 0.25}
CLEAN = {"nan": None, "inf": None, "ninf": None, "f32": None, "array": [1.0, None, None],
         "nested": [{"x": [None, 2]}], "ok": 0.25}


def test_every_json_writer_writes_null_for_nan_and_inf(tmp_path):
    with pytest.raises(ValueError):
        strict_load(json.dumps({"a": float("nan")}))  # what Python's json writes by default
    assert strict_load(ckpt_lib.dumps(NASTY)) == CLEAN
    path = ckpt_lib.write_json(str(tmp_path / "report.json"), NASTY)
    assert strict_load(open(path).read()) == CLEAN
    log = logs.MetricsLog(str(tmp_path), [{"run": 0, "arm": "vanilla", "seed": 0}], tensorboard=False)
    log.write([{"epoch": 1, "run": 0, "val_loss": float("nan"), "train_loss": 0.5}])
    log.close()
    assert strict_load(open(tmp_path / "metrics.jsonl").readline()) == {"epoch": 1, "run": 0, "val_loss": None,
                                                                       "train_loss": 0.5}
    from benchmarks import common

    bench = common.write_json("nan_check", {"speedup": float("nan"), "rows": [{"s": np.inf}]}, out_dir=str(tmp_path))
    payload = strict_load(open(bench).read())
    assert payload["speedup"] is None and payload["rows"] == [{"s": None}]


def captured(monkeypatch):
    """Replaces plotting.save_figure so that a test can look at the figure before it is closed."""
    figures = []
    real = plotting.save_figure

    def save(fig, path, dpi=130, **kw):
        figures.append(fig)
        return real(fig, path, dpi=40, **kw)

    monkeypatch.setattr(plotting, "save_figure", save)
    return figures


def test_ratio_sweep_without_prune_ratios_has_no_empty_panel(tmp_path, monkeypatch):
    figures = captured(monkeypatch)
    rows = [{"method": "none", "ratio": 0.0, "avg_endpoint_accuracy_mean": 0.9, "interp_accuracy_mean": 0.5,
             "interp_accuracy_std": None},
            {"method": "anchor", "ratio": 0.4, "avg_endpoint_accuracy_mean": 0.88, "interp_accuracy_mean": 0.7,
             "interp_accuracy_std": 0.02}]
    path = plotting.plot_ratio_sweep(rows, str(tmp_path / "sweep.png"), caption="bars: ± sample std over 5 disjoint pairs")
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["TNA-PFN"]
    assert Image.open(path).text["Description"] == "bars: ± sample std over 5 disjoint pairs"
    rows.append({"method": "prune", "ratio": 0.4, "avg_endpoint_accuracy_mean": 0.8, "interp_accuracy_mean": 0.4})
    plotting.plot_ratio_sweep(rows, str(tmp_path / "sweep2.png"))
    assert [ax.get_title() for ax in figures[1].axes] == ["TNA-PFN", "prune at init"]


def test_long_curves_get_sparse_markers_and_keep_their_sample_std_bands(tmp_path, monkeypatch):
    figures = captured(monkeypatch)
    rng = np.random.default_rng(0)
    rounds = np.arange(1, 201)
    seeds = 0.5 + 0.05 * rng.standard_normal((4, 200))
    series = {"FedAvg": {"x": rounds, "y": seeds}, "short": {"x": [1, 2, 3], "y": [[0.1, 0.2, 0.3]]}}
    path = plotting.plot_curves(series, str(tmp_path / "acc.png"), "round", "accuracy", title="t",
                                caption="bands: ± sample std over 4 seeds")
    (ax,) = figures[0].axes
    long_line, short_line = ax.get_lines()
    assert long_line.get_markevery() == 200 // 15 and short_line.get_markevery() is None
    (band,) = ax.collections  # one band: the one-seed curve has no spread to draw
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx((seeds.mean(0) + seeds.std(0, ddof=1)).max(), rel=1e-6)  # ddof=1, not 0
    assert Image.open(path).text == {**Image.open(path).text, "Title": "t",
                                     "Description": "bands: ± sample std over 4 seeds"}
    plotting.plot_barrier_bars([{"g": "a", "s": "x", "v": 0.3, "e": None}, {"g": "b", "s": "x", "v": 0.2, "e": 0.1}],
                               str(tmp_path / "bars.png"), "g", "s", value_key="v", std_key="e")  # None: no bar


def test_the_pytorch_protocol_runs_with_disjoint_pairs_and_no_validation_split(tmp_path):
    c = tiny_config(num_seeds=4, train__epochs=1, data__val_fraction=0.0, analysis__plots=True,
                    train__tensorboard=False)
    c.model.init = "torch"
    c.analysis.pairs = "disjoint"
    c.sweep.anchor_ratios = (0.0, 0.5)  # no prune ratios
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "Mean of empty slice"
        report = runner.run(c, str(tmp_path))
    saved = strict_load((tmp_path / "report.json").read_text())
    for line in open(tmp_path / "metrics.jsonl"):
        strict_load(line)
    assert saved["model"]["init"] == "torch" and saved["statistics"]["pairs"] == "disjoint"
    assert [a["val_accuracy_mean"] for a in saved["arms"]] == [None, None]
    assert all(r["val_accuracy"] is None for r in saved["runs"])
    assert saved["lmc"]["vanilla"]["pairs"] == [[0, 1], [2, 3]] and saved["lmc"]["TNA-PFN 0.5"]["pairs"] == [[4, 5], [6, 7]]
    per_pair = [p["accuracy_barrier"] for p in saved["lmc"]["vanilla"]["per_pair"]]
    assert saved["lmc"]["vanilla"]["accuracy_barrier_std"] == pytest.approx(np.std(per_pair, ddof=1), abs=1e-12)
    acc = [r["test_accuracy"] for r in saved["runs"] if r["arm"] == "vanilla"]
    assert saved["arms"][0]["test_accuracy_std"] == pytest.approx(np.std(acc, ddof=1), rel=1e-6)
    assert report["markdown"].endswith("Test accuracy: mean ± sample std over 4 seeds. LMC columns: mean ± sample "
                                       "std over 2 disjoint pairs of seeds per arm. Anchors: shared anchor values.")
    assert "2 disjoint pairs" in (tmp_path / "report.md").read_text()
    caption = Image.open(tmp_path / "ratio_sweep.png").text["Description"]
    assert "± sample std of Interp. Acc." in caption and "2 disjoint pairs" in caption
    assert "shared anchor values" in caption and "model.init=torch" in caption
    assert math.isfinite(saved["lmc"]["vanilla"]["accuracy_barrier_mean"])
    assert not os.path.exists(tmp_path / "tensorboard")
