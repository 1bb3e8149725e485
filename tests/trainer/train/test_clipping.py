"""AdaptiveClipper on its own: EDM's rule (threshold 1.5 mean + 2 std of the last 50 clipped norms, starting
from one norm of 3000) against a plain-Python reading of it, skips, and its checkpoint state."""

import collections
import random
import statistics

import torch

from molscale.trainer.train.clipping import INITIAL_NORM, AdaptiveClipper


def reference_thresholds(norms, takes, history=50):
    """The rule as the released EDM code states it, with a deque (the queue of recent norms)."""
    queue = collections.deque([INITIAL_NORM], maxlen=history)
    out = []
    for norm, take in zip(norms, takes):
        threshold = 1.5 * statistics.fmean(queue) + 2 * statistics.pstdev(queue)
        out.append(threshold)
        if take:
            queue.append(min(norm, threshold))
    return out


def test_thresholds_follow_the_rule_through_spikes_and_skips():
    rng = random.Random(0)
    norms = [abs(rng.gauss(5.0, 1.0)) for _ in range(130)]
    norms[70] = norms[71] = 500.0  # spikes: recorded clipped
    takes = [i not in (40, 41, 90) for i in range(len(norms))]  # skipped steps record nothing
    clipper = AdaptiveClipper()
    got = []
    for norm, take in zip(norms, takes):
        threshold = clipper.threshold()
        got.append(float(threshold))
        clipper.push(torch.tensor(norm, dtype=torch.float64), threshold, torch.tensor(take))
    expected = reference_thresholds(norms, takes)
    assert max(abs(g - e) / e for g, e in zip(got, expected)) < 1e-12
    assert got[0] > 4000 and got[-1] < 20  # unclipped at first, then following the recent norms


def test_state_round_trip_and_a_changed_history():
    clipper = AdaptiveClipper(history=4)
    for norm in (3.0, 4.0, 5.0, 6.0, 7.0, 8.0):  # wraps around the ring
        clipper.push(torch.tensor(norm), clipper.threshold())
    state = clipper.state_dict()
    assert state == {"norms": [5.0, 6.0, 7.0, 8.0], "history": 4}  # oldest first
    restored = AdaptiveClipper(history=4)
    restored.load_state_dict(state)
    assert float(restored.threshold()) == float(clipper.threshold())
    longer = AdaptiveClipper(history=50)
    longer.load_state_dict(state)  # the checkpoint's history length wins
    assert longer.history == 4 and float(longer.threshold()) == float(clipper.threshold())
