"""The sampling chunk plan of evals/generate.py (no Ray): molecules sorted and cut by an atom-pair budget.

That the molecules do not depend on the number of workers end to end is test_generate_job's (1 and 2 workers
give the same samples.sdf); here the plan itself is checked: it takes no worker count and is a function of the
seed, the histogram and the budget alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from molscale.datasets.sources.qm9 import train_atom_count_histogram
from molscale.evals.ray_sampling import chunk_plan, fixed_count_chunks, plan_summary
from molscale.trainer.model.packing import budget_chunks, default_pair_budget, real_pair_fraction


@pytest.fixture(scope="module")
def qm9_histogram():
    return train_atom_count_histogram()


def check_plan(plan, n_samples, budget):
    indices = np.concatenate([idx for _, idx, _ in plan])
    assert sorted(indices.tolist()) == list(range(n_samples))  # every molecule exactly once
    for _, idx, counts in plan:
        assert len(idx) == 1 or len(idx) * int(counts.max()) ** 2 <= budget
    assert len({seed for seed, _, _ in plan}) == len(plan)


@pytest.mark.parametrize("n_samples,batch", [(1000, 250), (10000, 250), (10000, 1000), (24, 6)])
def test_budget_plan_covers_every_molecule_within_budget_and_pads_less(qm9_histogram, n_samples, batch):
    budget = default_pair_budget(qm9_histogram, batch)
    plan = chunk_plan(n_samples, qm9_histogram, 7, budget)
    check_plan(plan, n_samples, budget)
    summary = plan_summary(plan, budget, batch)
    assert summary["real_pair_fraction"] > summary["fixed_count_real_pair_fraction"]
    # --batch keeps its meaning on average: about as many chunks as fixed chunks of --batch molecules
    assert len(plan) <= 1.5 * -(-n_samples // batch) + 1


def test_budget_plan_is_deterministic_and_follows_the_seed(qm9_histogram):
    budget = default_pair_budget(qm9_histogram, 250)
    a, b = (chunk_plan(1000, qm9_histogram, 3, budget) for _ in range(2))
    assert [(s, i.tolist(), c.tolist()) for s, i, c in a] == [(s, i.tolist(), c.tolist()) for s, i, c in b]
    other = chunk_plan(1000, qm9_histogram, 4, budget)
    assert [c.tolist() for _, _, c in other] != [c.tolist() for _, _, c in a]


def test_given_counts_are_planned_as_given():
    counts = [5, 29, 3, 12, 12, 29, 7]  # a conditional run's (count, target) pairs keep their order
    plan = chunk_plan(len(counts), {5: 1}, 0, 2 * 29 ** 2, counts)
    check_plan(plan, len(counts), 2 * 29 ** 2)
    for _, idx, chunk_counts in plan:
        assert chunk_counts.tolist() == [counts[i] for i in idx]
    assert max(len(idx) for _, idx, _ in plan) > 1 and plan[-1][2].tolist() == [29, 29]


def test_a_molecule_larger_than_the_budget_gets_a_chunk_of_its_own():
    chunks = budget_chunks([4, 30, 4, 4], 100)
    assert [(idx.tolist(), n) for idx, n in chunks] == [([0, 2, 3], 4), ([1], 30)]


def test_budget_plan_beats_the_fixed_count_plan_on_qm9(qm9_histogram):
    """The numbers docs and the report quote: real / padded atom pairs at 1,000 and 10,000 molecules."""
    for n_samples in (1000, 10000):
        budget = default_pair_budget(qm9_histogram, 250)
        plan = chunk_plan(n_samples, qm9_histogram, 0, budget)
        counts = np.concatenate([c for _, _, c in plan])
        new = real_pair_fraction(counts, [(idx, int(c.max())) for _, idx, c in plan])
        old = real_pair_fraction(counts, fixed_count_chunks(counts, 250))
        assert new > old and new > 0.9
        largest_old = max(len(idx) * n ** 2 for idx, n in fixed_count_chunks(counts, 250))
        assert max(len(idx) * int(c.max()) ** 2 for _, idx, c in plan) <= min(budget, largest_old)
