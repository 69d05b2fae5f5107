#!/usr/bin/env bash
# Pruned accuracy of kprune vs tfmot 0.8.1 on the tutorial pipeline, 3 seeds,
# interleaved. Needs Fashion-MNIST (apt-get install dataset-fashion-mnist).
# Creates .venv (make) and .venv-tfmot (tensorflow + tf-keras + tfmot 0.8.1).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s .venv/.installed
if [ ! -x .venv-tfmot/bin/python ]; then
  python3 -m venv .venv-tfmot
  .venv-tfmot/bin/pip install --quiet tensorflow==2.21.0 tf-keras==2.21.0 \
    tensorflow-model-optimization==0.8.1
fi
for seed in 0 1 2; do
  .venv-tfmot/bin/python benchmarks/tutorial_accuracy.py --library tfmot --seed "$seed"
  .venv/bin/python benchmarks/tutorial_accuracy.py --library kprune --seed "$seed"
done | tee benchmarks/tutorial_accuracy.jsonl
.venv/bin/python - <<'PY'
import json
import statistics

rows = [json.loads(line) for line in open("benchmarks/tutorial_accuracy.jsonl")]
for library in ("tfmot", "kprune"):
    mine = [r for r in rows if r["library"] == library]
    print(
        f"{library:7s} dense {statistics.mean(r['dense_accuracy'] for r in mine):.4f}"
        f"  pruned {statistics.mean(r['pruned_accuracy'] for r in mine):.4f}"
        f"  sparsity {mine[0]['kernel_sparsity']}"
    )
PY
