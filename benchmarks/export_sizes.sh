#!/usr/bin/env bash
# File sizes of the 3.27M-parameter tutorial CNN pruned to 90%, every export
# kprune and tfmot 0.8.1 offer, 2 seeds, interleaved. Needs Fashion-MNIST
# (apt-get install dataset-fashion-mnist). Creates .venv (make) and
# .venv-tfmot (tensorflow + tf-keras + tfmot 0.8.1). About 20 minutes on
# 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s .venv/.installed
if [ ! -x .venv-tfmot/bin/python ]; then
  python3 -m venv .venv-tfmot
  .venv-tfmot/bin/pip install --quiet tensorflow==2.21.0 tf-keras==2.21.0 \
    tensorflow-model-optimization==0.8.1
fi
for seed in ${SEEDS:-0 1}; do
  .venv-tfmot/bin/python benchmarks/export_sizes.py --library tfmot --seed "$seed" \
    --out "out/export_sizes/seed$seed" 2>/dev/null | grep '^{'
  .venv/bin/python benchmarks/export_sizes.py --library kprune --seed "$seed" \
    --out "out/export_sizes/seed$seed" 2>/dev/null | grep '^{'
done | tee benchmarks/export_sizes.jsonl
