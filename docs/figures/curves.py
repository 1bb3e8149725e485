"""Validation curves of BENCHMARKS.md experiments from run directories' metrics.jsonl: a table and a PNG.

    python docs/figures/curves.py [--metric valid/eps] OUT.png LABEL=RUN_DIR[,RUN_DIR...] [LABEL=...]

Runs given together under one label are seeds of one arm: the table shows their mean and half their range
(the spread) at every validation; the x axis is training molecules seen (step x molecules per step, read from
each run's config.json). --metric picks the validation value plotted and tabulated (default valid/loss; the
run logs every loss term, e.g. valid/eps).
"""

import json
import os
import sys

import numpy as np
from arms import validations as by_step  # this folder: scripts run as python docs/figures/NAME.py


def validations(run_dir: str) -> dict[int, dict]:
    """molecules seen -> the validation record there (arms.validations keys the same records by step)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    per_step = cfg["data"]["batch_size"] * cfg["deepspeed"]["gradient_accumulation_steps"]
    return {step * per_step: r for step, r in by_step(run_dir).items()}


def main(out_png: str, arms: list[str], metric: str = "valid/loss") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        label, dirs = arm.split("=", 1)
        runs = [validations(d) for d in dirs.split(",")]
        seen = sorted(set.intersection(*(set(r) for r in runs)))
        loss = np.array([[r[m][metric] for m in seen] for r in runs])
        mean, spread = loss.mean(0), (loss.max(0) - loss.min(0)) / 2
        print(f"\n{label} ({len(runs)} seeds): molecules seen | {metric} mean +- spread | valid LUMO MAE (meV)")
        for k, m in enumerate(seen):
            mae = [r[m].get("valid/mae_lumo") for r in runs]
            mae_text = f"{np.mean(mae):.1f} +- {(max(mae) - min(mae)) / 2:.1f}" if None not in mae else "-"
            print(f"  {m:>8,} | {mean[k]:.4f} +- {spread[k]:.4f} | {mae_text}")
        ax.errorbar(seen, mean, yerr=spread, label=label, capsize=3, marker="o", markersize=3)
    ax.set_xlabel("training molecules seen")
    ax.set_ylabel(f"{metric} (EMA weights)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = "valid/loss"
    if args[:1] == ["--metric"]:
        chosen, args = args[1], args[2:]
    main(args[0], args[1:], chosen)
