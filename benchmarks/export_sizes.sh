#!/usr/bin/env bash
# File sizes of the 3.27M-parameter tutorial CNN pruned to 90%, every export
# kprune and tfmot 0.8.1 offer, interleaved, for each seed in $SEEDS (default
# "0 1"). Needs Fashion-MNIST
# (apt-get install dataset-fashion-mnist). Creates .venv (make) and
# .venv-tfmot (tensorflow + tf-keras + tfmot 0.8.1). About 25 minutes per
# seed on 2 busy cores.
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
.venv/bin/python - <<'PY'
import json
import statistics

rows = [json.loads(line) for line in open("benchmarks/export_sizes.jsonl")]
for library in ("tfmot", "kprune"):
    mine = [r for r in rows if r["library"] == library]
    print(f"{library} ({len(mine)} seeds), median MB:")
    for key in mine[0]["bytes"]:
        values = [r["bytes"][key] / 1e6 for r in mine]
        print(f"  {key:<40} {statistics.median(values):.3f}")
    for key in mine[0]["accuracy"]:
        values = [r["accuracy"][key] for r in mine]
        print(f"  accuracy {key:<31} {statistics.median(values):.4f}")
PY
