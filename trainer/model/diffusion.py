"""Diffusion maths for training: CoM-free noise, time drawing and the UniGEM / EDM losses (docs/architecture.md).

Random draws use `generator` (for reproducible runs; drawn on its device, moved to the data's) or, with
generator None, the global RNG of the data's device. The losses read nothing back to the host: with size chunks
off, a step's shapes depend only on the batch; with size chunks on (packing.py), the plan comes from the atom
counts the loader keeps on the host (batch["num_atoms_host"]) and UniGEM's phase split is kept on the host
(drawn with the CPU's RNG when no generator is given; a generator on a GPU costs one read), so only small index
tensors travel, host to device.
Batches follow the loader contract: pos [B, N, 3] (CoM-free, Angstrom), node_mask [B, N] bool with real atoms
first, atom_type [B, N] vocabulary index, props [B, P] in dataset units, optionally num_atoms_host (a list of
the B atom counts). All loss terms are float32 (or the dtype of pos).
"""

from dataclasses import dataclass

import torch

from molscale.trainer.model.branches import Branch
from molscale.trainer.model.packing import default_chunk_cost, plan_chunks, take

REDUCTIONS = ("molecule", "reference")


@dataclass
class LossConfig:
    """How a batch's per-molecule errors become one loss: the ``loss`` section of a run config.

    reduction 'molecule': each molecule's eps MSE is normalised by its own atoms (3 N), and every term is a mean
    over the molecules it covers (atom-type and property terms over the growth half). 'reference': the released
    UniGEM code (equivariant_diffusion/en_diffusion.py, EnVariationalDiffusion.compute_error and compute_loss with
    loss_type 'l2'; qm9/losses.py, compute_loss_and_nll): the squared error summed over a molecule's atoms is
    divided by 3 x the batch's largest molecule and halved, the atom-type L1 is averaged over that same padded
    size and the channels, and every term (growth-only ones included) is averaged over the whole batch.

    nominal_batch (reduction 'molecule'): divide by this fixed molecule count instead of the batch's own, so that
    every molecule weighs the same whatever the size of its batch (atom-pair-budget batches hold about
    budget / N^2 molecules; a mean over them would weigh a molecule like N^2).
    """
    reduction: str = "molecule"
    nominal_batch: int | None = None

    def validate(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"loss.reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")
        if self.nominal_batch is not None and self.nominal_batch < 2:
            raise ValueError(f"loss.nominal_batch must be at least 2 (or null), got {self.nominal_batch}")
        if self.nominal_batch is not None and self.reduction == "reference":
            raise ValueError("loss.nominal_batch applies to reduction 'molecule'; the reference reduction is a mean "
                             "over each batch, as the released code's fixed-size batches")


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


ONE_HOT_SCALE = 0.25  # EDM normalisation factors [1, 4, 10] for (x, one-hot, charge)


def one_hot(index, num_classes, dtype):
    """index [...] int64 -> [..., num_classes] in ``dtype``. A comparison, not F.one_hot: on the CPU F.one_hot
    checks its indices' range by reading them on the host (on CUDA it does not), which would make the CPU step
    look as if it synchronised, and a compiled graph break there."""
    return (index.unsqueeze(-1) == torch.arange(num_classes, device=index.device)).to(dtype)


def draw_unigem_phases(batch_size, t_nucleation, num_steps, generator=None, device="cpu", order_on_host=False):
    """Growth-phase oversampling (UniGEM paper): a random half of the batch gets t ~ U{0..t_n}, the rest
    t ~ U{t_n+1..T}. Returns (order, t): molecules order[:B // 2] are the growth phase. The halves have fixed
    sizes, so splitting a batch by phase needs no look at t on the host. order_on_host: the permutation is
    drawn (with the generator, or the CPU's RNG) and returned on the host, for planning size chunks per phase;
    t stays on ``device`` either way."""
    n_growth = batch_size // 2
    order = randperm(batch_size, generator, "cpu" if order_on_host else device)
    order_dev = order.to(device, non_blocking=True)  # from pageable memory: staged at once, nothing waits
    t = torch.empty(batch_size, dtype=torch.long, device=device)
    t[order_dev[:n_growth]] = randint(0, t_nucleation, n_growth, generator, device)
    t[order_dev[n_growth:]] = randint(t_nucleation + 1, num_steps, batch_size - n_growth, generator, device)
    return order, t


def draw_unigem_t(batch_size, t_nucleation, num_steps, generator=None, device="cpu"):
    return draw_unigem_phases(batch_size, t_nucleation, num_steps, generator, device)[1]


def chunk_cost(model, device):
    """Per-chunk cost for plan_chunks, or None for no size chunks (always so for the edge-list layouts).
    'auto' is the device's default (packing.DEFAULT_CHUNK_COST_PAIRS), and no chunks under CUDA graphs or compiled
    blocks, which specialise on the batch shape: chunks would make new shapes in nearly every step. Never with
    ``model.fixed_shapes`` (a CUDA graph of the whole training step, which cannot plan on the host either)."""
    cost = model.cfg.chunk_cost_pairs
    if model.graph_builder is not None or getattr(model, "fixed_shapes", False):
        return None  # (graph_builder: a benchmark layout, one graph of the whole batch)
    if cost != "auto":
        return cost
    if getattr(model, "cuda_graphs", None) is not None or model.cfg.kernel == "compiled":
        return None
    return default_chunk_cost(device)


def size_plan(model, batch):
    """(per-chunk cost, atom counts LongTensor [B] on the host) to plan size chunks with; None: no size chunks.

    The counts are batch["num_atoms_host"] when the batch carries it (the loader's batches do). Otherwise they
    are read from node_mask: free on the CPU, one device synchronisation elsewhere, which an explicit
    model.chunk_cost_pairs accepts and 'auto' never makes (it then leaves the batch whole)."""
    node_mask = batch["node_mask"]
    cost = chunk_cost(model, node_mask.device)
    if cost is None:
        return None
    given = batch.get("num_atoms_host")
    if given is not None:
        counts = torch.as_tensor(given, dtype=torch.long).reshape(-1)
        if len(counts) != node_mask.shape[0] or (len(counts) and int(counts.max()) > node_mask.shape[1]):
            raise ValueError(f"batch['num_atoms_host'] must hold the atom counts of the batch's "
                             f"{node_mask.shape[0]} molecules (each at most {node_mask.shape[1]})")
        return cost, counts
    if node_mask.device.type != "cpu" and model.cfg.chunk_cost_pairs == "auto":
        return None
    mask = node_mask.cpu()
    counts = mask.sum(1)
    packed = torch.arange(mask.shape[1])[None, :] < counts[:, None]
    if not torch.equal(mask, packed):
        raise ValueError("node_mask must list real atoms first in every molecule (padding at the end)")
    return cost, counts


def all_molecules(batch_size, plan, device):
    """Indices of the whole batch, where size_chunks wants them: on the host with a plan, else on the device."""
    return torch.arange(batch_size, device="cpu" if plan is not None else device)


def size_chunks(groups, plan, n_max, device):
    """Molecules of each group cut into size chunks -> [(group name, indices on ``device``, padded size)].

    groups: {name: molecule indices}, empty groups dropped; plan: size_plan's (cost, counts), or None for
    one chunk per group at the batch's padded size (indices as given, nothing read on the host). With a plan the
    groups' indices are host tensors, and all chunks' indices travel to the device in one copy."""
    if plan is None:
        return [(name, members, n_max) for name, members in groups.items() if len(members)]
    cost, counts = plan
    planned = [(name, members[part], n_pad) for name, members in groups.items() if len(members)
               for part, n_pad in plan_chunks(counts[members].tolist(), cost)]
    if not planned:
        return []
    moved = torch.cat([idx for _, idx, _ in planned]).to(device, non_blocking=True)
    parts = moved.split([len(idx) for _, idx, _ in planned])
    return [(name, part, n_pad) for (name, _, n_pad), part in zip(planned, parts)]


def reference_atoms(batch, num_atoms):
    """The padded molecule size the reference reduction divides by: the batch's largest molecule, or
    batch['reference_atoms'] where the trainer put the largest over every rank's micro-batch (one global batch,
    as the released code pads its whole batch before DataParallel scatters it)."""
    given = batch.get("reference_atoms")
    return num_atoms.max() if given is None else given.to(num_atoms)


def unigem_loss(model, batch, generator=None, t=None, eps=None):
    """UniGEM loss (UniGEM paper): each molecule's eps MSE through the branch of its phase; atom-type and property
    L1 on the normalised targets for growth-phase molecules (t <= t_n) only; all weights 1. How the terms are
    normalised is ``model.loss_cfg`` (LossConfig). ``t`` and ``eps`` fix the times and the noise (tests).

    Returns {'loss', 'eps', 'eps_nucleation', 'eps_growth', 'atom_type', 'prop_<name>', ...}: the terms of 'loss',
    and the eps error of each phase over the molecules of that phase.
    """
    cfg, loss_cfg = model.cfg, model.loss_cfg
    pos, node_mask = batch["pos"], batch["node_mask"]  # [B, N, 3], [B, N]
    batch_size, n_max = node_mask.shape
    plan = size_plan(model, batch)
    if t is None:
        order, t_dev = draw_unigem_phases(batch_size, cfg.t_nucleation, model.num_steps, generator, pos.device,
                                          order_on_host=plan is not None)
        groups = {Branch.NUCLEATION: order[batch_size // 2:], Branch.GROWTH: order[: batch_size // 2]}
    else:  # given times (tests): the phases come from t itself
        t_dev = t.to(pos.device)
        growth = (t.cpu() if plan is not None else t_dev) <= cfg.t_nucleation
        groups = {Branch.NUCLEATION: (~growth).nonzero()[:, 0], Branch.GROWTH: growth.nonzero()[:, 0]}
    if eps is None:
        eps = com_free_noise(pos.shape, node_mask, generator, pos.dtype)
    alpha, sigma = model.schedule.alpha_sigma(t_dev, pos.dtype)
    pos_t = alpha[:, None, None] * pos + sigma[:, None, None] * eps
    num_atoms = node_mask.sum(1).to(pos.dtype)  # [B]
    reference = loss_cfg.reduction == "reference"
    # per-molecule normalisers: its own atoms, or the batch's padded size (reference)
    atoms_norm = reference_atoms(batch, num_atoms).expand(batch_size) if reference else num_atoms  # [B]
    eps_scale = 0.5 if reference else 1.0  # the reference halves the L2 error (0.5 x SNR weight 1)
    type_target = one_hot(batch["atom_type"], model.num_atom_types, pos.dtype) * ONE_HOT_SCALE  # [B, N, K]
    if cfg.properties:
        prop_mean, prop_mad = model.prop_normalisation(pos)
        prop_target = (batch["props"][:, : len(cfg.properties)].to(pos.dtype) - prop_mean) / prop_mad  # [B, P]
    context = model.batch_context(batch)  # [B, C] of a conditional model (EDM-style context), else None

    sums = {name: pos.new_zeros(()) for name in ("eps_nucleation", "eps_growth", "atom_type")}
    sums.update({f"prop_{name}": pos.new_zeros(()) for name in cfg.properties})
    chunks = [(branch, idx, n_pad, (take(pos_t, idx, n_pad), take(node_mask, idx, n_pad), take(t_dev, idx),
                                    *(() if context is None else (take(context, idx),))))
              for branch, idx, n_pad in size_chunks(groups, plan, n_max, pos.device)]
    # the calls this loss makes, announced so that CUDA graphs (when on) are captured before its forward starts
    model.prepare_network([(inputs, {"branch": branch, "heads": branch == Branch.GROWTH})
                           for branch, _, _, inputs in chunks])
    for branch, idx, n_pad, inputs in chunks:
        mask, n = inputs[1], take(atoms_norm, idx)  # [b, n], [b]
        chunk_context = inputs[3] if len(inputs) > 3 else None
        out = model.denoise(*inputs[:3], branch, heads=branch == Branch.GROWTH, context=chunk_context)
        sq_err = (out["eps"] - take(eps, idx, n_pad)).square().sum((1, 2))  # [b]
        sums[f"eps_{branch}"] = sums[f"eps_{branch}"] + eps_scale * (sq_err / (3 * n)).sum()
        if branch != Branch.GROWTH:
            continue
        abs_err = (out["atom_type"] - take(type_target, idx, n_pad)).abs() * mask.unsqueeze(-1)
        sums["atom_type"] = sums["atom_type"] + (abs_err.sum((1, 2)) / (n * model.num_atom_types)).sum()
        prop_err = (out["props"] - take(prop_target, idx)).abs().sum(0) if cfg.properties else ()  # [P]
        for k, name in enumerate(cfg.properties):
            sums[f"prop_{name}"] = sums[f"prop_{name}"] + prop_err[k]

    n_growth, n_nucleation = max(len(groups[Branch.GROWTH]), 1), max(len(groups[Branch.NUCLEATION]), 1)
    phase_size = {"eps_nucleation": n_nucleation, "eps_growth": n_growth}
    if reference:  # every term a mean over the whole batch (growth-only terms are zero for the other half)
        divisor = dict.fromkeys(sums, batch_size)
        divisor.update(phase_size)  # the per-phase eps are reported as means over their phase
        eps_divisor = batch_size
    elif loss_cfg.nominal_batch:  # a fixed count: a molecule's weight does not depend on its batch
        divisor = dict.fromkeys(sums, loss_cfg.nominal_batch / 2)  # each phase is half of a batch
        eps_divisor = loss_cfg.nominal_batch
    else:
        divisor = dict.fromkeys(sums, n_growth)
        divisor.update(phase_size)
        eps_divisor = batch_size
    terms = {name: total / divisor[name] for name, total in sums.items()}
    terms["eps"] = (sums["eps_nucleation"] + sums["eps_growth"]) / eps_divisor
    terms["loss"] = terms["eps"] + terms["atom_type"] + sum(terms[f"prop_{name}"] for name in cfg.properties)
    return terms


def edm_loss(model, batch, generator=None, t=None):
    """EDM joint diffusion: eps MSE over coordinates and h = [one-hot / 4, Z / 10], t ~ U{0..T}. Reduction
    'molecule': normalised per dimension and atom of each molecule, mean over the batch (nominal_batch: over that
    count); 'reference': EDM's compute_error (/ (3 + channels) x the batch's largest molecule, halved), mean over
    the batch. Returns {'loss', 'eps', 'eps_pos', 'eps_h'} (the last two per dimension of their part)."""
    loss_cfg = model.loss_cfg
    pos, node_mask = batch["pos"], batch["node_mask"]
    batch_size, n_max = node_mask.shape
    t_dev = randint(0, model.num_steps, batch_size, generator, pos.device) if t is None else t.to(pos.device)
    h = model.atom_features(batch["atom_type"], node_mask, pos.dtype)  # [B, N, C]
    eps = com_free_noise(pos.shape, node_mask, generator, pos.dtype)
    eps_h = masked_noise(h.shape, node_mask, generator, pos.dtype)
    alpha, sigma = (v[:, None, None] for v in model.schedule.alpha_sigma(t_dev, pos.dtype))
    pos_t, h_t = alpha * pos + sigma * eps, alpha * h + sigma * eps_h
    num_atoms = node_mask.sum(1).to(pos.dtype)
    context = model.batch_context(batch)
    if loss_cfg.reduction == "reference":
        atoms_norm, scale, divisor = reference_atoms(batch, num_atoms).expand(batch_size), 0.5, batch_size
    else:
        atoms_norm, scale, divisor = num_atoms, 1.0, loss_cfg.nominal_batch or batch_size

    plan = size_plan(model, batch)
    sse_pos = sse_h = pos.new_zeros(())  # sums over molecules of per-atom squared errors
    molecules = all_molecules(batch_size, plan, pos.device)
    for _, idx, n_pad in size_chunks({"all": molecules}, plan, n_max, pos.device):
        mask, n = take(node_mask, idx, n_pad), take(atoms_norm, idx)
        out = model.denoise(take(pos_t, idx, n_pad), take(h_t, idx, n_pad), mask, take(t_dev, idx),
                            None if context is None else take(context, idx))
        sse_pos = sse_pos + ((out["eps"] - take(eps, idx, n_pad)).square().sum((1, 2)) / n).sum()
        sse_h = sse_h + ((out["eps_h"] - take(eps_h, idx, n_pad)).square().sum((1, 2)) / n).sum()
    dims_pos, dims_h = 3, model.h_channels
    loss = scale * (sse_pos + sse_h) / (divisor * (dims_pos + dims_h))
    return {"loss": loss, "eps": loss, "eps_pos": scale * sse_pos / (divisor * dims_pos),
            "eps_h": scale * sse_h / (divisor * dims_h)}
