"""GEOM-Drugs -> shards: the K lowest-energy conformers of every molecule (EDM/UniGEM protocol).

Two source layouts (GEOM, Axelrod and Gomez-Bombarelli 2022; docs/data.md):

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

Split 80/10/10 at random by molecule (default: no molecule in two splits) or by conformer, from a seeded hash
of the SMILES (and rank), so a molecule's split does not depend on --limit or on the order of the source.
The published EDM/UniGEM tables split by conformer with EDM's own permutation file (``geom_permutation.npy``,
drawn once without a seed and shipped with EDM's code): ``--edm-permutation FILE`` reproduces that split
(see ``edm_splits``). The driver cuts the source into chunks of
--shard-size molecules (msgpack: whole top-level objects, located without decoding them); worker processes
build each chunk into one shard per split, and a rerun resumes a killed build (datasets/shards/chunked.py).
Shards hold molecules in source order. A molecule's conformers are spread over ``interleave`` shards per split
and chunk (energy rank r into shard r mod G), so that the loader's shard-order shuffle separates them: a
shuffle buffer of a few thousand samples cannot, and a batch would hold several conformers of one molecule.
Rejected records: molecule-level reasons count molecules, conformer-level reasons count conformers
(``notes.rejected_units`` says which is which).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle

import numpy as np
from rdkit import Chem, RDLogger

from molscale.datasets.chemistry.bonds import bonds_from_mol
from molscale.datasets.chemistry.elements import GEOM_ATOM_VOCAB, Z_TO_SYMBOL
from molscale.datasets.errors import InputError
from molscale.datasets.shards.chunked import chunked_build, chunked_manifest
from molscale.datasets.shards.manifest import FORMAT, load_manifest
from molscale.datasets.shards.samples import encode_sample

RDLogger.DisableLog("rdApp.*")
log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_CONFORMERS = 30
DEFAULT_CHUNK_MOLECULES = 100  # x up to 30 conformers: shards of about 2,400 train conformers
SUMMARY_NAME = "summary_drugs.json"
_GEOM_Z = frozenset(GEOM_ATOM_VOCAB)
# EDM's conformer split (its build_geom_dataset.py, load_split_data): positions perm[:int(0.1 n)] are validation,
# the next int(0.1 n) test, the rest train
EDM_SPLIT_FRACTION = 0.1
REJECTED_UNITS = {
    "molecule": ["unsupported element", "no conformers", "unreadable molecule", "missing pickle",
                 "unreadable pickle"],
    "conformer": ["non-finite coordinate", "non-finite energy", "unreadable conformer"],
}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# --- chunking (driver) and reading (worker) -----------------------------------------------------------

def _conformer_count(unpacker) -> int:
    """Read one molecule record (a dict) off ``unpacker`` and return the length of its "conformers" list,
    skipping the conformers themselves (0 for a record that is not a dict or has no list)."""
    import msgpack
    try:
        fields = unpacker.read_map_header()
    except (ValueError, msgpack.UnpackValueError):
        unpacker.skip()
        return 0
    count = 0
    for _ in range(fields):
        key = unpacker.unpack()
        if key != "conformers":
            unpacker.skip()
            continue
        try:
            count = unpacker.read_array_header()
        except (ValueError, msgpack.UnpackValueError):
            unpacker.skip()
            continue
        for _ in range(count):
            unpacker.skip()
    return count


def msgpack_chunks(path: str, chunk_molecules: int, limit: int | None, keep: int | None = None):
    """(chunk index, payload, molecules) over a msgpack stream, reading only headers in the driver.

    Each top-level object (a dict smiles -> molecule) is skipped over with ``Unpacker.skip`` to learn its
    byte range and entry count, so the driver never decodes conformers; a worker decodes its byte ranges.
    A chunk is a run of whole top-level objects holding at least ``chunk_molecules`` molecules. With ``keep``
    (EDM split) the driver also counts each molecule's conformers, min(keep, len(conformers)) as EDM's list
    holds them, and the payload carries the EDM index of the chunk's first conformer.
    """
    import msgpack
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=(1 << 31) - 1)
        chunk, first, ranges, count, total = 0, 0, [], 0, 0
        conformers, chunk_first_conformer = 0, 0
        while limit is None or total < limit:
            offset = unpacker.tell()
            try:
                entries = unpacker.read_map_header()
            except msgpack.OutOfData:
                break
            except ValueError:
                raise InputError(f"{path} is not a GEOM msgpack stream: the top-level object at byte "
                                 f"{offset} is not a dict smiles -> molecule") from None
            take = entries if limit is None else min(entries, limit - total)
            for entry in range(entries):
                unpacker.skip()  # the SMILES
                if keep is not None and entry < take:
                    conformers += min(keep, _conformer_count(unpacker))
                else:
                    unpacker.skip()
            ranges.append((offset, unpacker.tell(), take))
            count += take
            total += take
            if count >= chunk_molecules:
                yield chunk, ("msgpack", path, first, ranges, chunk_first_conformer), count
                chunk, first, ranges, count = chunk + 1, first + count, [], 0
                chunk_first_conformer = conformers
        if ranges:
            yield chunk, ("msgpack", path, first, ranges, chunk_first_conformer), count


def edm_conformer_count(path: str, keep: int) -> int:
    """Length of EDM's conformer list for the whole msgpack stream: every molecule, min(keep, its conformers)."""
    import msgpack
    count = 0
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=(1 << 31) - 1)
        while True:
            offset = unpacker.tell()
            try:
                entries = unpacker.read_map_header()
            except msgpack.OutOfData:
                return count
            except ValueError:
                raise InputError(f"{path} is not a GEOM msgpack stream: the top-level object at byte "
                                 f"{offset} is not a dict smiles -> molecule") from None
            for _ in range(entries):
                unpacker.skip()
                count += min(keep, _conformer_count(unpacker))


_EDM_SPLITS: dict = {}  # (path, size, mtime) -> split index per EDM conformer index, once per process


def edm_splits(permutation_path: str, conformers: int) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of every position of EDM's conformer list, from EDM's permutation
    file: perm[:int(0.1 n)] valid, the next int(0.1 n) test, the rest train (EDM's build_geom_dataset.py,
    load_split_data). Raises InputError unless the file is a permutation of exactly ``conformers`` indices."""
    stat = os.stat(permutation_path)
    key = (permutation_path, stat.st_size, stat.st_mtime_ns)
    if key in _EDM_SPLITS:
        return _EDM_SPLITS[key]
    try:
        perm = np.load(permutation_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"--edm-permutation {permutation_path}: not a numpy .npy file ({err})") from None
    if not isinstance(perm, np.ndarray):  # an .npz archive
        raise InputError(f"--edm-permutation {permutation_path}: not a numpy .npy file (an .npz archive)")
    n = len(perm) if perm.ndim == 1 else -1
    if n != conformers:
        raise InputError(f"--edm-permutation {permutation_path} holds {n if n >= 0 else perm.shape} indices, but "
                         f"EDM's conformer list of this source has {conformers} (every molecule of the whole file, "
                         f"--limit or not, with its lowest-energy conformers, up to --conformers each); use the "
                         f"permutation made for this file, with the same --conformers")
    if not np.issubdtype(perm.dtype, np.integer) or not np.array_equal(np.sort(perm), np.arange(n)):
        raise InputError(f"--edm-permutation {permutation_path} is not a permutation of 0..{n - 1}")
    val_end = int(n * EDM_SPLIT_FRACTION)
    test_end = val_end + int(n * EDM_SPLIT_FRACTION)
    split = np.zeros(n, dtype=np.uint8)  # train
    split[perm[:val_end]] = SPLIT_NAMES.index("valid")
    split[perm[val_end:test_end]] = SPLIT_NAMES.index("test")
    _EDM_SPLITS.clear()
    _EDM_SPLITS[key] = split
    return split


def folder_chunks(folder: str, summary_path: str, chunk_molecules: int, limit: int | None):
    """(chunk index, payload, molecules) over the summary of an rdkit_folder; workers load the pickles."""
    with open(summary_path, "rb") as f:
        summary = json.load(f)
    entries = list(summary.items())[:limit]
    for chunk, first in enumerate(range(0, len(entries), chunk_molecules)):
        items = [(smiles, entry.get("pickle_path") if isinstance(entry, dict) else None)
                 for smiles, entry in entries[first:first + chunk_molecules]]
        yield chunk, ("rdkit_folder", folder, first, items), len(items)


def read_chunk(payload):
    """(molecule index, smiles, molecule dict or the exception that made it unreadable) of a chunk."""
    layout, source, first, items = payload[:4]
    index = first
    if layout == "msgpack":
        import msgpack
        with open(source, "rb") as f:
            for offset, end, take in items:
                f.seek(offset)
                batch = msgpack.unpackb(f.read(end - offset), raw=False, strict_map_key=False)
                for smiles, mol_data in list(batch.items())[:take]:
                    yield index, smiles, mol_data
                    index += 1
        return
    for smiles, rel in items:
        yield index, smiles, _load_pickle(source, rel)
        index += 1


def _load_pickle(folder: str, rel: str | None):
    if not rel:
        return KeyError("missing pickle: no pickle_path in the summary")
    path = os.path.join(folder, rel)
    if not os.path.exists(path):
        return FileNotFoundError(f"missing pickle: {rel}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # the driver checked --trust-pickle
    except Exception as err:  # noqa: BLE001 -- a broken pickle raises about anything
        return ValueError(f"unreadable pickle: {rel}: {type(err).__name__}: {err}")


PICKLE_WARNING = ("is a GEOM rdkit_folder: its molecules are Python pickles, and loading a pickle can execute "
                  "arbitrary code. Pass --trust-pickle only if you trust where the files came from, or build "
                  "from drugs_crude.msgpack instead.")


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


def _edm_energy_key(conf) -> tuple:
    """Sort key of a conformer in EDM's numpy argsort of the energies: -inf first, +inf after the finite ones,
    NaN last (an unreadable energy, on which EDM would fail, with the NaNs)."""
    try:
        energy = float(conf["totalenergy"])
    except (KeyError, TypeError, ValueError):
        return (1, 0.0)
    return (1, 0.0) if math.isnan(energy) else (0, energy)


def add_molecule(sink, index: int, smiles: str, mol_data, params: dict, edm_first: int | None = None) -> None:
    """Check one molecule, keep its K lowest-energy conformers and write them to their split. ``edm_first``:
    the EDM-list index of this molecule's first conformer (EDM split), else None."""
    rejected, record = sink.rejected, f"geom molecule {index} ({smiles})"
    if isinstance(mol_data, Exception):
        reason = str(mol_data).strip("'\"")
        rejected.add(record, reason if ":" in reason else f"unreadable molecule: {reason}")
        return
    confs = mol_data.get("conformers") if isinstance(mol_data, dict) else None
    if not confs:
        rejected.add(record, "no conformers")
        return
    # Read every conformer, rejecting broken ones, then keep the K lowest energies.
    candidates = []
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
            names = ", ".join(Z_TO_SYMBOL.get(a, f"Z={a}") for a in bad)
            rejected.add(record, f"unsupported element: {names}")
            return
        if not math.isfinite(energy):
            rejected.add(where, f"non-finite energy: {energy}")
            continue
        if not np.all(np.isfinite(pos)):
            rejected.add(where, "non-finite coordinate")
            continue
        candidates.append((energy, c, z, pos, bonds, bond_problem))
    if not candidates:
        rejected.add(record, "no conformers: none readable")
        return
    candidates.sort(key=lambda t: (t[0], t[1]))
    keep = params["conformers"]
    sink.notes["conformers_beyond_k"] += max(0, len(candidates) - keep)
    if params["layout"] == "msgpack" and Chem.MolFromSmiles(smiles) is None:
        sink.notes["unparsable_smiles"] += 1
    molecule_split = assign_split(params["seed"], smiles)
    if edm_first is not None:
        # EDM's list holds the K lowest energies of all the molecule's conformers; the ones rejected here leave
        # their positions empty rather than letting the next conformer take them. Equal energies: a stable sort
        # here, numpy's default (unstable) argsort in EDM, which may order a tie otherwise
        energies = [_edm_energy_key(conf) for conf in confs]
        edm_position = {c: p for p, c in enumerate(sorted(range(len(confs)), key=lambda c: (energies[c], c))[:keep])}
        kept = [cand for cand in candidates if cand[1] in edm_position]
        sink.notes["conformers_not_in_edm_list"] += len(candidates[:keep]) - len(kept)
        edm_split = edm_splits(params["edm_permutation"], params["edm_conformers"])
    else:
        kept = candidates[:keep]
    for rank, (energy, c, z, pos, bonds, bond_problem) in enumerate(kept):
        if edm_first is not None:
            split = int(edm_split[edm_first + edm_position[c]])
        elif params["split_by"] == "molecule":
            split = molecule_split
        else:
            split = assign_split(params["seed"], f"{smiles}#{rank}")
        if bond_problem is not None:
            sink.no_bonds[bond_problem.split(":")[0]] += 1
        pos = pos - pos.mean(axis=0, keepdims=True)  # stored CoM-free, float32
        sample = encode_sample(f"geom-{index:07d}-{rank:02d}", pos, z,
                               {"totalenergy": energy, "energy_rank": rank}, bonds, smiles)
        sink.write(split, sample, z, {"totalenergy": energy}, group=rank % params["interleave"])


def geom_chunk(sink, payload, params: dict) -> None:
    """Worker: every molecule of one chunk."""
    edm_next = payload[4] if params.get("edm_permutation") else None  # EDM index of the next molecule's conformers
    for index, smiles, mol_data in read_chunk(payload):
        sink.notes["molecules_read"] += 1
        add_molecule(sink, index, smiles, mol_data, params, edm_next)
        if edm_next is not None:  # the driver's count: every molecule, readable or not
            confs = mol_data.get("conformers") if isinstance(mol_data, dict) else None
            edm_next += min(params["conformers"], len(confs) if isinstance(confs, list) else 0)


def build_geom(out_url: str, source: str, conformers: int = DEFAULT_CONFORMERS, split_by: str = "molecule",
               trust_pickle: bool = False, limit: int | None = None, shard_size: int | None = None, seed: int = 0,
               workers: int = 1, backend: str = "process", storage_options: dict | None = None,
               command: str = "", progress: bool = True, edm_permutation: str | None = None,
               interleave: int | None = None):
    """GEOM-Drugs (msgpack stream or rdkit_folder at ``source``) -> shards + manifest at ``out_url``.

    ``shard_size``: molecules per shard group (default DEFAULT_CHUNK_MOLECULES); a chunk of ``interleave`` x
    ``shard_size`` molecules is built by one of ``workers`` processes into ``interleave`` shards per split, a
    conformer of energy rank r going to shard r mod ``interleave`` (default: ``conformers``, so no shard holds
    two conformers of one molecule; 1: one shard per split and chunk). A rerun resumes (datasets/shards/chunked.py).
    ``edm_permutation``: EDM's geom_permutation.npy, to split by conformer exactly as EDM (``edm_splits``).
    """
    shard_size = DEFAULT_CHUNK_MOLECULES if shard_size is None else shard_size
    interleave = conformers if interleave is None else interleave
    if interleave < 1:
        raise InputError(f"--interleave must be at least 1 (got {interleave}).")
    if not source:
        raise InputError("geom needs --source PATH (drugs_crude.msgpack or an rdkit_folder).")
    if conformers < 1:
        raise InputError(f"--conformers must be at least 1 (got {conformers}).")
    if split_by not in ("molecule", "conformer"):
        raise InputError(f"--split-by must be molecule or conformer (got {split_by!r}).")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit}); leave it out for all molecules.")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1 (got {shard_size}).")
    source = os.path.abspath(source)
    if os.path.isdir(source):
        layout, summary_path = "rdkit_folder", os.path.join(source, SUMMARY_NAME)
        if not os.path.exists(summary_path):
            raise InputError(f"{source} is a folder without {SUMMARY_NAME}; pass the rdkit_folder "
                             f"(holding {SUMMARY_NAME} and drugs/) or drugs_crude.msgpack.")
        if not trust_pickle:
            raise InputError(f"{source} {PICKLE_WARNING}")
    elif os.path.isfile(source):
        layout, summary_path = "msgpack", None
    else:
        raise InputError(f"--source {source} does not exist.")

    edm = None
    if edm_permutation is not None:
        if split_by != "conformer" or layout != "msgpack":
            raise InputError("--edm-permutation reproduces EDM's split of drugs_crude.msgpack by conformer: use it "
                             "with --split-by conformer and the msgpack source")
        edm_permutation = os.path.abspath(edm_permutation)
        if not os.path.isfile(edm_permutation):
            raise InputError(f"--edm-permutation {edm_permutation} does not exist")
        # checked before anything is built: the file must match this source's whole conformer list
        edm = {"file": edm_permutation, "sha256": _sha256(edm_permutation),
               "conformers": edm_conformer_count(source, conformers)}
        edm_splits(edm_permutation, edm["conformers"])
    elif split_by == "conformer":
        log.warning("--split-by conformer without --edm-permutation: a seeded split of this project, not the one "
                    "of the published GEOM tables; pass EDM's geom_permutation.npy to reproduce those")

    params = {"source": "geom", "path": source, "layout": layout, "conformers": conformers,
              "split_by": split_by, "seed": seed, "limit": limit, "shard_size": shard_size, "format": FORMAT,
              "interleave": interleave, "edm_permutation": edm and edm["file"],
              "edm_permutation_sha256": edm and edm["sha256"], "edm_conformers": edm and edm["conformers"]}
    chunk_molecules = shard_size * interleave
    chunks = (lambda: msgpack_chunks(source, chunk_molecules, limit, conformers if edm else None)) \
        if layout == "msgpack" else (lambda: folder_chunks(source, summary_path, chunk_molecules, limit))
    done, merged, finalize = chunked_build(out_url, params, storage_options, chunks, geom_chunk, SPLIT_NAMES,
                                           workers, progress, "geom molecules", backend=backend,
                                           unit_total=limit, groups=interleave)
    if done is not None:
        return done

    notes = merged["notes"]
    edm_note = {"conformers_not_in_edm_list": {
        "total": notes["conformers_not_in_edm_list"],
        "meaning": "valid conformers among the K lowest energies here but not in EDM's list (EDM's K lowest "
                   "included conformers rejected here); not kept, so every kept conformer has EDM's split"}} \
        if edm else {}
    manifest = chunked_manifest(
        merged, params=params, command=command, atom_vocab=GEOM_ATOM_VOCAB,
        source={"name": "geom-drugs", "layout": layout, "path": source,
                "bytes": os.path.getsize(summary_path or source)},
        properties={"totalenergy": {"unit": "Hartree"}},
        notes={
            "molecules_read": {"total": notes["molecules_read"], "meaning": "molecule records read from the source"},
            "conformers_beyond_k": {"total": notes["conformers_beyond_k"],
                                    "meaning": f"valid conformers past the {conformers} lowest energies; "
                                               f"not kept (protocol)"},
            "unparsable_smiles": {"total": notes["unparsable_smiles"],
                                  "meaning": "RDKit could not parse the SMILES; coordinates kept (msgpack "
                                             "has no bonds either way)"},
            "no_bonds": {"total": sum(merged["no_bonds"].values()), "reasons": dict(merged["no_bonds"]),
                         "meaning": "the RDKit molecule has a bond type outside 1/2/3/aromatic; kept "
                                    "without bonds.npy"},
            **edm_note,
        },
        details={
            "conformers_per_molecule": conformers,
            "split": {"by": split_by, "fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS)), "seed": seed,
                      "method": "blake2b(seed:smiles[#rank]) -> uniform [0,1) -> 80/10/10"} if edm is None else
                     {"by": "conformer", "method": "EDM permutation file: perm[:int(0.1 n)] valid, the next "
                                                   "int(0.1 n) test, the rest train",
                      "edm_permutation": edm["file"], "sha256": edm["sha256"], "edm_conformers": edm["conformers"]},
            "interleave": {"shards_per_split_and_chunk": interleave,
                           "rule": "a conformer of energy rank r goes to shard r mod interleave of its chunk"},
            "rejected_units": REJECTED_UNITS,
            "props": {"totalenergy": "Hartree (GEOM xtb total energy)",
                      "energy_rank": "0 = lowest energy among the molecule's kept conformers"},
        })
    finalize(manifest)
    return load_manifest(out_url, storage_options)
