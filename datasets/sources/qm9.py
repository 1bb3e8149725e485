"""QM9 from the PyPI package ``qm9pack``: 130,831 molecules with coordinates and properties.

The package's ``import`` needs pkg_resources, which newer setuptools no longer ship, so the CSV
files are read from the installed package folder directly. Molecules come in gdb-id order; the
standard split (EDM: qm9/data/prepare/qm9.py, gen_splits_gdb9) is a seeded permutation over that order.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import importlib.util
import multiprocessing as mp
import os
from collections import Counter
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB, symbols_to_z
from molscale.datasets.chemistry.properties import QM9_PROPERTIES
from molscale.datasets.errors import InputError
from molscale.datasets.shards.build import Rejections, finish_splits, start_build
from molscale.datasets.shards.manifest import (
    FORMAT,
    load_manifest,
    mean_mad,
    save_manifest,
)
from molscale.datasets.shards.samples import encode_sample
from molscale.datasets.shards.writer import SplitShardWriter

QM9_NUM_MOLECULES = 130_831
QM9_SPLIT_SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}  # EDM's split (qm9/data/prepare)
_CSV_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def qm9pack_data_dir() -> str:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the PyPI package 'qm9pack' is not installed; run `pip install qm9pack` "
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
    train_end = QM9_SPLIT_SIZES["train"]
    valid_end = train_end + QM9_SPLIT_SIZES["valid"]
    split_of[perm[:train_end]] = 0
    split_of[perm[train_end:valid_end]] = 1
    split_of[perm[valid_end:]] = 2
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


def _perceive(args):
    """(bonds or None, method or None, error or None) of one molecule."""
    # imported here: QM9's facts (atom-count histogram, split) are read by the trainer, which needs no RDKit
    from molscale.datasets.chemistry.bonds import perceive_bonds
    z, pos = args
    try:
        return (*perceive_bonds(z, pos), None)
    except ValueError as err:
        return None, None, str(err)


def sampled_positions(count: int, seed: int) -> np.ndarray:
    """``count`` gdb-order positions drawn uniformly without replacement (seeded), sorted: a subset whose sizes
    and splits follow the full dataset's, unlike the first N by gdb id (the smallest molecules)."""
    return np.sort(np.random.default_rng(seed).choice(QM9_NUM_MOLECULES, size=count, replace=False))


def build_qm9(out_url: str, limit: int | None = None, shard_size: int = 1000, workers: int = 1,
              storage_options: dict | None = None, command: str = "", progress: bool = True,
              sample: int | None = None, sample_seed: int = 0):
    """QM9 (qm9pack) -> shards; the standard split; ``limit`` keeps the first N molecules by gdb id, ``sample``
    N molecules drawn at random (``sample_seed``); either way each molecule stays in its standard split."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit}); leave it out for all "
                         f"{QM9_NUM_MOLECULES} molecules.")
    if sample is not None and not 1 <= sample <= QM9_NUM_MOLECULES:
        raise InputError(f"--sample must be between 1 and {QM9_NUM_MOLECULES} (got {sample})")
    if sample is not None and limit is not None:
        raise InputError("--sample draws molecules at random and --limit keeps the first ones: give one of them")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1 (got {shard_size}).")
    if workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers}).")
    params = {"source": "qm9", "limit": limit, "shard_size": shard_size, "format": FORMAT}
    if sample is not None:  # recorded only when used: earlier builds' parameters (and their reruns) stay as they were
        params.update(sample=sample, sample_seed=sample_seed)
    done, fs, out_path = start_build(out_url, params, storage_options)
    if done is not None:
        return done

    rejected = Rejections()
    records, positions = [], []
    rows = iter_rows(limit)
    keep = sampled_positions(sample, sample_seed) if sample is not None else None
    kept = np.zeros(QM9_NUM_MOLECULES, dtype=bool)
    if keep is not None:
        kept[keep] = True
    for position, row in enumerate(tqdm(rows, total=limit or QM9_NUM_MOLECULES, desc="reading qm9pack",
                                        unit="mol", disable=not progress)):
        if keep is not None and (position >= QM9_NUM_MOLECULES or not kept[position]):
            continue
        try:
            records.append(row_to_record(row))
            positions.append(position)
        except (ValueError, KeyError) as err:
            rejected.add(f"qm9 row {position}", f"unreadable row: {err}")
    n_read = len(positions) + rejected.as_dict()["total"]
    if limit is None and sample is None and n_read != QM9_NUM_MOLECULES:
        raise InputError(f"qm9pack gave {n_read} molecules, expected {QM9_NUM_MOLECULES}; "
                         f"the standard split is defined over exactly that many. Reinstall qm9pack.")

    # Split and order come from the full permutation, so a --limit build puts each molecule in the
    # split the full build gives it, and shards hold molecules in permutation (random) order.
    split_of = standard_split()[positions]
    order_key = split_order()[positions]
    writers = {name: SplitShardWriter(fs, out_path, name, shard_size) for name in SPLIT_NAMES}
    plan = sorted(range(len(records)), key=lambda i: (split_of[i], order_key[i]))
    no_bonds, by_method = Counter(), Counter()

    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        jobs = ((records[i]["z"], records[i]["pos"]) for i in plan)
        results = pool.imap(_perceive, jobs, chunksize=64) if pool else map(_perceive, jobs)
        for i, (bonds, method, error) in zip(plan, tqdm(results, total=len(plan), desc="bonds + shards",
                                                        unit="mol", disable=not progress)):
            rec = records[i]
            if error is not None:
                no_bonds[error.split(":")[0]] += 1
            else:
                by_method[method] += 1
            pos = rec["pos"] - rec["pos"].mean(axis=0, keepdims=True)  # stored CoM-free, float32
            sample = encode_sample(rec["key"], pos, rec["z"], rec["props"], bonds, rec["smiles"])
            writers[SPLIT_NAMES[split_of[i]]].write(sample, len(rec["z"]))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool:
            pool.terminate()

    splits = finish_splits(writers)
    train_ids = [i for i in range(len(records)) if split_of[i] == 0]
    prop_stats = {spec.name: mean_mad([records[i]["props"][spec.name] for i in train_ids])
                  for spec in QM9_PROPERTIES} if train_ids else {}
    manifest = {
        "format": FORMAT,
        "source": {"name": "qm9", "package": "qm9pack", "version": qm9pack_version()},
        "build": params,
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "atom_vocab": list(QM9_ATOM_VOCAB),
        "properties": {spec.name: {"unit": spec.unit} for spec in QM9_PROPERTIES},
        "property_stats": prop_stats,
        "splits": splits,
        "rejected": rejected.as_dict(),
        "notes": {"no_bonds": {"total": sum(no_bonds.values()), "reasons": dict(no_bonds),
                               "meaning": "bond perception from coordinates failed with both methods; kept "
                                          "without bonds.npy"},
                  "bonds_by_hueckel": {"total": by_method["hueckel"],
                                       "meaning": "RDKit's default connectivity failed and the extended-Hueckel "
                                                  "one found the bonds (strained polycyclics)"}},
    }
    save_manifest(fs, out_path, manifest)
    return load_manifest(out_url, storage_options)
