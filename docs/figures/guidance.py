"""The guidance comparison of BENCHMARKS.md: arms compared cell by cell, from evaluation folders.

    python docs/figures/guidance.py EVAL_DIR [EVAL_DIR ...]

Each EVAL_DIR is an `evals/generate.py --guide ... --scorer ...` folder. A folder's arm is read from its
metrics.json: "unguided" (--guide-scale 0), else the guidance reading ("noisy" or "clean"). A cell is one
(checkpoint, sampling seed, target); arms are compared only on the cells they share, by the paired differences
over cells with a Student t interval (evals/protocol/statistics.py). Markdown on stdout.
"""

import json
import os
import sys
from collections import defaultdict

from molscale.evals.protocol.statistics import across_seeds, paired_difference

# metrics.json keys per row; lower is better for the MAEs
COLUMNS = (("scorer_mae", "scorer's MAE to the target, all molecules"),
           ("scorer_mae_valid", "scorer's MAE, valid molecules"),
           ("self_mae", "guiding head's own MAE"),
           ("validity", "validity"),
           ("atom_stability", "atom stability"),
           ("cap_fraction", "fraction of guided steps capped"))


def read(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        m = json.load(f)
    g = m["guidance"]
    arm = "unguided" if g["scale"] == 0 else g["on"]
    cell = (m["source"]["checkpoint"], m["source"]["seed"], g["target"])
    values = {"scorer_mae": g["scorer_mae"], "scorer_mae_valid": g["scorer_mae_valid"], "self_mae": g["self_mae"],
              "validity": m["validity"], "atom_stability": m["atom_stability"],
              "cap_fraction": g["cap_fraction"] if g["scale"] else None}
    return arm, cell, values


def main(folders):
    arms = defaultdict(dict)  # arm -> cell -> values
    for folder in folders:
        arm, cell, values = read(folder)
        arms[arm][cell] = values
    names = [a for a in ("unguided", "noisy", "clean") if a in arms]
    print("| arm | cells | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for arm in names:
        cells = arms[arm]
        texts = []
        for key, _ in COLUMNS:
            got = [v[key] for v in cells.values() if v[key] is not None]
            texts.append(across_seeds(got).text(3 if key not in ("scorer_mae", "scorer_mae_valid", "self_mae")
                                                else 1) if len(got) > 1 else "-")
        print(f"| {arm} | {len(cells)} | " + " | ".join(texts) + " |")
    print()
    print("Paired differences over shared cells (first arm minus second), mean +- standard deviation, "
          "95% t interval:")
    print()
    print("| arms | " + " | ".join(label for key, label in COLUMNS if key != "cap_fraction") + " |")
    print("|---" * len(COLUMNS) + "|")
    for a, b in (("clean", "noisy"), ("noisy", "unguided"), ("clean", "unguided")):
        if a not in arms or b not in arms:
            continue
        shared = sorted(set(arms[a]) & set(arms[b]))
        texts = []
        for key, _ in COLUMNS:
            if key == "cap_fraction":
                continue
            pairs = [(arms[a][c][key], arms[b][c][key]) for c in shared
                     if arms[a][c][key] is not None and arms[b][c][key] is not None]
            if len(pairs) < 2:
                texts.append("-")
                continue
            d = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
            digits = 3 if key in ("validity", "atom_stability") else 1
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
