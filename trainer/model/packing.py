"""Size chunks: run a padded batch as a few smaller padded batches of similar-sized molecules.

The dense EGNN costs B * N^2 pairs with N the largest molecule of the batch. Molecules never interact, so a
batch can be cut into chunks of similar atom counts, each padded only to its own largest molecule. Two ways:

- plan_chunks (training, property prediction, inside one sampling call): dynamic programming over the sorted
  atom counts, minimising sum(len(chunk) * n_max^2) plus a fixed cost per chunk (the per-call overhead, in pair
  equivalents). Planning reads atom counts on the host; the loader's batches carry them there
  (batch["num_atoms_host"]), so no device value is read back.
- budget_chunks (the sampling plan of evals/generate.py): the sorted molecules cut into chunks whose padded cost
  stays within an atom-pair budget, so that no chunk is heavier than the budget and none is padded far beyond
  its members.
"""

import math

import numpy as np
import torch

# The per-call overhead of the network, in atom pairs of network work ("auto" of model.chunk_cost_pairs).
# CPU: about 1,000 pairs. CUDA: an eager call is bound by the host's launches. On an H100 at QM9 batch 64 the
# eager step (two network calls, forward and backward, 7,359 operator calls) took 110 ms, about 50 ms per call,
# while the GPU's own work was 14.4 ms for some 47,000 padded pairs, 0.3 us a pair (BENCHMARKS.md, "One GPU"):
# 50 ms / 0.3 us ~ 160,000 pairs (forward-only sampling calls scale both down alike). That is more than a whole
# QM9 batch of 64 costs, so QM9 batches stay whole; a split pays only where padding wastes more, e.g. a GEOM
# batch holding a 150-atom molecule among 40-atom ones. Devices not listed: no chunking.
DEFAULT_CHUNK_COST_PAIRS = {"cpu": 1024, "cuda": 160_000}


def default_chunk_cost(device):
    return DEFAULT_CHUNK_COST_PAIRS.get(torch.device(device).type)


def _size_runs(counts):
    """(molecule order sorted by size, [(size, end)]): `end` is where each run of equal sizes ends in that order."""
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    runs = []
    for position, i in enumerate(order, start=1):
        if runs and runs[-1][0] == counts[i]:
            runs[-1] = (counts[i], position)
        else:
            runs.append((counts[i], position))
    return order, runs


def plan_chunks(num_atoms, chunk_cost_pairs):
    """num_atoms: host sequence of atom counts -> list of (molecule indices LongTensor, padded size).

    chunk_cost_pairs None keeps the whole batch as one chunk (padded to its largest molecule).
    """
    counts = [int(n) for n in num_atoms]
    if not counts:
        return []
    if chunk_cost_pairs is None:
        return [(torch.arange(len(counts)), max(counts))]
    order, runs = _size_runs(counts)
    # Cuts between molecules of equal size never pay (they add a chunk and save nothing), so the DP runs over
    # the runs of equal sizes: best[k] is the cost of the first k runs; a chunk of runs (j, k] costs
    # (its molecules) * (size of run k)^2 + overhead.
    ends = [0] + [end for _, end in runs]
    best = [0.0] + [float("inf")] * len(runs)
    cut = [0] * (len(runs) + 1)
    for k in range(1, len(runs) + 1):
        for j in range(k):
            cost = best[j] + (ends[k] - ends[j]) * runs[k - 1][0] ** 2 + chunk_cost_pairs
            if cost < best[k]:
                best[k], cut[k] = cost, j
    chunks, k = [], len(runs)
    while k > 0:
        j = cut[k]
        chunks.append((torch.tensor(order[ends[j]:ends[k]]), runs[k - 1][0]))
        k = j
    return chunks[::-1]


def default_pair_budget(histogram: dict[int, int], batch: int) -> int:
    """The atom-pair budget of a sampling chunk: what ``batch`` molecules of the histogram's mean cost (mean N^2)
    would take. Chunks then hold about ``batch`` molecules on average: more of the small ones, fewer of the
    large ones, and about as many chunks as fixed chunks of ``batch`` molecules would make."""
    total = sum(histogram.values())
    mean_pairs = sum(int(n) ** 2 * c for n, c in histogram.items()) / total
    return max(1, math.ceil(batch * mean_pairs))


def budget_chunks(num_atoms, max_pairs, chunk_cost_pairs=None):
    """num_atoms: host sequence -> [(molecule indices LongTensor, padded size)], smallest molecules first.

    The sorted molecules are cut into chunks whose padded cost len(chunk) * n_max^2 stays within max_pairs (a
    chunk holds at least one molecule, so one larger than the budget gets a chunk of its own), minimising the
    padded pairs plus chunk_cost_pairs per chunk, by dynamic programming over the sorted molecules. The default
    per-chunk cost, an eighth of the budget, makes a chunk more only where that saves an eighth of a full
    chunk's work in padding: at 0 every distinct size would get chunks of its own, down to single molecules;
    at the whole budget the plan is the fewest chunks the budget allows, padded across size boundaries.
    """
    counts = np.asarray([int(n) for n in num_atoms], dtype=np.int64)
    chunk_cost = max_pairs // 8 if chunk_cost_pairs is None else chunk_cost_pairs
    order = np.argsort(counts, kind="stable")
    pairs = counts[order] ** 2
    # best[j]: cost of the j smallest molecules; a last chunk (i, j] costs (j - i) * pairs[j-1] + chunk_cost,
    # so best[j] = j * pairs[j-1] + chunk_cost + min over the allowed i of (best[i] - i * pairs[j-1])
    best = np.zeros(len(order) + 1, dtype=np.int64)
    cut = np.zeros(len(order) + 1, dtype=np.int64)
    starts = np.arange(len(order) + 1, dtype=np.int64)
    for j in range(1, len(order) + 1):
        lo = max(0, j - max(1, max_pairs // int(pairs[j - 1])))
        candidates = best[lo:j] - starts[lo:j] * pairs[j - 1]
        i = int(np.argmin(candidates))
        best[j], cut[j] = candidates[i] + j * pairs[j - 1] + chunk_cost, lo + i
    chunks, j = [], len(order)
    while j > 0:
        i = int(cut[j])
        chunks.append((torch.from_numpy(order[i:j].copy()), int(counts[order[j - 1]])))
        j = i
    return chunks[::-1]


def real_pair_fraction(num_atoms, chunks):
    """Real atom pairs (sum of N^2) over padded pairs (sum of len(chunk) * n_pad^2) of a plan: 1 is no padding."""
    real = sum(int(n) ** 2 for n in num_atoms)
    padded = sum(len(idx) * n_pad ** 2 for idx, n_pad in chunks)
    return real / padded if padded else 1.0


def take(tensor, index, n_pad=None):
    """Rows `index` of a batch tensor; with n_pad, per-atom tensors [B, N, ...] are cut to n_pad atoms."""
    out = tensor.index_select(0, index.to(tensor.device))
    return out if n_pad is None else out[:, :n_pad]
