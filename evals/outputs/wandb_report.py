"""A W&B Report of an evaluation run, through the Reports API (``wandb-workspaces``).

Built for every run (so its layout is tested offline); saved to the W&B server only when the run
is online, since a report lives on the server.
"""

from __future__ import annotations

HEADLINE = ("atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty")
DISTRIBUTION = ("atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1")


def build_report(entity: str, project: str, run_name: str, metrics: dict, group: str | None = None):
    """The report; with ``group`` (the training run's, which the evaluation joins) also the training curves."""
    import wandb_workspaces.reports.v2 as wr

    def fmt(value):
        return "undefined" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    table = "\n".join(["| metric | value |", "|---|---|"] +
                      [f"| {k} | {fmt(metrics.get(k))} |" for k in (*HEADLINE, *DISTRIBUTION) if k in metrics] +
                      [f"| {k} | {fmt(v)} |" for k, v in metrics.items() if k.startswith("mae_")])
    runs = wr.Runset(entity=entity, project=project, name="this evaluation", query=run_name)
    report = wr.Report(entity=entity, project=project, title=f"molscale evaluation: {run_name}",
                       description=f"{metrics.get('n_samples', '?')} molecules, EDM protocol and distribution metrics")
    report.blocks = [
        wr.H1("Generated molecules"),
        wr.MarkdownBlock(text=table),
        wr.PanelGrid(runsets=[runs], panels=[
            wr.BarPlot(title="EDM protocol", metrics=list(HEADLINE)),
            wr.BarPlot(title="distribution distances (lower is better)", metrics=list(DISTRIBUTION)),
            wr.MediaBrowser(media_keys=["plots/atom_counts", "plots/bond_lengths", "plots/bond_angles"]),
        ]),
    ]
    if group:
        training = wr.Runset(entity=entity, project=project, name="training run",
                             filters=f"Metric('Group') == {group!r}")
        report.blocks += [wr.H2("Training run"), wr.PanelGrid(runsets=[training], panels=[
            wr.LinePlot(title="loss", x="trainer/step", y=["loss"]),
            wr.LinePlot(title="validation loss", x="trainer/step", y=["valid/loss"]),
        ])]
    return report


def publish_report(run, metrics: dict) -> str | None:
    """Save the report when ``run`` is online; returns its URL, or None for an offline run."""
    if run.offline:
        return None
    report = build_report(run.entity, run.project, run.name, metrics, group=run.group or None)
    report.save()
    return report.url
