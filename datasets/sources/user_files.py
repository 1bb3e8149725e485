"""Users' own molecules -> shards: ``python -m datasets build sdf|xyz --input FILE [--properties name:unit,...]``.

Records are read by ``molecule_files`` (SDF with its SD tags, multi-frame XYZ with extended-XYZ ``key=value``
comments) and kept as given: coordinates CoM-free, hydrogens as in the file, bonds from the SDF bond table or,
for XYZ, perceived from the coordinates with RDKit (kept without bonds when that fails, and counted). Chosen
fields become properties (``props.json`` and the manifest's train-split statistics, so a model can be trained
on them with ``model.properties``). Rejected and counted, by reason: everything ``molecule_files`` rejects,
a property that is missing or not a finite number, and two atoms closer than ``MIN_ATOM_DISTANCE`` (a damaged
file: RDKit's bond perception would crash on them). Sample key ``{format}-{record index:08d}``. Split
80/10/10 from a seeded hash of the record's canonical SMILES (SDF records that sanitise), else its name, else
its index: records of one molecule (same SMILES, or the same name) land in the same split. Atom vocabulary:
the elements the file holds, in order of atomic number.
"""

from __future__ import annotations

import os

import numpy as np
from rdkit import Chem

from molscale.datasets.errors import InputError
from molscale.datasets.shards.chunked import chunked_build, chunked_manifest
from molscale.datasets.shards.manifest import FORMAT, load_manifest
from molscale.datasets.shards.samples import encode_sample
from molscale.datasets.sources.fields import parse_properties, property_values
from molscale.datasets.sources.geom import SPLIT_FRACTIONS, SPLIT_NAMES, assign_split
from molscale.datasets.sources.molecule_files import file_format, parse_record, split_records

DEFAULT_CHUNK_RECORDS = 1000


def _chunks(raw: list, chunk_records: int, limit: int | None):
    raw = raw[:limit] if limit is not None else raw
    for chunk, first in enumerate(range(0, len(raw), chunk_records)):
        items = raw[first:first + chunk_records]
        yield chunk, (first, items), len(items)


MIN_ATOM_DISTANCE = 0.1  # Angstrom: atoms closer than this are damage (a repeated atom line), not chemistry


def _atoms_on_top(record) -> str | None:
    """Why the record's atoms cannot be a molecule (two closer than MIN_ATOM_DISTANCE), else None. RDKit's bond
    perception crashes the process (not an exception) on atoms at the same place, so this is checked first."""
    from scipy.spatial import cKDTree
    pos = record.conformers[0]
    pairs = cKDTree(pos).query_pairs(MIN_ATOM_DISTANCE, output_type="ndarray")
    if not len(pairs):
        return None
    i, j = (int(a) for a in pairs[0])
    return (f"atoms on top of each other: atoms {i} and {j} are {float(np.linalg.norm(pos[i] - pos[j])):.3f} "
            f"Angstrom apart (at least {MIN_ATOM_DISTANCE} expected)")


def _bonds(record):
    """The record's bonds, or perceived from its coordinates; (bonds or None, how)."""
    if record.bonds is not None:
        return record.bonds, "file"
    from molscale.datasets.chemistry.bonds import perceive_bonds
    try:
        return perceive_bonds(record.z, record.conformers[0])[0], "perceived"
    except ValueError:
        return None, None


def file_chunk(sink, payload, params: dict) -> None:
    """Worker: every record of one chunk."""
    first, items = payload
    specs = [tuple(spec) for spec in params["properties"]]
    for offset, (fmt, raw) in enumerate(items):
        index = first + offset
        sink.notes["records_read"] += 1
        record = parse_record(index, fmt, raw, add_hydrogens=False)
        record_id = f"{params['source']} record {index}" + (f" ({record.name})" if record.name else "")
        if not record.ok:
            sink.rejected.add(record_id, record.reason)
            continue
        values, reason = property_values(record.fields, specs)
        reason = reason or _atoms_on_top(record)
        if reason:
            sink.rejected.add(record_id, reason)
            continue
        bonds, how = _bonds(record)
        if bonds is None:
            sink.no_bonds["bond perception failed"] += 1
        else:
            sink.notes[f"bonds_{how}"] += 1
        split = assign_split(params["seed"], record.smiles or record.name or f"record-{index}")
        sample = encode_sample(f"{params['source']}-{index:08d}", record.conformers[0], record.z, values,
                               bonds, record.smiles or None)
        sink.write(split, sample, record.z, values)


def build_molecule_file(out_url: str, fmt: str, path: str, properties: str | None = None, limit: int | None = None,
                        shard_size: int | None = None, seed: int = 0, workers: int = 1, backend: str = "process",
                        storage_options: dict | None = None, command: str = "", progress: bool = True):
    """An SDF or XYZ file -> shards + manifest (chunks of ``shard_size`` records, one shard per split each)."""
    shard_size = DEFAULT_CHUNK_RECORDS if shard_size is None else shard_size
    if not path:
        raise InputError(f"{fmt} needs --input FILE (a .{fmt} file, optionally .gz)")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit}); leave it out for all records.")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1 (got {shard_size}).")
    found = file_format(path)
    if found != fmt:
        raise InputError(f"--input {path} is a {found} file by its name; `build {fmt}` reads .{fmt} files")
    specs = parse_properties(properties)
    path = os.path.abspath(path)
    raw = split_records(path, fmt)
    if not raw:
        raise InputError(f"--input {path} holds no molecules")
    params = {"source": fmt, "input": path, "properties": [list(s) for s in specs],
              "seed": seed, "limit": limit, "shard_size": shard_size, "format": FORMAT,
              "rdkit": Chem.rdBase.rdkitVersion}
    done, merged, finalize = chunked_build(out_url, params, storage_options, lambda: _chunks(raw, shard_size, limit),
                                           file_chunk, SPLIT_NAMES, workers, progress, f"{fmt} -> shards",
                                           backend=backend, unit_total=min(len(raw), limit or len(raw)))
    if done is not None:
        return done
    if not merged["seen_z"]:
        raise InputError(f"--input {path}: none of its records could be used ({merged['rejected']['reasons']}); "
                         f"nothing was written")
    notes = merged["notes"]
    manifest = chunked_manifest(
        merged, params=params, command=command, atom_vocab=merged["seen_z"],
        source={"name": fmt, "input": path},
        properties={name: {"unit": unit} for name, unit in specs},
        notes={
            "records_read": {"total": notes["records_read"], "meaning": f"records read from the {fmt} file"},
            "bonds_file": {"total": notes["bonds_file"], "meaning": "bonds from the file's bond table"},
            "bonds_perceived": {"total": notes["bonds_perceived"],
                                "meaning": "bonds perceived from the coordinates (RDKit)"},
            "no_bonds": {"total": sum(merged["no_bonds"].values()),
                         "meaning": "records kept without bonds.npy (bond perception failed)"},
        },
        details={"split": {"by": "canonical SMILES, else name, else record index",
                           "fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS)), "seed": seed,
                           "method": "blake2b(seed:key) -> uniform [0,1) -> 80/10/10"},
                 "hydrogens": "as in the file", "coordinates": "Angstrom, centre of mass at the origin"})
    finalize(manifest)
    return load_manifest(out_url, storage_options)
