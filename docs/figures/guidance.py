"""The guidance comparison of BENCHMARKS.md: arms compared cell by cell, from evaluation folders.

    python docs/figures/guidance.py EVAL_DIR [EVAL_DIR ...]

Each EVAL_DIR is an `evals/generate.py --guide ... --scorer ...` folder. A folder's arm is read from its
metrics.json: "unguided" (--guide-scale 0), else the guidance reading ("noisy" or "clean"), followed by the
scale (", scale 30") where the folders hold more than one guidance scale. A cell is one
(checkpoint, sampling seed, target); arms are compared only on the cells they share, by the paired differences
over cells with a Student t interval (evals/protocol/statistics.py). Markdown on stdout.
"""

import json
import os
import sys
from collections import defaultdict

from molscale.evals.protocol.statistics import across_seeds, paired_difference

# (metrics.json key, column label, decimals); lower is better for the MAEs
COLUMNS = (("scorer_mae", "scorer's MAE to the target, all molecules", 1),
           ("scorer_mae_valid", "scorer's MAE, valid molecules", 1),
           ("self_mae", "guiding head's own MAE", 1),
           ("validity", "validity", 3),
           ("atom_stability", "atom stability", 3),
           ("cap_fraction", "fraction of guided steps capped", 3))
PAIRED = [c for c in COLUMNS if c[0] != "cap_fraction"]  # the unguided arm has no cap


def read(folder):
    """(reading, scale, cell, values) of one evaluation folder; reading is "unguided" at scale 0."""
    with open(os.path.join(folder, "metrics.json")) as f:
        m = json.load(f)
    g = m["guidance"]
    reading = "unguided" if g["scale"] == 0 else g["on"]
    cell = (m["source"]["checkpoint"], m["source"]["seed"], g["target"])
    values = {"scorer_mae": g["scorer_mae"], "scorer_mae_valid": g["scorer_mae_valid"], "self_mae": g["self_mae"],
              "validity": m["validity"], "atom_stability": m["atom_stability"],
              "cap_fraction": g["cap_fraction"] if g["scale"] else None}
    return reading, g["scale"], cell, values


def arm_order(arm):
    reading, _, scale = arm.partition(", scale ")
    return ("unguided", "noisy", "clean").index(reading), float(scale or 0)


def main(folders):
    read_all = [read(folder) for folder in folders]
    several_scales = len({scale for reading, scale, _, _ in read_all if reading != "unguided"}) > 1
    arms = defaultdict(dict)  # arm -> cell -> values
    for reading, scale, cell, values in read_all:
        arm = f"{reading}, scale {scale:g}" if several_scales and reading != "unguided" else reading
        arms[arm][cell] = values
    names = sorted(arms, key=arm_order)
    print("| arm | cells | " + " | ".join(label for _, label, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for arm in names:
        cells = arms[arm]
        texts = []
        for key, _, digits in COLUMNS:
            got = [v[key] for v in cells.values() if v[key] is not None]
            texts.append(across_seeds(got).text(digits) if len(got) > 1 else "-")
        print(f"| {arm} | {len(cells)} | " + " | ".join(texts) + " |")
    print()
    print("Paired differences over shared cells (first arm minus second), mean +- standard deviation, "
          "95% t interval:")
    print()
    print("| arms | " + " | ".join(label for _, label, _ in PAIRED) + " |")
    print("|---" * (len(PAIRED) + 1) + "|")
    guided = [n for n in names if n != "unguided"]
    # each guided arm against every guided arm before it, then each against the unguided control
    pairs = [(a, b) for i, a in enumerate(guided) for b in guided[:i]] + [(a, "unguided") for a in guided]
    for a, b in pairs:
        if a not in arms or b not in arms:
            continue
        shared = sorted(set(arms[a]) & set(arms[b]))
        texts = []
        for key, _, digits in PAIRED:
            pairs = [(arms[a][c][key], arms[b][c][key]) for c in shared
                     if arms[a][c][key] is not None and arms[b][c][key] is not None]
            if len(pairs) < 2:
                texts.append("-")
                continue
            d = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
            texts.append(d.text(digits) + ("" if d.separable_from_zero else ", not separable"))
        print(f"| {a} - {b} | " + " | ".join(texts) + " |")
    print()
    print("Per target (mean over the cells of that target), scorer's MAE, all / valid molecules:")
    print()
    targets = sorted({cell[2] for arm in names for cell in arms[arm]})
    print("| target | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for t in targets:
        row = []
        for arm in names:
            vals = [v for c, v in arms[arm].items() if c[2] == t]
            mae = sum(v["scorer_mae"] for v in vals) / len(vals)
            valid = [v["scorer_mae_valid"] for v in vals if v["scorer_mae_valid"] is not None]
            row.append(f"{mae:.1f} / {sum(valid) / len(valid):.1f}" if valid else f"{mae:.1f} / -")
        print(f"| {t:g} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
