"""Size chunks: run a padded batch as a few smaller padded batches of similar-sized molecules.

The dense EGNN costs B * N^2 pairs with N the largest molecule of the batch. Molecules never interact, so a
batch can be cut into chunks of similar atom counts, each padded only to its own largest molecule. The cut is
chosen by dynamic programming over the sorted atom counts, minimising sum(len(chunk) * n_max^2) plus a fixed
cost per chunk (the per-call overhead, in pair equivalents). Planning reads atom counts on the host, so it
happens once per batch outside the model's forward; on GPUs, where per-call overhead dominates, it is off
unless asked for (the data loader's size buckets already keep padding small there).
"""

import torch

DEFAULT_CHUNK_COST_PAIRS = {"cpu": 1024}  # devices not listed: no chunking


def default_chunk_cost(device):
    return DEFAULT_CHUNK_COST_PAIRS.get(torch.device(device).type)


def plan_chunks(num_atoms, chunk_cost_pairs):
    """num_atoms: host sequence of atom counts -> list of (molecule indices LongTensor, padded size).

    chunk_cost_pairs None keeps the whole batch as one chunk (padded to its largest molecule).
    """
    counts = [int(n) for n in num_atoms]
    if not counts:
        return []
    if chunk_cost_pairs is None:
        return [(torch.arange(len(counts)), max(counts))]
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    sizes = [counts[i] for i in order]
    # best[k]: cost of chunking the k smallest molecules; a chunk (j, k] costs (k - j) * sizes[k-1]^2 + overhead
    best = [0.0] + [float("inf")] * len(sizes)
    cut = [0] * (len(sizes) + 1)
    for k in range(1, len(sizes) + 1):
        for j in range(k):
            cost = best[j] + (k - j) * sizes[k - 1] ** 2 + chunk_cost_pairs
            if cost < best[k]:
                best[k], cut[k] = cost, j
    chunks, k = [], len(sizes)
    while k > 0:
        j = cut[k]
        chunks.append((torch.tensor(order[j:k]), sizes[k - 1]))
        k = j
    return chunks[::-1]


def take(tensor, index, n_pad=None):
    """Rows `index` of a batch tensor; with n_pad, per-atom tensors [B, N, ...] are cut to n_pad atoms."""
    out = tensor.index_select(0, index.to(tensor.device))
    return out if n_pad is None else out[:, :n_pad]
