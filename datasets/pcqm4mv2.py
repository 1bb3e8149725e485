"""PCQM4Mv2 -> shards: DFT geometries of ``pcqm4m-v2-train.sdf`` with the HOMO-LUMO gap of ``data.csv.gz``.

SDF record i aligns with CSV row i (FACTS.md). Both files are streamed in lockstep (SDF through
``Chem.ForwardSDMolSupplier(removeHs=False, sanitize=False)``, plain or gzip; CSV row by row), so
memory does not grow with the dataset. The CSV ``idx`` column must equal the record position, else
the build stops (the files do not belong together).

Count mismatch: the real CSV has more rows than the SDF (valid/test molecules have no released 3D
geometry), so extra CSV rows are rejected and counted as "csv row without sdf record"; extra SDF
records as "sdf record without csv row". Both appear in the manifest; nothing is dropped silently.
With --limit the files are read only up to N records and the tails are not looked at.

Each sample: key ``pcqm4mv2-{idx:07d}``, CoM-free positions, ``props.json`` ``{"homolumogap": gap}``
in eV (manifest ``properties.homolumogap.unit = "eV"``), ``bonds.npy`` from the SDF bond block
(aromatic = 4), ``smiles.txt`` from the CSV. Split: seeded hash of idx, 95% train / 5% valid
(the SDF only holds training molecules). ``atom_vocab``: the sorted atomic numbers seen in the
build (so a --limit build can have a smaller vocabulary than the full one; it is recorded in the
manifest, which is what models read).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import math
import os
from array import array
from collections import Counter

import numpy as np
from rdkit import Chem, RDLogger

from .bonds import bonds_from_mol
from .build import Rejections, finish_splits, start_build
from .geom import assign_split
from .manifest import FORMAT, load_manifest, mean_mad, save_manifest
from .samples import encode_sample
from .writer import SplitShardWriter

RDLogger.DisableLog("rdApp.*")

SPLIT_NAMES = ("train", "valid")
SPLIT_FRACTIONS = (0.95, 0.05)


def _open_binary(path: str):
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _csv_rows(path: str):
    raw = _open_binary(path)
    text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    reader = csv.DictReader(text)
    missing = {"idx", "smiles", "homolumogap"} - set(reader.fieldnames or ())
    if missing:
        text.close()
        raise SystemExit(f"error: {path} lacks column(s) {sorted(missing)}; expected idx, smiles, homolumogap "
                         f"(PCQM4Mv2 data.csv.gz), got {reader.fieldnames}")
    return text, reader


def build_pcqm4mv2(out_url: str, sdf: str, csv_path: str, limit: int | None = None, shard_size: int = 1000,
                   seed: int = 0, workers: int = 1, storage_options: dict | None = None, command: str = "",
                   progress: bool = True):
    """PCQM4Mv2 SDF + CSV -> shards + manifest. ``workers`` is accepted but unused (one process)."""
    if not sdf or not csv_path:
        raise SystemExit("error: pcqm4mv2 needs --sdf pcqm4m-v2-train.sdf[.gz] and --csv data.csv.gz.")
    for label, path in (("--sdf", sdf), ("--csv", csv_path)):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {label} {path} does not exist.")
    if limit is not None and limit < 1:
        raise SystemExit(f"error: --limit must be at least 1 (got {limit}); leave it out for all molecules.")
    if shard_size < 1:
        raise SystemExit(f"error: --shard-size must be at least 1 (got {shard_size}).")
    sdf, csv_path = os.path.abspath(sdf), os.path.abspath(csv_path)
    params = {"source": "pcqm4mv2", "sdf": sdf, "csv": csv_path, "seed": seed, "limit": limit,
              "shard_size": shard_size, "format": FORMAT}
    done, fs, out_path = start_build(out_url, params, storage_options)
    if done is not None:
        return done

    rejected = Rejections()
    no_bonds = Counter()
    seen_z: set[int] = set()
    train_gap = array("d")
    writers = {name: SplitShardWriter(fs, out_path, name, shard_size) for name in SPLIT_NAMES}
    sdf_file = _open_binary(sdf)
    text, rows = _csv_rows(csv_path)
    n_sdf = n_csv = 0
    try:
        from tqdm import tqdm
        supplier = Chem.ForwardSDMolSupplier(sdf_file, removeHs=False, sanitize=False)
        for i, mol in enumerate(tqdm(supplier, desc="reading pcqm4mv2", unit="mol", total=limit,
                                     disable=not progress)):
            if limit is not None and i >= limit:
                break
            n_sdf += 1
            row = next(rows, None)
            if row is None:
                rejected.add(f"sdf record {i}", "sdf record without csv row")
                continue
            n_csv += 1
            try:
                idx = int(row["idx"])
            except (TypeError, ValueError):
                raise SystemExit(f"error: {csv_path} row {i} has idx {row['idx']!r}, not an integer.") from None
            if idx != i:
                raise SystemExit(f"error: {csv_path} row {i} has idx {idx}; SDF record i must align with CSV "
                                 f"row i of idx i. Are these the matching PCQM4Mv2 files?")
            record = f"pcqm4mv2 {i}"
            if mol is None:
                rejected.add(record, "unreadable sdf record")
                continue
            try:
                gap = float(row["homolumogap"])
            except (TypeError, ValueError):
                gap = math.nan
            if not math.isfinite(gap):
                rejected.add(record, f"missing homolumogap: {row['homolumogap']!r}")
                continue
            if mol.GetNumConformers() == 0:
                rejected.add(record, "no coordinates")
                continue
            z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
            pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
            if len(z) == 0:
                rejected.add(record, "no atoms")
                continue
            if not np.all(np.isfinite(pos)):
                rejected.add(record, "non-finite coordinate")
                continue
            if z.min() < 1 or z.max() > 255:
                rejected.add(record, f"unsupported element: Z={int(z.min())}..{int(z.max())}")
                continue
            try:
                bonds = bonds_from_mol(mol)
            except ValueError as err:
                bonds = None
                no_bonds[str(err).split(":")[0].split(" between")[0]] += 1
            seen_z.update(z.tolist())
            split = assign_split(seed, f"pcqm4mv2:{idx}", SPLIT_FRACTIONS)
            pos = pos - pos.mean(axis=0, keepdims=True)  # stored CoM-free, float32
            sample = encode_sample(f"pcqm4mv2-{idx:07d}", pos, z, {"homolumogap": gap}, bonds, row["smiles"])
            writers[SPLIT_NAMES[split]].write(sample, len(z))
            if split == 0:
                train_gap.append(gap)
        if limit is None or n_sdf < limit:
            # The SDF is exhausted (or was never longer than the limit): the CSV tail has no geometry.
            extra = 0
            for row in rows:
                if limit is not None and n_sdf + extra >= limit:
                    break
                rejected.add(f"csv row {row.get('idx')}", "csv row without sdf record")
                extra += 1
            n_csv += extra
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        sdf_file.close()
        text.close()

    splits = finish_splits(writers)
    manifest = {
        "format": FORMAT,
        "source": {"name": "pcqm4mv2", "sdf": sdf, "csv": csv_path, "sdf_bytes": os.path.getsize(sdf),
                   "csv_bytes": os.path.getsize(csv_path), "version": "v2"},
        "build": params,
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "atom_vocab": sorted(seen_z),
        "properties": {"homolumogap": {"unit": "eV"}},
        "property_stats": {"homolumogap": mean_mad(train_gap)} if len(train_gap) else {},
        "splits": splits,
        "rejected": rejected.as_dict(),
        # every notes entry is {total, meaning} (what `inspect` prints); other details go to "details"
        "notes": {
            "sdf_records_read": {"total": n_sdf, "meaning": "SDF records read"},
            "csv_rows_read": {"total": n_csv, "meaning": "CSV rows read"},
            "no_bonds": {"total": sum(no_bonds.values()), "reasons": dict(no_bonds),
                         "meaning": "the SDF has a bond type outside 1/2/3/aromatic; kept without bonds.npy"},
        },
        "details": {
            "atom_vocab": "sorted atomic numbers seen in this build",
            "split": {"fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS)), "seed": seed,
                      "method": "blake2b(seed:pcqm4mv2:idx) -> uniform [0,1) -> 95/5"},
        },
    }
    save_manifest(fs, out_path, manifest)
    return load_manifest(out_url, storage_options)
