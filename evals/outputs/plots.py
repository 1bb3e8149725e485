"""PNG plots of generated versus reference histograms (the layout of distribution.py), and a metrics table.

Every function takes histogram dicts (reference optional) and an output path, and returns the path.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from molscale.datasets.chemistry.elements import Z_TO_SYMBOL  # noqa: E402
from molscale.evals.protocol.distribution import (  # noqa: E402
    ANGLE_BIN_DEGREES,
    BOND_KIND_NAMES,
    LENGTH_BIN_ANGSTROM,
    angle_bin_centres_degrees,
    length_bin_centres_angstrom,
)

GEN_STYLE = {"color": "tab:blue", "label": "generated"}
REF_STYLE = {"color": "tab:orange", "label": "reference"}
PLOT_FILES = {"atom_counts": "atom_counts.png", "bond_lengths": "bond_lengths.png",
              "bond_angles": "bond_angles.png", "metrics_table": "metrics_table.png",
              "steps_curve": "steps_curve.png"}
CURVE_METRICS = ("atom_stability", "mol_stability", "validity", "valid_unique")


def _density(hist: np.ndarray, group: int = 1) -> np.ndarray:
    """Histogram summed over ``group`` neighbouring bins, normalised to sum 1 (zeros stay zeros)."""
    hist = np.asarray(hist, dtype=np.float64)
    if group > 1:
        hist = hist[: len(hist) // group * group].reshape(-1, group).sum(axis=1)
    total = hist.sum()
    return hist / total if total else hist


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_atom_counts(gen: dict, path: str, ref: dict | None = None) -> str:
    """Share of molecules per atom count."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sides = [(gen, GEN_STYLE, -0.2)] + ([(ref, REF_STYLE, 0.2)] if ref is not None else [])
    for hist, style, shift in sides:
        counts = hist["atom_counts"]
        if counts:
            n = np.array(sorted(counts))
            share = np.array([counts[k] for k in n], dtype=np.float64) / sum(counts.values())
            ax.bar(n + shift, share, width=0.4, **style)
    ax.set_xlabel("atoms per molecule")
    ax.set_ylabel("share of molecules")
    ax.legend()
    return _save(fig, path)


def _panels(keys: list, gen_hists: dict, ref_hists: dict | None, centres: np.ndarray, group: int,
            title_of, xlabel: str, path: str, xlim=None) -> str:
    keys = keys or [None]
    cols = min(len(keys), 3)
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    shown = centres[: len(centres) // group * group].reshape(-1, group).mean(axis=1)
    for ax, key in zip(axes.flat, keys):
        if key is None:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        if key in gen_hists:
            ax.plot(shown, _density(gen_hists[key], group), **GEN_STYLE)
        if ref_hists is not None and key in ref_hists:
            ax.plot(shown, _density(ref_hists[key], group), **REF_STYLE)
        ax.set_title(title_of(key))
        ax.set_xlabel(xlabel)
        if xlim is not None:
            ax.set_xlim(*xlim)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, path)


def _occupied_range(hists: list[dict], centres: np.ndarray, pad: float) -> tuple[float, float] | None:
    total = sum((np.asarray(h, dtype=np.float64) for d in hists for h in d.values()), np.zeros(len(centres)))
    nonzero = np.flatnonzero(total)
    if len(nonzero) == 0:
        return None
    return max(0.0, centres[nonzero[0]] - pad), centres[nonzero[-1]] + pad


def plot_bond_lengths(gen: dict, path: str, ref: dict | None = None) -> str:
    """Bond-length distribution per bond kind (Angstrom, 0.01 A bins)."""
    hists = [gen["bond_length"]] + ([ref["bond_length"]] if ref is not None else [])
    keys = sorted(set().union(*hists))
    centres = length_bin_centres_angstrom()
    return _panels(keys, gen["bond_length"], ref["bond_length"] if ref is not None else None, centres, 1,
                   lambda k: f"{BOND_KIND_NAMES.get(k, k)} bonds", f"length (A, {LENGTH_BIN_ANGSTROM} A bins)",
                   path, _occupied_range(hists, centres, 0.05))


def plot_bond_angles(gen: dict, path: str, ref: dict | None = None) -> str:
    """Bond-angle distribution per central atom type (degrees, drawn in 1-degree bins)."""
    hists = [gen["bond_angle"]] + ([ref["bond_angle"]] if ref is not None else [])
    keys = sorted(set().union(*hists))
    group = max(1, round(1.0 / ANGLE_BIN_DEGREES))
    return _panels(keys, gen["bond_angle"], ref["bond_angle"] if ref is not None else None,
                   angle_bin_centres_degrees(), group,
                   lambda k: f"angles around {Z_TO_SYMBOL.get(k, k)}", "angle (degrees)", path, (0, 180))


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}"
    return str(value)


def plot_metrics_table(metrics: dict, path: str) -> str:
    """The metric dict as a two-column table image."""
    rows = [[name, format_value(value)] for name, value in metrics.items()
            if isinstance(value, (int, float, str)) or value is None]
    fig, ax = plt.subplots(figsize=(5, 0.3 * len(rows) + 0.6))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=["metric", "value"], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    return _save(fig, path)


def plot_steps_curve(rows: list[dict], path: str) -> str:
    """Quality against denoising steps (``metrics.json`` "steps_curve" rows), steps on a log axis."""
    rows = sorted(rows, key=lambda r: r["steps"])
    steps = [r["steps"] for r in rows]
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in CURVE_METRICS:
        values = [r.get(name) for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, [np.nan if v is None else v for v in values], marker="o", label=name)
    ax.set(xscale="log", xlabel="denoising steps K (network evaluations - 1)", ylabel="fraction", ylim=(0, 1.02),
           title=f"quality against steps ({rows[0].get('sampler', '')})")
    ax.legend(fontsize=8)
    ax_time.plot(steps, [r["seconds_per_1000"] for r in rows], marker="o", color="tab:gray")
    ax_time.set(xscale="log", yscale="log", xlabel="denoising steps K", ylabel="s per 1,000 molecules",
                title="sampling wall time")
    return _save(fig, path)


def make_plots(histograms: dict, out_dir: str, reference: dict | None = None,
               metrics: dict | None = None) -> dict[str, str]:
    """All plots into ``out_dir``; returns {plot name: file name relative to out_dir}."""
    made = {
        "atom_counts": plot_atom_counts(histograms, os.path.join(out_dir, PLOT_FILES["atom_counts"]), reference),
        "bond_lengths": plot_bond_lengths(histograms, os.path.join(out_dir, PLOT_FILES["bond_lengths"]), reference),
        "bond_angles": plot_bond_angles(histograms, os.path.join(out_dir, PLOT_FILES["bond_angles"]), reference),
    }
    if metrics is not None:
        made["metrics_table"] = plot_metrics_table(metrics, os.path.join(out_dir, PLOT_FILES["metrics_table"]))
    return {name: os.path.basename(p) for name, p in made.items()}
