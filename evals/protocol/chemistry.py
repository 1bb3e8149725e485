"""RDKit side of the EDM protocol: validity, SMILES, uniqueness, novelty.

A molecule is valid when the RDKit molecule built from its atoms and the distance-inferred bonds
(``all_single=True``: every bond single, the GEOM convention) sanitises. RDKit may add implicit
hydrogens to under-bonded atoms while sanitising (as in EDM), so an under-bonded molecule can be valid
but unstable. The SMILES kept is the canonical SMILES of the largest fragment with its hydrogens as explicit
atoms, as EDM's evaluation writes it (qm9/rdkit_functions.py: MolToSmiles of the sanitised largest fragment).
Removing the hydrogens would merge an under-bonded molecule with its saturated form (a CH3 radical and CH4
would both read `C`) and lower uniqueness below EDM's on the same molecules.
"""

from __future__ import annotations

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Geometry import Point3D

RDLogger.DisableLog("rdApp.*")

_BOND_TYPE = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def rdkit_molecule(z: np.ndarray, order: np.ndarray, pos: np.ndarray | None = None,
                   all_single: bool = False) -> Chem.RWMol:
    """Unsanitised RDKit molecule. z [N] atomic numbers, order [N, N] bond orders 0..3,
    pos [N, 3] Angstrom (optional: adds a 3D conformer)."""
    mol = Chem.RWMol()
    for atomic_number in z:
        mol.AddAtom(Chem.Atom(int(atomic_number)))
    rows, cols = np.nonzero(np.triu(order, 1))
    for i, j in zip(rows.tolist(), cols.tolist()):
        mol.AddBond(i, j, Chem.BondType.SINGLE if all_single else _BOND_TYPE[int(order[i, j])])
    if pos is not None:
        conf = Chem.Conformer(len(z))
        conf.Set3D(True)
        for i, (x, y, w) in enumerate(np.asarray(pos, dtype=np.float64).tolist()):
            conf.SetAtomPosition(i, Point3D(x, y, w))
        mol.AddConformer(conf, assignId=True)
    return mol


def sanitize(mol: Chem.Mol) -> bool:
    """Sanitise in place; True when RDKit accepts the molecule."""
    try:
        Chem.SanitizeMol(mol)
        return True
    except Exception:  # RDKit raises several exception types (valence, kekulisation, ...) for one answer
        return False


def largest_fragment_smiles(mol: Chem.Mol) -> str:
    """Canonical SMILES, hydrogens kept as explicit atoms, of the fragment with the most atoms of a sanitised
    molecule (EDM's convention for uniqueness and novelty)."""
    fragments = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    largest = max(fragments, key=lambda m: m.GetNumAtoms())
    return Chem.MolToSmiles(largest)


def aromatic_bond_mask(mol: Chem.Mol, num_atoms: int) -> np.ndarray:
    """[N, N] bool, True for bonds RDKit perceived as aromatic (only meaningful after sanitising)."""
    mask = np.zeros((num_atoms, num_atoms), dtype=bool)
    for bond in mol.GetBonds():
        if bond.GetIsAromatic():
            i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            mask[i, j] = mask[j, i] = True
    return mask


def uniqueness(valid_smiles: list[str]) -> float:
    """Distinct SMILES / valid molecules (0 when nothing is valid)."""
    return len(set(valid_smiles)) / len(valid_smiles) if valid_smiles else 0.0


def novelty(valid_smiles: list[str], train_smiles) -> float:
    """Share of the distinct valid SMILES that are absent from ``train_smiles`` (0 when nothing is valid)."""
    distinct = set(valid_smiles)
    if not distinct:
        return 0.0
    train = train_smiles if isinstance(train_smiles, (set, frozenset)) else set(train_smiles)
    return len(distinct - train) / len(distinct)
