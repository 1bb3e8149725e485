"""An evaluation as a W&B run: metrics, plots, a molecule table and a report.

An evaluation of a checkpoint joins its training run: the same project, entity and group (unless --wandb-project
or WANDB_PROJECT / WANDB_ENTITY / WANDB_RUN_GROUP say otherwise), job_type "eval", and config keys
``training_run`` and ``training_step`` naming the run and the step it evaluates.
"""

from __future__ import annotations

import os


def eval_init_args(project: str | None, config: dict, training: dict | None, training_step: int | None) -> dict:
    """The ``wandb.init`` arguments of an evaluation; ``training`` is the checkpoint's ``client_state["wandb"]``."""
    from molscale.trainer.train.wandb_run import resolve_mode, resolve_target
    target = resolve_target(project, None, None, "molscale-evals", fallback=training)
    config = dict(config)
    if training:
        parts = (training.get("entity"), training.get("project"), training["id"])
        config["training_run"] = "/".join(parts) if all(parts) else training["id"]
        config["training_step"] = training_step
    return {**target, "job_type": "eval", "mode": resolve_mode(None), "config": config}


def log_eval(out_dir: str, metrics: dict, molecules_sdf: str, project: str | None, config: dict,
             training: dict | None = None, training_step: int | None = None) -> None:
    import wandb
    run = wandb.init(dir=out_dir, **eval_init_args(project, config, training, training_step))
    run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".png"):
            run.log({f"plots/{name[:-4]}": wandb.Image(os.path.join(out_dir, name))})
    table = wandb.Table(columns=["index", "smiles", "valid", "mol_stable", "molecule"])
    from rdkit import Chem
    for i, mol in enumerate(Chem.SDMolSupplier(molecules_sdf, sanitize=False, removeHs=False)):
        if i >= 32 or mol is None:
            break
        props = mol.GetPropsAsDict()
        try:
            view = wandb.Molecule.from_rdkit(mol, convert_to_3d_and_optimize=False)
        except Exception:  # a molecule RDKit cannot write as PDB still gets its row
            view = None
        table.add_data(i, props.get("smiles", ""), bool(props.get("valid", False)),
                       bool(props.get("mol_stable", False)), view)
    run.log({"molecules": table})
    from molscale.evals.outputs.wandb_report import publish_report
    url = publish_report(run, metrics)
    if url:
        print(f"W&B report: {url}")
    run.finish()
