"""Any SMILES list (or the drug-like MOSES set) -> 3D conformers -> shards, fanned out over Ray.

Each molecule: RDKit parses the SMILES, adds hydrogens, embeds K conformers with ETKDGv3 (seeded per
molecule, so the result does not depend on which worker builds it), optimises each with MMFF94, and keeps
them all, ordered by MMFF energy. Sample key ``smiles-{molecule index:08d}-{rank:02d}`` (index = position in
the input, rejected molecules included), ``props.json`` ``{"mmff_energy": E (kcal/mol), "energy_rank": r}``,
``bonds.npy`` from the RDKit molecule (aromatic = 4), ``smiles.txt`` the input SMILES. Atom vocabulary:
GEOM-Drugs' 16 types, so these shards and GEOM shards fit the same models. Split 80/10/10 by molecule from a
seeded hash of the canonical SMILES (duplicates land in the same split).

Rejected and counted, by reason: unparsable SMILES, unsupported element, more than ``MAX_EMBED_ATOMS`` atoms,
embedding failure, missing MMFF parameters, non-finite coordinates, a line that is not UTF-8 text or a CSV row
that cannot be split (a damaged record costs that record). Inputs: a text file with one SMILES per line
(first whitespace-separated token; blank lines and lines starting with # skipped; .gz allowed), a CSV with a
``smiles`` column, or ``moses`` / ``moses:test`` / ``moses:test_scaffolds``: the splits shipped in the PyPI
package molsets (install it with ``pip install --no-deps molsets``: only its data files are read).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import itertools
import os
import zlib

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem

from molscale.datasets.chemistry.bonds import bonds_from_mol
from molscale.datasets.chemistry.elements import GEOM_ATOM_VOCAB, Z_TO_SYMBOL
from molscale.datasets.errors import InputError
from molscale.datasets.shards.chunked import chunked_build, chunked_manifest
from molscale.datasets.shards.manifest import FORMAT, load_manifest
from molscale.datasets.shards.samples import encode_sample
from molscale.datasets.sources.fields import parse_properties, property_values
from molscale.datasets.sources.geom import SPLIT_FRACTIONS, SPLIT_NAMES, assign_split
from molscale.datasets.sources.unreadable import NOT_UTF8, Unreadable

RDLogger.DisableLog("rdApp.*")

DEFAULT_CONFORMERS = 5
DEFAULT_CHUNK_MOLECULES = 200
MOSES_SPLITS = ("train", "test", "test_scaffolds")
MMFF_MAX_ITERS = 500
# ETKDG's time grows about as atoms^3 (one conformer: 150 atoms 1 s, 300 atoms 7 s, 600 atoms 53 s on one core),
# so a larger molecule (or a damaged line that parses as one) is rejected rather than embedded for minutes.
MAX_EMBED_ATOMS = 500
_VOCAB = frozenset(GEOM_ATOM_VOCAB)


def moses_file(name: str) -> str:
    """Path of a MOSES split's csv.gz inside the installed molsets package (found without importing it)."""
    split = name.split(":", 1)[1] if ":" in name else "train"
    if split not in MOSES_SPLITS:
        raise InputError(f"--input {name}: MOSES has the splits {', '.join(MOSES_SPLITS)} "
                         f"(moses, moses:test, moses:test_scaffolds).")
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("--input moses needs the MOSES data of the PyPI package molsets: "
                         "`pip install --no-deps molsets` (its other dependencies are not needed).")
    path = os.path.join(spec.submodule_search_locations[0], "dataset", "data", f"{split}.csv.gz")
    if not os.path.isfile(path):
        raise InputError(f"the installed molsets package has no {path}; reinstall molsets 0.3.1.")
    return path


def _text_lines(path: str):
    """(line number, line) of a text file (plain or gzip), lines kept with their ends; bytes that are not UTF-8
    come through as surrogate escapes (``_bad_utf8`` finds them), so that one bad byte costs its line only. A
    damaged .gz ends the lines with (line number, Unreadable) for what could not be decompressed."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    number = 0
    text = io.TextIOWrapper(gzip.open(path, "rb") if gzipped else open(path, "rb"), encoding="utf-8",
                            errors="surrogateescape", newline="")
    with text:
        try:
            for number, line in enumerate(text, start=1):
                yield number, line
        except (OSError, EOFError, zlib.error) as err:
            yield number + 1, Unreadable("", "truncated file", f"line {number + 1}: the compressed file is "
                                                               f"damaged here ({err}); what follows is lost")


def _bad_utf8(text: str, line: int) -> str | None:
    """Where ``text`` (decoded with surrogate escapes) holds a byte that is not UTF-8; None when it holds none."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return f"line {line}: byte 0x{ord(text[err.start]) - 0xDC00:02x} is not UTF-8"


def _readable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _csv_rows(lines):
    """(first line number, cells) of each CSV row of ``lines`` ((number, line) pairs), or (number, Unreadable)
    for a row the csv module rejects (a quote that is never closed, say): that row is its first line, and
    reading goes on with the line after it, so a damaged row costs that row."""
    pending: list = []  # lines to read again after a damaged row
    lines = iter(lines)
    while True:
        taken: list = []

        def feed():
            while True:
                item = pending.pop(0) if pending else next(lines, None)
                if item is None:
                    return
                if isinstance(item[1], Unreadable):  # the damaged end of a .gz: stop here
                    pending.insert(0, item)
                    return
                taken.append(item)
                yield item[1]

        reader = csv.reader(feed(), strict=True)
        try:
            for row in reader:
                first, taken[:] = taken[0][0], []
                yield first, row
        except csv.Error as err:
            first = taken[0][0]
            pending[0:0] = taken[1:]
            yield first, Unreadable("", "unreadable CSV row", f"line {first}: {err}")
            continue
        if pending:  # the damaged end of a .gz
            yield pending[0]
        return


def read_smiles_records(path: str):
    """(SMILES, name, fields) of each record of a text or CSV file (plain or gzip), in file order, or an
    ``Unreadable`` (molecule_files) for a record that is not UTF-8 text or a CSV row that cannot be split.

    A CSV (a header with a ``smiles`` column): name from a ``name`` or ``id`` column, fields every column by
    header name. A text file: one SMILES per line (blank lines and lines starting with # skipped), the rest of
    the line its name, no fields."""
    lines = _text_lines(path)
    first = next(lines, None)
    if first is None:
        return
    header = smiles_header(first[1]) if isinstance(first[1], str) else []
    if header:  # a CSV with a smiles column
        lower = [name.lower() for name in header]
        column = lower.index("smiles")
        name_column = next((lower.index(n) for n in ("name", "id") if n in lower), None)
        for number, row in _csv_rows(lines):
            if isinstance(row, Unreadable):
                yield row
            elif row:
                cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
                name = cells[name_column] if name_column is not None else ""
                bad = next(filter(None, (_bad_utf8(cell, number) for cell in cells)), None)
                if bad:
                    yield Unreadable(_readable(name), NOT_UTF8, bad)
                else:
                    yield cells[column], name, dict(zip(header, cells))
        return
    for number, line in itertools.chain([first], lines):  # no header: the first line is data
        if isinstance(line, Unreadable):
            yield line
        elif line.strip() and not line.startswith("#"):
            parts = line.split()
            bad = _bad_utf8(line, number)
            if bad:
                yield Unreadable(_readable(" ".join(parts[1:])), NOT_UTF8, bad)
            else:
                yield parts[0], " ".join(parts[1:]), {}


def smiles_header(first_line: str) -> list[str]:
    """The column names of a CSV whose first line is ``first_line`` and which has a ``smiles`` column, else []."""
    header = [_readable(name.strip()) for name in next(csv.reader([first_line]), [])]
    return header if "smiles" in [name.lower() for name in header] else []


def read_smiles(path: str):
    """SMILES strings of a text or CSV file (plain or gzip), in file order (records that cannot be read: "")."""
    for record in read_smiles_records(path):
        yield "" if isinstance(record, Unreadable) else record[0]


def smiles_chunks(path: str, chunk_molecules: int, limit: int | None, fields: tuple[str, ...] = ()):
    """Chunks of (first index, items): an item is the SMILES, or (SMILES, {field: raw value}) with ``fields``."""
    chunk, first, items = 0, 0, []
    for index, record in enumerate(read_smiles_records(path)):
        if limit is not None and index >= limit:
            break
        if isinstance(record, Unreadable):  # rejected by the worker, with its reason
            items.append(record)
        else:
            smiles, _, row = record
            items.append((smiles, {f: row.get(f) for f in fields}) if fields else smiles)
        if len(items) == chunk_molecules:
            yield chunk, (first, items), len(items)
            chunk, first, items = chunk + 1, first + len(items), []
    if items:
        yield chunk, (first, items), len(items)


ZERO_SEED_STANDIN = 2**30  # RDKit embeds K copies of one conformer for randomSeed 0 (and 2**31 - 1; measured): never 0


def embedding_seed(seed: int, index: int) -> int:
    """ETKDG's randomSeed for molecule ``index`` of a build with ``seed`` (so that the result does not depend on
    which worker embeds it)."""
    # RDKit takes a 32-bit signed seed (larger ones raise OverflowError): wrap, which keeps every smaller seed
    return (seed * 1_000_003 + index) % (2**31 - 1) or ZERO_SEED_STANDIN


def conformers(mol: Chem.Mol, k: int, seed: int) -> list[tuple[float, int, bool]]:
    """Embed up to k ETKDGv3 conformers and MMFF-optimise them: [(energy kcal/mol, conformer id, whether the
    optimisation converged within MMFF_MAX_ITERS)] sorted by energy."""
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    params.numThreads = 1
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=k, params=params))
    if not ids:  # hard cases (large rings, cages) often embed from random coordinates
        params.useRandomCoords = True
        ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=k, params=params))
    if not ids:
        return []
    results = AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=MMFF_MAX_ITERS)
    # RDKit's flag per conformer: 0 converged, 1 more iterations needed, -1 force field not set up
    return sorted((energy, conf_id, flag == 0) for conf_id, (flag, energy) in zip(ids, results))


def add_molecule(sink, index: int, smiles: str, params: dict, fields: dict | None = None) -> None:
    rejected, record = sink.rejected, f"smiles {index} ({smiles})"
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        rejected.add(record, "unparsable smiles")
        return
    values, reason = property_values(fields or {}, params.get("properties", []))
    if reason:
        rejected.add(record, reason)
        return
    bad = sorted({a.GetAtomicNum() for a in mol.GetAtoms()} - _VOCAB)
    if bad:
        rejected.add(record, f"unsupported element: {', '.join(Z_TO_SYMBOL.get(z, f'Z={z}') for z in bad)}")
        return
    mol = Chem.AddHs(mol)
    if mol.GetNumAtoms() > MAX_EMBED_ATOMS:
        rejected.add(record, f"too many atoms to embed: {mol.GetNumAtoms()} with hydrogens (at most {MAX_EMBED_ATOMS})")
        return
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        rejected.add(record, "no MMFF parameters")
        return
    ranked = conformers(mol, params["conformers"], embedding_seed(params["seed"], index))
    if not ranked:
        rejected.add(record, "embedding failed")
        return
    sink.notes["conformers_short"] += params["conformers"] - len(ranked)
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    bonds = bonds_from_mol(mol)
    split = assign_split(params["seed"], Chem.MolToSmiles(mol))
    for rank, (energy, conf_id, _) in enumerate(ranked):
        pos = mol.GetConformer(conf_id).GetPositions()
        if not (np.all(np.isfinite(pos)) and np.isfinite(energy)):
            rejected.add(f"{record} conformer {conf_id}", "non-finite coordinate")
            continue
        pos = pos - pos.mean(axis=0, keepdims=True)
        sample = encode_sample(f"smiles-{index:08d}-{rank:02d}", pos, z,
                               {"mmff_energy": float(energy), "energy_rank": rank, **values}, bonds, smiles)
        sink.write(split, sample, z, {"mmff_energy": float(energy), **values})


def smiles_chunk(sink, payload, params: dict) -> None:
    """Worker (a Ray task): every molecule of one chunk."""
    first, items = payload
    for offset, item in enumerate(items):
        sink.notes["molecules_read"] += 1
        if isinstance(item, Unreadable):  # not UTF-8 text, a CSV row that cannot be split
            name = f" ({item.name})" if item.name else ""
            sink.rejected.add(f"smiles {first + offset}{name}", f"{item.kind}: {item.detail}")
            continue
        smiles, fields = item if isinstance(item, (tuple, list)) else (item, None)
        add_molecule(sink, first + offset, smiles, params, fields)


def build_smiles(out_url: str, source: str, conformers: int = DEFAULT_CONFORMERS, limit: int | None = None,
                 shard_size: int | None = None, seed: int = 0, workers: int = 1, backend: str = "ray",
                 storage_options: dict | None = None, command: str = "", progress: bool = True,
                 properties: str | None = None):
    """SMILES file or MOSES -> conformer shards + manifest; chunks of ``shard_size`` molecules are built by
    Ray tasks (``backend="ray"``, a local Ray of ``workers`` CPUs unless $RAY_ADDRESS names a cluster) or
    worker processes; a rerun resumes a killed build."""
    shard_size = DEFAULT_CHUNK_MOLECULES if shard_size is None else shard_size
    if not source:
        raise InputError("smiles needs --input FILE (one SMILES per line, or a CSV with a smiles "
                         "column) or --input moses.")
    if conformers < 1:
        raise InputError(f"--conformers must be at least 1 (got {conformers}).")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit}); leave it out for all molecules.")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1 (got {shard_size}).")
    if backend not in ("ray", "process"):
        raise InputError(f"--backend must be ray or process (got {backend!r}).")
    if source == "moses" or source.startswith("moses:"):
        path, name = moses_file(source), source
    else:
        path = os.path.abspath(source)
        if not os.path.isfile(path):
            raise InputError(f"--input {source} does not exist (give a SMILES file or 'moses').")
        name = path
    specs = parse_properties(properties)
    if specs:
        lines = _text_lines(path)
        first_line = next(lines, (0, ""))[1]
        lines.close()
        header = smiles_header(first_line) if isinstance(first_line, str) else []
        missing = [n for n, _ in specs if n not in header]
        if missing:
            columns = f"its columns: {', '.join(header)}" if header else "properties need a CSV with a smiles column"
            raise InputError(f"--properties: {source} has no column {', '.join(missing)} ({columns})")
        if "mmff_energy" in dict(specs) or "energy_rank" in dict(specs):
            raise InputError("--properties: mmff_energy and energy_rank are the builder's own; rename the column")
    params = {"source": "smiles", "input": name, "conformers": conformers, "seed": seed, "limit": limit,
              "shard_size": shard_size, "format": FORMAT,
              "rdkit": Chem.rdBase.rdkitVersion, "method": "ETKDGv3 + MMFF94"}
    if specs:  # only then: the parameters of builds without properties stay what they were
        params["properties"] = [list(spec) for spec in specs]
    fields = tuple(n for n, _ in specs)
    done, merged, finalize = chunked_build(out_url, params, storage_options,
                                           lambda: smiles_chunks(path, shard_size, limit, fields), smiles_chunk,
                                           SPLIT_NAMES, workers, progress, "smiles -> conformers",
                                           backend=backend, unit_total=limit)
    if done is not None:
        return done
    if not merged["notes"]["molecules_read"]:
        raise InputError(f"--input {source} holds no molecules")
    if not sum(entry["count"] for entry in merged["splits"].values()):
        raise InputError(f"--input {source}: none of its {merged['notes']['molecules_read']} molecules could be "
                         f"used ({merged['rejected']['reasons']}); nothing was written")
    notes = merged["notes"]
    manifest = chunked_manifest(
        merged, params=params, command=command, atom_vocab=GEOM_ATOM_VOCAB,
        source={"name": "moses" if name.startswith("moses") else "smiles", "input": name, "path": path},
        properties={"mmff_energy": {"unit": "kcal/mol"}, **{n: {"unit": unit} for n, unit in specs}},
        notes={
            "molecules_read": {"total": notes["molecules_read"], "meaning": "SMILES read from the input"},
            "conformers_short": {"total": notes["conformers_short"],
                                 "meaning": f"conformers fewer than {conformers} because ETKDG embedded fewer"},
        },
        details={
            "conformers_per_molecule": conformers,
            "method": f"RDKit {Chem.rdBase.rdkitVersion}: AddHs, ETKDGv3 (randomSeed = (seed * 1000003 + index) "
                      f"mod (2^31 - 1), {ZERO_SEED_STANDIN} in place of 0), "
                      f"MMFF94 optimisation (maxIters {MMFF_MAX_ITERS}); conformers ranked by MMFF energy",
            "split": {"by": "molecule", "fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS)), "seed": seed,
                      "method": "blake2b(seed:canonical smiles) -> uniform [0,1) -> 80/10/10"},
        })
    finalize(manifest)
    return load_manifest(out_url, storage_options)
