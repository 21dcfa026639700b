"""Offline data sources: MNIST-1D (generated) and scikit-learn's digits (shipped).

Each source is ``fn(data_config) -> (x_train, y_train, x_test, y_test, num_classes, kind, info)``
and never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

SourceOutput = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str, dict[str, Any]]


def _get(cfg: Any, field: str, default: Any) -> Any:
    return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


def cache_dir() -> str:
    """Where generated datasets are cached (``$TNA_JAX_CACHE`` or ``~/.cache/tna_jax``)."""
    return os.environ.get("TNA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tna_jax"))


def _save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            os.fchmod(f.fileno(), 0o644)  # a shared cache: mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def mnist1d(cfg: Any) -> SourceOutput:
    """MNIST-1D (Greydanus 2020) generated offline by the ``mnist1d`` package.

    Fields: ``num_samples`` (default 5000, 80% train / 20% test as in the package),
    ``generation_seed`` (default 42, the package's). Never uses the package's download path.
    Generated arrays are cached as ``.npz`` (no pickle) in :func:`cache_dir`, keyed by the two
    fields and the package version, so a cached dataset loads without importing the package
    (which pulls in matplotlib and scipy: seconds per process).
    """
    import importlib.metadata

    num_samples = _get(cfg, "num_samples", 5000)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ValueError(f"data.num_samples must be an integer >= 20; got {num_samples!r}.")
    gen_seed = _get(cfg, "generation_seed", 42)
    key = {"num_samples": num_samples, "seed": gen_seed, "mnist1d": importlib.metadata.version("mnist1d")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"mnist1d_{digest}.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
                spec = json.loads(str(z["spec"]))
            return (arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], 10, "features",
                    {"generator": "mnist1d", **spec})
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is regenerated below
    import mnist1d.data as m1d

    args = m1d.get_dataset_args()
    args.num_samples = num_samples
    args.seed = gen_seed
    spec = {k: v for k, v in vars(args).items() if k != "url"}
    # make_dataset seeds NumPy's global generator; restore it so we leave no trace.
    state = np.random.get_state()  # noqa: NPY002 (restoring the global generator mnist1d seeds)
    try:
        data = m1d.make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    arrays = {
        "x": data["x"].astype(np.float32), "y": data["y"].astype(np.int32),
        "x_test": data["x_test"].astype(np.float32), "y_test": data["y_test"].astype(np.int32),
    }
    try:
        _save_npz_atomic(path, spec=np.array(json.dumps(spec, sort_keys=True, default=str)), **arrays)
    except OSError:
        pass  # a read-only home is fine: we just do not cache
    return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], 10, "features", {"generator": "mnist1d", **spec}


def digits(cfg: Any) -> SourceOutput:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package) as images
    of shape (8, 8, 1); ``test_fraction`` (default 0.2) of them are held out for testing."""
    from sklearn.datasets import load_digits

    test_fraction = _get(cfg, "test_fraction", 0.2)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1); got {test_fraction!r}.")
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(1234).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test], 10, "image", {"source": "sklearn.datasets.load_digits"}
