"""EDM-protocol and distribution metrics, computed in chunks that can be merged.

    stats = [molecule_stats(chunk) for chunk in chunks]     # fan out (e.g. one Ray task per chunk)
    merged = merge_stats(stats)
    metrics = compute_metrics(merged, train_smiles=..., reference_stats=...)
or ``evaluate(molecules, ...)`` for all three at once. ``reference_statistics(molecules)`` gives the
histograms of a reference set once, to be cached and shipped to every task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rdkit import Chem

from molscale.evals.protocol.chemistry import (
    aromatic_bond_mask,
    largest_fragment_smiles,
    novelty,
    rdkit_molecule,
    sanitize,
    uniqueness,
)
from molscale.evals.protocol.distribution import (
    DistributionAccumulator,
    distribution_metrics,
    empty_histograms,
    merge_histograms,
)
from molscale.evals.protocol.molecules import as_molecule_list
from molscale.evals.protocol.stability import (
    atom_valences,
    bond_order_matrix,
    pairwise_distances_angstrom,
    stable_atoms,
)
from molscale.evals.protocol.statistics import ClusterSums, clustered_fraction, wilson_interval

COUNT_KEYS = ("n_samples", "n_atoms", "n_stable_atoms", "n_stable_molecules", "n_valid")


@dataclass
class MoleculeAnalysis:
    order: np.ndarray        # [N, N] int8 EDM bond orders 0..3
    valence: np.ndarray      # [N] bond-order sums
    stable: np.ndarray       # [N] bool
    mol: Chem.RWMol          # RDKit molecule with the inferred bonds (sanitised when valid)
    valid: bool
    smiles: str | None       # largest fragment, canonical, hydrogens removed; None when invalid
    kind: np.ndarray         # [N, N] bond kinds 0..4 (4 = aromatic as RDKit perceives it)
    dist: np.ndarray         # [N, N] Angstrom

    @property
    def molecule_stable(self) -> bool:
        return len(self.stable) > 0 and bool(self.stable.all())


def analyse_molecule(z: np.ndarray, pos: np.ndarray, all_single: bool = False,
                     with_conformer: bool = False) -> MoleculeAnalysis:
    """z [N] atomic numbers, pos [N, 3] Angstrom -> everything the metrics need about one molecule."""
    z = np.asarray(z, dtype=np.int64)
    dist = pairwise_distances_angstrom(pos)
    order = bond_order_matrix(z, pos, dist)
    valence = atom_valences(order)
    stable = stable_atoms(z, valence)
    mol = rdkit_molecule(z, order, pos if with_conformer else None, all_single=all_single)
    valid = len(z) > 0 and sanitize(mol)
    smiles = largest_fragment_smiles(mol) if valid else None
    kind = order
    if valid and not all_single:
        aromatic = aromatic_bond_mask(mol, len(z))
        if aromatic.any():
            kind = np.where(aromatic, 4, order).astype(np.int8)
    return MoleculeAnalysis(order, valence, stable, mol, valid, smiles, kind, dist)


def molecule_stats(molecules, all_single: bool = False, distribution: bool = True) -> dict:
    """Partial statistics of a chunk of molecules; merge chunks with ``merge_stats``.

    molecules: anything ``as_molecule_list`` accepts. Returns counts (COUNT_KEYS), ``atom_clusters`` (the
    statistics.ClusterSums of stable atoms per molecule, behind atom stability's standard error), ``valid_smiles``
    (one entry per valid molecule, in input order), ``valid`` (one bool per molecule, in input order: the
    property rows are also reported over the valid molecules alone) and ``histograms`` (see distribution.py; None
    when ``distribution`` is False).
    """
    counts = dict.fromkeys(COUNT_KEYS, 0)
    clusters = ClusterSums()
    valid_smiles: list[str] = []
    valid: list[bool] = []
    accumulator = DistributionAccumulator() if distribution else None
    for z, pos in as_molecule_list(molecules):
        result = analyse_molecule(z, pos, all_single=all_single)
        counts["n_samples"] += 1
        stable = int(result.stable.sum())
        counts["n_atoms"] += len(z)
        counts["n_stable_atoms"] += stable
        clusters.add(stable, len(z))
        counts["n_stable_molecules"] += int(result.molecule_stable)
        valid.append(bool(result.valid))
        if result.valid:
            counts["n_valid"] += 1
            valid_smiles.append(result.smiles)
        if accumulator is not None:
            accumulator.add(np.asarray(z, dtype=np.int64), pos, result.dist, result.order, result.kind,
                            result.valence)
    return {**counts, "atom_clusters": clusters, "valid_smiles": valid_smiles, "valid": valid,
            "histograms": accumulator.histograms() if accumulator is not None else None}


def merge_stats(parts: list[dict]) -> dict:
    """Sum of ``molecule_stats`` results (SMILES lists concatenated in the order given)."""
    merged = dict.fromkeys(COUNT_KEYS, 0)
    merged["valid_smiles"], merged["valid"] = [], []
    for part in parts:
        for key in COUNT_KEYS:
            merged[key] += part[key]
        merged["valid_smiles"].extend(part["valid_smiles"])
        merged["valid"].extend(part["valid"])
    merged["atom_clusters"] = sum((part["atom_clusters"] for part in parts), ClusterSums())
    hists = [p["histograms"] for p in parts if p.get("histograms") is not None]
    merged["histograms"] = merge_histograms(hists) if hists else None
    return merged


def _fraction(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def uncertainty(stats: dict, n_unique: int) -> dict:
    """95% intervals of the molecule fractions (Wilson) and atom stability's standard error with molecules as
    clusters (evals/protocol/statistics.py): how far another draw of as many molecules could land."""
    n = stats["n_samples"]
    _, atom_se = clustered_fraction(stats["atom_clusters"])
    intervals = {"atom_stability_se": atom_se}
    for name, successes in (("mol_stability", stats["n_stable_molecules"]), ("validity", stats["n_valid"]),
                            ("valid_unique", n_unique)):
        intervals[f"{name}_ci95_low"], intervals[f"{name}_ci95_high"] = wilson_interval(successes, n)
    return intervals


def compute_metrics(stats: dict, train_smiles=None, reference_stats: dict | None = None) -> dict:
    """Flat metric dict from merged statistics.

    train_smiles: SMILES of the training set (``references.reference_smiles``); novelty is None without.
    reference_stats: histograms of a reference split (``reference_statistics``); the distribution
    metrics are None without (or when ``stats`` holds no histograms).
    """
    n, n_valid = stats["n_samples"], stats["n_valid"]
    n_unique = len(set(stats["valid_smiles"]))
    metrics = {
        "n_samples": n,
        "atom_stability": _fraction(stats["n_stable_atoms"], stats["n_atoms"]),
        "mol_stability": _fraction(stats["n_stable_molecules"], n),
        "validity": _fraction(n_valid, n),
        "uniqueness": uniqueness(stats["valid_smiles"]),
        "valid_unique": _fraction(n_unique, n),
        "novelty": novelty(stats["valid_smiles"], train_smiles) if train_smiles is not None else None,
        "n_atoms": stats["n_atoms"],
        "n_valid": n_valid,
        "n_unique": n_unique,
        **uncertainty(stats, n_unique),
    }
    dist_keys = ("atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1")
    if reference_stats is not None and stats.get("histograms") is not None:
        metrics.update(distribution_metrics(stats["histograms"], reference_stats))
    else:
        metrics.update(dict.fromkeys(dist_keys))
    return metrics


def reference_statistics(molecules, all_single: bool = False) -> dict:
    """Histograms of a reference set of molecules (the ``reference_stats`` of compute_metrics)."""
    hist = molecule_stats(molecules, all_single=all_single)["histograms"]
    return hist if hist is not None else empty_histograms()


def evaluate(molecules, train_smiles=None, reference_stats: dict | None = None, all_single: bool = False) -> dict:
    """All metrics of a list of molecules in one process (see the module docstring for the chunked form)."""
    return compute_metrics(molecule_stats(molecules, all_single=all_single), train_smiles, reference_stats)
