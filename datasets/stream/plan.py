"""The epoch plan: which samples each rank and worker reads, in which order, batched how.

Everything random about an epoch is decided here from the manifest alone (shard sample counts
and atom counts), before any shard is read. That gives three properties the trainer relies on:
  * every rank yields the same number of batches (no DDP end-of-epoch hang),
  * every sample is seen exactly once per epoch (ranks and workers get disjoint sample ranges),
  * resuming is exact: skipping the first k planned batches of a worker skips exactly its samples.

Samples are addressed by their position in the epoch's sequence of (shard, index in shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batching:
    """Fixed molecule count (``batch_size``), or an atom-pair budget over size buckets.

    With a budget, a batch of B molecules padded to N atoms costs B * N^2 (the fully connected
    EGNN's edge count); molecules are grouped by bucket (upper bounds in ``bucket_bounds``) so
    that padding stays small, and a batch is closed before it would exceed ``pair_budget``.
    Built from a validated LoaderConfig (``LoaderConfig.batching``), which checks these values.
    """
    batch_size: int | None = 64
    pair_budget: int | None = None
    bucket_bounds: tuple[int, ...] = ()
    shuffle: bool = True
    shuffle_buffer: int = 1000


@dataclass
class WorkerPlan:
    shard_ids: np.ndarray          # [S_w] shard of each position in this worker's stream
    index_in_shard: np.ndarray     # [S_w]
    batches: list[np.ndarray]      # positions (into the two arrays above) of each batch, in order


def _shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a streaming shuffle buffer of size ``buffer`` over items 0..n-1."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if buffer <= 1:
        return np.arange(n)
    u = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    buf = list(range(min(buffer, n)))
    k = 0
    for item in range(len(buf), n):
        j = int(u[item] * len(buf))
        out[k] = buf[j]
        buf[j] = item
        k += 1
    tail = rng.permutation(len(buf))
    out[k:] = np.asarray(buf, dtype=np.int64)[tail]
    return out


def _batch(order: np.ndarray, sizes: np.ndarray, b: Batching) -> list[np.ndarray]:
    if b.batch_size is not None:
        return [order[i:i + b.batch_size] for i in range(0, len(order), b.batch_size)]
    bounds = list(b.bucket_bounds) or [int(sizes.max(initial=1))]
    pending: list[list[int]] = [[] for _ in range(len(bounds) + 1)]
    pending_max = [0] * (len(bounds) + 1)
    batches = []
    bucket_of = np.searchsorted(np.asarray(bounds), sizes[order], side="left")
    for item, bucket in zip(order.tolist(), bucket_of.tolist()):
        n = int(sizes[item])
        new_max = max(pending_max[bucket], n)
        if pending[bucket] and (len(pending[bucket]) + 1) * new_max * new_max > b.pair_budget:
            batches.append(np.asarray(pending[bucket]))
            pending[bucket], new_max = [], n
        pending[bucket].append(item)
        pending_max[bucket] = new_max
    batches += [np.asarray(p) for p in pending if p]
    return batches


def _equalise(worker_batches: list[list[np.ndarray]], target: int) -> None:
    """Split the largest batches (in place) until the rank has ``target`` batches.

    Splitting keeps every sample exactly once; only where nothing can be split (single-molecule
    batches) is a batch repeated.
    """
    count = sum(len(w) for w in worker_batches)
    while count < target:
        w, i = max(((w, i) for w, bl in enumerate(worker_batches) for i in range(len(bl))),
                   key=lambda wi: len(worker_batches[wi[0]][wi[1]]), default=(None, None))
        if w is None:
            raise ValueError("cannot equalise batch counts: a rank has no samples at all; "
                             "use fewer ranks or workers than there are samples")
        batch = worker_batches[w][i]
        if len(batch) > 1:
            half = len(batch) // 2
            worker_batches[w][i:i + 1] = [batch[:half], batch[half:]]
        else:
            worker_batches[w].append(batch)
        count += 1


def plan_epoch(shard_counts: list[int], shard_num_atoms: list[list[int]], batching: Batching,
               epoch: int, seed: int, world_size: int, num_streams: int) -> list[list[WorkerPlan]]:
    """Plans of every rank (outer list) and worker stream (inner list) for one epoch."""
    rng = np.random.default_rng([seed, epoch, 0])
    n_shards = len(shard_counts)
    shard_order = rng.permutation(n_shards) if batching.shuffle else np.arange(n_shards)
    counts = np.asarray(shard_counts, dtype=np.int64)[shard_order]
    seq_shard = np.repeat(shard_order, counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    seq_index = np.arange(counts.sum()) - np.repeat(starts, counts)
    seq_atoms = np.concatenate([np.asarray(shard_num_atoms[s], dtype=np.int64) for s in shard_order]) \
        if n_shards else np.zeros(0, dtype=np.int64)
    total = len(seq_shard)

    plans: list[list[WorkerPlan]] = []
    for rank in range(world_size):
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        rank_plans = []
        for w in range(num_streams):
            a = lo + w * (hi - lo) // num_streams
            z = lo + (w + 1) * (hi - lo) // num_streams
            sizes = seq_atoms[a:z]
            if batching.shuffle:
                order = _shuffle_buffer_order(z - a, batching.shuffle_buffer,
                                              np.random.default_rng([seed, epoch, 1, rank, w]))
            else:
                order = np.arange(z - a)
            rank_plans.append(WorkerPlan(seq_shard[a:z], seq_index[a:z], _batch(order, sizes, batching)))
        plans.append(rank_plans)

    target = max(sum(len(p.batches) for p in rank_plans) for rank_plans in plans)
    for rank_plans in plans:
        lists = [p.batches for p in rank_plans]
        _equalise(lists, target)
        for p, bl in zip(rank_plans, lists):
            p.batches = bl
    return plans
