"""Bonds perceived from 3D coordinates with RDKit (connectivity + bond orders, xyz2mol method).

Output rows are (i, j, order) with i < j and order 1, 2, 3, or 4 for aromatic.
"""

from __future__ import annotations

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import rdDetermineBonds

from molscale.datasets.chemistry.elements import Z_TO_SYMBOL

RDLogger.DisableLog("rdApp.*")

BOND_ORDER = {
    Chem.BondType.SINGLE: 1,
    Chem.BondType.DOUBLE: 2,
    Chem.BondType.TRIPLE: 3,
    Chem.BondType.AROMATIC: 4,
}
NO_BONDS = np.zeros((0, 3), dtype=np.int32)


def mol_from_xyz(z: np.ndarray, pos: np.ndarray) -> Chem.Mol:
    lines = [str(len(z)), ""]
    lines += [f"{Z_TO_SYMBOL[int(a)]} {x:.6f} {y:.6f} {w:.6f}" for a, (x, y, w) in zip(z, pos)]
    mol = Chem.MolFromXYZBlock("\n".join(lines) + "\n")
    if mol is None:
        raise ValueError("RDKit could not read the coordinates")
    return mol


def bonds_from_mol(mol: Chem.Mol) -> np.ndarray:
    rows = []
    for bond in mol.GetBonds():
        i, j = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        order = BOND_ORDER.get(bond.GetBondType())
        if order is None:
            raise ValueError(f"unsupported bond type {bond.GetBondType()} between atoms {i} and {j}")
        rows.append((i, j, order))
    return np.asarray(sorted(rows), dtype=np.int32).reshape(-1, 3) if rows else NO_BONDS.copy()


def perceive_bonds(z: np.ndarray, pos: np.ndarray, charge: int = 0) -> np.ndarray:
    """Bonds of a neutral (by default) molecule from its coordinates; raises ValueError on failure."""
    mol = mol_from_xyz(z, pos)
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=charge)
        Chem.SanitizeMol(mol)
    except Exception as err:  # RDKit raises ValueError/RuntimeError/AtomValenceException alike
        raise ValueError(f"bond perception failed: {err}") from None
    return bonds_from_mol(mol)
