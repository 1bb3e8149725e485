"""plan_epoch, the loader's epoch plan, on its own: which samples each rank and worker reads, batched how."""

import itertools

import numpy as np
import pytest

from molscale.datasets.stream.plan import Batching, plan_epoch

SHARD_COUNTS = [7, 12, 5, 9]


def shard_atoms(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 30, size=n).tolist() for n in SHARD_COUNTS]


def samples_read(plans):
    """(rank, (shard, index)) of every sample each rank's batches hold, in order."""
    out = []
    for rank, rank_plans in enumerate(plans):
        for p in rank_plans:
            for batch in p.batches:
                out += [(rank, (int(p.shard_ids[i]), int(p.index_in_shard[i]))) for i in batch]
    return out


@pytest.mark.parametrize("world_size, streams", [(1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("batching", [Batching(batch_size=4), Batching(batch_size=None, pair_budget=2000,
                                                                        bucket_bounds=(10, 20))],
                         ids=["fixed", "pair-budget"])
def test_every_sample_once_and_every_rank_the_same_number_of_batches(world_size, streams, batching):
    plans = plan_epoch(SHARD_COUNTS, shard_atoms(), batching, epoch=0, seed=1, world_size=world_size,
                       num_streams=streams)
    assert len(plans) == world_size and all(len(r) == streams for r in plans)
    read = samples_read(plans)
    everything = {(s, i) for s, n in enumerate(SHARD_COUNTS) for i in range(n)}
    assert sorted(sample for _, sample in read) == sorted(everything)  # once each, none missing
    batches_per_rank = {sum(len(p.batches) for p in r) for r in plans}
    assert len(batches_per_rank) == 1  # no rank waits for another at the end of an epoch


def test_a_pair_budget_bounds_every_batch():
    atoms = shard_atoms(3)
    budget = 1500
    plans = plan_epoch(SHARD_COUNTS, atoms, Batching(batch_size=None, pair_budget=budget, bucket_bounds=(12, 20)),
                       epoch=2, seed=0, world_size=1, num_streams=1)
    for p in plans[0]:
        for batch in p.batches:
            sizes = [atoms[int(p.shard_ids[i])][int(p.index_in_shard[i])] for i in batch]
            assert len(batch) == 1 or len(batch) * max(sizes) ** 2 <= budget


def test_the_plan_depends_on_seed_and_epoch_only():
    def order(epoch, seed, shuffle=True):
        plans = plan_epoch(SHARD_COUNTS, shard_atoms(), Batching(batch_size=5, shuffle=shuffle, shuffle_buffer=8),
                           epoch=epoch, seed=seed, world_size=2, num_streams=2)
        return samples_read(plans)
    assert order(0, 1) == order(0, 1)
    assert order(1, 1) != order(0, 1) and order(0, 2) != order(0, 1)
    # without shuffling the shards are read in order, each from its start
    unshuffled = [sample for _, sample in order(0, 1, shuffle=False)]
    assert unshuffled == [(s, i) for s, n in enumerate(SHARD_COUNTS) for i in range(n)]


def test_more_ranks_than_samples_is_refused():
    with pytest.raises(ValueError, match="a rank has no samples at all"):
        plan_epoch([2], [[5, 6]], Batching(batch_size=1), epoch=0, seed=0, world_size=3, num_streams=1)


def test_ranks_read_disjoint_contiguous_halves_of_the_epoch():
    plans = plan_epoch(SHARD_COUNTS, shard_atoms(), Batching(batch_size=3), epoch=0, seed=4, world_size=2,
                       num_streams=1)
    per_rank = {rank: {s for r, s in samples_read(plans) if r == rank} for rank in (0, 1)}
    assert not per_rank[0] & per_rank[1]
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    assert list(itertools.chain(*per_rank.values()))  # both hold samples
