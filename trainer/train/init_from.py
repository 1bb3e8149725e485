"""``init_from``: start a run from the matching tensors of another run's checkpoint (e.g. a pretrained trunk).

Tensors are matched by name and shape. A MoleculeJAE pretraining checkpoint holds the trunk of a UniGEM
(``embed``, ``shared``, ``nucleation``) but no ``growth`` branch: each ``growth.*`` tensor is initialised
from the pretrained ``nucleation.*`` tensor of the same shape, so both branches start from the pretrained
stack. The report says which tensors were loaded, which were copied that way, which are new (left as
initialised) and which checkpoint tensors were skipped, and why. The EMA weights of the checkpoint are used
when it has them (as for evaluation).
"""

from __future__ import annotations

import json
import os

import torch

from molscale.trainer.artifacts import model_weights, read_model_states
from molscale.trainer.train.checkpoints import CheckpointError

BRANCH_COPIES = (("growth.", "nucleation."),)  # (destination prefix, source prefix)


def checkpoint_weights(path: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(checkpoint folder, name -> tensor) of a run directory or checkpoint folder (EMA weights if any)."""
    folder, states, state = read_model_states(path)
    if "module" not in state:
        raise CheckpointError(f"{states} has no 'module': not a checkpoint written by trainer/main.py")
    return folder, model_weights(state)[0]


def initialise(model: torch.nn.Module, path: str) -> dict:
    """Load what matches from the checkpoint at ``path`` into ``model``; returns the report."""
    folder, weights = checkpoint_weights(path)
    own = model.state_dict()
    update, loaded, copied, new = {}, [], [], []
    skipped = {}
    for name, tensor in own.items():
        source = name if name in weights else None
        if source is None:
            for dst, src in BRANCH_COPIES:
                if name.startswith(dst) and src + name[len(dst):] in weights:
                    source = src + name[len(dst):]
        if source is None:
            new.append(name)
            continue
        if weights[source].shape != tensor.shape:
            skipped[source] = f"shape {tuple(weights[source].shape)} here {tuple(tensor.shape)}"
            new.append(name)
            continue
        update[name] = weights[source].to(tensor.dtype)
        (loaded if source == name else copied).append(name if source == name else f"{name} <- {source}")
    used = set(loaded) | {entry.split(" <- ")[1] for entry in copied}
    for name in weights:
        if name not in used and name not in skipped:
            skipped[name] = "not in this model"
    model.load_state_dict(update, strict=False)
    return {"checkpoint": folder, "loaded": loaded, "copied": copied, "new": new, "skipped": skipped}


def _groups(names) -> str:
    """'shared.* (24), embed.* (2)': tensor names grouped by their first component."""
    counts: dict[str, int] = {}
    for name in names:
        head = name.split(" <- ")[0].split(".")[0]
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{head}.* ({n})" for head, n in counts.items()) or "none"


def summary(report: dict) -> str:
    return (f"init_from {report['checkpoint']}: loaded {len(report['loaded'])} tensors "
            f"[{_groups(report['loaded'])}]; copied {len(report['copied'])} [{_groups(report['copied'])}, "
            f"from nucleation.*]; new {len(report['new'])} [{_groups(report['new'])}]; skipped "
            f"{len(report['skipped'])} [{_groups(report['skipped'])}]")


def write_report(report: dict, run_dir: str) -> str:
    path = os.path.join(run_dir, "init_from.json")
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path
