"""Users' molecule files -> records of atomic numbers and 3D conformers: SDF, (multi-frame) XYZ or SMILES.

Reading is two steps, so that a large file fans out: ``split_records(path)`` cuts the file into raw records on
the caller's side (cheap text work, one record per molecule, in file order), and ``parse_record`` turns one raw
record into a ``MoleculeRecord`` wherever it runs (RDKit parsing, ETKDG embedding for SMILES). A record that
cannot be used is not dropped: it comes back with ``reason`` set, and its index and name still there.

Formats, by file extension (``.gz`` allowed after it):
- ``.sdf`` / ``.sd`` / ``.mol``: every record needs 3D coordinates; in a record with bonds and no hydrogen
  atoms, the implicit hydrogens are placed by RDKit (``add_hydrogens``) and ``note`` says so. Name: the title.
- ``.xyz``: frames of ``N`` / comment / ``N`` lines ``symbol x y z`` (Angstrom). Name: the comment line.
- ``.smi`` / ``.txt`` / ``.csv``: as ``python -m datasets build smiles`` reads them (one SMILES per line with an
  optional name after it, or a CSV with a ``smiles`` column and optionally a ``name`` or ``id`` column). Each
  SMILES gets K ETKDGv3 conformers, MMFF-optimised, as that builder embeds them.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field

import numpy as np
from rdkit import Chem, RDLogger

from molscale.datasets.chemistry.elements import SYMBOL_TO_Z, Z_TO_SYMBOL
from molscale.datasets.errors import InputError

RDLogger.DisableLog("rdApp.*")

FORMATS = {".sdf": "sdf", ".sd": "sdf", ".mol": "sdf", ".xyz": "xyz", ".smi": "smiles", ".txt": "smiles",
           ".csv": "smiles"}


@dataclass
class MoleculeRecord:
    index: int                 # position in the input, unusable records included
    name: str                  # SDF title, XYZ comment, the SMILES' name column, or ""
    smiles: str = ""           # the input SMILES, or RDKit's for an SDF/XYZ record when it sanitises
    z: np.ndarray | None = None                                      # int64 [N] atomic numbers
    conformers: list[np.ndarray] = field(default_factory=list)      # float32 [N, 3] Angstrom, each CoM-free
    bonds: np.ndarray | None = None  # int32 [E, 3] (i < j, order; aromatic 4) from an SDF bond table or RDKit
    fields: dict = field(default_factory=dict)  # SD tags, extended-XYZ key=value pairs, CSV columns
    reason: str | None = None  # why the record cannot be used (one line, with the details); None when it can
    kind: str = ""             # the reason's category, for counting ("unparsable SMILES", ...)
    note: str = ""             # what was done to it (hydrogens added, fewer conformers than asked)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def reject(self, kind: str, detail: str = "") -> None:
        self.kind, self.reason = kind, f"{kind}: {detail}" if detail else kind


def file_format(path: str) -> str:
    """'sdf', 'xyz' or 'smiles' from the file name; InputError for a missing file or an unknown extension."""
    if not os.path.isfile(path):
        raise InputError(f"--input {path}: no such file")
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in FORMATS:
        raise InputError(f"--input {path}: unknown molecule file type {ext or '(none)'!r}; use one of "
                         f"{', '.join(sorted(FORMATS))} (optionally .gz)")
    return FORMATS[ext]


def _text(path: str) -> str:
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            return f.read().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"--input {path} cannot be read as text: {err}") from None


def split_records(path: str, fmt: str | None = None) -> list[tuple[str, object]]:
    """The raw records of a molecule file, in file order: [(format, payload)] for ``parse_record``.

    Payloads: an SDF record's text; an XYZ frame's (first line number, lines) or, where the frame layout
    breaks, (line number, error message); a SMILES's (smiles, name, fields)."""
    fmt = fmt or file_format(path)
    if fmt == "smiles":
        from molscale.datasets.sources.smiles import read_smiles_records
        try:
            return [("smiles", item) for item in read_smiles_records(path)]
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise InputError(f"--input {path} cannot be read as text: {err}") from None
    text = _text(path)
    if fmt == "sdf":
        blocks = text.replace("\r\n", "\n").split("$$$$\n")
        if blocks and blocks[-1].strip().rstrip("$").strip() == "":  # what follows the last $$$$
            blocks = blocks[:-1]
        return [("sdf", block) for block in blocks if block.strip()]
    return [("xyz", frame) for frame in _xyz_frames(text.splitlines())]


def _xyz_frames(lines: list[str]):
    i = 0
    while i < len(lines):
        if not lines[i].strip():  # blank lines between frames
            i += 1
            continue
        head = lines[i].split()
        if len(head) != 1 or not head[0].isdigit():
            yield (i + 1, f"line {i + 1}: {lines[i].strip()[:40]!r} is not an atom count; the rest of the file "
                          f"(from line {i + 1}) cannot be split into frames")
            return
        count = int(head[0])
        frame = lines[i:i + 2 + count]
        if len(frame) < 2 + count:
            yield (i + 1, f"line {i + 1}: the frame announces {count} atoms and the file ends after "
                          f"{max(0, len(frame) - 2)}")
            return
        yield (i + 1, frame)
        i += 2 + count


def sd_tags(block: str) -> dict[str, str]:
    """The SD data items after ``M  END``: ``> <name>`` lines, each followed by its value lines up to a blank."""
    tags, name, lines = {}, None, []
    for line in block.split("M  END", 1)[-1].splitlines() if "M  END" in block else []:
        if line.startswith(">"):
            start, end = line.find("<"), line.find(">", line.find("<") + 1)
            name, lines = (line[start + 1:end].strip(), []) if start >= 0 and end > start else (None, [])
        elif name is not None and line.strip() == "":
            tags[name], name = "\n".join(lines).strip(), None
        elif name is not None:
            lines.append(line)
    if name is not None:
        tags[name] = "\n".join(lines).strip()
    return tags


def _xyz_comment(line: str) -> tuple[str, dict[str, str]]:
    """(name, fields) of an XYZ comment line: ``key=value`` tokens are fields (extended XYZ); the name is the
    ``name=`` or ``id=`` field, or the whole line when it holds no fields."""
    fields = dict(token.split("=", 1) for token in line.split() if "=" in token and not token.startswith("="))
    name = fields.get("name", fields.get("id", "")) if fields else line.strip()
    return name, fields


def _centred(pos) -> np.ndarray:
    pos = np.asarray(pos, dtype=np.float64)
    return (pos - pos.mean(axis=0, keepdims=True)).astype(np.float32)


def _check_elements(record: MoleculeRecord, z: np.ndarray, vocab) -> bool:
    if vocab is None:
        return True
    bad = sorted(set(z.tolist()) - set(vocab))
    if bad:
        names = ", ".join(Z_TO_SYMBOL.get(a, f"Z={a}") for a in bad)
        record.reject("element not in the model's atom vocabulary",
                      f"{names} (the model knows {', '.join(Z_TO_SYMBOL.get(a, str(a)) for a in vocab)})")
        return False
    return True


def _smiles_of(mol) -> str:
    try:
        copy = Chem.Mol(mol)
        Chem.SanitizeMol(copy)
        return Chem.MolToSmiles(Chem.RemoveHs(copy))
    except Exception:  # RDKit raises several types for molecules it cannot sanitise
        return ""


def _from_sdf(record: MoleculeRecord, block: str, add_hydrogens: bool) -> tuple[np.ndarray, np.ndarray] | None:
    mol = Chem.MolFromMolBlock(block, sanitize=False, removeHs=False)
    if mol is None:
        record.name = block.split("\n", 1)[0].strip()
        record.reject("unreadable SDF record", "RDKit could not parse its mol block")
        return None
    record.name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
    record.fields = sd_tags(block)
    if mol.GetNumAtoms() == 0:
        record.reject("no atoms")
        return None
    if not mol.GetNumConformers() or not mol.GetConformer().Is3D():
        record.reject("no 3D coordinates", "a 2D drawing; give its SMILES to embed conformers")
        return None
    # Hydrogens left implicit (a heavy-atom record, as docking tools write them) are placed from the bond
    # table; a record without any bonds says nothing about its hydrogens and is taken as given.
    mol.UpdatePropertyCache(strict=False)
    has_hydrogens = any(a.GetAtomicNum() == 1 for a in mol.GetAtoms())
    implicit = sum(a.GetNumImplicitHs() for a in mol.GetAtoms()) if mol.GetNumBonds() else 0
    if add_hydrogens and implicit and not has_hydrogens:
        mol = Chem.AddHs(mol, addCoords=True)
        record.note = f"{implicit} implicit hydrogen(s) placed by RDKit"
    record.smiles = _smiles_of(mol)
    if mol.GetNumBonds():
        from molscale.datasets.chemistry.bonds import bonds_from_mol
        try:
            record.bonds = bonds_from_mol(mol)
        except ValueError as err:  # a bond type the shards cannot hold (dative, ...): kept without bonds
            record.note = (record.note + "; " if record.note else "") + f"bonds dropped: {err}"
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return z, mol.GetConformer().GetPositions()


def _from_xyz(record: MoleculeRecord, payload) -> tuple[np.ndarray, np.ndarray] | None:
    first_line, frame = payload
    if isinstance(frame, str):  # the frame layout broke here
        record.reject("broken XYZ frame", frame)
        return None
    record.name, record.fields = _xyz_comment(frame[1])
    symbols, coords = [], []
    for offset, line in enumerate(frame[2:]):
        parts = line.split()
        where = f"line {first_line + 2 + offset}"
        if len(parts) < 4:
            record.reject("broken XYZ frame", f"{where}: expected 'symbol x y z', got {line.strip()[:40]!r}")
            return None
        symbol = parts[0].capitalize()
        if symbol not in SYMBOL_TO_Z:
            record.reject("unknown element symbol", f"{where}: {parts[0]!r}")
            return None
        try:
            coords.append([float(v) for v in parts[1:4]])
        except ValueError:
            record.reject("broken XYZ frame", f"{where}: coordinates {' '.join(parts[1:4])!r} are not numbers")
            return None
        symbols.append(symbol)
    if not symbols:
        record.reject("no atoms", f"line {first_line}")
        return None
    return np.asarray([SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64), np.asarray(coords)


def _from_smiles(record: MoleculeRecord, payload, conformers: int, seed: int, vocab):
    from rdkit.Chem import AllChem

    from molscale.datasets.sources.smiles import conformers as embed
    from molscale.datasets.sources.smiles import embedding_seed
    smiles, name, record.fields = payload
    record.smiles, record.name = smiles, name
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        record.reject("unparsable SMILES")
        return None
    mol = Chem.AddHs(mol)
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    if not _check_elements(record, z, vocab):
        return None
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        record.reject("no MMFF parameters", "its conformers could not be optimised as `build smiles` does")
        return None
    ranked = embed(mol, conformers, embedding_seed(seed, record.index))
    if not ranked:
        record.reject("embedding failed", "RDKit ETKDGv3 found no conformer, also from random coordinates")
        return None
    if len(ranked) < conformers:
        record.note = f"{len(ranked)} of {conformers} conformers embedded"
    from molscale.datasets.chemistry.bonds import bonds_from_mol
    record.bonds = bonds_from_mol(mol)
    return z, [mol.GetConformer(conf_id).GetPositions() for _, conf_id in ranked]


def parse_record(index: int, fmt: str, payload, conformers: int = 1, seed: int = 0, vocab=None,
                 add_hydrogens: bool = True) -> MoleculeRecord:
    """One raw record -> MoleculeRecord (``reason`` set when it cannot be used). ``vocab``: atomic numbers a
    model knows (others make the record unusable); ``conformers``: K for SMILES (seeded by ``seed`` and the
    record's index, so the result does not depend on where it runs)."""
    record = MoleculeRecord(index=index, name="")
    if fmt == "smiles":
        got = _from_smiles(record, payload, conformers, seed, vocab)
        if got is None:
            return record
        z, positions = got
    else:
        got = _from_sdf(record, payload, add_hydrogens) if fmt == "sdf" else _from_xyz(record, payload)
        if got is None or not _check_elements(record, got[0], vocab):
            return record
        z, positions = got[0], [got[1]]
    if not all(np.all(np.isfinite(p)) for p in positions):
        record.reject("non-finite coordinate")
        return record
    record.z, record.conformers = z, [_centred(p) for p in positions]
    return record


def read_molecule_file(path: str, conformers: int = 1, seed: int = 0, vocab=None,
                       add_hydrogens: bool = True) -> list[MoleculeRecord]:
    """Every record of ``path``, parsed here, in file order (``split_records`` + ``parse_record``)."""
    return [parse_record(i, fmt, payload, conformers, seed, vocab, add_hydrogens)
            for i, (fmt, payload) in enumerate(split_records(path))]


def rejection_counts(records) -> dict[str, int]:
    """{reason category: count} over the unusable records."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.ok:
            counts[r.kind] = counts.get(r.kind, 0) + 1
    return counts
