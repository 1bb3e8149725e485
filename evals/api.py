"""molscale's Python API: load a trained model, sample molecules, predict properties.

    from molscale.evals.api import load_model, predict_properties, sample_molecules

    model = load_model("runs/cpu_demo/model.safetensors")      # an exported file, a run or checkpoint folder
    for molecule in sample_molecules(model, 4, steps=100, seed=0):
        print(molecule.atomic_numbers, molecule.positions.shape)
    for row in predict_properties(model, ["CCO", "c1ccccc1"]):  # SMILES, or Molecule objects with 3D coordinates
        print(row["input"], row["status"], row["values"])

The command lines (evals/generate.py, evals/predict.py) do the same at scale over Ray and write files; these
functions run in the calling process, on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Molecule:
    atomic_numbers: np.ndarray  # int64 [N]
    positions: np.ndarray       # float32 [N, 3], Angstrom


def load_model(path: str, device: str = "cpu", kernel: str | None = None):
    """The EMA model of an exported .safetensors file, a run directory (its newest intact checkpoint) or a
    checkpoint folder, in evaluation mode on ``device``; ``kernel`` overrides model.kernel (eager, compiled,
    fused). States files are read without unpickling code (MOLSCALE_TRUST_PICKLE=1 for trusted old ones)."""
    from molscale.trainer.artifacts import load_for_eval
    return load_for_eval(path, device, kernel=kernel).model


def sample_molecules(model, n: int, *, steps: int | None = None, seed: int = 0, sampler: str = "ancestral",
                     atom_counts=None, histogram: dict[int, int] | None = None,
                     step_graphs: bool = False) -> list[Molecule]:
    """``n`` molecules. Sizes: ``atom_counts`` (n integers), or drawn from ``histogram`` ({atoms: count}; for
    a loaded run, its training set's), seeded by ``seed``; ``steps``: denoising steps (default: the model's T);
    ``step_graphs``: on a GPU, each denoising step as one CUDA graph (generate.py's ``--cuda-graphs step``: the
    same molecules, fewer launches)."""
    import torch

    from molscale.trainer.model.sampling import sample, sample_num_atoms
    if not model.generates_molecules:
        raise ValueError("sample_molecules: this model is a property classifier; it generates no molecules")
    generator = torch.Generator().manual_seed(seed)
    if atom_counts is None:
        if not histogram:
            raise ValueError("sample_molecules: give atom_counts (n integers) or a histogram {atoms: count}")
        atom_counts = sample_num_atoms(histogram, n, generator)
    atom_counts = torch.as_tensor(atom_counts, dtype=torch.long)
    if atom_counts.shape != (n,) or int(atom_counts.min()) < 1:
        raise ValueError(f"sample_molecules: atom_counts must be {n} positive integers")
    device = next(model.parameters()).device
    device_generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = sample(model, atom_counts, steps=steps, generator=device_generator, sampler=sampler,
                     step_graphs=step_graphs)
    z, pos = out["z"].cpu().numpy(), out["pos"].float().cpu().numpy()
    return [Molecule(z[i, :k].astype(np.int64), pos[i, :k]) for i, k in enumerate(atom_counts.tolist())]


def predict_properties(model, molecules, *, conformers: int = 5, seed: int = 0,
                       weighting: str = "lowest") -> list[dict]:
    """One dict per input, in order: ``input``, ``status`` ('ok' or 'rejected'), ``reason``, ``note`` and
    ``values`` {property: (value, spread)} in the dataset's units (a Molecule is its own one conformer; a SMILES
    gets ``conformers`` RDKit ETKDGv3 + MMFF conformers and one value by ``weighting``, as evals/predict.py's
    --conformers-weighting)."""
    from molscale.evals.property_prediction import predict_chunk, predict_conformers
    names = list(model.cfg.properties)
    if not model.predicts_properties or not names:
        raise ValueError("predict_properties: this model predicts no properties")
    rows = []
    for index, item in enumerate(molecules):
        if isinstance(item, str):
            (row,) = predict_chunk("", index, [("smiles", (item, "", {}))], names, conformers, seed, model=model,
                                   weighting=weighting)
            values = row["values"]
            rows.append({"input": item, "status": row["status"], "reason": row["reason"], "note": row["note"],
                         "values": None if values is None else
                         {n: (float(m), float(s)) for n, m, s in zip(names, *values)}})
            continue
        z, pos = np.asarray(item.atomic_numbers), np.asarray(item.positions, dtype=np.float32)
        unknown = sorted(set(z.tolist()) - set(model.cfg.atom_vocab))
        if unknown or pos.shape != (len(z), 3) or not len(z) or not np.isfinite(pos).all():
            reason = f"elements {unknown} unknown to the model" if unknown else "positions are not finite [N, 3]"
            rows.append({"input": item, "status": "rejected", "reason": reason, "note": "", "values": None})
            continue
        (pred,) = predict_conformers(model, [(z, pos)], 1)
        rows.append({"input": item, "status": "ok", "reason": "", "note": "",
                     "values": {n: (float(v), 0.0) for n, v in zip(names, pred)}})
    return rows
