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

Damaged files cost the damaged records only: the file is read as bytes and each record decoded on its own (a
record whose bytes are not UTF-8 is rejected with the line and byte); an XYZ frame whose atom count disagrees
with its lines is rejected and reading resumes at the next intact frame (a claimed count allocates nothing);
a damaged .gz keeps what decompresses and rejects the record it cuts; non-finite coordinates and coordinates
beyond ``MAX_COORDINATE`` are rejected. Only a file none of whose records is text is an error as a whole.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
from rdkit import Chem, RDLogger

from molscale.datasets.chemistry.elements import SYMBOL_TO_Z, Z_TO_SYMBOL
from molscale.datasets.errors import InputError
from molscale.datasets.sources.unreadable import NOT_UTF8, Unreadable

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
    note: str = ""             # what was done to it or what to mind (hydrogens added, a charge, ...)
    energies: list[float] = field(default_factory=list)  # MMFF94 energy (kcal/mol) per conformer, SMILES only

    @property
    def ok(self) -> bool:
        return self.reason is None

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text

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


MAX_COORDINATE = 1e5  # Angstrom: a coordinate beyond this is damage (and overflows the model's distances)
_MAX_COUNT_DIGITS = 12  # an XYZ atom-count line longer than this is not taken as one


def not_utf8_detail(data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> str:
    """Where the first byte that is not UTF-8 sits in ``data`` (a record starting at line ``first_line``)."""
    line = first_line + data.count(b"\n", 0, err.start)
    return f"line {line}: byte 0x{data[err.start]:02x} is not UTF-8 ({err.reason})"


def _replace(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def read_bytes(path: str) -> tuple[bytes, str | None]:
    """The bytes of ``path`` (gunzipped when it is gzip) and, for a damaged compressed file, what went wrong:
    the bytes that could be decompressed come back, and the caller rejects the record the damage cut."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw, None
    out: list[bytes] = []
    rest = raw
    while rest:
        if rest[:2] != b"\x1f\x8b":
            if rest.strip(b"\0"):
                return b"".join(out), f"{len(rest)} bytes after the compressed data are not gzip; they are lost"
            break
        member = zlib.decompressobj(wbits=31)
        for start in range(0, len(rest), 1 << 16):  # by pieces: damage loses the piece it is in, not all
            try:
                out.append(member.decompress(rest[start:start + (1 << 16)]))
            except zlib.error as err:
                return b"".join(out), f"the compressed data is damaged after {sum(map(len, out))} bytes ({err})"
            if member.eof:
                break
        if not member.eof:
            return b"".join(out), f"the compressed file ends early, after {sum(map(len, out))} bytes (truncated)"
        rest = member.unused_data
    return b"".join(out), None


def split_records(path: str, fmt: str | None = None, what: str = "--input") -> list[tuple[str, object]]:
    """The raw records of a molecule file, in file order: [(format, payload)] for ``parse_record``.

    Payloads: an SDF record's text; an XYZ frame's (first line number, lines) or, where the frame layout
    breaks, (line number, error message); a SMILES's (smiles, name, fields); or, for any format, an
    ``Unreadable`` (a record whose bytes are not UTF-8, the record a damaged .gz file cuts). A damaged record
    costs that record: the others are read. A file none of whose records is UTF-8 text is an InputError."""
    fmt = fmt or file_format(path)
    if fmt == "smiles":
        from molscale.datasets.sources.smiles import read_smiles_records
        records = [("smiles", item) for item in read_smiles_records(path)]
    else:
        data, damage = read_bytes(path)
        records = [(fmt, item) for item in (_sdf_blocks(data) if fmt == "sdf" else _xyz_frames(data))]
        if damage:
            name = getattr(records[-1][1], "name", "") if records else ""
            records[-1:] = [(fmt, Unreadable(name, "truncated file", damage))]
    if records and all(isinstance(p, Unreadable) and p.kind == NOT_UTF8 for _, p in records):
        raise InputError(f"{what} {path} cannot be read as text: no record is UTF-8 ({records[0][1].detail})")
    return records


def _sdf_blocks(data: bytes):
    """SDF records (text), or Unreadable for a record whose bytes are not UTF-8 or that holds two mol blocks."""
    data = data.replace(b"\r\n", b"\n")
    blocks = _SDF_END.split(data)
    if blocks and blocks[-1].strip().rstrip(b"$").strip() == b"":  # what follows the last $$$$
        blocks = blocks[:-1]
    line = 1
    for block in blocks:
        first, lines = line, block.count(b"\n") + 1
        line += lines
        if not block.strip():
            continue
        title = _replace(block.split(b"\n", 1)[0]).strip()
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Unreadable(title, NOT_UTF8, not_utf8_detail(block, err, first))
            continue
        ends = len(_MOL_END.findall(text))
        if ends > 1:
            yield Unreadable(title, "unreadable SDF record",
                             f"line {first}: {ends} mol blocks in one record (a damaged $$$$ line between records?)")
            continue
        yield text


# $$$$ ends a record at the end of a line: also after a record cut mid-line, which then costs itself only
_SDF_END = re.compile(rb"\$\$\$\$[ \t\r]*(?:\n|\Z)")
_MOL_END = re.compile(r"^M  END\s*$", re.M)


def _xyz_frames(data: bytes):
    """XYZ frames: (first line number, lines) of each, (line number, message) where the layout breaks, or
    Unreadable for a frame whose bytes are not UTF-8.

    A frame is an atom-count line, a comment line and that many atom lines, followed by the next count line
    or the end (blank lines between frames allowed). Where the layout breaks (a count that disagrees with the
    lines, a line that is no count), the lines up to the next intact frame become one rejected record and
    reading goes on from there: a damaged frame costs that frame. Nothing is allocated for a claimed count."""
    lines = data.splitlines()
    L = len(lines)
    count = [-1] * L
    blank = [False] * L
    for p, line in enumerate(lines):
        s = line.strip()
        blank[p] = not s
        if s.isdigit() and len(s) <= _MAX_COUNT_DIGITS:  # bytes.isdigit: ASCII digits only
            count[p] = int(s)
    next_count, next_nonblank = [L] * (L + 3), [L] * (L + 3)
    for p in range(L - 1, -1, -1):
        next_count[p] = p if count[p] >= 0 else next_count[p + 1]
        next_nonblank[p] = p if not blank[p] else next_nonblank[p + 1]

    def atom_like(p: int) -> bool:
        parts = lines[p].split()
        return len(parts) >= 4 and parts[0][:1].isalpha()

    def intact(k: int) -> bool:
        """A frame starts at line k, its atom lines hold no count line and what follows is not an atom line."""
        n = count[k]
        end = k + 2 + n
        if n < 0 or end > L or next_count[k + 2] < end:
            return False
        after = next_nonblank[end]
        return after == L or count[after] >= 0 or not atom_like(after)

    i = next_nonblank[0]
    while i < L:
        if intact(i):
            end = i + 2 + count[i]
            frame = lines[i:end]
            joined = b"\n".join(frame)
            try:
                yield (i + 1, joined.decode("utf-8").split("\n"))
            except UnicodeDecodeError as err:
                yield Unreadable(_replace(frame[1]).strip(), NOT_UTF8, not_utf8_detail(joined, err, i + 1))
            i = next_nonblank[end]
            continue
        k = next_count[i + 1]  # the next intact frame: the damage ends there
        while k < L and not intact(k):
            k = next_count[k + 1]
        shown = _replace(lines[i].strip()[:40])
        if count[i] < 0:
            what = f"line {i + 1}: {shown!r} is not an atom count"
        elif k == L and i + 2 + count[i] > L:
            what = f"line {i + 1}: the frame announces {count[i]} atoms and the file ends after {max(0, L - i - 2)}"
        else:
            held = max(0, (k if k < L else L) - i - 2)
            what = (f"line {i + 1}: the frame announces {count[i]} atoms but {held} line(s) follow before "
                    + (f"the next frame (line {k + 1})" if k < L else "the end of the file"))
        if k < L:
            what += f"; line {k} skipped" if k == i + 1 else f"; lines {i + 1}-{k} skipped"
        elif count[i] < 0:
            what += f"; the rest of the file (from line {i + 1}) cannot be split into frames"
        yield (i + 1, what)
        i = k


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


def _from_sdf(record: MoleculeRecord, block: str, add_hydrogens: bool, embed_2d: tuple | None = None):
    """(z, [positions]) of one SDF record; ``embed_2d`` (conformers, seed, vocab): a record without 3D
    coordinates gets conformers embedded from its bond table, as a SMILES does, instead of being rejected."""
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
        if embed_2d is None:
            record.reject("no 3D coordinates",
                          "a 2D drawing; give its SMILES, or predict.py --embed-2d, to embed conformers")
            return None
        if not mol.GetNumBonds() and mol.GetNumAtoms() > 1:
            record.reject("no 3D coordinates", "a 2D record without bonds: nothing to embed conformers from")
            return None
        Chem.SanitizeMol(mol)  # a drawing from a database: its bond table is the molecule
        record.smiles = _smiles_of(mol)
        got = _embed(record, Chem.RemoveHs(mol), *embed_2d)
        if got is not None:
            record.add_note("conformers embedded from a 2D record")
        return got
    # Hydrogens left implicit (a heavy-atom record, as docking tools write them) are placed from the bond
    # table; a record without any bonds says nothing about its hydrogens and is taken as given.
    mol.UpdatePropertyCache(strict=False)
    has_hydrogens = any(a.GetAtomicNum() == 1 for a in mol.GetAtoms())
    implicit = sum(a.GetNumImplicitHs() for a in mol.GetAtoms()) if mol.GetNumBonds() else 0
    if add_hydrogens and implicit and not has_hydrogens:
        mol = Chem.AddHs(mol, addCoords=True)
        record.note = f"{implicit} implicit hydrogen(s) placed by RDKit"
    elif implicit and has_hydrogens:
        record.add_note(f"hydrogens partly given: {implicit} more would fill the valences (taken as given)")
    _chemistry_notes(record, mol)
    record.smiles = _smiles_of(mol)
    if mol.GetNumBonds():
        from molscale.datasets.chemistry.bonds import bonds_from_mol
        try:
            record.bonds = bonds_from_mol(mol)
        except ValueError as err:  # a bond type the shards cannot hold (dative, ...): kept without bonds
            record.add_note(f"bonds dropped: {err}")
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return z, [mol.GetConformer().GetPositions()]


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
    smiles, name, record.fields = payload
    record.smiles, record.name = smiles, name
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        record.reject("unparsable SMILES")
        return None
    return _embed(record, mol, conformers, seed, vocab)


def _embed(record: MoleculeRecord, mol, conformers: int, seed: int, vocab):
    """(z, K conformers) of a molecule given by its bond table (a SMILES, a 2D SDF record): hydrogens added,
    ETKDGv3 + MMFF94 as `build smiles` embeds them; None (the record rejected) when that cannot be done."""
    from rdkit.Chem import AllChem

    from molscale.datasets.sources.smiles import MAX_EMBED_ATOMS, MMFF_MAX_ITERS, embedding_seed
    from molscale.datasets.sources.smiles import conformers as embed
    mol = Chem.AddHs(mol)
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    if not _check_elements(record, z, vocab):
        return None
    if len(z) > MAX_EMBED_ATOMS:
        record.reject("too many atoms to embed", f"{len(z)} with hydrogens (at most {MAX_EMBED_ATOMS})")
        return None
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        record.reject("no MMFF parameters", "its conformers could not be optimised as `build smiles` does")
        return None
    ranked = embed(mol, conformers, embedding_seed(seed, record.index))
    if not ranked:
        record.reject("embedding failed", "RDKit ETKDGv3 found no conformer, also from random coordinates")
        return None
    if len(ranked) < conformers:
        record.add_note(f"{len(ranked)} of {conformers} conformers embedded")
    unconverged = sum(not converged for _, _, converged in ranked)
    if unconverged:
        record.add_note(f"MMFF did not converge for {unconverged} of {len(ranked)} conformers "
                        f"in {MMFF_MAX_ITERS} iterations")
    _chemistry_notes(record, mol)
    from molscale.datasets.chemistry.bonds import bonds_from_mol
    record.bonds = bonds_from_mol(mol)
    record.energies = [float(energy) for energy, _, _ in ranked]
    return z, [mol.GetConformer(conf_id).GetPositions() for _, conf_id, _ in ranked]


def _chemistry_notes(record: MoleculeRecord, mol) -> None:
    """Notes on what a model trained on QM9-like data has not seen: a net charge, unpaired electrons."""
    from rdkit.Chem import Descriptors
    mol.UpdatePropertyCache(strict=False)
    charge = Chem.GetFormalCharge(mol)
    if charge:
        record.add_note(f"net formal charge {charge:+d} (QM9 holds neutral molecules)")
    radicals = Descriptors.NumRadicalElectrons(mol)
    if radicals:
        record.add_note(f"{radicals} unpaired electron(s) (QM9 holds closed-shell molecules)")


def parse_record(index: int, fmt: str, payload, conformers: int = 1, seed: int = 0, vocab=None,
                 add_hydrogens: bool = True, embed_2d: bool = False) -> MoleculeRecord:
    """One raw record -> MoleculeRecord (``reason`` set when it cannot be used). ``vocab``: atomic numbers a
    model knows (others make the record unusable); ``conformers``: K for SMILES (seeded by ``seed`` and the
    record's index, so the result does not depend on where it runs); ``embed_2d``: embed conformers for an SDF
    record without 3D coordinates (as for a SMILES) instead of rejecting it."""
    record = MoleculeRecord(index=index, name="")
    if isinstance(payload, Unreadable):
        record.name = payload.name
        record.reject(payload.kind, payload.detail)
        return record
    try:
        return _parse(record, fmt, payload, conformers, seed, vocab, add_hydrogens, embed_2d)
    except Exception as err:  # RDKit raises many types on hostile input: that record is lost, not the file
        record.z, record.conformers, record.bonds = None, [], None
        record.reject(f"unreadable {fmt.upper()} record", f"{type(err).__name__}: {str(err).strip()[:200]}")
        return record


def _parse(record: MoleculeRecord, fmt: str, payload, conformers: int, seed: int, vocab,
           add_hydrogens: bool, embed_2d: bool) -> MoleculeRecord:
    if fmt == "smiles":
        got = _from_smiles(record, payload, conformers, seed, vocab)
    elif fmt == "sdf":
        got = _from_sdf(record, payload, add_hydrogens, (conformers, seed, vocab) if embed_2d else None)
    else:
        got = _from_xyz(record, payload)
        got = None if got is None else (got[0], [got[1]])
    if got is None or not _check_elements(record, got[0], vocab):
        return record
    z, positions = got
    dummies = np.flatnonzero(np.asarray(z) < 1)
    if len(dummies):
        record.reject("dummy atom", f"atom {int(dummies[0])} has atomic number 0 (a query or attachment point)")
        return record
    positions = [np.asarray(p, dtype=np.float64) for p in positions]
    if not all(np.all(np.isfinite(p)) for p in positions):
        record.reject("non-finite coordinate")
        return record
    largest = max(float(np.abs(p).max()) for p in positions)
    if largest > MAX_COORDINATE:
        record.reject("coordinate out of range", f"{largest:.3g} Angstrom (at most {MAX_COORDINATE:g})")
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
