"""Size-chunk planners (trainer/model/packing.py) against brute force over every cut of the sorted molecules."""

import itertools
import random

import pytest

from molscale.trainer.model.packing import budget_chunks, plan_chunks


def cost(chunks, per_chunk):
    return sum(len(idx) * n_pad ** 2 + per_chunk for idx, n_pad in chunks)


def best_cut(sizes, per_chunk, max_pairs=None):
    """The least cost over every way to cut the sorted sizes into contiguous chunks (within max_pairs)."""
    sizes, best = sorted(sizes), float("inf")
    for mask in itertools.product((False, True), repeat=len(sizes) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(mask) if cut] + [len(sizes)]
        chunks = [(range(a, b), sizes[b - 1]) for a, b in zip(bounds, bounds[1:])]
        if max_pairs is None or all(len(i) == 1 or len(i) * n ** 2 <= max_pairs for i, n in chunks):
            best = min(best, cost(chunks, per_chunk))
    return best


def check_cover(chunks, sizes):
    assert sorted(i for idx, _ in chunks for i in idx.tolist()) == list(range(len(sizes)))
    for idx, n_pad in chunks:
        assert n_pad == max(sizes[i] for i in idx.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_plan_chunks_finds_the_cheapest_cut(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(2, 12) for _ in range(rng.randint(1, 9))]
    for per_chunk in (0, 20, 200, 10_000):
        chunks = plan_chunks(sizes, per_chunk)
        check_cover(chunks, sizes)
        assert cost(chunks, per_chunk) == best_cut(sizes, per_chunk)


@pytest.mark.parametrize("seed", range(6))
def test_budget_chunks_find_the_cheapest_cut_within_the_budget(seed):
    rng = random.Random(100 + seed)
    sizes = [rng.randint(2, 12) for _ in range(rng.randint(1, 9))]
    for max_pairs, per_chunk in ((100, 10), (300, 0), (300, 40), (1000, 125)):
        chunks = budget_chunks(sizes, max_pairs, per_chunk)
        check_cover(chunks, sizes)
        assert all(len(idx) == 1 or len(idx) * n ** 2 <= max_pairs for idx, n in chunks)
        assert cost(chunks, per_chunk) == best_cut(sizes, per_chunk, max_pairs)
