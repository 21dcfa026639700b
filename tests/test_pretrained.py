"""Real pretrained weights (tna_jax.pretrained): all-MiniLM-L6-v2 against the PyTorch reference,
the NumPy safetensors reader, the name mapping, and the errors for bad checkpoint files."""

import json
import os
import shutil
import struct
import sys

import jax
import numpy as np
import pytest

from tna_jax import models, pretrained
from tna_jax import tree as tree_lib

TEXTS = [
    "A man is playing a guitar.",
    "Stocks fell sharply on Monday after the central bank raised interest rates.",
    "Ünïcödé accents: café, naïve, Zürich.",
    "中文字符 and an emoji 🙂 in one line",
    "",
    "word " * 100,  # longer than the sequence length: truncated the same way by both
]
SEQ_LEN = 48


def _write_safetensors(path, tensors, extra_header=None):
    """The safetensors format by hand: u64 header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    header.update(extra_header or {})
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


TINY = {"name": "transformer", "vocab_size": 50, "hidden": 8, "layers": 2, "heads": 2, "intermediate": 16,
        "max_len": 16, "type_vocab": 2}


def _tiny_checkpoint(tmp_path, seed=0, **overrides):
    """A Hugging Face-style BERT checkpoint made from a tiny Flax encoder: (dir, flax params)."""
    cfg = {**TINY, **overrides}
    tmp_path.mkdir(parents=True, exist_ok=True)
    net = models.build(cfg, (6,), 3)
    rng = np.random.default_rng(seed)  # random values of the right shapes: no compilation needed
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), _expected(net))
    flat = dict(tree_lib.named_leaves({k: v for k, v in params.items() if k != "head"}))
    tensors = {}
    for ours, (hf, transposed) in pretrained.hf_tensor_names(cfg["layers"]).items():
        value = np.asarray(flat[ours])
        tensors[hf] = np.ascontiguousarray(value.T if transposed else value)
    tensors["embeddings.position_ids"] = np.arange(cfg["max_len"], dtype=np.int64)[None]
    tensors["pooler.dense.weight"] = np.zeros((cfg["hidden"], cfg["hidden"]), np.float32)
    _write_safetensors(tmp_path / "model.safetensors", tensors, {"__metadata__": {"format": "pt"}})
    hf_cfg = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute",
              "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden"], "num_hidden_layers": cfg["layers"],
              "num_attention_heads": cfg["heads"], "intermediate_size": cfg["intermediate"],
              "max_position_embeddings": cfg["max_len"], "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    return tmp_path, net, params


def _expected(net):
    return jax.eval_shape(net.init, jax.random.key(0))["params"]


def test_tiny_checkpoint_round_trip(tmp_path):
    model_dir, net, params = _tiny_checkpoint(tmp_path)
    cfg = pretrained.read_bert_config(str(model_dir))
    assert {k: cfg[k] for k in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_len")} == \
        {k: TINY[k] for k in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_len")}
    loaded = pretrained.load_bert_params(str(model_dir), _expected(net))
    body = {k: v for k, v in params.items() if k != "head"}
    tree_lib.check_same_structure(body, loaded)
    for (name, a), (_, b) in zip(tree_lib.named_leaves(body), tree_lib.named_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    # the Linear weights really were transposed: query kernel (in, out) is the stored weight.T
    stored = pretrained.read_safetensors(str(model_dir / "model.safetensors"), ["encoder.layer.1.attention.self.query.weight"])
    np.testing.assert_array_equal(stored["encoder.layer.1.attention.self.query.weight"].T,
                                  loaded["layer_1"]["attention"]["query"]["kernel"])
    # the first layer of a 2-layer checkpoint loads into a 1-layer encoder
    one = models.build({**TINY, "layers": 1}, (6,), 3)
    first = pretrained.load_bert_params(str(model_dir), _expected(one))
    assert sorted(first) == ["embeddings", "layer_0"]
    np.testing.assert_array_equal(first["layer_0"]["output"]["kernel"], np.asarray(params["layer_0"]["output"]["kernel"]))


def test_safetensors_reader_returns_what_was_saved(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.integers(-9, 9, (7,)).astype(np.int64),
               "c": rng.normal(size=(2, 2, 2)).astype(np.float16), "d": np.zeros((0, 4), np.float32)}
    path = str(tmp_path / "x.safetensors")
    st.save_file(tensors, path)
    ours = pretrained.read_safetensors(path)
    ref = st.load_file(path)
    assert sorted(ours) == sorted(ref) == sorted(tensors)
    for k in tensors:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
        np.testing.assert_array_equal(ours[k], ref[k])


def test_checkpoint_errors_name_the_file_and_the_tensor(tmp_path):
    model_dir, net, _ = _tiny_checkpoint(tmp_path / "ok")
    path = model_dir / "model.safetensors"
    expected = _expected(net)
    # missing file
    with pytest.raises(FileNotFoundError, match=r"weights file .*nowhere/model.safetensors does not exist"):
        pretrained.load_bert_params(str(tmp_path / "nowhere"), expected)
    # truncated: cut inside the data section, then inside the header
    raw = path.read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(pretrained.PretrainedError, match=r"cut/model.safetensors is truncated: tensor '[^']+' ends at byte"):
        pretrained.load_bert_params(str(cut), expected)
    (cut / "model.safetensors").write_bytes(raw[:50])
    with pytest.raises(pretrained.PretrainedError, match=r"cut/model.safetensors is truncated or not a safetensors file"):
        pretrained.load_bert_params(str(cut), expected)
    (cut / "model.safetensors").write_bytes(raw[:5])
    with pytest.raises(pretrained.PretrainedError, match="shorter than the 8-byte"):
        pretrained.read_safetensors(str(cut / "model.safetensors"))
    # another architecture: wider hidden size, and a module BERT does not have
    wide_dir, _, _ = _tiny_checkpoint(tmp_path / "wide", hidden=12, heads=2)
    with pytest.raises(pretrained.PretrainedError,
                       match=r"wide/model.safetensors: tensor 'embeddings.word_embeddings.weight' has shape \(50, 12\); "
                             r"the Flax encoder needs \(50, 8\)"):
        pretrained.load_bert_params(str(wide_dir), expected)
    tensors = pretrained.read_safetensors(str(path))
    tensors["encoder.layer.0.crossattention.self.query.weight"] = np.zeros((8, 8), np.float32)
    other = tmp_path / "other"
    other.mkdir()
    _write_safetensors(other / "model.safetensors", tensors)
    with pytest.raises(pretrained.PretrainedError, match=r"crossattention.*another architecture"):
        pretrained.load_bert_params(str(other), expected)
    del tensors["encoder.layer.0.crossattention.self.query.weight"]
    del tensors["encoder.layer.1.output.LayerNorm.bias"]
    _write_safetensors(other / "model.safetensors", tensors)
    with pytest.raises(pretrained.PretrainedError,
                       match=r"other/model.safetensors has no tensor 'encoder.layer.1.output.LayerNorm.bias'.*"
                             r"layer_1/output_norm/bias"):
        pretrained.load_bert_params(str(other), expected)
    # a deeper encoder than the checkpoint
    deep = models.build({**TINY, "layers": 3}, (6,), 3)
    with pytest.raises(pretrained.PretrainedError, match=r"no tensor 'encoder.layer.2.*the checkpoint has 2 layers"):
        pretrained.load_bert_params(str(model_dir), _expected(deep))
    # a config of another model type, and a damaged one
    cfg = json.loads((model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(pretrained.PretrainedError, match=r"other/config.json: model_type='roberta'"):
        pretrained.read_bert_config(str(other))
    (other / "config.json").write_text("{not json")
    with pytest.raises(pretrained.PretrainedError, match="config.json is not valid JSON"):
        pretrained.read_bert_config(str(other))


# --------------------------------------------------------------------------------------------
# The real checkpoint.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(pretrained.MINILM_PACKAGE)
    return pretrained.load_minilm(2, seq_len=SEQ_LEN)


def test_loading_minilm_needs_no_torch(monkeypatch):
    pytest.importorskip(pretrained.MINILM_PACKAGE)
    for name in ("torch", "transformers", "sentence_transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of these now raises ImportError
    # (the weights are read with the safetensors package, which needs no torch: its NumPy reader)
    net, variables, tok = pretrained.load_minilm(4, seq_len=16, num_layers=1)
    ids = tok.encode(["hello world"], 16)
    assert ids[0, :4].tolist() == [101, 7592, 2088, 102] and ids[0, 4:].tolist() == [0] * 12
    logits, _ = net.apply(variables, ids)
    assert logits.shape == (1, 4) and np.isfinite(np.asarray(logits)).all()
    assert net.param_count() == 30522 * 384 + 512 * 384 + 2 * 384 + 2 * 384 + (4 * (384 * 384 + 384) + 2 * 2 * 384
                                                                            + 384 * 1536 + 1536 + 1536 * 384 + 384) + 384 * 4 + 4


def test_minilm_embeddings_match_sentence_transformers(minilm):
    pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers")
    net, variables, tok = minilm
    ids = tok.encode(TEXTS, SEQ_LEN)
    ours = pretrained.encode(net, variables, ids)
    ref_model = st.SentenceTransformer(pretrained.minilm_dir(), device="cpu")
    ref_model.max_seq_length = SEQ_LEN
    ref = ref_model.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    assert ours.shape == ref.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # the same token ids as the reference tokenizer (which pads to the longest text)
    ref_ids = ref_model.tokenizer(TEXTS, padding=True, truncation=True, max_length=SEQ_LEN)["input_ids"]
    for row, ref_row in zip(ids, ref_ids):
        assert row[: len(ref_row)].tolist() == list(ref_row) and not row[len(ref_row):].any()
    # and embeddings that mean something: the paraphrase is closer than the unrelated sentence
    e = pretrained.encode(net, variables, tok.encode(["A man plays the guitar.", "Someone is playing an instrument.",
                                                       "The stock market crashed."], SEQ_LEN))
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_real_checkpoint_truncated_copy(tmp_path):
    pytest.importorskip(pretrained.MINILM_PACKAGE)
    src = pretrained.minilm_dir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(f.read(2_000_000))
    with pytest.raises(pretrained.PretrainedError, match=r"model.safetensors is truncated: tensor '[a-zA-Z.0-9_]+' ends at"):
        pretrained.load_minilm(2, seq_len=8, num_layers=1, model_dir=str(tmp_path))
    os.remove(tmp_path / "tokenizer.json")
    os.remove(tmp_path / "model.safetensors")
    os.symlink(os.path.join(src, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="tokenizer file .*tokenizer.json does not exist"):
        pretrained.load_minilm(2, seq_len=8, num_layers=1, model_dir=str(tmp_path))
    tok = pretrained.Tokenizer.from_dir(src)
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.encode("one string", 8)
    with pytest.raises(ValueError, match="max_len must be an integer >= 2"):
        tok.encode(["a"], 1)
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 6\]"):
        pretrained.load_minilm(2, num_layers=7)
