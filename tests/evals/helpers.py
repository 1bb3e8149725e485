"""Small molecules with known answers, embedded with RDKit (ETKDG, fixed seed) or built by hand."""

from __future__ import annotations

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem


def embedded(smiles: str, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(z [N], pos float32 [N, 3] Angstrom) of an ETKDG conformer with explicit hydrogens, MMFF-relaxed
    (ETKDG alone leaves some bond lengths a few pm off, enough to cross an EDM margin)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles}")
    AllChem.MMFFOptimizeMolecule(mol)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return z, mol.GetConformer().GetPositions().astype(np.float32)


def kekule_benzene(single_angstrom: float = 1.46, double_angstrom: float = 1.34,
                   ch_angstrom: float = 1.08) -> tuple[np.ndarray, np.ndarray]:
    """Planar C6H6 with alternating C-C lengths and 120 degree angles (closes exactly), H pointing outward."""
    ring, point, heading = [], np.zeros(2), 0.0
    for k in range(6):
        ring.append(point.copy())
        step = single_angstrom if k % 2 == 0 else double_angstrom
        point = point + step * np.array([np.cos(heading), np.sin(heading)])
        heading += np.pi / 3
    ring = np.array(ring) - np.mean(ring, axis=0)
    hydrogens = ring + ch_angstrom * ring / np.linalg.norm(ring, axis=1, keepdims=True)
    pos = np.concatenate([ring, hydrogens])
    pos = np.concatenate([pos, np.zeros((12, 1))], axis=1)
    return np.array([6] * 6 + [1] * 6), pos.astype(np.float32)


def star(center_z: int, ligand_z: int, count: int, distance_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """An atom with ``count`` ligands at ``distance_angstrom`` spread over a sphere (ligands far from each other)."""
    directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
    pos = np.concatenate([np.zeros((1, 3)), distance_angstrom * directions[:count]])
    return np.array([center_z] + [ligand_z] * count), pos.astype(np.float32)


def pair(z1: int, z2: int, distance_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    return np.array([z1, z2]), np.array([[0, 0, 0], [distance_angstrom, 0, 0]], dtype=np.float32)
