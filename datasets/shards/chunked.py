"""Chunked builds: parallel over worker processes (or Ray tasks) and resumable after a crash.

The driver reads the source in order and cuts it into chunks of consecutive records. One worker builds a
whole chunk: it writes one shard per split (``{split}-{chunk:06d}.tar``, through SplitShardWriter: temporary
name, then rename or PUT), or ``groups`` shards per split (``{split}-{chunk * groups + group:06d}.tar``)
when a source spreads related records over several shards (GEOM conformers), and, last, a part file
``_parts/chunk-{chunk:06d}.json`` with everything the manifest needs from it (shards, rejections, notes, train
property values, atomic numbers seen). A part file therefore means "this chunk is complete": a rerun after a
kill skips those chunks and redoes the others (same input, same bytes). ``_parts/build.json`` holds the
build parameters, so a partial build is only resumed by the same command. The driver merges the parts in
chunk order into the manifest, writes the manifest last and then removes ``_parts/``.

Chunk contents depend only on the source and the parameters, never on the number of workers, so a build
with 1 worker and one with 16 give the same shards.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from tqdm import tqdm

from molscale.datasets.errors import InputError
from molscale.datasets.shards import storage
from molscale.datasets.shards.build import Rejections, split_entry, start_build
from molscale.datasets.shards.manifest import FORMAT, mean_mad
from molscale.datasets.shards.writer import SplitShardWriter

log = logging.getLogger(__name__)

PARTS_DIR = "_parts"
ONE_SHARD = 1 << 62  # shard size of a chunk writer: the whole chunk goes into one shard per split


@dataclass
class Target:
    """Where a chunk writes (picklable: it travels to worker processes and Ray tasks)."""
    out_url: str
    storage_options: dict | None
    split_names: tuple[str, ...]
    groups: int = 1  # shards per split and chunk; a sample goes to the group the source names


@dataclass
class ChunkSink:
    """What a source's chunk function writes to: samples by split, rejections and notes."""
    target: Target
    chunk: int
    rejected: Rejections = field(default_factory=Rejections)
    notes: Counter = field(default_factory=Counter)
    no_bonds: Counter = field(default_factory=Counter)
    train_values: dict = field(default_factory=dict)  # property -> values on the train split (mean/MAD)
    seen_z: set = field(default_factory=set)

    def __post_init__(self):
        self.fs, self.out_path = storage.get_fs(self.target.out_url, self.target.storage_options)
        groups = self.target.groups
        # shard numbers chunk * groups + group: unique over the build, and in source order within a group
        self.writers = {(name, group): SplitShardWriter(self.fs, self.out_path, name, ONE_SHARD,
                                                        first_index=self.chunk * groups + group)
                        for name in self.target.split_names for group in range(groups)}

    def write(self, split: int, sample: dict, z, stats: dict | None = None, group: int = 0) -> None:
        self.writers[self.target.split_names[split], group].write(sample, len(z))
        self.seen_z.update(int(a) for a in set(z.tolist()))
        if split == 0 and stats:
            for name, value in stats.items():
                self.train_values.setdefault(name, []).append(float(value))

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

    def finish(self) -> dict:
        """Close the shards, then write and return the part file (written last: it marks completion)."""
        shards = {name: [shard for group in range(self.target.groups) for shard in self.writers[name, group].finish()]
                  for name in self.target.split_names}
        part = {"chunk": self.chunk, "shards": shards, "rejected": self.rejected.as_dict(),
                "notes": dict(self.notes), "no_bonds": dict(self.no_bonds), "train_values": self.train_values,
                "seen_z": sorted(self.seen_z)}
        storage.write_bytes(self.fs, part_path(self.out_path, self.chunk), json.dumps(part).encode())
        return part


def part_path(out_path: str, chunk: int) -> str:
    return storage.join(out_path, PARTS_DIR, f"chunk-{chunk:06d}.json")


def run_chunk(chunk_fn, target: Target, chunk: int, payload, params: dict) -> dict:
    """Worker entry: build one chunk with ``chunk_fn(sink, payload, params)``; returns its part."""
    sink = ChunkSink(target, chunk)
    try:
        chunk_fn(sink, payload, params)
    except BaseException:
        sink.abort()
        raise
    return sink.finish()


def _completed_parts(fs, out_path: str) -> dict[int, dict]:
    folder = storage.join(out_path, PARTS_DIR)
    fs.invalidate_cache(folder)
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return {}
    parts = {}
    for name in names:
        if name.startswith("chunk-") and name.endswith(".json"):
            part = json.loads(storage.read_bytes(fs, storage.join(folder, name)))
            parts[int(part["chunk"])] = part
    return parts


def _remove_stale_temporaries(fs, out_path: str) -> None:
    """Half-written shards of a killed build (SplitShardWriter's ``.tmp-*`` files in a local --out)."""
    if not storage.is_local(fs) or not os.path.isdir(out_path):
        return  # on object storage the temporaries live in the local temp folder and never reach the bucket
    stale = [name for name in os.listdir(out_path) if name.startswith(".tmp-")]
    for name in stale:
        os.unlink(os.path.join(out_path, name))
    if stale:
        log.info("removed %d half-written shard(s) of an interrupted build from %s", len(stale), out_path)


def _claim(fs, out_path: str, out_url: str, params: dict) -> None:
    """Record the parameters of this build; refuse to resume a partial build made with others."""
    path = storage.join(out_path, PARTS_DIR, "build.json")
    try:
        previous = json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError:
        previous = None
    if previous is not None and previous != params:
        raise InputError(f"{out_url} holds a partial build with other parameters ({previous}), not "
                         f"{params}. Rerun that command to finish it, or delete {out_url} first.")
    if previous is None:
        storage.write_bytes(fs, path, json.dumps(params).encode())


class _InProcess:
    """The executor interface over the current process (workers=1: simplest to debug and profile)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures=False, pending=()):
        pass


def staged_package() -> str:
    """A temporary ``molscale`` folder holding a copy of molscale.datasets, for Ray's ``py_modules`` upload: the
    cluster's workers import the chunk builders from it, whether or not molscale is installed on their nodes."""
    import shutil
    import tempfile

    import molscale.datasets
    stage = os.path.join(tempfile.mkdtemp(prefix="molscale-ray-"), "molscale")
    shutil.copytree(os.path.dirname(molscale.datasets.__file__), os.path.join(stage, "datasets"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return stage


class _RayExecutor:
    """Ray tasks behind the executor interface: one task per chunk, on a local Ray or $RAY_ADDRESS."""

    def __init__(self, workers: int):
        import ray
        self.ray = ray
        self.started = not ray.is_initialized()  # a Ray started here is stopped when the build ends
        if self.started:
            if os.environ.get("RAY_ADDRESS"):
                # the cluster's workers import this package from an upload of it
                ray.init(log_to_driver=False, runtime_env={"py_modules": [staged_package()]})
            else:
                # a Ray of our own ("local"), never one that `ray start` left running on this machine
                ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
        # as many chunks in flight as the cluster has CPUs (a local Ray: --workers)
        self.slots = max(1, int(ray.cluster_resources().get("CPU", workers)))
        self.remote = ray.remote(num_cpus=1, max_retries=2)(run_chunk)

    def submit(self, fn, *args):
        return self.remote.remote(*args)

    def wait(self, pending):
        done, rest = self.ray.wait(list(pending), num_returns=1)
        return set(done), set(rest)

    def result(self, ref):
        return self.ray.get(ref)

    def shutdown(self, cancel_futures=False, pending=()):
        for ref in pending if cancel_futures else ():
            self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()


def run_chunks(chunks, chunk_fn, target: Target, params: dict, workers: int, backend: str, done: set[int],
               progress: bool, desc: str, unit_total: int | None):
    """Build every chunk ``(index, payload, n_records)`` of the iterator not in ``done``; yields parts.

    At most ``workers + 2`` chunks (Ray: cluster CPUs + 2) are in flight, so memory stays bounded however long
    the source is. On a Ray cluster, GEOM and PCQM4Mv2 chunks name files by path, so the source must sit on a
    filesystem every node sees (SMILES chunks carry their strings); ``--out`` should be object storage.
    """
    if backend == "ray":
        executor = _RayExecutor(workers)
    elif workers > 1:
        executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    else:
        executor = _InProcess()
    is_ray = backend == "ray"
    slots = executor.slots if is_ray else workers
    pending: dict = {}
    bar = tqdm(total=unit_total, desc=desc, unit="mol", disable=not progress, dynamic_ncols=True)

    def collect():
        # wait for at least one chunk in flight to finish
        if is_ray:
            finished, _ = executor.wait(pending)
            results = [(ref, executor.result(ref)) for ref in finished]
        else:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            results = [(future, future.result()) for future in finished]
        for handle, part in results:
            bar.update(pending.pop(handle))
            yield part

    try:
        for index, payload, n_records in chunks:
            if index in done:
                bar.update(n_records)
                continue
            pending[executor.submit(run_chunk, chunk_fn, target, index, payload, params)] = n_records
            while len(pending) >= slots + 2:
                yield from collect()
        while pending:
            yield from collect()
    except BaseException:
        if is_ray:
            executor.shutdown(cancel_futures=True, pending=list(pending))
        else:
            executor.shutdown(cancel_futures=True)
        raise
    finally:
        bar.close()
    executor.shutdown()


def merge_parts(parts: list[dict], split_names, driver_rejected: Rejections | None = None) -> dict:
    """Merge part files (any order) into manifest fields: splits, rejected, notes, stats, seen_z."""
    parts = sorted(parts, key=lambda p: p["chunk"])
    splits = {name: split_entry([shard for part in parts for shard in part["shards"][name]])
              for name in split_names}
    rejected = Rejections()
    for part in parts:
        rejected.merge(part["rejected"])
    if driver_rejected is not None:
        rejected.merge(driver_rejected.as_dict())
    notes, no_bonds, values, seen_z = Counter(), Counter(), {}, set()
    for part in parts:
        notes.update(part["notes"])
        no_bonds.update(part["no_bonds"])
        for name, vals in part["train_values"].items():
            values.setdefault(name, []).extend(vals)
        seen_z.update(part["seen_z"])
    stats = {name: mean_mad(vals) for name, vals in values.items() if vals}
    return {"splits": splits, "rejected": rejected.as_dict(), "notes": notes, "no_bonds": no_bonds,
            "property_stats": stats, "seen_z": sorted(seen_z)}


def chunked_build(out_url: str, params: dict, storage_options: dict | None, chunks, chunk_fn, split_names,
                  workers: int, progress: bool, desc: str, backend: str = "process", unit_total: int | None = None,
                  driver_rejected: Rejections | None = None, groups: int = 1):
    """Run a chunked build; returns (manifest, None) when already complete, else (None, merged, finalize)
    where ``finalize(manifest_dict)`` saves the manifest and removes the part files. ``groups``: shards per
    split and chunk (ChunkSink.write's ``group``)."""
    if workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers}).")
    complete, fs, out_path = start_build(out_url, params, storage_options)
    if complete is not None:
        return complete, None, None
    _claim(fs, out_path, out_url, params)
    _remove_stale_temporaries(fs, out_path)
    parts = _completed_parts(fs, out_path)
    if parts:
        print(f"resuming the partial build in {storage.redact_url(out_url)}: {len(parts)} chunk(s) already complete")
    target = Target(out_url, storage_options, tuple(split_names), groups)
    for part in run_chunks(chunks(), chunk_fn, target, params, workers, backend, set(parts), progress, desc,
                           unit_total):
        parts[part["chunk"]] = part
    merged = merge_parts(list(parts.values()), split_names, driver_rejected)
    merged["chunks"] = len(parts)

    def finalize(manifest: dict):
        from molscale.datasets.shards.manifest import save_manifest
        save_manifest(fs, out_path, manifest)
        try:
            fs.rm(storage.join(out_path, PARTS_DIR), recursive=True)
        except FileNotFoundError:
            pass
    return None, merged, finalize


def chunked_manifest(merged: dict, *, params: dict, command: str, source: dict, atom_vocab, properties: dict,
                     notes: dict, details: dict) -> dict:
    """The manifest of a chunked build: the builder's own fields around what the parts merged into.

    ``notes`` entries are ``{total, meaning}`` (what ``inspect`` prints); other details go to ``details``.
    """
    return {
        "format": FORMAT,
        "source": source,
        "build": params,
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "atom_vocab": list(atom_vocab),
        "properties": properties,
        "property_stats": merged["property_stats"],
        "splits": merged["splits"],
        "rejected": merged["rejected"],
        "notes": notes,
        "details": {**details, "chunks": merged["chunks"]},
    }
