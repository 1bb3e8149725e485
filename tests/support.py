"""What many tests share: the repository root, the environment of a CPU subprocess, molecules from samples."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: commands run from here, as the README runs them


def cpu_env(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess that runs molscale on the CPU: DeepSpeed's CPU accelerator, W&B offline and
    quiet, one OpenMP thread, Ray without usage reporting, unbuffered output, and none of an enclosing launcher's
    rank variables, W&B key or Ray address. ``extra`` adds or overrides variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               RAY_DISABLE_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_API_KEY", "RAY_ADDRESS"):
        env.pop(name, None)
    env.update(extra)
    return env


def sample_mol(sample):
    """An RDKit molecule (3D conformer, bonds, the sample's key as its name) from a shard sample read with bonds."""
    from rdkit import Chem
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE, 4: Chem.BondType.AROMATIC}
    mol = Chem.RWMol()
    for z in sample["z"]:
        mol.AddAtom(Chem.Atom(int(z)))
    for i, j, order in sample["bonds"]:
        mol.AddBond(int(i), int(j), kinds[int(order)])
    conf = Chem.Conformer(len(sample["z"]))
    for i, p in enumerate(sample["pos"]):
        conf.SetAtomPosition(i, [float(v) for v in p])
    conf.Set3D(True)
    mol.AddConformer(conf)
    mol = mol.GetMol()
    mol.SetProp("_Name", sample["key"])
    return mol
