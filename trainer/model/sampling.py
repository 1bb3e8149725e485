"""Ancestral sampling (EDM's sample_p_zs_given_zt) and property prediction, for UniGEM and EDM models.

The sampler visits a grid of time steps T = t_K > ... > t_1 > t_0 = 0 (all T steps, or every `stride`-th),
takes the ancestral step t -> s between neighbours and ends with the prediction at t = 0:
x = (z_0 - sigma_0 eps_hat) / alpha_0. UniGEM routes the whole batch through the branch of the current phase
and reads atom types from the growth branch's head at t = 0; EDM takes the argmax of the one-hot channels.
Sampler state is float32 (the dtype of the model's first parameter when that is float64, for tests).
"""

import torch

from molscale.trainer.model.diffusion import (
    chunk_cost,
    chunks_of,
    com_free_noise,
    host_atom_counts,
    masked_noise,
    remove_mean,
)
from molscale.trainer.model.packing import plan_chunks, take


def sample_num_atoms(histogram, num_samples, generator=None):
    """Atom counts drawn from a {num_atoms: count} histogram -> LongTensor [num_samples]."""
    sizes = torch.tensor([int(n) for n in histogram], dtype=torch.long)
    weights = torch.tensor([float(c) for c in histogram.values()], dtype=torch.float64)
    if len(sizes) == 0 or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("the atom-count histogram must hold at least one positive count")
    if generator is not None:
        weights = weights.to(generator.device)
    draws = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    return sizes[draws.cpu()]


def timestep_grid(num_steps, stride=1):
    """[T, T - stride, ..., 0]: always starts at T and ends at 0."""
    if stride < 1:
        raise ValueError(f"sampling stride must be >= 1, got {stride}")
    grid = list(range(num_steps, 0, -stride))
    return grid + [0]


def _state_dtype(model):
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def sample(model, num_atoms, stride=1, generator=None, device=None):
    """Generate molecules. num_atoms: LongTensor [B] (e.g. from sample_num_atoms).

    Returns pos [B, N, 3] (Angstrom, CoM-free), node_mask [B, N], atom_type [B, N] (vocabulary index, 0 at
    padding), z [B, N] (atomic numbers, 0 at padding), num_atoms [B]; N = max(num_atoms).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_atoms = torch.as_tensor(num_atoms, dtype=torch.long).cpu()
    batch_size, n_max = len(num_atoms), int(num_atoms.max())
    grid = timestep_grid(model.num_steps, stride)
    pos = torch.zeros(batch_size, n_max, 3, dtype=_state_dtype(model), device=device)
    atom_type = torch.zeros(batch_size, n_max, dtype=torch.long, device=device)
    for idx, n_pad in plan_chunks(num_atoms.tolist(), chunk_cost(model, device)):
        node_mask = torch.arange(n_pad)[None, :] < num_atoms[idx][:, None]  # [b, n_pad]
        pos_c, type_c = _sample_chunk(model, node_mask.to(device), grid, generator, pos.dtype)
        pos[idx.to(device), :n_pad] = pos_c
        atom_type[idx.to(device), :n_pad] = type_c
    node_mask = (torch.arange(n_max)[None, :] < num_atoms[:, None]).to(device)
    vocab = torch.tensor(model.cfg.atom_vocab, dtype=torch.long, device=device)
    z = torch.where(node_mask, vocab[atom_type], 0)
    return {"pos": pos, "node_mask": node_mask, "atom_type": atom_type, "z": z, "num_atoms": num_atoms.to(device)}


def ancestral_step(schedule, z_t, eps_hat, t: int, s: int, node_mask, generator=None, com_free=True):
    """z_s ~ p(z_s | z_t) for s < t, with eps_hat the network's noise estimate. z_t, eps_hat [B, N, D].

    Coordinates (com_free) get CoM-free noise and are projected back to zero CoM after the step.
    """
    inv_alpha_ts, eps_coef, std = schedule.step_coefficients(t, s)
    draw = com_free_noise if com_free else masked_noise
    z_s = z_t * inv_alpha_ts - eps_coef * eps_hat + std * draw(z_t.shape, node_mask, generator, z_t.dtype)
    return remove_mean(z_s, node_mask) if com_free else z_s * node_mask.to(z_s.dtype).unsqueeze(-1)


def _sample_chunk(model, node_mask, grid, generator, dtype):
    # node_mask [b, n] -> pos [b, n, 3], atom_type [b, n]; the model says which latents it diffuses
    latents = model.initial_latents(node_mask, generator, dtype)
    for t, s in zip(grid[:-1], grid[1:]):
        eps = model.predict_noise(latents, node_mask, t, final=False)
        latents = {name: ancestral_step(model.schedule, z, eps[name], t, s, node_mask, generator,
                                        com_free=name == "pos") for name, z in latents.items()}
    # final prediction at t = 0
    out = model.predict_noise(latents, node_mask, 0, final=True)
    alpha0, sigma0 = model.schedule.host_alpha_sigma(0)
    pos = remove_mean((latents["pos"] - sigma0 * out["pos"]) / alpha0, node_mask)
    type_scores = model.atom_type_scores(latents, out, alpha0, sigma0)
    atom_type = torch.where(node_mask, type_scores.argmax(-1), 0)
    return pos, atom_type


@torch.no_grad()
def predict_properties(model, batch):
    """UniGEM property prediction in dataset units: clean coordinates at t = 0 through the growth branch.

    batch: pos [B, N, 3], node_mask [B, N]. Returns [B, P] in the units of batch["props"].
    """
    if not (model.predicts_properties and model.cfg.properties):
        raise ValueError("property prediction needs a UniGEM model configured with properties")
    pos, node_mask = batch["pos"], batch["node_mask"]
    batch_size, n_max = node_mask.shape
    out = pos.new_zeros(batch_size, len(model.cfg.properties))
    cost = chunk_cost(model, pos.device)
    counts = host_atom_counts(node_mask, plan_needed=cost is not None)  # size chunks off: nothing read back
    for idx, n_pad in chunks_of(torch.arange(batch_size, device=pos.device), counts, cost, n_max):
        t = torch.zeros(len(idx), dtype=torch.long, device=pos.device)
        pred = model.denoise(take(pos, idx, n_pad), take(node_mask, idx, n_pad), t, "growth", heads=True)["props"]
        out[idx] = pred.to(out.dtype)
    mean, mad = model.prop_normalisation(out)
    return out * mad + mean
