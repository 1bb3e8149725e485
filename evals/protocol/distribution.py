"""Distribution statistics (histograms) of a set of molecules and the MiDi distances between two sets.

Histograms are plain dicts of counts so that they can be summed across chunks, pickled to Ray tasks and
saved as JSON:
    atom_types   {Z: atoms}
    atom_counts  {atoms per molecule: molecules}
    bond_types   {kind: bonds}                kind 1 single, 2 double, 3 triple, 4 aromatic
    valency      {Z: int64 [MAX_VALENCE + 1]}  EDM bond-order sum per atom (aromatic bonds count as the
                                               order the distance gave them)
    bond_length  {kind: int64 [LENGTH_BINS]}   bins of LENGTH_BIN_ANGSTROM from 0 Angstrom
    bond_angle   {Z of the central atom: int64 [ANGLE_BINS]}  bins of ANGLE_BIN_DEGREES from 0 degrees
Bond kinds are the distance-inferred orders, except that bonds RDKit perceives as aromatic in a molecule
that sanitises are kind 4.

Distances (MiDi definitions, Vignac et al. 2023): atom-type and bond-type TV = sum |p_gen - p_ref| (no 1/2);
valency W1 per atom type weighted by the reference atom-type frequency; bond-length W1 (Angstrom) per
bond kind weighted by the reference bond-kind frequency; bond-angle W1 (degrees) per central atom type
weighted by the reference share of angles around that type. A type the generated set lacks contributes
nothing to a W1 (its absence shows in the TV instead).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from molscale.evals.protocol.bond_tables import MAX_VALENCE

BOND_KIND_NAMES = {1: "single", 2: "double", 3: "triple", 4: "aromatic"}
LENGTH_BIN_ANGSTROM = 0.01
LENGTH_BINS = 300  # 0 .. 3 Angstrom; longer bonds (none under the EDM tables) land in the last bin
ANGLE_BIN_DEGREES = 0.1
ANGLE_BINS = 1800  # 0 .. 180 degrees
HISTOGRAM_KEYS = ("atom_types", "atom_counts", "bond_types", "valency", "bond_length", "bond_angle")


def length_bin_centres_angstrom() -> np.ndarray:
    return (np.arange(LENGTH_BINS) + 0.5) * LENGTH_BIN_ANGSTROM


def angle_bin_centres_degrees() -> np.ndarray:
    return (np.arange(ANGLE_BINS) + 0.5) * ANGLE_BIN_DEGREES


def bond_angles_degrees(pos: np.ndarray, dist: np.ndarray, adjacency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles j-i-k for every atom i and every pair j < k of its bonded neighbours.

    pos [N, 3], dist [N, N] Angstrom, adjacency [N, N] bool -> (central atom index [A], angle in degrees [A]).
    """
    degree = adjacency.sum(axis=1)
    centres = np.flatnonzero(degree >= 2)
    if len(centres) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    n = len(pos)
    neighbours = adjacency[centres]  # [C, N]
    pairs = neighbours[:, :, None] & neighbours[:, None, :] & np.triu(np.ones((n, n), dtype=bool), 1)
    c, j, k = np.nonzero(pairs)
    i = centres[c]
    pos = np.asarray(pos, dtype=np.float64)
    u = (pos[j] - pos[i]) / dist[i, j][:, None]
    v = (pos[k] - pos[i]) / dist[i, k][:, None]
    cosine = np.clip(np.einsum("ad,ad->a", u, v), -1.0, 1.0)
    return i, np.degrees(np.arccos(cosine))


class DistributionAccumulator:
    """Collects per-molecule arrays and bins them once in ``histograms()`` (cheap per molecule)."""

    def __init__(self):
        self._atom_z, self._valence, self._n_atoms = [], [], []
        self._bond_kind, self._bond_length = [], []
        self._angle_z, self._angle = [], []

    def add(self, z: np.ndarray, pos: np.ndarray, dist: np.ndarray, order: np.ndarray, kind: np.ndarray,
            valence: np.ndarray) -> None:
        """z [N], pos [N, 3], dist [N, N] Angstrom, order [N, N] 0..3, kind [N, N] 0..4, valence [N]."""
        self._n_atoms.append(len(z))
        self._atom_z.append(z)
        self._valence.append(valence)
        rows, cols = np.nonzero(np.triu(kind, 1))
        self._bond_kind.append(kind[rows, cols])
        self._bond_length.append(dist[rows, cols])
        centre, angle = bond_angles_degrees(pos, dist, order > 0)
        self._angle_z.append(z[centre])
        self._angle.append(angle)

    def histograms(self) -> dict:
        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        atom_z, valence = cat(self._atom_z, np.int64), cat(self._valence, np.int64)
        bond_kind, bond_length = cat(self._bond_kind, np.int64), cat(self._bond_length, np.float64)
        angle_z, angle = cat(self._angle_z, np.int64), cat(self._angle, np.float64)
        length_bin = np.clip((bond_length / LENGTH_BIN_ANGSTROM).astype(np.int64), 0, LENGTH_BINS - 1)
        angle_bin = np.clip((angle / ANGLE_BIN_DEGREES).astype(np.int64), 0, ANGLE_BINS - 1)
        valence = np.minimum(valence, MAX_VALENCE)
        return {
            "atom_types": _counts(atom_z),
            "atom_counts": _counts(np.asarray(self._n_atoms, dtype=np.int64)),
            "bond_types": _counts(bond_kind),
            "valency": {t: np.bincount(valence[atom_z == t], minlength=MAX_VALENCE + 1)
                        for t in np.unique(atom_z).tolist()},
            "bond_length": {t: np.bincount(length_bin[bond_kind == t], minlength=LENGTH_BINS)
                            for t in np.unique(bond_kind).tolist()},
            "bond_angle": {t: np.bincount(angle_bin[angle_z == t], minlength=ANGLE_BINS)
                           for t in np.unique(angle_z).tolist()},
        }


def _counts(values: np.ndarray) -> dict[int, int]:
    keys, counts = np.unique(values, return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist()))


def empty_histograms() -> dict:
    return {key: {} for key in HISTOGRAM_KEYS}


def merge_histograms(parts: list[dict]) -> dict:
    """Sum of histogram dicts (missing keys count as zero)."""
    out = empty_histograms()
    for part in parts:
        for key in HISTOGRAM_KEYS:
            target = out[key]
            for t, value in part.get(key, {}).items():
                target[t] = target[t] + value if t in target else (value.copy() if hasattr(value, "copy") else value)
    return out


def histograms_to_json(hist: dict) -> dict:
    """JSON-ready copy: keys as strings, arrays as lists."""
    return {key: {str(t): (v.tolist() if hasattr(v, "tolist") else v) for t, v in hist.get(key, {}).items()}
            for key in HISTOGRAM_KEYS}


def histograms_from_json(data: dict) -> dict:
    out = empty_histograms()
    for key in HISTOGRAM_KEYS:
        for t, v in data.get(key, {}).items():
            out[key][int(t)] = np.asarray(v, dtype=np.int64) if isinstance(v, list) else int(v)
    return out


def total_variation(gen_counts: dict, ref_counts: dict) -> float:
    """sum over categories |p_gen - p_ref| (range 0..2); nan when either side is empty."""
    gen_total, ref_total = sum(gen_counts.values()), sum(ref_counts.values())
    if gen_total == 0 or ref_total == 0:
        return float("nan")
    return float(sum(abs(gen_counts.get(t, 0) / gen_total - ref_counts.get(t, 0) / ref_total)
                     for t in set(gen_counts) | set(ref_counts)))


def weighted_w1(gen_hists: dict, ref_hists: dict, values: np.ndarray, ref_weights: dict) -> float:
    """sum over types of w_ref(type) * W1(gen histogram, ref histogram) with bin positions ``values``;
    types with an empty histogram on either side are skipped; nan when the reference has no weight."""
    weight_total = sum(ref_weights.values())
    if weight_total == 0:
        return float("nan")
    total = 0.0
    for t, ref in ref_hists.items():
        gen = gen_hists.get(t)
        if gen is None or gen.sum() == 0 or ref.sum() == 0:
            continue
        total += ref_weights.get(t, 0) / weight_total * wasserstein_distance(values, values, gen, ref)
    return float(total)


def distribution_metrics(gen: dict, ref: dict) -> dict:
    """MiDi distances of generated histograms ``gen`` to reference histograms ``ref`` (same layout)."""
    angle_weights = {t: int(h.sum()) for t, h in ref["bond_angle"].items()}
    return {
        "atom_type_tv": total_variation(gen["atom_types"], ref["atom_types"]),
        "bond_type_tv": total_variation(gen["bond_types"], ref["bond_types"]),
        "valency_w1": weighted_w1(gen["valency"], ref["valency"], np.arange(MAX_VALENCE + 1, dtype=np.float64),
                                  ref["atom_types"]),
        "bond_length_w1": weighted_w1(gen["bond_length"], ref["bond_length"], length_bin_centres_angstrom(),
                                      ref["bond_types"]),
        "bond_angle_w1": weighted_w1(gen["bond_angle"], ref["bond_angle"], angle_bin_centres_degrees(),
                                     angle_weights),
    }
