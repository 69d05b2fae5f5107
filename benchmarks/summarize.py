"""Prints the Markdown tables of benchmarks/README.md from results.jsonl.

Usage: `python benchmarks/summarize.py benchmarks/results.jsonl`. Rows come
from `mask_update.py`, `step_time.py` and `memory.py` (see `bench.sh`);
several passes of the same measurement are pooled by their medians.
"""

import collections
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
median = statistics.median


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


# 1. Mask update time per size.
update = collections.defaultdict(list)
for r in rows:
    if r["bench"] == "mask_update":
        update[(r["library"], r["size"])] += r["times_ms"]
print("| weights | kprune (ms) | one read (ms) | kprune / one read |", end="")
print(" tfmot 0.8.1 (ms) | tfmot / kprune |")
print("|---|---|---|---|---|---|")
for size in sorted({size for _, size in update}):
    kp = median(update[("kprune", size)]) if update[("kprune", size)] else None
    fl = median(update[("floor", size)]) if update[("floor", size)] else None
    tf = median(update[("tfmot", size)]) if update[("tfmot", size)] else None
    print(
        f"| {size:.0e} | {fmt(kp, 2)} | {fmt(fl, 2)} | "
        f"{fmt(kp / fl if kp and fl else None)}x | {fmt(tf, 1)} | "
        f"{fmt(tf / kp if tf and kp else None)}x |"
    )

# 2. Step time ratios; each process pairs its own plain and pruned runs.
print()
steps = collections.defaultdict(list)
params = {}
for r in rows:
    if r["bench"] == "step_time":
        model = r["model"] + (", jit_compile" if r["jit"] else "")
        steps[(r["flavour"], model, r["config"])].append(r)
        params[model] = r["params"]


def ratio(flavour, model, config, field="median_ms"):
    plain = steps[(flavour, model, "plain")]
    pruned = steps[(flavour, model, config)]
    if not plain or not pruned:
        return None, None
    ratios = [p[field] / q[field] for p, q in zip(pruned, plain)]
    return median(p["median_ms"] for p in pruned), median(ratios)


print(
    "| model | params | Keras 3 step (ms) | kprune f=100 | kprune f=1 |"
    " tf-keras step (ms) | tfmot f=100 | tfmot f=1 |"
)
print("|---|---|---|---|---|---|---|---|")
for model in sorted(params, key=lambda m: ("jit" in m, params[m])):
    cells = [model, f"{params[model]:,}"]
    for flavour in ("keras3", "tf_keras"):
        if not steps[(flavour, model, "plain")]:
            cells += ["-"] * 3
            continue
        base = median(r["median_ms"] for r in steps[(flavour, model, "plain")])
        cells.append(fmt(base))
        for config in ("pruned_f100", "pruned_f1"):
            ms, x = ratio(flavour, model, config)
            _, cpu = ratio(flavour, model, config, "cpu_median_ms")
            cells.append(f"{fmt(ms)} ms, {fmt(x, 2)}x (CPU {fmt(cpu, 2)}x)")
    print("| " + " | ".join(cells) + " |")

# 3. Memory.
print()
memory = collections.defaultdict(list)
for r in rows:
    if r["bench"] == "memory":
        memory[(r["flavour"], r["library"])].append(r)
print(
    "| library | params | mask bytes / pruned weight | peak RSS (MiB) |"
    " peak RSS over plain, bytes / pruned weight | RSS after training over"
    " plain, bytes / pruned weight |"
)
print("|---|---|---|---|---|---|")
for flavour, library in (("keras3", "keras"), ("keras3", "kprune")) + (
    ("tf_keras", "keras"),
    ("tf_keras", "tfmot"),
):
    runs = memory[(flavour, library)]
    if not runs:
        continue
    plain = memory[(flavour, "keras")]
    peak = median(r["peak_rss_mib"] for r in runs)
    after = median(r["rss_after_mib"] for r in runs)
    name = {"keras": f"plain {flavour}", "kprune": "kprune"}.get(
        library, "tfmot 0.8.1"
    )
    extra_peak = extra_after = "-"
    if library != "keras" and plain:
        pruned = runs[0]["pruned_weights"]
        base_peak = median(r["peak_rss_mib"] for r in plain)
        base_after = median(r["rss_after_mib"] for r in plain)
        extra_peak = fmt((peak - base_peak) * 2**20 / pruned, 2)
        extra_after = fmt((after - base_after) * 2**20 / pruned, 2)
    print(
        f"| {name} | {runs[0]['params']:,} | "
        f"{runs[0]['mask_bytes_per_pruned_weight']} | {fmt(peak)} | "
        f"{extra_peak} | {extra_after} |"
    )
