"""Bonds perceived from 3D coordinates with RDKit (connectivity + bond orders, xyz2mol method).

RDKit's default connectivity (covalent radii) fails on some strained polycyclics (bicyclo[1.1.1]pentanes,
oxetane and cyclobutane cages: about 5% of QM9), where a stretched ring bond or a short cross-ring contact
breaks the valences; the extended-Hueckel connectivity (``useHueckel=True``, RDKit's YAeHMOP) reads those
from the electronic structure instead and is tried when the default fails.

Output rows are (i, j, order) with i < j and order 1, 2, 3, or 4 for aromatic.
"""

from __future__ import annotations

import contextlib
import os
import sys

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


METHODS = ("default", "hueckel")  # the order perceive_bonds tries them in


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for a moment: YAeHMOP (the Hueckel code) prints a '!!! Warning !!!' line to it,
    from C, for every O-H bond it finds short; a QM9 build would print thousands of them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _determine(z: np.ndarray, pos: np.ndarray, charge: int, method: str) -> np.ndarray:
    mol = mol_from_xyz(z, pos)
    if method == "hueckel":
        with _quiet_stderr():
            rdDetermineBonds.DetermineBonds(mol, charge=charge, useHueckel=True)
    else:
        rdDetermineBonds.DetermineBonds(mol, charge=charge)
    Chem.SanitizeMol(mol)
    return bonds_from_mol(mol)


def perceive_bonds(z: np.ndarray, pos: np.ndarray, charge: int = 0) -> tuple[np.ndarray, str]:
    """(bonds, the method that found them) of a neutral (by default) molecule from its coordinates: RDKit's
    default connectivity first (what earlier builds used), then the extended-Hueckel one. Raises ValueError,
    with both methods' reasons, when neither gives a molecule RDKit can sanitise."""
    reasons = []
    for method in METHODS:
        try:
            return _determine(z, pos, charge, method), method
        except Exception as err:  # RDKit raises ValueError/RuntimeError/AtomValenceException alike
            reasons.append(f"{method}: {str(err).strip() or type(err).__name__}")
    raise ValueError("bond perception failed: " + "; ".join(reasons))

