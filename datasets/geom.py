"""GEOM-Drugs -> shards: the K lowest-energy conformers of every molecule (EDM/UniGEM protocol).

Two source layouts (FACTS.md, GEOM-Drugs):

* ``drugs_crude.msgpack``: a msgpack stream of dicts ``smiles -> {"conformers": [{"totalenergy": E,
  "xyz": [[Z, x, y, z], ...]}, ...], ...}``. Read object by object with ``msgpack.Unpacker``, so memory
  stays bounded by one batch of molecules. No bonds (the SMILES atom order is not the xyz order); the
  SMILES is only checked with RDKit and an unparsable one is counted in ``notes.unparsable_smiles``
  (the coordinates are kept).
* an ``rdkit_folder``: ``summary_drugs.json`` (smiles -> {"pickle_path": ...}) plus one pickle per
  molecule holding ``{"conformers": [{"rd_mol": Mol, "totalenergy": E}, ...]}``. Bonds come from the
  RDKit molecule. Unpickling runs arbitrary code, so it needs ``trust_pickle=True`` (--trust-pickle).

Each sample: key ``geom-{molecule index:07d}-{rank:02d}`` (molecule index = position in source order,
rejected molecules included, so keys do not move with --limit or with rejections; rank = 0 for the
lowest energy), positions CoM-free float32, ``props.json`` ``{"totalenergy": E (Hartree), "energy_rank": r}``,
``smiles.txt``, ``bonds.npy`` when the source has an RDKit molecule.

Split 80/10/10 at random by molecule (default: no molecule in two splits) or by conformer (the EDM
protocol, kept for comparability), from a seeded hash of the SMILES (and rank), so a molecule's split
does not depend on --limit or on the order of the source. Samples are written as they are read (memory
bounded); shards hold molecules in source order, the loader's shard-order shuffle and shuffle buffer
mix them. Rejected records: molecule-level reasons count molecules, conformer-level reasons count
conformers (``notes.rejected_units`` says which is which). Single process (no --workers parallelism).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import pickle
from array import array
from collections import Counter

import numpy as np
from rdkit import Chem, RDLogger

from .bonds import bonds_from_mol
from .build import Rejections, finish_splits, start_build
from .elements import GEOM_ATOM_VOCAB, Z_TO_SYMBOL
from .manifest import FORMAT, load_manifest, mean_mad, save_manifest
from .samples import encode_sample
from .writer import SplitShardWriter

RDLogger.DisableLog("rdApp.*")
log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_CONFORMERS = 30
SUMMARY_NAME = "summary_drugs.json"
_GEOM_Z = frozenset(GEOM_ATOM_VOCAB)
REJECTED_UNITS = {
    "molecule": ["unsupported element", "no conformers", "unreadable molecule", "missing pickle",
                 "unreadable pickle"],
    "conformer": ["non-finite coordinate", "non-finite energy", "unreadable conformer"],
}


def split_fraction(seed: int, key: str) -> float:
    """A deterministic uniform number in [0, 1) from ``seed`` and ``key`` (independent of order)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def assign_split(seed: int, key: str, fractions=SPLIT_FRACTIONS) -> int:
    u = split_fraction(seed, key)
    edge = 0.0
    for index, fraction in enumerate(fractions):
        edge += fraction
        if u < edge:
            return index
    return len(fractions) - 1


# --- readers: each yields (smiles, conformer list or exception); a conformer is a dict -----------------

def iter_msgpack(path: str):
    """(smiles, molecule dict) from a msgpack stream, one top-level object at a time."""
    import msgpack
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=(1 << 31) - 1)
        for batch in unpacker:
            if not isinstance(batch, dict):
                raise SystemExit(f"error: {path} is not a GEOM msgpack stream: a top-level object is a "
                                 f"{type(batch).__name__}, expected a dict smiles -> molecule")
            yield from batch.items()


def iter_rdkit_folder(folder: str, summary_path: str, trust_pickle: bool):
    """(smiles, molecule dict or the exception that made it unreadable) for each summary entry."""
    if not trust_pickle:
        raise SystemExit(f"error: {folder} is a GEOM rdkit_folder: its molecules are Python pickles, and "
                         f"loading a pickle can execute arbitrary code. Pass --trust-pickle only if you "
                         f"trust where the files came from, or build from drugs_crude.msgpack instead.")
    with open(summary_path, "rb") as f:
        summary = json.load(f)
    for smiles, entry in summary.items():
        rel = entry.get("pickle_path") if isinstance(entry, dict) else None
        if not rel:
            yield smiles, KeyError("missing pickle: no pickle_path in the summary")
            continue
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            yield smiles, FileNotFoundError(f"missing pickle: {rel}")
            continue
        try:
            with open(path, "rb") as f:
                yield smiles, pickle.load(f)  # opt-in above (trust_pickle)
        except Exception as err:  # noqa: BLE001 -- a broken pickle raises about anything
            yield smiles, ValueError(f"unreadable pickle: {rel}: {type(err).__name__}: {err}")


def _conformer_arrays(conf: dict):
    """(z int array, pos float64 [N,3], bonds or None, bond problem or None) of one conformer."""
    mol = conf.get("rd_mol")
    if mol is not None:
        z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
        try:
            return z, pos, bonds_from_mol(mol), None
        except ValueError as err:
            return z, pos, None, str(err)
    xyz = np.asarray(conf["xyz"], dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 4 or len(xyz) == 0:
        raise ValueError(f"unreadable conformer: xyz has shape {xyz.shape}, expected [N, 4]")
    z_float = xyz[:, 0]
    if not np.all(np.isfinite(z_float)) or np.any(z_float != np.round(z_float)):
        raise ValueError("unreadable conformer: atomic numbers are not integers")
    return z_float.astype(np.int64), xyz[:, 1:], None, None


def build_geom(out_url: str, source: str, conformers: int = DEFAULT_CONFORMERS, split_by: str = "molecule",
               trust_pickle: bool = False, limit: int | None = None, shard_size: int = 1000, seed: int = 0,
               workers: int = 1, storage_options: dict | None = None, command: str = "",
               progress: bool = True):
    """GEOM-Drugs (msgpack stream or rdkit_folder at ``source``) -> shards + manifest at ``out_url``.

    ``workers`` is accepted for a uniform command line but unused: the build is one process.
    """
    if not source:
        raise SystemExit("error: geom needs --source PATH (drugs_crude.msgpack or an rdkit_folder).")
    if conformers < 1:
        raise SystemExit(f"error: --conformers must be at least 1 (got {conformers}).")
    if split_by not in ("molecule", "conformer"):
        raise SystemExit(f"error: --split-by must be molecule or conformer (got {split_by!r}).")
    if limit is not None and limit < 1:
        raise SystemExit(f"error: --limit must be at least 1 (got {limit}); leave it out for all molecules.")
    if shard_size < 1:
        raise SystemExit(f"error: --shard-size must be at least 1 (got {shard_size}).")
    source = os.path.abspath(source)
    if os.path.isdir(source):
        layout, summary_path = "rdkit_folder", os.path.join(source, SUMMARY_NAME)
        if not os.path.exists(summary_path):
            raise SystemExit(f"error: {source} is a folder without {SUMMARY_NAME}; pass the rdkit_folder "
                             f"(holding {SUMMARY_NAME} and drugs/) or drugs_crude.msgpack.")
    elif os.path.isfile(source):
        layout, summary_path = "msgpack", None
    else:
        raise SystemExit(f"error: --source {source} does not exist.")
    if layout == "rdkit_folder" and not trust_pickle:
        list(iter_rdkit_folder(source, summary_path, trust_pickle))  # raises the explanation

    params = {"source": "geom", "path": source, "layout": layout, "conformers": conformers,
              "split_by": split_by, "seed": seed, "limit": limit, "shard_size": shard_size, "format": FORMAT}
    done, fs, out_path = start_build(out_url, params, storage_options)
    if done is not None:
        return done

    molecules = iter_msgpack(source) if layout == "msgpack" else \
        iter_rdkit_folder(source, summary_path, trust_pickle)
    rejected = Rejections()
    notes = Counter()
    no_bonds = Counter()
    train_energy = array("d")
    writers = {name: SplitShardWriter(fs, out_path, name, shard_size) for name in SPLIT_NAMES}
    n_molecules = 0
    try:
        from tqdm import tqdm
        bar = tqdm(desc="reading geom", unit="mol", total=limit, disable=not progress)
        for index, (smiles, mol_data) in enumerate(molecules):
            if limit is not None and index >= limit:
                break
            n_molecules += 1
            bar.update()
            record = f"geom molecule {index} ({smiles})"
            if isinstance(mol_data, Exception):
                reason = str(mol_data).strip("'\"")
                rejected.add(record, reason if ":" in reason else f"unreadable molecule: {reason}")
                continue
            confs = mol_data.get("conformers") if isinstance(mol_data, dict) else None
            if not confs:
                rejected.add(record, "no conformers")
                continue
            # Read every conformer, rejecting broken ones, then keep the K lowest energies.
            candidates = []
            unsupported = None
            for c, conf in enumerate(confs):
                where = f"{record} conformer {c}"
                try:
                    energy = float(conf["totalenergy"])
                    z, pos, bonds, bond_problem = _conformer_arrays(conf)
                except (KeyError, TypeError, ValueError) as err:
                    msg = str(err)
                    rejected.add(where, msg if msg.startswith("unreadable conformer") else
                                 f"unreadable conformer: {type(err).__name__}: {msg}")
                    continue
                bad = sorted(set(z.tolist()) - _GEOM_Z)
                if bad:
                    unsupported = bad
                    break
                if not math.isfinite(energy):
                    rejected.add(where, f"non-finite energy: {energy}")
                    continue
                if not np.all(np.isfinite(pos)):
                    rejected.add(where, "non-finite coordinate")
                    continue
                candidates.append((energy, c, z, pos, bonds, bond_problem))
            if unsupported is not None:
                names = ", ".join(Z_TO_SYMBOL.get(a, f"Z={a}") for a in unsupported)
                rejected.add(record, f"unsupported element: {names}")
                continue
            if not candidates:
                rejected.add(record, "no conformers: none readable")
                continue
            candidates.sort(key=lambda t: (t[0], t[1]))
            notes["conformers_beyond_k"] += max(0, len(candidates) - conformers)
            if layout == "msgpack" and Chem.MolFromSmiles(smiles) is None:
                notes["unparsable_smiles"] += 1
            molecule_split = assign_split(seed, smiles)
            for rank, (energy, _, z, pos, bonds, bond_problem) in enumerate(candidates[:conformers]):
                split = molecule_split if split_by == "molecule" else assign_split(seed, f"{smiles}#{rank}")
                if bond_problem is not None:
                    no_bonds[bond_problem.split(":")[0]] += 1
                pos = pos - pos.mean(axis=0, keepdims=True)  # stored CoM-free, float32
                sample = encode_sample(f"geom-{index:07d}-{rank:02d}", pos, z,
                                       {"totalenergy": energy, "energy_rank": rank}, bonds, smiles)
                writers[SPLIT_NAMES[split]].write(sample, len(z))
                if split == 0:
                    train_energy.append(energy)
        bar.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise

    splits = finish_splits(writers)
    manifest = {
        "format": FORMAT,
        "source": {"name": "geom-drugs", "layout": layout, "path": source,
                   "bytes": os.path.getsize(summary_path or source)},
        "build": params,
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "atom_vocab": list(GEOM_ATOM_VOCAB),
        "properties": {"totalenergy": {"unit": "Hartree"}},
        "property_stats": {"totalenergy": mean_mad(train_energy)} if len(train_energy) else {},
        "splits": splits,
        "rejected": rejected.as_dict(),
        # every notes entry is {total, meaning} (what `inspect` prints); other details go to "details"
        "notes": {
            "molecules_read": {"total": n_molecules, "meaning": "molecule records read from the source"},
            "conformers_beyond_k": {"total": notes["conformers_beyond_k"],
                                    "meaning": f"valid conformers past the {conformers} lowest energies; "
                                               f"not kept (protocol)"},
            "unparsable_smiles": {"total": notes["unparsable_smiles"],
                                  "meaning": "RDKit could not parse the SMILES; coordinates kept (msgpack "
                                             "has no bonds either way)"},
            "no_bonds": {"total": sum(no_bonds.values()), "reasons": dict(no_bonds),
                         "meaning": "the RDKit molecule has a bond type outside 1/2/3/aromatic; kept "
                                    "without bonds.npy"},
        },
        "details": {
            "conformers_per_molecule": conformers,
            "split": {"by": split_by, "fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS)), "seed": seed,
                      "method": "blake2b(seed:smiles[#rank]) -> uniform [0,1) -> 80/10/10"},
            "rejected_units": REJECTED_UNITS,
            "props": {"totalenergy": "Hartree (GEOM xtb total energy)",
                      "energy_rank": "0 = lowest energy among the molecule's kept conformers"},
        },
    }
    save_manifest(fs, out_path, manifest)
    return load_manifest(out_url, storage_options)
