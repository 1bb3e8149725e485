"""PCQM4Mv2 -> shards: DFT geometries of ``pcqm4m-v2-train.sdf`` with the HOMO-LUMO gap of ``data.csv.gz``.

SDF record i aligns with CSV row i (OGB-LSC). Both files are streamed in lockstep by the driver (SDF
record texts, plain or gzip; CSV row by row), so memory does not grow with the dataset; worker processes
parse chunks of records with ``Chem.MolFromMolBlock(sanitize=False, removeHs=False)`` and write one shard
per split each; a rerun resumes a killed build (datasets/shards/chunked.py).
The CSV ``idx`` column must equal the record position, else the build stops (the files do not belong together).

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
import gzip
import io
import math
import os

import numpy as np
from rdkit import Chem, RDLogger

from molscale.datasets.chemistry.bonds import bonds_from_mol
from molscale.datasets.errors import InputError
from molscale.datasets.shards.build import Rejections
from molscale.datasets.shards.chunked import chunked_build, chunked_manifest
from molscale.datasets.shards.manifest import FORMAT, load_manifest
from molscale.datasets.shards.samples import encode_sample
from molscale.datasets.sources.geom import assign_split

RDLogger.DisableLog("rdApp.*")

SPLIT_NAMES = ("train", "valid")
SPLIT_FRACTIONS = (0.95, 0.05)
DEFAULT_CHUNK_RECORDS = 5000  # -> train shards of about 4,750 molecules


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
        raise InputError(f"{path} lacks column(s) {sorted(missing)}; expected idx, smiles, homolumogap "
                         f"(PCQM4Mv2 data.csv.gz), got {reader.fieldnames}")
    return text, reader


def sdf_records(path: str):
    """The raw text of each SDF record (up to and including its ``$$$$`` line), read as a stream."""
    with _open_binary(path) as f:
        lines = []
        for line in f:
            lines.append(line)
            if line.startswith(b"$$$$"):
                yield b"".join(lines)
                lines = []
        if any(line.strip() for line in lines):
            yield b"".join(lines)  # a last record without its terminator


def add_record(sink, i: int, block: bytes, row: dict | None, seed: int) -> None:
    """Parse one SDF record with its CSV row and write it to its split (or count why not)."""
    rejected, record = sink.rejected, f"pcqm4mv2 {i}"
    if row is None:
        rejected.add(f"sdf record {i}", "sdf record without csv row")
        return
    mol = Chem.MolFromMolBlock(block.decode("utf-8", "replace"), sanitize=False, removeHs=False)
    if mol is None:
        rejected.add(record, "unreadable sdf record")
        return
    try:
        gap = float(row["homolumogap"])
    except (TypeError, ValueError):
        gap = math.nan
    if not math.isfinite(gap):
        rejected.add(record, f"missing homolumogap: {row['homolumogap']!r}")
        return
    if mol.GetNumConformers() == 0:
        rejected.add(record, "no coordinates")
        return
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
    if len(z) == 0:
        rejected.add(record, "no atoms")
        return
    if not np.all(np.isfinite(pos)):
        rejected.add(record, "non-finite coordinate")
        return
    if z.min() < 1 or z.max() > 255:
        rejected.add(record, f"unsupported element: Z={int(z.min())}..{int(z.max())}")
        return
    try:
        bonds = bonds_from_mol(mol)
    except ValueError as err:
        bonds = None
        sink.no_bonds[str(err).split(":")[0].split(" between")[0]] += 1
    split = assign_split(seed, f"pcqm4mv2:{i}", SPLIT_FRACTIONS)
    pos = pos - pos.mean(axis=0, keepdims=True)  # stored CoM-free, float32
    sample = encode_sample(f"pcqm4mv2-{i:07d}", pos, z, {"homolumogap": gap}, bonds, row["smiles"])
    sink.write(split, sample, z, {"homolumogap": gap})


def pcqm_chunk(sink, payload, params: dict) -> None:
    """Worker: every (index, SDF record, CSV row) of one chunk."""
    for i, block, row in payload:
        add_record(sink, i, block, row, params["seed"])


def lockstep_chunks(sdf: str, csv_path: str, chunk_size: int, limit: int | None, rejected, counts: dict):
    """(chunk index, payload, records) from the SDF and CSV read in lockstep; checks idx alignment.

    CSV rows past the end of the SDF have no geometry: counted in ``rejected`` (the driver's own).
    """
    text, rows = _csv_rows(csv_path)
    try:
        chunk, payload = 0, []
        n_sdf = 0
        for i, block in enumerate(sdf_records(sdf)):
            if limit is not None and i >= limit:
                break
            n_sdf += 1
            row = next(rows, None)
            if row is not None:
                counts["csv"] += 1
                try:
                    idx = int(row["idx"])
                except (TypeError, ValueError):
                    raise InputError(f"{csv_path} row {i} has idx {row['idx']!r}, not an integer.") from None
                if idx != i:
                    raise InputError(f"{csv_path} row {i} has idx {idx}; SDF record i must align with CSV "
                                     f"row i of idx i. Are these the matching PCQM4Mv2 files?")
            payload.append((i, block, row))
            if len(payload) == chunk_size:
                yield chunk, payload, len(payload)
                chunk, payload = chunk + 1, []
        if payload:
            yield chunk, payload, len(payload)
        counts["sdf"] = n_sdf
        if limit is None or n_sdf < limit:
            # The SDF is exhausted (or was never longer than the limit): the CSV tail has no geometry.
            for row in rows:
                if limit is not None and counts["csv"] >= limit:
                    break
                rejected.add(f"csv row {row.get('idx')}", "csv row without sdf record")
                counts["csv"] += 1
    finally:
        text.close()


def build_pcqm4mv2(out_url: str, sdf: str, csv_path: str, limit: int | None = None, shard_size: int | None = None,
                   seed: int = 0, workers: int = 1, backend: str = "process",
                   storage_options: dict | None = None, command: str = "", progress: bool = True):
    """PCQM4Mv2 SDF + CSV -> shards + manifest; ``shard_size`` SDF records per chunk, built in parallel by
    ``workers`` processes into one shard per split each; a rerun resumes (datasets/shards/chunked.py)."""
    shard_size = DEFAULT_CHUNK_RECORDS if shard_size is None else shard_size
    if not sdf or not csv_path:
        raise InputError("pcqm4mv2 needs --sdf pcqm4m-v2-train.sdf[.gz] and --csv data.csv.gz.")
    for label, path in (("--sdf", sdf), ("--csv", csv_path)):
        if not os.path.isfile(path):
            raise InputError(f"{label} {path} does not exist.")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit}); leave it out for all molecules.")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1 (got {shard_size}).")
    sdf, csv_path = os.path.abspath(sdf), os.path.abspath(csv_path)
    _csv_rows(csv_path)[0].close()  # a CSV without the needed columns fails before any work
    params = {"source": "pcqm4mv2", "sdf": sdf, "csv": csv_path, "seed": seed, "limit": limit,
              "shard_size": shard_size, "format": FORMAT}
    csv_rejected = Rejections()
    counts = {"sdf": 0, "csv": 0}
    done, merged, finalize = chunked_build(
        out_url, params, storage_options,
        lambda: lockstep_chunks(sdf, csv_path, shard_size, limit, csv_rejected, counts),
        pcqm_chunk, SPLIT_NAMES, workers, progress, "pcqm4mv2 records", backend=backend, unit_total=limit,
        driver_rejected=csv_rejected)
    if done is not None:
        return done

    manifest = chunked_manifest(
        merged, params=params, command=command, atom_vocab=merged["seen_z"],
        source={"name": "pcqm4mv2", "sdf": sdf, "csv": csv_path, "sdf_bytes": os.path.getsize(sdf),
                "csv_bytes": os.path.getsize(csv_path), "version": "v2"},
        properties={"homolumogap": {"unit": "eV"}},
        notes={
            "sdf_records_read": {"total": counts["sdf"], "meaning": "SDF records read"},
            "csv_rows_read": {"total": counts["csv"], "meaning": "CSV rows read"},
            "no_bonds": {"total": sum(merged["no_bonds"].values()), "reasons": dict(merged["no_bonds"]),
                         "meaning": "the SDF has a bond type outside 1/2/3/aromatic; kept without bonds.npy"},
        },
        details={
            "atom_vocab": "sorted atomic numbers seen in this build",
            "split": {"fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS)), "seed": seed,
                      "method": "blake2b(seed:pcqm4mv2:idx) -> uniform [0,1) -> 95/5"},
        })
    finalize(manifest)
    return load_manifest(out_url, storage_options)
