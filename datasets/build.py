"""Builders: a molecule source -> WebDataset shards + manifest on any fsspec URL.

Every builder follows the same rules: validate arguments and the destination before any work;
count and report every rejected record by reason; write shards under temporary names; write the
manifest last; a rerun of a complete build with the same parameters is a no-op.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import sys
from collections import Counter

from tqdm import tqdm

from . import qm9, storage
from .bonds import perceive_bonds
from .elements import QM9_ATOM_VOCAB
from .manifest import FORMAT, ManifestError, histogram, load_manifest, mean_mad, save_manifest
from .properties import QM9_PROPERTIES
from .samples import encode_sample
from .writer import SplitShardWriter

log = logging.getLogger(__name__)


class Rejections:
    """Counts rejected records by reason and keeps the first few examples for the manifest."""

    def __init__(self, max_examples: int = 50):
        self.reasons: Counter = Counter()
        self.examples: list[dict] = []
        self.max_examples = max_examples

    def add(self, record_id: str, reason: str) -> None:
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"record": record_id, "reason": reason})

    def as_dict(self) -> dict:
        return {"total": sum(self.reasons.values()), "reasons": dict(self.reasons), "examples": self.examples}

    def merge(self, other: dict) -> None:
        """Add the counts and examples of another ``as_dict()`` (a chunk's), keeping the example limit."""
        self.reasons.update(other["reasons"])
        self.examples = (self.examples + list(other["examples"]))[:self.max_examples]


def existing_build(out_url: str, params: dict, storage_options: dict | None):
    """The manifest of a complete build with the same parameters, else None.

    A complete build with other parameters is an error: overwriting it silently would lose data.
    """
    try:
        manifest = load_manifest(out_url, storage_options)
    except ManifestError as err:
        if "not found" in str(err):
            return None
        raise SystemExit(f"error: {err}. Remove {out_url} or build into another --out.") from None
    if manifest.data.get("build") != params:
        raise SystemExit(f"error: {out_url} already holds a complete dataset built with {manifest.data.get('build')}, "
                         f"not {params}. Build into another --out, or delete it first.")
    return manifest


def start_build(out_url: str, params: dict, storage_options: dict | None):
    """(manifest, None, None) when this exact build is already complete (a no-op rerun), else
    (None, fs, path) of a destination checked to be writable."""
    done = existing_build(out_url, params, storage_options)
    if done is not None:
        print(f"{out_url} is already complete (same parameters); nothing to do.")
        return done, None, None
    fs, out_path = storage.get_fs(out_url, storage_options)
    storage.check_writable(fs, out_path, out_url)
    return None, fs, out_path


def split_entry(shards: list[dict]) -> dict:
    """The manifest ``splits`` entry of a split's shard list: count, shards, atom-count histogram."""
    sizes = [n for s in shards for n in s["num_atoms"]]
    return {"count": len(sizes), "shards": shards, "atom_count_histogram": histogram(sizes)}


def finish_splits(writers: dict) -> dict:
    """Close every split writer; their manifest ``splits`` entries."""
    return {name: split_entry(writer.finish()) for name, writer in writers.items()}


def _perceive(args):
    z, pos = args
    try:
        return perceive_bonds(z, pos), None
    except ValueError as err:
        return None, str(err)


def build_qm9(out_url: str, limit: int | None = None, shard_size: int = 1000, workers: int = 1,
              storage_options: dict | None = None, command: str = "", progress: bool = True):
    """QM9 (qm9pack) -> shards; the standard split; ``limit`` keeps the first N molecules by gdb id."""
    if limit is not None and limit < 1:
        raise SystemExit(f"error: --limit must be at least 1 (got {limit}); leave it out for all "
                         f"{qm9.QM9_NUM_MOLECULES} molecules.")
    if shard_size < 1:
        raise SystemExit(f"error: --shard-size must be at least 1 (got {shard_size}).")
    if workers < 1:
        raise SystemExit(f"error: --workers must be at least 1 (got {workers}).")
    params = {"source": "qm9", "limit": limit, "shard_size": shard_size, "format": FORMAT}
    done, fs, out_path = start_build(out_url, params, storage_options)
    if done is not None:
        return done

    rejected = Rejections()
    records, positions = [], []
    rows = qm9.iter_rows(limit)
    for position, row in enumerate(tqdm(rows, total=limit or qm9.QM9_NUM_MOLECULES, desc="reading qm9pack",
                                        unit="mol", disable=not progress)):
        try:
            records.append(qm9.row_to_record(row))
            positions.append(position)
        except (ValueError, KeyError) as err:
            rejected.add(f"qm9 row {position}", f"unreadable row: {err}")
    n_read = len(positions) + rejected.as_dict()["total"]
    if limit is None and n_read != qm9.QM9_NUM_MOLECULES:
        raise SystemExit(f"error: qm9pack gave {n_read} molecules, expected {qm9.QM9_NUM_MOLECULES}; "
                         f"the standard split is defined over exactly that many. Reinstall qm9pack.")

    # Split and order come from the full permutation, so a --limit build puts each molecule in the
    # split the full build gives it, and shards hold molecules in permutation (random) order.
    split_of = qm9.standard_split()[positions]
    order_key = qm9.split_order()[positions]
    writers = {name: SplitShardWriter(fs, out_path, name, shard_size) for name in qm9.SPLIT_NAMES}
    plan = sorted(range(len(records)), key=lambda i: (split_of[i], order_key[i]))
    no_bonds = Counter()

    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        jobs = ((records[i]["z"], records[i]["pos"]) for i in plan)
        results = pool.imap(_perceive, jobs, chunksize=64) if pool else map(_perceive, jobs)
        for i, (bonds, error) in zip(plan, tqdm(results, total=len(plan), desc="bonds + shards", unit="mol",
                                                disable=not progress)):
            rec = records[i]
            if error is not None:
                no_bonds[error.split(":")[0]] += 1
            pos = rec["pos"] - rec["pos"].mean(axis=0, keepdims=True)  # stored CoM-free, float32
            sample = encode_sample(rec["key"], pos, rec["z"], rec["props"], bonds, rec["smiles"])
            writers[qm9.SPLIT_NAMES[split_of[i]]].write(sample, len(rec["z"]))
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
        "source": {"name": "qm9", "package": "qm9pack", "version": qm9.qm9pack_version()},
        "build": params,
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "atom_vocab": list(QM9_ATOM_VOCAB),
        "properties": {spec.name: {"unit": spec.unit} for spec in QM9_PROPERTIES},
        "property_stats": prop_stats,
        "splits": splits,
        "rejected": rejected.as_dict(),
        "notes": {"no_bonds": {"total": sum(no_bonds.values()), "reasons": dict(no_bonds),
                               "meaning": "bond perception from coordinates failed; kept without bonds.npy"}},
    }
    save_manifest(fs, out_path, manifest)
    return load_manifest(out_url, storage_options)


def command_line() -> str:
    import shlex
    return "python -m datasets " + shlex.join(sys.argv[1:])
