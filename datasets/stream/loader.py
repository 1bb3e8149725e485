"""Streaming loader: shards on any fsspec URL -> padded, CoM-free batches for training.

    loader = StreamingLoader(LoaderConfig(url="s3://bucket/qm9", batch_size=64), seed=0, rank=r, world_size=w)
    for batch in loader:            # the rest of the current epoch; then loader.epoch advances
        ...
    state = loader.state_dict()     # resume later at exactly the next batch

What each rank and worker reads is planned from the manifest (datasets/stream/plan.py). Workers fetch a
whole shard at a time (retried with backoff on transient storage errors), keep only the samples
their remaining batches need, and emit batches in plan order. A corrupt or missing shard is
logged, counted and skipped; more than ``max_bad_shards`` of them stop the run with a clear error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from molscale.datasets.errors import InputError
from molscale.datasets.redaction import redact_url
from molscale.datasets.shards import storage
from molscale.datasets.shards.manifest import HALVES, Manifest, load_manifest
from molscale.datasets.shards.tario import CorruptShardError
from molscale.datasets.stream.plan import Batching, plan_epoch
from molscale.datasets.stream.split_reader import BAD_SHARD_ERRORS, TooManyBadShardsError, read_shard

log = logging.getLogger(__name__)
# TooManyBadShardsError (a RunError) is defined in split_reader and raised here too; import it from either.


@dataclass
class LoaderConfig:
    """How a dataset is streamed: the ``data`` section of a run config, and the loader's own settings.

    What the run decides elsewhere (the seed, the property columns its model needs, whether bonds are
    read, storage credentials, shuffling) is passed to StreamingLoader, not repeated here.
    """
    url: str = "data/qm9-smoke"
    split: str = "train"
    valid_split: str = "valid"             # the split a training run validates on
    batch_size: int | None = 64            # molecules per batch (EDM/UniGEM train with 64) ...
    pair_budget: int | None = None         # ... or an atom-pair budget per batch (sum B * N_max^2)
    bucket_bounds: tuple[int, ...] = ()    # atom-count bucket upper bounds for budget batching
    shuffle_buffer: int = 1000
    num_workers: int = 0
    prefetch_factor: int = 4
    max_bad_shards: int | None = None      # default: 1% of the split's shards, at least 1
    retries: int = 6                       # attempts per shard read on transient errors
    half: str | None = None                # 'first' | 'second': train on that half of `split` (Manifest.half)

    def __post_init__(self):
        self.bucket_bounds = tuple(self.bucket_bounds)
        self.validate()

    def validate(self) -> None:
        """The one check of these settings; messages name the run config's ``data.*`` keys."""
        if (self.batch_size is None) == (self.pair_budget is None):
            raise InputError("set exactly one of data.batch_size and data.pair_budget (the other null)")
        for name in ("batch_size", "pair_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"data.{name} must be at least 1 (got {value})")
        if self.num_workers < 0 or self.retries < 1 or self.prefetch_factor < 1:
            raise InputError("data.num_workers must be >= 0, data.retries and data.prefetch_factor >= 1")
        if self.half is not None and self.half not in HALVES:
            raise InputError(f"data.half must be one of {list(HALVES)} or null (got {self.half!r})")
        if self.max_bad_shards is not None and self.max_bad_shards < 0:
            raise InputError(f"data.max_bad_shards must be >= 0 (got {self.max_bad_shards})")

    def training_view(self, manifest: Manifest) -> Manifest:
        """The dataset as a run trains on it: with ``half``, its ``split`` cut to that half (Manifest.half)."""
        return manifest.half(self.split, self.half) if self.half else manifest

    def batching(self, shuffle: bool = True) -> Batching:
        return Batching(self.batch_size, self.pair_budget, self.bucket_bounds, shuffle, self.shuffle_buffer)


def vocab_lookup(atom_vocab) -> np.ndarray:
    """[256] table: atomic number -> index in the dataset's atom vocabulary (0 elsewhere)."""
    table = np.zeros(256, dtype=np.int64)
    table[list(atom_vocab)] = np.arange(len(atom_vocab))
    return table


def collate(samples: list[dict], vocab_index: np.ndarray, properties: tuple[str, ...],
            with_bonds: bool) -> dict:
    """Pad decoded samples to [B, N_max]; positions CoM-free over real atoms (float32).

    pos [B, N, 3] float32, node_mask [B, N] bool, z and atom_type [B, N] int64 (0 at padding),
    num_atoms [B] int64, num_atoms_host (the same counts as a list of ints, which stays on the host when the
    trainer copies the tensors to its device: size chunks are planned from it), props [B, P] float32 in
    dataset units, keys [B] str, bond_order [B, N, N] int8 and has_bonds [B] bool (with_bonds; aromatic = 4).
    """
    sizes = [len(s["z"]) for s in samples]
    B, N = len(samples), max(sizes)
    pos = np.zeros((B, N, 3), dtype=np.float32)
    z = np.zeros((B, N), dtype=np.int64)
    mask = np.zeros((B, N), dtype=bool)
    for b, s in enumerate(samples):
        n = sizes[b]
        pos[b, :n] = s["pos"]
        z[b, :n] = s["z"]
        mask[b, :n] = True
    num_atoms = np.asarray(sizes, dtype=np.int64)
    pos -= (pos.sum(axis=1, keepdims=True) / num_atoms[:, None, None]) * mask[..., None]
    # numpy, not torch: worker processes pickle numpy through the pipe far faster than torch
    # moves small tensors through shared memory; StreamingLoader converts (zero-copy).
    batch = {
        "pos": pos,
        "node_mask": mask,
        "z": z,
        "atom_type": vocab_index[z] * mask,
        "num_atoms": num_atoms,
        "num_atoms_host": sizes,
        "props": np.asarray([[s["props"][p] for p in properties] for s in samples],
                            dtype=np.float32).reshape(B, len(properties)),
        "keys": [s["key"] for s in samples],
    }
    if with_bonds:
        order = np.zeros((B, N, N), dtype=np.int8)
        has_bonds = np.zeros(B, dtype=bool)
        for b, s in enumerate(samples):
            if s["bonds"] is not None:
                has_bonds[b] = True
                if len(s["bonds"]):
                    i, j, o = s["bonds"].T
                    order[b, i, j] = o
                    order[b, j, i] = o
        batch["bond_order"] = order
        batch["has_bonds"] = has_bonds  # False: bonds unknown (e.g. perception failed), not "no bonds"
    return batch


def stream_of_worker(worker: int, consumed: list[int], lengths: list[int]) -> int:
    """The worker stream (its plan) that DataLoader worker ``worker`` serves, given the batches of each stream
    handed out already (``consumed``) and planned (``lengths``).

    The DataLoader takes a batch from each worker in turn, from worker 0 on and passing over finished ones,
    so an epoch yields batch k of streams 0, 1, ... before batch k + 1 of any. The stream whose batch is
    next (the lowest-numbered of those with the fewest batches handed out) goes to worker 0 and the others
    follow it round: a resumed epoch goes on in exactly the order it would have had without the restart.
    """
    left = [(c, s) for s, (c, n) in enumerate(zip(consumed, lengths)) if c < n]
    return ((min(left)[1] if left else 0) + worker) % len(lengths)


class _EpochStream(IterableDataset):
    """The batches of one rank, per worker, for the epoch and start positions in ``position``: a shared-memory
    tensor [epoch, first batch of stream 0, of stream 1, ...]. Persistent DataLoader workers keep their copy of
    this object for the whole run and read the position again each time an epoch starts."""

    def __init__(self, cfg: LoaderConfig, reading: Reading, manifest: Manifest, rank: int, world_size: int,
                 position: torch.Tensor):
        self.cfg, self.reading, self.manifest, self.rank, self.world_size = cfg, reading, manifest, rank, world_size
        self.position, self.properties = position, reading.properties
        self.vocab_index = vocab_lookup(manifest.atom_vocab)
        self.known_z = np.zeros(256, dtype=bool)
        self.known_z[list(manifest.atom_vocab)] = True
        self.shards = manifest.shards(reading.split)

    def __iter__(self):
        info = get_worker_info()
        epoch, *skip = self.position.tolist()
        plan = plan_epoch([s["count"] for s in self.shards], [s["num_atoms"] for s in self.shards],
                          self.cfg.batching(self.reading.shuffle), epoch, self.reading.seed, self.world_size,
                          len(skip))
        stream = stream_of_worker(info.id if info else 0, skip, [len(p.batches) for p in plan[self.rank]])
        fs, _ = storage.get_fs(self.manifest.url, self.reading.storage)
        yield from self._run(plan[self.rank][stream], stream, fs, skip[stream])

    def _read_shard(self, fs, shard_id: int) -> list[dict] | None:
        shard = self.shards[shard_id]
        try:
            samples = read_shard(self.manifest, shard, self.reading.storage, self.reading.with_bonds, fs=fs,
                                 attempts=self.cfg.retries)
            self._check_samples(samples, shard)
            return samples
        except BAD_SHARD_ERRORS as err:  # the shard's url is in the message
            log.error("skipping shard: %s", err)
            return None

    def _check_samples(self, samples: list[dict], shard: dict) -> None:
        """What collate needs of a sample beyond read_shard's checks: the batch's properties as numbers and
        elements of the dataset's vocabulary (a damaged shard can hold samples that decode and still lack them)."""
        number = (int, float)
        for s in samples:
            props = s["props"]
            for p in self.properties:
                value = props.get(p)
                if value.__class__ not in number:  # missing, a string, a bool, a list: not a number
                    raise CorruptShardError(f"{self.manifest.shard_url(shard)}: sample {s['key']}: property {p!r} "
                                            f"missing or not a number")
        if samples and not self.known_z[np.concatenate([s["z"] for s in samples])].all():
            raise CorruptShardError(f"{self.manifest.shard_url(shard)}: atomic numbers outside the dataset's "
                                    f"vocabulary {list(self.manifest.atom_vocab)}")

    def _run(self, wplan, stream: int, fs, first: int):
        batches = wplan.batches[first:]
        loaded: dict[int, dict | None] = {}    # stream position -> sample (None: its shard was bad)
        needed = set(np.concatenate(batches).tolist()) if batches else set()
        read_upto = 0                          # stream positions < read_upto have been read
        bad_shards: list[str] = []
        owed = 0                               # batches lost entirely to bad shards, repeated later
        n = len(wplan.shard_ids)
        for k, batch in enumerate(batches, start=first):
            last = int(batch.max())
            while read_upto <= last:
                shard_id = int(wplan.shard_ids[read_upto])
                end = read_upto
                while end < n and wplan.shard_ids[end] == shard_id:
                    end += 1
                wanted = [p for p in range(read_upto, end) if p in needed]
                if wanted:
                    samples = self._read_shard(fs, shard_id)
                    if samples is None:
                        bad_shards.append(self.shards[shard_id]["name"])
                        self._check_bad(bad_shards)
                    for p in wanted:
                        loaded[p] = None if samples is None else samples[int(wplan.index_in_shard[p])]
                read_upto = end
            got = [loaded.pop(int(p)) for p in batch]
            got = [s for s in got if s is not None]
            if not got:
                owed += 1
                continue
            out = collate(got, self.vocab_index, self.properties, self.reading.with_bonds)
            out.update(stream=stream, batch_index=k, bad_shards=list(bad_shards))
            for _ in range(1 + owed):  # keep the rank's batch count equal to the plan
                yield dict(out)
            owed = 0
        if owed:
            raise TooManyBadShardsError(f"worker stream {stream} of rank {self.rank} lost all of its last {owed} "
                                        f"batch(es) to bad shards: {bad_shards}")

    def _check_bad(self, bad: list[str]) -> None:
        limit = self.cfg.max_bad_shards
        if limit is None:
            limit = max(1, len(self.shards) // 100)
        if len(bad) > limit:
            raise TooManyBadShardsError(
                f"{len(bad)} corrupt or missing shards in {self.manifest.url} split {self.reading.split!r} "
                f"(limit data.max_bad_shards = {limit}): {', '.join(bad)}. Rebuild the dataset or raise the limit.")


def _leave_signals_to_the_rank(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGINT are for the rank, not for its workers.

    A preemption (SLURM, Kubernetes, a launcher) signals every process of the job, workers included. A
    worker that died of it made its rank raise "DataLoader worker ... is killed by signal" before the rank
    could finish its step and save. So workers ignore SIGINT, and SIGTERM from anyone but their rank: they
    serve batches until the rank has saved and releases its iterator, which shuts them down as usual.
    SIGTERM from the rank itself still ends a worker at once, as torch's own handler does: the rank's
    multiprocessing terminates (then joins) live workers when it exits with an error, and would wait forever
    for workers that ignored it. A worker also exits when its rank dies (torch's watchdog).

    torch installs its worker handlers (C level, SIGTERM among them) before calling this, and nothing
    in the worker touches signals after it. SIGTERM is blocked here, so in every thread this one starts
    too, and taken only by a thread of its own that sees the sender.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    rank_pid = parent.pid if parent is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(rank_pid,), name="sigterm", daemon=True).start()


def _take_sigterm(rank_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == rank_pid:
            os._exit(0)


def _as_is(batch):
    # Batches are collated in the worker already; the default would walk every key string again.
    return batch


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class Reading:
    """What a user of the loader decides beyond LoaderConfig (a run: its seed, model and storage)."""
    split: str
    seed: int
    shuffle: bool
    properties: tuple[str, ...]
    with_bonds: bool
    storage: dict | None = field(default=None, repr=False)


class StreamingLoader:
    """Epoch-based iteration over a split with exact, resumable position (see module docstring).

    split: default ``cfg.split``; properties: the ``props`` columns (default: every property of the
    dataset); with_bonds: also read ``bond_order``/``has_bonds``; storage: fsspec/S3 options;
    manifest: the dataset's manifest when the caller has read it already (it is read once per process).
    """

    def __init__(self, cfg: LoaderConfig, *, split: str | None = None, seed: int = 0, shuffle: bool = True,
                 properties=None, with_bonds: bool = False, storage: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, manifest: Manifest | None = None):
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        split = split or cfg.split
        self.manifest = manifest or load_manifest(cfg.url, storage)
        self.manifest.split(split)  # a clear error for an unknown split, before any work
        if split == cfg.split:
            self.manifest = cfg.training_view(self.manifest)
        known = tuple(self.manifest.data.get("properties", {}))
        properties = tuple(properties) if properties is not None else known
        missing = [p for p in properties if p not in known]
        if missing:
            raise InputError(f"properties {missing} are not in {cfg.url} (it has {list(known)})")
        if self.manifest.count(split) < world_size * max(1, cfg.num_workers):
            raise InputError(f"split {split!r} of {cfg.url} has {self.manifest.count(split)} samples, "
                             f"fewer than ranks x workers = {world_size * max(1, cfg.num_workers)}")
        self.reading = Reading(split, seed, shuffle, properties, with_bonds, storage)
        self.properties = properties
        self.epoch = 0
        self._consumed = [0] * max(1, cfg.num_workers)   # batches handed out, per worker stream
        self._bad_shards: set[str] = set()
        self._len = None
        # where the next epoch starts, in shared memory: the workers below persist across epochs and read it
        self._position = torch.zeros(1 + len(self._consumed), dtype=torch.int64).share_memory_()
        self._dataloader = None

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        if self._len is None:
            shards = self.manifest.shards(self.reading.split)
            plan = plan_epoch([s["count"] for s in shards], [s["num_atoms"] for s in shards],
                              self.cfg.batching(self.reading.shuffle), self.epoch, self.reading.seed,
                              self.world_size, max(1, self.cfg.num_workers))
            self._len = sum(len(p.batches) for p in plan[self.rank])
        return self._len

    @property
    def bad_shards(self) -> list[str]:
        return sorted(self._bad_shards)

    def _loader(self) -> DataLoader:
        """One DataLoader for the loader's life: its worker processes persist across epochs, so an epoch
        boundary starts no processes and re-reads nothing but the shards."""
        if self._dataloader is None:
            stream = _EpochStream(self.cfg, self.reading, self.manifest, self.rank, self.world_size, self._position)
            workers = self.cfg.num_workers
            # A generator of its own: DataLoader draws its workers' base seed from it, and drawing from the
            # global RNG would shift the training noise of a resumed run.
            self._dataloader = DataLoader(
                stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                prefetch_factor=self.cfg.prefetch_factor if workers else None,
                worker_init_fn=_leave_signals_to_the_rank if workers else None, persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(self.reading.seed))
        return self._dataloader

    def close(self) -> None:
        """Stop the worker processes now. They persist across epochs and otherwise stop only when the loader is
        garbage-collected; a forked worker holds copies of the parent's open files and sockets until then.
        Iterating again afterwards starts new workers."""
        iterator = self._dataloader._iterator if self._dataloader is not None else None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what DataLoader itself calls when its iterator is deleted
        self._dataloader = None

    def __iter__(self):
        workers = self.cfg.num_workers
        self._position[0] = self.epoch
        self._position[1:] = torch.tensor(self._consumed)
        for batch in self._loader():
            self._consumed[batch.pop("stream")] = batch.pop("batch_index") + 1
            self._bad_shards.update(batch.pop("bad_shards"))
            yield {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        self.epoch += 1
        self._consumed = [0] * max(1, workers)
        self._len = None

    # --- exact resume -----------------------------------------------------------------------
    def _identity(self) -> dict:
        c, r = self.cfg, self.reading
        # written into checkpoints (so without credentials); load_state_dict does not compare it
        return {"url": redact_url(c.url.rstrip("/")), "split": r.split, "world_size": self.world_size,
                "num_workers": max(1, c.num_workers), "seed": r.seed,
                "batching": [c.batch_size, c.pair_budget, list(c.bucket_bounds), r.shuffle, c.shuffle_buffer]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": list(self._consumed), "bad_shards": self.bad_shards,
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        changed = [k for k in mine if k != "url" and state.get(k) != mine[k]]
        if changed:
            raise InputError("cannot resume the data loader exactly: " + ", ".join(
                f"{k} was {state.get(k)!r}, now {mine[k]!r}" for k in changed) +
                ". Resume with the same world size, data.num_workers, seed and batching.")
        self.epoch = int(state["epoch"])
        self._consumed = list(state["consumed"])
        self._bad_shards = set(state.get("bad_shards", []))
        self._len = None
