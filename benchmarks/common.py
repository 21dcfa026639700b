"""Shared helpers for the benchmark scripts: interleaved timing, tables, atomic JSON output.

Every benchmark compares two or more variants measured in the same process, interleaved round by
round, so that noise from other jobs on a shared machine hits all variants alike; the ratio of
medians is what we report.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

from tna_jax import checkpoint as ckpt_lib

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 7, inner: int = 1,
                     warmup: int = 1) -> dict[str, dict[str, float]]:
    """Times each zero-argument callable `rounds` times, interleaving the variants.

    Returns per variant the median, min and max seconds per call (over `inner` calls a round).
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for k, v in samples.items()}


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, payload: dict[str, Any], out_dir: str | None = None) -> str:
    """Writes `payload` (plus machine info) to results/<name>.json atomically; returns the path."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path = os.path.join(out_dir, f"{name}.json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(ckpt_lib.dumps(payload, indent=2))  # strict JSON: NaN/inf as null
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def import_torch() -> Any:
    """PyTorch for the comparisons, or ImportError when it is absent or switched off with
    ``TNA_JAX_BENCH_TORCH=0`` (CI's quick guard: its environment has torch for the tests, but the
    PyTorch comparisons are measured at full size only, on an idle machine)."""
    if os.environ.get("TNA_JAX_BENCH_TORCH", "1") == "0":
        raise ImportError("PyTorch comparisons are switched off (TNA_JAX_BENCH_TORCH=0)", name="torch")
    import torch

    return torch
