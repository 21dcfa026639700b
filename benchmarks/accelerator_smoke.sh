#!/usr/bin/env bash
# Smoke run on whatever accelerator JAX finds (GPU, TPU, or CPU as a fallback): the quickstart,
# the multi-seed benchmark and the LMC benchmark, then the device and every ratio in one table.
#
#   bash benchmarks/accelerator_smoke.sh [workdir]     # default workdir: runs/accelerator_smoke
#
# Install first with the matching extra, e.g. pip install -e ".[cuda12,bench]" or ".[tpu,bench]".
# Unchanged on any machine: nothing here names a device; on CPU it forces one device per core,
# as train.py does, and on an accelerator it uses all of its devices.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
WORK="${1:-runs/accelerator_smoke}"
OUT="$WORK/results"
mkdir -p "$OUT"

"$PY" - <<'PY'
import jax
print(f"backend: {jax.default_backend()}; devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
PY

echo "== quickstart"
start=$(date +%s)
"$PY" train.py --config configs/quickstart.py --workdir "$WORK/quickstart" --config.train.progress=false
echo "quickstart wall time: $(( $(date +%s) - start )) s"

echo "== benchmarks"
"$PY" benchmarks/run_all.py --only multiseed lmc --out "$OUT" --report "$WORK/BENCHMARKS.md"
echo "report: $WORK/BENCHMARKS.md"
