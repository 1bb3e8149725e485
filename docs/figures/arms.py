"""Two arms of seed-paired training runs, compared at every validation and on a final evaluation, with the
project's statistics helper (evals/protocol/statistics.py: mean, standard deviation, Student-t interval of the
paired differences). Prints markdown tables for BENCHMARKS.md.

    python docs/figures/arms.py --metric valid/eps --metric valid/mae_lumo --onset valid/mae_lumo=749.3 \
        --final lumo/metrics.json:mae_lumo \
        "from scratch=runs/a-s0,runs/a-s1,runs/a-s2" "pretrained=runs/b0-s0+runs/b1-s0,runs/b0-s1+runs/b1-s1,..."

Each arm lists one entry per seed, in the same seed order in both arms (a seed orders the data alike in both,
so the arms are compared seed by seed). An entry may join runs with "+" (say, two pretraining seeds fine-tuned
with the same seed): their values are averaged into that seed's one value, and listed on their own in the
onset table. --onset METRIC=LEVEL reports, per run, the first validation step where METRIC falls below LEVEL
(for a property MAE: the step where the model leaves the atom-count plateau). --final FILE:KEY (repeatable)
reads KEY from each run's FILE (a metrics.json written after training); runs without it are left out of that
table. An entry may also be an evaluation folder (evals/generate.py --out): "--final metrics.json:validity"
compares two sampling settings of the same checkpoints, paired by (checkpoint, seed).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from molscale.evals.protocol.statistics import across_seeds, paired_difference


def validations(run_dir: str) -> dict[int, dict]:
    """step -> the validation record of that step (metrics.jsonl rows holding valid/loss); none for a folder
    without metrics.jsonl (an evaluation's output, compared by --final only)."""
    rows = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "valid/loss" in r:
                rows[r["step"]] = r
    return rows


def read_json(path: str) -> dict:
    """The JSON object at PATH, or {} where the file is missing."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def parse_arm(text: str) -> tuple[str, list[list[str]]]:
    label, entries = text.split("=", 1)
    return label, [entry.split("+") for entry in entries.split(",")]


def decimals(chosen: int | None, values) -> int:
    return chosen if chosen is not None else (1 if np.abs(values).mean() >= 10 else 4)


def summary(values, digits: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f} (n = 1)" if values else "-"
    s = across_seeds(values)
    return f"{s.mean:.{digits}f} +- {s.std:.{digits}f}"


def difference(a, b, digits: int) -> str:
    if len(a) < 2 or len(a) != len(b):
        return "-"
    d = paired_difference(a, b)
    verdict = "" if d.separable_from_zero else ", not separable"
    return f"{d.mean:.{digits}f} ({d.confidence:.0%} CI {d.low:.{digits}f} to {d.high:.{digits}f}{verdict})"


def seed_values(entries, value_of) -> list[float] | None:
    """One value per seed (the mean over an entry's joined runs), or None where a run lacks it."""
    out = []
    for runs in entries:
        got = [value_of(run) for run in runs]
        if any(v is None for v in got):
            return None
        out.append(float(np.mean(got)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arms", nargs=2, metavar="LABEL=RUN[+RUN],...")
    p.add_argument("--metric", action="append", default=[], help="validation value to tabulate (repeatable)")
    p.add_argument("--onset", default=None, metavar="METRIC=LEVEL")
    p.add_argument("--final", action="append", default=[], metavar="FILE:KEY",
                   help="a value of each run's final FILE (JSON) to compare (repeatable)")
    p.add_argument("--digits", type=int, default=None,
                   help="decimals (default: 1 for values of 10 or more, as meV MAEs; 4 below, as losses)")
    args = p.parse_args(argv)
    (la, a), (lb, b) = (parse_arm(t) for t in args.arms)
    if len(a) != len(b):
        raise SystemExit(f"the arms pair seed by seed: {la} has {len(a)} seeds, {lb} {len(b)}")
    all_runs = {run for entries in (a, b) for runs in entries for run in runs}
    vals = {run: validations(run) for run in all_runs}
    steps = sorted(set.intersection(*(set(v) for v in vals.values())))
    files = {}  # each file read once
    for metric in args.metric:
        print(f"\n{metric}: mean +- standard deviation over seeds; {la} - {lb} paired by seed\n")
        print(f"| step | {la} | {lb} | {la} - {lb} |\n|---|---|---|---|")
        for step in steps:
            va = seed_values(a, lambda r: vals[r][step].get(metric))
            vb = seed_values(b, lambda r: vals[r][step].get(metric))
            if va is None or vb is None:
                continue
            d = decimals(args.digits, va)
            print(f"| {step} | {summary(va, d)} | {summary(vb, d)} | {difference(va, vb, d)} |")
    if args.onset:
        metric, level = args.onset.rsplit("=", 1)
        print(f"\nonset: the first validation step where {metric} < {level} (of the steps every run reached, "
              f"last {steps[-1] if steps else '-'}); '-' where it never did\n")
        for label, entries in ((la, a), (lb, b)):
            cells = []
            for runs in entries:
                for run in runs:
                    below = [s for s in steps if vals[run][s].get(metric, float("inf")) < float(level)]
                    cells.append(f"{os.path.basename(run)} {below[0] if below else '-'}")
            print(f"- {label}: " + ", ".join(cells))
    for final in args.final:
        path, key = final.rsplit(":", 1)
        for run in all_runs:
            if (run, path) not in files:
                files[run, path] = read_json(os.path.join(run, path))
        finals = {run: files[run, path].get(key) for run in all_runs}
        fa, fb = seed_values(a, finals.get), seed_values(b, finals.get)
        print(f"\n{key} from each run's {path}\n")
        for label, entries, values in ((la, a, fa), (lb, b, fb)):
            each = [finals[r] for runs in entries for r in runs]
            d = decimals(args.digits, [v for v in each if v is not None] or [0.0])
            cells = ", ".join(f"{v:.{d}f}" if v is not None else "-" for v in each)
            print(f"- {label}: {summary(values, d) if values else '-'} [{cells}]")
        if fa and fb:
            print(f"- {la} - {lb}: {difference(fa, fb, decimals(args.digits, fa))}")


if __name__ == "__main__":
    main()
