"""Helpers for the model-core tests: tiny models and padded batches in the data loader's format."""

import torch

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.trainer.model.diffusion import remove_mean
from molscale.trainer.model.networks import ModelConfig, UniGEM, build_model


def make_batch(num_atoms, n_max=None, dtype=torch.float64, seed=0, num_types=5, num_props=2):
    """A padded batch (real atoms first) with CoM-free coordinates, like the data loader's."""
    gen = torch.Generator().manual_seed(seed)
    num_atoms = torch.as_tensor(num_atoms)
    n_max = n_max or int(num_atoms.max())
    node_mask = torch.arange(n_max)[None, :] < num_atoms[:, None]
    pos = remove_mean(1.5 * torch.randn(len(num_atoms), n_max, 3, generator=gen, dtype=dtype), node_mask)
    atom_type = torch.randint(0, num_types, (len(num_atoms), n_max), generator=gen) * node_mask
    props = torch.randn(len(num_atoms), num_props, generator=gen, dtype=dtype) * 3 + 1
    return {"pos": pos, "node_mask": node_mask, "atom_type": atom_type, "num_atoms": num_atoms, "props": props}


def tiny_model(kind="unigem", hidden=16, layers=3, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    unigem = kind == "unigem"  # only UniGEM has a property head
    cfg = ModelConfig(kind=kind, hidden=hidden, layers=layers, properties=["gap", "mu"] if unigem else [],
                      atom_vocab=list(QM9_ATOM_VOCAB), **overrides)
    model = build_model(cfg, prop_mean=[1.0, 2.0] if unigem else None, prop_mad=[3.0, 0.5] if unigem else None)
    return model.to(dtype)


def random_orthogonal(seed, reflect):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a uniformly random orthogonal matrix
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def outputs(model, batch, seed):
    """Network outputs (UniGEM: growth branch with its heads) for a batch at fixed random times."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, model.num_steps + 1, (len(batch["num_atoms"]),), generator=gen)
    if isinstance(model, UniGEM):
        return model.denoise(batch["pos"], batch["node_mask"], t, "growth", heads=True)
    h = model.atom_features(batch["atom_type"], batch["node_mask"], batch["pos"].dtype) + 0.1
    return model.denoise(batch["pos"], h * batch["node_mask"][..., None], batch["node_mask"], t)


def outputs_and_grads(model, batch, seed, pos_grad=False):
    """Outputs, and the gradients of a random weighting of them with respect to every parameter (and with
    pos_grad to the input coordinates, as 'pos')."""
    model.zero_grad(set_to_none=True)
    batch = {**batch, "pos": batch["pos"].clone().requires_grad_(pos_grad)}
    out = outputs(model, batch, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((value * torch.randn(value.shape, generator=gen, dtype=value.dtype)).sum() for value in out.values())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if pos_grad:
        grads["pos"] = batch["pos"].grad
    return {k: v.detach() for k, v in out.items()}, grads
