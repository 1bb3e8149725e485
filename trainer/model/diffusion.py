"""Diffusion maths for training: CoM-free noise, time drawing and the UniGEM / EDM losses (docs/architecture.md).

Random draws use `generator` (for reproducible runs; drawn on its device, moved to the data's) or, with
generator None, the global RNG of the data's device. With size chunks off (the default on GPUs) the losses
read nothing back to the host: no device synchronisation, and a step's shapes depend only on the batch.
Batches follow the loader contract: pos [B, N, 3] (CoM-free, Angstrom), node_mask [B, N] bool with real atoms
first, atom_type [B, N] vocabulary index, props [B, P] in dataset units. All loss terms are float32 (or the
dtype of pos).
"""

import torch
import torch.nn.functional as F

from molscale.trainer.model.packing import default_chunk_cost, plan_chunks, take


def remove_mean(x, node_mask):
    """Subtract the mean over real atoms; zero at padding. x [B, N, D], node_mask [B, N]."""
    mask = node_mask.to(x.dtype).unsqueeze(-1)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    return (x - (x * mask).sum(1, keepdim=True) / count) * mask


def randn(shape, generator=None, device=None, dtype=torch.float32):
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def com_free_noise(shape, node_mask, generator=None, dtype=torch.float32):
    """Gaussian noise projected to the zero centre-of-mass subspace of each molecule; zero at padding."""
    return remove_mean(randn(shape, generator, node_mask.device, dtype), node_mask)


def masked_noise(shape, node_mask, generator=None, dtype=torch.float32):
    return randn(shape, generator, node_mask.device, dtype) * node_mask.to(dtype).unsqueeze(-1)


def randint(low, high, size, generator=None, device="cpu"):
    """Integers in [low, high] inclusive on ``device`` (drawn on the generator's device when one is given)."""
    draw_on = generator.device if generator is not None else device
    return torch.randint(low, high + 1, (size,), generator=generator, device=draw_on).to(device)


def randperm(size, generator=None, device="cpu"):
    draw_on = generator.device if generator is not None else device
    return torch.randperm(size, generator=generator, device=draw_on).to(device)


def draw_unigem_phases(batch_size, t_nucleation, num_steps, generator=None, device="cpu"):
    """Growth-phase oversampling (UniGEM paper): a random half of the batch gets t ~ U{0..t_n}, the rest
    t ~ U{t_n+1..T}. Returns (order, t): molecules order[:B // 2] are the growth phase. The halves have fixed
    sizes, so splitting a batch by phase needs no look at t on the host."""
    n_growth = batch_size // 2
    order = randperm(batch_size, generator, device)
    t = torch.empty(batch_size, dtype=torch.long, device=device)
    t[order[:n_growth]] = randint(0, t_nucleation, n_growth, generator, device)
    t[order[n_growth:]] = randint(t_nucleation + 1, num_steps, batch_size - n_growth, generator, device)
    return order, t


def draw_unigem_t(batch_size, t_nucleation, num_steps, generator=None, device="cpu"):
    return draw_unigem_phases(batch_size, t_nucleation, num_steps, generator, device)[1]


def chunk_cost(model, device):
    """Per-chunk cost for plan_chunks, or None for no size chunks (always so for the edge-list layouts)."""
    cost = model.cfg.chunk_cost_pairs
    if model.cfg.layout != "dense":
        return None
    return default_chunk_cost(device) if cost == "auto" else cost


def host_atom_counts(node_mask, plan_needed):
    """Atom counts on the host (one device sync on GPUs, and only when chunking is on)."""
    if not plan_needed:
        return None
    mask = node_mask.cpu()
    counts = mask.sum(1)
    packed = torch.arange(mask.shape[1])[None, :] < counts[:, None]
    if not torch.equal(mask, packed):
        raise ValueError("node_mask must list real atoms first in every molecule (padding at the end)")
    return counts


def chunks_of(indices, counts, cost, n_max):
    """Split molecules `indices` (LongTensor) into size chunks -> [(indices, padded size)]; counts: host atom
    counts (None: chunking off, one chunk at the batch's padded size, nothing read on the host)."""
    if len(indices) == 0:
        return []
    if counts is None:
        return [(indices, n_max)]
    host = indices.cpu()
    return [(host[part].to(indices.device), n_pad) for part, n_pad in plan_chunks(counts[host].tolist(), cost)]


def unigem_loss(model, batch, generator=None, t=None):
    """UniGEM loss (UniGEM paper): each molecule's eps MSE through the branch of its phase; atom-type and property
    L1 on the normalised targets for growth-phase molecules (t <= t_n) only; all weights 1.

    Returns {'loss', 'eps', 'eps_nucleation', 'eps_growth', 'atom_type', 'prop_<name>', ...}: per-molecule means
    over the molecules each term covers (0 when a group is empty).
    """
    cfg = model.cfg
    pos, node_mask = batch["pos"], batch["node_mask"]  # [B, N, 3], [B, N]
    batch_size, n_max = node_mask.shape
    if t is None:
        order, t_dev = draw_unigem_phases(batch_size, cfg.t_nucleation, model.num_steps, generator, pos.device)
        groups = {"nucleation": order[batch_size // 2:], "growth": order[: batch_size // 2]}
    else:  # given times (tests): the phases come from t itself
        t_dev = t.to(pos.device)
        growth = t_dev <= cfg.t_nucleation
        groups = {"nucleation": (~growth).nonzero()[:, 0], "growth": growth.nonzero()[:, 0]}
    eps = com_free_noise(pos.shape, node_mask, generator, pos.dtype)
    alpha, sigma = model.schedule.alpha_sigma(t_dev, pos.dtype)
    pos_t = alpha[:, None, None] * pos + sigma[:, None, None] * eps
    num_atoms = node_mask.sum(1).to(pos.dtype)  # [B]
    type_target = F.one_hot(batch["atom_type"], model.num_atom_types).to(pos.dtype) * 0.25  # [B, N, K]
    if cfg.properties:
        prop_mean, prop_mad = model.prop_normalisation(pos)
        prop_target = (batch["props"].to(pos.dtype) - prop_mean) / prop_mad  # [B, P]

    cost = chunk_cost(model, pos.device)
    counts = host_atom_counts(node_mask, cost is not None)
    sums = {name: pos.new_zeros(()) for name in ("eps_nucleation", "eps_growth", "atom_type")}
    sums.update({f"prop_{name}": pos.new_zeros(()) for name in cfg.properties})
    chunks = [(branch, idx, n_pad, (take(pos_t, idx, n_pad), take(node_mask, idx, n_pad), take(t_dev, idx)))
              for branch, members in groups.items() for idx, n_pad in chunks_of(members, counts, cost, n_max)]
    # the calls this loss makes, announced so that CUDA graphs (when on) are captured before its forward starts
    model.prepare_network([(model._denoise, inputs, {"branch": branch, "heads": branch == "growth"})
                           for branch, _, _, inputs in chunks])
    for branch, idx, n_pad, inputs in chunks:
        mask, n = inputs[1], take(num_atoms, idx)  # [b, n], [b]
        out = model.denoise(*inputs, branch, heads=branch == "growth")
        sq_err = (out["eps"] - take(eps, idx, n_pad)).square().sum((1, 2))  # [b]
        sums[f"eps_{branch}"] = sums[f"eps_{branch}"] + (sq_err / (3 * n)).sum()
        if branch != "growth":
            continue
        abs_err = (out["atom_type"] - take(type_target, idx, n_pad)).abs() * mask.unsqueeze(-1)
        sums["atom_type"] = sums["atom_type"] + (abs_err.sum((1, 2)) / (n * model.num_atom_types)).sum()
        prop_err = (out["props"] - take(prop_target, idx)).abs().sum(0) if cfg.properties else ()  # [P]
        for k, name in enumerate(cfg.properties):
            sums[f"prop_{name}"] = sums[f"prop_{name}"] + prop_err[k]

    n_growth, n_nucleation = max(len(groups["growth"]), 1), max(len(groups["nucleation"]), 1)
    terms = {name: total / (n_nucleation if name == "eps_nucleation" else n_growth) for name, total in sums.items()}
    terms["eps"] = (sums["eps_nucleation"] + sums["eps_growth"]) / batch_size
    terms["loss"] = terms["eps"] + terms["atom_type"] + sum(terms[f"prop_{name}"] for name in cfg.properties)
    return terms


def edm_loss(model, batch, generator=None, t=None):
    """EDM joint diffusion: eps MSE over coordinates and h = [one-hot / 4, Z / 10], normalised per dimension,
    t ~ U{0..T}. Returns {'loss', 'eps', 'eps_pos', 'eps_h'} (the last two per dimension of their part)."""
    pos, node_mask = batch["pos"], batch["node_mask"]
    batch_size, n_max = node_mask.shape
    t_dev = randint(0, model.num_steps, batch_size, generator, pos.device) if t is None else t.to(pos.device)
    h = model.atom_features(batch["atom_type"], node_mask, pos.dtype)  # [B, N, C]
    eps = com_free_noise(pos.shape, node_mask, generator, pos.dtype)
    eps_h = masked_noise(h.shape, node_mask, generator, pos.dtype)
    alpha, sigma = (v[:, None, None] for v in model.schedule.alpha_sigma(t_dev, pos.dtype))
    pos_t, h_t = alpha * pos + sigma * eps, alpha * h + sigma * eps_h
    num_atoms = node_mask.sum(1).to(pos.dtype)

    cost = chunk_cost(model, pos.device)
    counts = host_atom_counts(node_mask, cost is not None)
    sse_pos = sse_h = pos.new_zeros(())  # sums over molecules of per-atom squared errors
    for idx, n_pad in chunks_of(torch.arange(batch_size, device=pos.device), counts, cost, n_max):
        mask, n = take(node_mask, idx, n_pad), take(num_atoms, idx)
        out = model.denoise(take(pos_t, idx, n_pad), take(h_t, idx, n_pad), mask, take(t_dev, idx))
        sse_pos = sse_pos + ((out["eps"] - take(eps, idx, n_pad)).square().sum((1, 2)) / n).sum()
        sse_h = sse_h + ((out["eps_h"] - take(eps_h, idx, n_pad)).square().sum((1, 2)) / n).sum()
    dims_pos, dims_h = 3, model.h_channels
    loss = (sse_pos + sse_h) / (batch_size * (dims_pos + dims_h))
    return {"loss": loss, "eps": loss, "eps_pos": sse_pos / (batch_size * dims_pos),
            "eps_h": sse_h / (batch_size * dims_h)}
