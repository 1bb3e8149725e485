"""QM9 from the PyPI package ``qm9pack``: 130,831 molecules with coordinates and properties.

The package's ``import`` needs pkg_resources, which newer setuptools no longer ship, so the CSV
files are read from the installed package folder directly. Molecules come in gdb-id order; the
standard split (FACTS.md) is a seeded permutation over that order.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
from functools import lru_cache

import numpy as np

from .elements import symbols_to_z
from .properties import QM9_PROPERTIES

QM9_NUM_MOLECULES = 130_831
QM9_SPLIT_SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}
_CSV_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def qm9pack_data_dir() -> str:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the PyPI package 'qm9pack' is not installed; run `pip install qm9pack` "
                         "(or `make test`, which installs everything).")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def qm9pack_version() -> str:
    try:
        return importlib.metadata.version("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def standard_split(num_molecules: int = QM9_NUM_MOLECULES) -> np.ndarray:
    """Split name index per molecule in gdb-id order: 0 train, 1 valid, 2 test (EDM's split).

    Equivalent to ``np.random.seed(0); perm = np.random.permutation(130831)`` with train =
    perm[:100000], valid = perm[100000:117748], test = perm[117748:].
    """
    perm = np.random.RandomState(0).permutation(num_molecules)
    split_of = np.empty(num_molecules, dtype=np.int8)
    split_of[perm[:100_000]] = 0
    split_of[perm[100_000:117_748]] = 1
    split_of[perm[117_748:]] = 2
    return split_of


def split_order(num_molecules: int = QM9_NUM_MOLECULES) -> np.ndarray:
    """Position of each molecule within the standard permutation (the order shards are written in)."""
    perm = np.random.RandomState(0).permutation(num_molecules)
    rank = np.empty(num_molecules, dtype=np.int64)
    rank[perm] = np.arange(num_molecules)
    return rank


SPLIT_NAMES = ("train", "valid", "test")


def _parse_symbols(text: str) -> list[str]:
    # "['C','H','H']" -> ["C", "H", "H"]
    return [s.strip().strip("'\"") for s in text.strip("[]").split(",") if s.strip()]


def iter_rows(limit: int | None = None):
    """Raw CSV rows in gdb-id order (the files are sorted by ``Index``)."""
    data_dir = qm9pack_data_dir()
    seen = 0
    for part in _CSV_PARTS:
        path = os.path.join(data_dir, part)
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if limit is not None and seen >= limit:
                    return
                row["_file"] = part
                yield row
                seen += 1


def _parse_xyz(text: str) -> np.ndarray:
    # "[[0.59,0.,1.],[1.2*^-6,...]]": not JSON (trailing dots, Mathematica exponents), so split by hand.
    rows = text.replace("*^", "e").strip()[2:-2].split("],[")
    return np.asarray([[float(v) for v in row.split(",")] for row in rows], dtype=np.float32)


def row_to_record(row: dict) -> dict:
    """One molecule as plain Python/numpy (picklable for worker processes).

    Raises ValueError with the gdb id when the row cannot be read.
    """
    gdb_id = int(row["Index"])
    where = f"{row.get('_file', 'qm9')} gdb id {gdb_id}"
    symbols = _parse_symbols(row["Elements"])
    pos = _parse_xyz(row["XYZ_Ang"])
    if pos.shape != (len(symbols), 3):
        raise ValueError(f"{where}: {len(symbols)} elements but coordinates of shape {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError(f"{where}: non-finite coordinate")
    props = {}
    for spec in QM9_PROPERTIES:
        value = float(row[spec.column].replace("*^", "e")) * spec.scale
        if not np.isfinite(value):
            raise ValueError(f"{where}: property {spec.name} is not a finite number")
        props[spec.name] = value
    return {
        "key": f"qm9-{gdb_id:06d}",
        "gdb_id": gdb_id,
        "symbols": symbols,
        "z": np.asarray(symbols_to_z(symbols, where), dtype=np.uint8),
        "pos": pos,
        "props": props,
        "smiles": row["SMILES"],
    }


@lru_cache(maxsize=1)
def train_atom_count_histogram() -> dict[int, int]:
    """Atom-count histogram of the QM9 train split, read from qm9pack (a few seconds).

    Datasets carry the same histogram in their manifest; this is for tools that run without one
    (``python -m trainer.bench``).
    """
    counts = np.fromiter((int(r["N_atoms"]) for r in iter_rows()), dtype=np.int64)
    if len(counts) != QM9_NUM_MOLECULES:
        raise RuntimeError(f"qm9pack holds {len(counts)} molecules, expected {QM9_NUM_MOLECULES}")
    train = counts[standard_split() == 0]
    values, freq = np.unique(train, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, freq)}
