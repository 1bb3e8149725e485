"""EDM-protocol bond orders from distances, and atom/molecule stability.

A pair is single-bonded when its distance is below b1 + 10 pm; a single bond becomes double when the
pair has a double length and the distance is below b2 + 5 pm; a double becomes triple when the pair
has a triple length and the distance is below b3 + 3 pm. An atom is stable when its bond-order sum is an
allowed valence; a molecule is stable when all its atoms are.
"""

from __future__ import annotations

import numpy as np

from molscale.evals.protocol.bond_tables import (
    MAX_VALENCE,
    MAX_Z,
    allowed_valence_table,
    bond_thresholds_angstrom,
)


def pairwise_distances_angstrom(pos: np.ndarray) -> np.ndarray:
    """pos [N, 3] -> [N, N] float64 distances (float64 so that edge cases decide the same everywhere)."""
    pos = np.asarray(pos, dtype=np.float64)
    diff = pos[:, None, :] - pos[None, :, :]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


def check_atomic_numbers(z: np.ndarray) -> None:
    if len(z) and (z.min() < 1 or z.max() > MAX_Z):
        raise ValueError(f"atomic numbers must lie in 1..{MAX_Z}; got {sorted(set(z.tolist()))}. "
                         f"Map model atom-type indices to atomic numbers with the dataset's atom_vocab first.")


def bond_order_matrix(z: np.ndarray, pos: np.ndarray, dist: np.ndarray | None = None) -> np.ndarray:
    """z [N] atomic numbers, pos [N, 3] Angstrom -> [N, N] int8 symmetric bond orders 0..3 (diagonal 0)."""
    z = np.asarray(z, dtype=np.int64)
    check_atomic_numbers(z)
    if dist is None:
        dist = pairwise_distances_angstrom(pos)
    thresholds = bond_thresholds_angstrom()[:, z[:, None], z[None, :]]  # [3, N, N]
    single = dist < thresholds[0]
    np.fill_diagonal(single, False)
    double = single & (dist < thresholds[1])
    triple = double & (dist < thresholds[2])
    return single.astype(np.int8) + double + triple


def atom_valences(order: np.ndarray) -> np.ndarray:
    """order [N, N] -> [N] int bond-order sums."""
    return order.sum(axis=1, dtype=np.int64)


def stable_atoms(z: np.ndarray, valence: np.ndarray) -> np.ndarray:
    """z [N], valence [N] -> [N] bool: valence is allowed for the element (elements outside the protocol
    are never stable)."""
    return allowed_valence_table()[np.asarray(z, dtype=np.int64), np.minimum(valence, MAX_VALENCE)]


def molecule_stability(z: np.ndarray, pos: np.ndarray) -> tuple[int, int, bool]:
    """(number of stable atoms, number of atoms, molecule stable) of one molecule."""
    stable = stable_atoms(z, atom_valences(bond_order_matrix(z, pos)))
    return int(stable.sum()), len(stable), bool(stable.all())
