"""``report.html``: one self-contained page (inline CSS) with the metrics, the plots (PNG files beside it,
referenced by relative path) and example SMILES."""

from __future__ import annotations

import html
import os

from molscale.evals.outputs.plots import CURVE_METRICS, PLOT_FILES, format_value, make_plots, plot_steps_curve

METRIC_HELP = {
    "n_samples": "molecules evaluated",
    "atom_stability": "share of atoms whose bond-order sum is an allowed valence",
    "mol_stability": "share of molecules with every atom stable",
    "validity": "share of molecules RDKit sanitises",
    "uniqueness": "distinct SMILES / valid molecules",
    "valid_unique": "validity x uniqueness",
    "novelty": "share of distinct valid SMILES absent from the train set",
    "atom_type_tv": "sum |p_gen - p_ref| over atom types",
    "bond_type_tv": "sum |p_gen - p_ref| over bond kinds",
    "valency_w1": "W1 of valencies per atom type, weighted by reference frequency",
    "bond_length_w1": "W1 of bond lengths (A) per bond kind, weighted by reference frequency",
    "bond_angle_w1": "W1 of bond angles (degrees) per central atom type, weighted by reference frequency",
}
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f0f0f0; }
td.num { font-family: monospace; text-align: right; }
img { max-width: 100%; margin: 0.5em 0 1.5em 0; }
.note { color: #666; font-size: 90%; }
"""


def _metrics_rows(metrics: dict) -> str:
    rows = []
    for name, value in metrics.items():
        if isinstance(value, (dict, list, tuple)):
            continue
        rows.append(f"<tr><td>{html.escape(name)}</td><td class='num'>{html.escape(format_value(value))}</td>"
                    f"<td class='note'>{html.escape(METRIC_HELP.get(name, ''))}</td></tr>")
    return "\n".join(rows)


def write_report(metrics: dict, out_dir: str, histograms: dict | None = None, reference: dict | None = None,
                 example_smiles: list[str] | None = None, title: str = "Molecule generation report",
                 notes: dict | None = None, max_examples: int = 20, steps_curve: list[dict] | None = None) -> str:
    """Write plots and ``report.html`` into ``out_dir`` (local); returns the path of the HTML file.

    metrics: the flat dict of ``metrics.compute_metrics``; histograms / reference: generated and reference
    histograms (distribution.py layout), plotted when given; example_smiles: shown up to ``max_examples``;
    notes: extra key/value lines (checkpoint, dataset, command) shown under the title; steps_curve: the rows of
    a sweep over denoising steps (``--steps K1,K2,...``), shown as a table and a plot.
    """
    os.makedirs(out_dir, exist_ok=True)
    plots = make_plots(histograms, out_dir, reference, metrics) if histograms is not None else {}
    if steps_curve:
        plots["steps_curve"] = os.path.basename(plot_steps_curve(steps_curve, os.path.join(out_dir,
                                                                                           PLOT_FILES["steps_curve"])))
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append("<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                                         for k, v in notes.items()) + "</table>")
    parts += ["<h2>Metrics</h2>", "<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>",
              _metrics_rows(metrics), "</table>"]
    captions = {"atom_counts": "Atoms per molecule", "bond_lengths": "Bond lengths per bond kind",
                "bond_angles": "Bond angles per central atom type"}
    if steps_curve:
        columns = ("steps", "network_evaluations", *CURVE_METRICS, "uniqueness", "seconds_per_1000")
        parts += ["<h2>Quality against sampling steps</h2><p class='note'>the same seed and atom counts at every "
                  "K; the metrics above are those of the first K asked for</p><table><tr>",
                  "".join(f"<th>{html.escape(c)}</th>" for c in columns), "</tr>"]
        parts += ["<tr>" + "".join(f"<td class='num'>{html.escape(format_value(row.get(c)))}</td>" for c in columns)
                  + "</tr>" for row in steps_curve]
        parts.append(f"</table><img src='{html.escape(plots['steps_curve'])}' alt='quality against steps'>")
    for name, caption in captions.items():
        if name in plots:
            parts.append(f"<h2>{caption}</h2><img src='{html.escape(plots[name])}' alt='{html.escape(caption)}'>")
    if example_smiles:
        parts.append(f"<h2>Example SMILES</h2><p class='note'>first {min(max_examples, len(example_smiles))} "
                     f"of {len(example_smiles)} valid molecules</p><table><tr><th>#</th><th>SMILES</th></tr>")
        parts += [f"<tr><td>{i}</td><td><code>{html.escape(s)}</code></td></tr>"
                  for i, s in enumerate(example_smiles[:max_examples])]
        parts.append("</table>")
    parts.append("</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
