#!/usr/bin/env bash
# Speed and memory of kprune vs tfmot 0.8.1 vs plain Keras, interleaved.
#   bash benchmarks/bench.sh          # quick (make bench): about 25 minutes
#                                     # on 2 busy cores, less on a quiet one
#   bash benchmarks/bench.sh --full   # 2 passes, more rounds, tfmot at 1e8
# Creates .venv (make) and .venv-tfmot (tensorflow + tf-keras + tfmot 0.8.1)
# when missing. Writes JSON rows to benchmarks/results.jsonl and prints the
# tables of benchmarks/README.md (benchmarks/summarize.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=quick
[ "${1:-}" = "--full" ] && mode=full
make -s .venv/.installed
if [ ! -x .venv-tfmot/bin/python ]; then
  python3 -m venv .venv-tfmot
  .venv-tfmot/bin/pip install --quiet tensorflow==2.21.0 tf-keras==2.21.0 \
    tensorflow-model-optimization==0.8.1
fi
out=benchmarks/results.jsonl
: > "$out"
export TF_CPP_MIN_LOG_LEVEL=3
run() { nice -n 5 "$@" 2> >(grep -v -e "^WARNING: All log" -e "^I0000" -e "^E0000" -e "^W0000" >&2) | tee -a "$out"; }

if [ "$mode" = full ]; then
  passes=2 rounds=7 big_rounds=5 repeats=7 tfmot_big="1e8"
else
  passes=1 rounds=3 big_rounds=2 repeats=5 tfmot_big=""
fi

# 1. Mask update per tensor size; tfmot's sort is capped at 1e7 in quick mode
#    (about 40 s per update at 1e8).
for _ in $(seq "$passes"); do
  for size in 1e5 1e6 1e7 1e8; do
    run .venv/bin/python benchmarks/mask_update.py --library kprune \
      --sizes "$size" --repeats "$repeats"
    if [ "$size" != 1e8 ] || [ -n "$tfmot_big" ]; then
      r=$repeats
      [ "$size" = 1e8 ] && r=1
      run .venv-tfmot/bin/python benchmarks/mask_update.py --library tfmot \
        --sizes "$size" --repeats "$r"
    fi
  done
done

# 2. Step time of fit, plain vs pruned at frequency 100 and 1.
for _ in $(seq "$passes"); do
  for model in mlp_512 mlp_2048 cnn; do
    # tfmot's frequency-1 step takes seconds on the 10M model: fewer steps.
    tfmot_f1=20 r=$rounds
    [ "$model" = mlp_2048 ] && tfmot_f1=3 r=$big_rounds
    run .venv/bin/python benchmarks/step_time.py --library kprune \
      --model "$model" --rounds "$r"
    run .venv-tfmot/bin/python benchmarks/step_time.py --library tfmot \
      --model "$model" --rounds "$r" --f1-steps "$tfmot_f1"
  done
done

# jit_compile=True (XLA) on kprune and Keras 3 only.
run .venv/bin/python benchmarks/step_time.py --library kprune \
  --model mlp_512 --rounds "$rounds" --jit

# 3. Memory: peak RSS of a 36.8M-parameter MLP, each run in its own process.
for _ in $(seq "$passes"); do
  run .venv/bin/python benchmarks/memory.py --library kprune --plain
  run .venv/bin/python benchmarks/memory.py --library kprune
  run .venv-tfmot/bin/python benchmarks/memory.py --library tfmot --plain
  run .venv-tfmot/bin/python benchmarks/memory.py --library tfmot
done

.venv/bin/python benchmarks/summarize.py "$out"
