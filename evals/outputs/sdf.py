"""Molecules with 3D coordinates and the distance-inferred bonds to an SDF file, and back.

Every molecule is written: one that sanitises is written as RDKit sanitised it; one that does not is
written unsanitised with the bonds as inferred. Each record carries the properties ``index`` (position
in the input), ``valid`` (1/0), ``mol_stable`` (1/0) and, when valid, ``smiles``.
Writes to a local path; uploading elsewhere is the caller's business.
"""

from __future__ import annotations

import os

import numpy as np
from rdkit import Chem

from molscale.evals.protocol.metrics import analyse_molecule
from molscale.evals.protocol.molecules import as_molecule_list


def write_sdf(molecules, path: str, all_single: bool = False) -> int:
    """Write ``molecules`` (anything ``as_molecule_list`` accepts) to ``path``; returns the count written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    count = 0
    with Chem.SDWriter(path) as writer:
        for index, (z, pos) in enumerate(as_molecule_list(molecules)):
            result = analyse_molecule(z, pos, all_single=all_single, with_conformer=True)
            mol = result.mol
            if not result.valid:
                mol.UpdatePropertyCache(strict=False)  # valences for the writer without sanitising
            mol.SetProp("_Name", f"molecule {index}")
            mol.SetIntProp("index", index)
            mol.SetIntProp("valid", int(result.valid))
            mol.SetIntProp("mol_stable", int(result.molecule_stable))
            if result.smiles is not None:
                mol.SetProp("smiles", result.smiles)
            writer.SetKekulize(result.valid)
            writer.write(mol)
            count += 1
    return count


def read_sdf(path: str) -> list[dict]:
    """Records of an SDF written by ``write_sdf`` (read without sanitising):
    dicts with z [N] int, pos [N, 3] float32 Angstrom, bonds int32 [E, 3] (i < j, order; aromatic = 4),
    and props (the SD properties as strings)."""
    out = []
    for mol in Chem.SDMolSupplier(path, sanitize=False, removeHs=False):
        if mol is None:
            raise ValueError(f"{path}: a record could not be parsed; the file is not an SDF write_sdf made")
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        pos = mol.GetConformer().GetPositions().astype(np.float32) if mol.GetNumConformers() else \
            np.zeros((len(z), 3), dtype=np.float32)
        rows = []
        for bond in mol.GetBonds():
            i, j = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
            order = 4 if bond.GetBondType() == Chem.BondType.AROMATIC else int(bond.GetBondTypeAsDouble())
            rows.append((i, j, order))
        bonds = np.asarray(sorted(rows), dtype=np.int32).reshape(-1, 3)
        out.append({"z": z, "pos": pos, "bonds": bonds, "props": mol.GetPropsAsDict(includePrivate=False)})
    return out
