"""Quality against sampling steps for BENCHMARKS.md, from evaluation folders of one checkpoint: a table and a PNG.

    python docs/figures/steps.py OUT.png EVAL_DIR [EVAL_DIR ...]

Each EVAL_DIR is an `evals/generate.py --out` folder (one sampler and step count, read from its metrics.json);
folders of the same sampler form one line. The table (markdown, on stdout) has one row per folder.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("atom_stability", "mol_stability", "validity", "valid_unique")


def main(out_png, folders):
    rows = []
    for folder in folders:
        with open(os.path.join(folder, "metrics.json")) as f:
            m = json.load(f)
        s = m["source"]
        rows.append({"sampler": s["sampler"], "steps": s["steps"], **{k: m[k] for k in (*METRICS, "uniqueness")},
                     "s_per_1000": 1000 * s["sampling_seconds"] / s["n_samples"], "n": s["n_samples"]})
    rows.sort(key=lambda r: (r["sampler"], -r["steps"]))
    print("| sampler | steps K | atom stability | molecule stability | validity | uniqueness | valid x unique "
          "| s per 1,000 molecules |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['atom_stability']:.3f} | {r['mol_stability']:.3f} | "
              f"{r['validity']:.3f} | {r['uniqueness']:.3f} | {r['valid_unique']:.3f} | {r['s_per_1000']:,.0f} |")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for sampler in sorted({r["sampler"] for r in rows}):
        line = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["steps"])
        steps = [r["steps"] for r in line]
        for ax, key in zip(axes, ("atom_stability", "validity")):
            ax.plot(steps, [r[key] for r in line], marker="o", label=sampler)
        axes[2].plot(steps, [r["s_per_1000"] for r in line], marker="o", label=sampler)
    for ax, title in zip(axes, ("atom stability", "validity", "sampling s per 1,000 molecules")):
        ax.set(xscale="log", xlabel="denoising steps K", title=title)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"\n{out_png}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
