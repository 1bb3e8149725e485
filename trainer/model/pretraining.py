"""MoleculeJAE-style pretraining of the UniGEM trunk (after Du et al., "Molecule Joint Auto-Encoding", NeurIPS 2023).

The trunk is pretrained through exactly the interface UniGEM gives it (networks.run_trunk): node input
[mask, t/T], coordinates noised by UniGEM's VP schedule, t drawn as UniGEM draws it (half of each batch in the
growth range t <= t_n). What is learned is therefore the eps (score) estimate UniGEM's nucleation phase needs,
and the features its growth branch starts from. Everything else acts through auxiliary parts that read the
trunk's output and are dropped at fine-tuning; none of them feeds the trunk.

Noise (the same t for both parts of a molecule; alpha_t, sigma_t of the run's diffusion schedule):

    x_t = alpha_t x_0 + sigma_t eps_x      eps_x: Gaussian, CoM-free
    A_t = alpha_t A_0 + sigma_t eps_A      A_0: one-hot bond order [B, N, N, C] (0 none .. 4 aromatic) as floats,
                                           eps_A: symmetric, zero on the diagonal and on padded pairs

Terms (the score is -eps / sigma_t: predicting eps is denoising score matching):

    score_3d    eps_x from the trunk (its coordinate update), |.|^2 / (3 n) per molecule, mean over the batch:
                UniGEM's own eps loss with reduction 'molecule'
    score_2d    eps_A from BondGraphScore: message passing over the noised bond graph A_t, read out from pairs
                of trunk features; mean square over real off-diagonal pairs and channels, mean over the
                molecules with known bonds
    atom_type   (pretrain.atom_types) UniGEM's growth-branch atom-type target (one-hot / 4, L1) from the trunk
                features, for the molecules of the growth phase only, as in UniGEM's loss
    contrastive symmetric InfoNCE between a clean-molecule encoder (its own EGNN on x_0) and the pooled trunk
                features of the noised molecule, weighted by pretrain.contrastive_weight (0.01, as MoleculeJAE)
    loss        score_3d + bond_weight * score_2d + atom_type + contrastive_weight * contrastive

Choices against the MoleculeJAE paper (docs/architecture.md, "Pretraining"):
- Noise: the paper's VE SDE, sigma in [0.1, 10], is the VP schedule seen at x_t / alpha_t = x_0 + (sigma_t /
  alpha_t) eps. For UniGEM's polynomial_2 schedule with T = 1000, sigma_t / alpha_t runs from 0.003 (t = 0) to
  316 (t = T) and passes 0.1 at t = 71 and 10 at t = 949: drawing t as UniGEM does covers the paper's range and
  the ends UniGEM samples through.
- The clean encoder conditions nothing: in the paper it conditions the noised encoder, but here the noised
  encoder is UniGEM's trunk, which never sees a clean molecule, and a head given the clean molecule could read
  the answer from it instead of from the trunk. It only enters the contrastive term.
- Atom types are never an input of the trunk (UniGEM's generation path has none). They may be targets
  (atom-type term) and an input of the clean encoder; pretrain.atom_types false removes both (BENCHMARKS.md).

Transferable trunk: `embed.*`, `shared.*` and `nucleation.*` have the names and shapes of the same modules of
networks.UniGEM for the same ModelConfig (init_from also copies `nucleation.*` into `growth.*`). The other
modules (`clean_encoder.*`, `score_2d.*`, `type_head.*`, `proj_clean.*`, `proj_noised.*`) are pretraining-only
and have no namesake in UniGEM (TRUNK_PREFIXES, trunk_state_dict).

Numerics follow trainer/model/egnn.py: positions, bond channels, losses and node features between blocks are in
the dtype of `pos` (float32; float64 in tests); Linear layers run in bf16 under torch.autocast. Random draws use
`generator` (CPU or device) and are moved to the data's device (trainer/model/diffusion.py); nothing is read
back to the host.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from molscale.trainer.model.diffusion import (
    ONE_HOT_SCALE,
    LossConfig,
    com_free_noise,
    draw_unigem_phases,
    one_hot,
    randn,
)
from molscale.trainer.model.egnn import DenseGraph, EGNNBlock, pairwise_dist2, use_kernel
from molscale.trainer.model.networks import ModelConfig, UniGEM, mlp, run_trunk
from molscale.trainer.model.schedule import DiffusionConfig

TRUNK_PREFIXES = ("embed.", "shared.", "nucleation.")  # parameters shared by name with networks.UniGEM
RBF_CENTERS = 16  # Gaussian radial basis of the noised distance for the 2D head: centres 0..RBF_MAX Angstrom
RBF_MAX = 8.0
ADJACENCY_BIAS = -3.0  # the 2D head's soft adjacency starts near 0.05 per pair: a few bonds, not N neighbours


@dataclass
class PretrainConfig:
    """The ``pretrain`` section of a run config (objective 'moleculejae'). The noise process is the run's
    ``diffusion`` section and the growth range ``model.t_nucleation``: the ones UniGEM trains with."""
    bond_weight: float = 1.0  # weight of the 2D bond-channel score term
    atom_types: bool = True  # atom types as targets of an auxiliary head and as input of the clean encoder
    contrastive_weight: float = 0.01  # lambda of the contrastive surrogate (1 hurt downstream: Du et al.)
    temperature: float = 0.1  # InfoNCE temperature on cosine similarities
    encoder_blocks: int = 2  # EGNN blocks of the clean-molecule encoder
    bond_blocks: int = 2  # message-passing layers of the 2D head over the noised bond graph
    bond_channels: int = 5  # one-hot of bond order 0..4 (none, single, double, triple, aromatic)

    def validate(self, loss: LossConfig | None = None):
        """This section's checks, and (given the run's loss section) that the loss reduces per molecule."""
        def check(ok, name, what):
            if not ok:
                raise ValueError(f"pretrain.{name} must be {what}, got {getattr(self, name)!r}")

        check(self.bond_weight >= 0, "bond_weight", ">= 0")
        check(isinstance(self.atom_types, bool), "atom_types", "true or false")
        check(self.contrastive_weight >= 0, "contrastive_weight", ">= 0")
        check(self.temperature > 0, "temperature", "> 0")
        check(isinstance(self.encoder_blocks, int) and self.encoder_blocks >= 1, "encoder_blocks", "an integer >= 1")
        check(isinstance(self.bond_blocks, int) and self.bond_blocks >= 0, "bond_blocks", "an integer >= 0")
        check(isinstance(self.bond_channels, int) and self.bond_channels >= 2, "bond_channels", "an integer >= 2")
        if loss is not None and loss.reduction != "molecule":
            raise ValueError("objective 'moleculejae' reduces per molecule: loss.reduction must be 'molecule' "
                             "(loss.nominal_batch applies)")


def masked_mean(x, node_mask):
    """x [B, N, D], node_mask [B, N] -> mean over real atoms [B, D]."""
    mask = node_mask.to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def pair_mask_of(node_mask, dtype):
    """[B, N, N]: 1 where i != j and both atoms are real."""
    mask = node_mask.to(dtype)
    not_self = 1.0 - torch.eye(mask.shape[1], dtype=dtype, device=mask.device)
    return mask[:, :, None] * mask[:, None, :] * not_self


def symmetric_noise(shape, node_mask, generator=None, dtype=torch.float32):
    """Gaussian [B, N, N, C], symmetric in (i, j), zero on the diagonal and on padded pairs."""
    raw = randn(shape, generator, node_mask.device, dtype)
    upper = torch.triu(torch.ones(shape[1], shape[2], dtype=dtype, device=node_mask.device), diagonal=1)
    upper = raw * upper[None, :, :, None]
    return (upper + upper.transpose(1, 2)) * pair_mask_of(node_mask, dtype).unsqueeze(-1)


def radial_basis(dist2):
    """[B, N, N] squared distances -> [B, N, N, RBF_CENTERS] Gaussian features (bounded, unlike d2 itself)."""
    centers = torch.linspace(0.0, RBF_MAX, RBF_CENTERS, dtype=dist2.dtype, device=dist2.device)
    width = RBF_MAX / (RBF_CENTERS - 1)
    return torch.exp(-(torch.sqrt(dist2 + 1e-8).unsqueeze(-1) - centers).square() / (2 * width**2))


class CleanEncoder(nn.Module):
    """EGNN blocks over the clean coordinates -> per-atom features [B, N, H]; atoms embedded by type, or all
    alike when pretraining does not see atom types."""

    def __init__(self, hidden, num_atom_types, blocks, atom_types=True):
        super().__init__()
        self.atom_types = atom_types
        self.atom_embed = nn.Embedding(num_atom_types if atom_types else 1, hidden)
        self.blocks = nn.ModuleList(EGNNBlock(hidden) for _ in range(blocks))
        # only h leaves the encoder: the last block's coordinate MLP would never get a gradient (which trips
        # DDP / ZeRO unused-parameter checks), so it is frozen at its initialisation
        for name, param in self.blocks[-1].named_parameters():
            if name.startswith("coord_"):
                param.requires_grad_(False)

    def forward(self, pos, atom_type, node_mask):
        mask = node_mask.to(pos.dtype).unsqueeze(-1)
        graph = DenseGraph.build(pos, node_mask)
        index = atom_type if self.atom_types else torch.zeros_like(atom_type)
        h = self.atom_embed(index).to(pos.dtype) * mask
        for block in self.blocks:
            h, pos = block(h, pos, graph)
        return h


class BondMessages(nn.Module):
    """One message-passing layer over the noised bond graph: g_i += phi([g_i, sum_j w_ij m_ij]) with the soft
    adjacency w_ij = sigmoid(u . A_t[i, j] + b) read from the noised bond channels and m_ij = silu(W g_j + V e_ij)."""

    def __init__(self, hidden, channels):
        super().__init__()
        self.adjacency = nn.Linear(channels, 1)
        nn.init.constant_(self.adjacency.bias, ADJACENCY_BIAS)
        self.msg_node = nn.Linear(hidden, hidden)
        self.msg_edge = nn.Linear(hidden, hidden, bias=False)
        self.update = mlp(2 * hidden, hidden, hidden)

    def forward(self, g, edge, a_t, pair_mask):
        # g [B, N, H], edge [B, N, N, H], a_t [B, N, N, C], pair_mask [B, N, N]
        weight = torch.sigmoid(self.adjacency(a_t.to(g.dtype)).squeeze(-1).to(pair_mask.dtype)) * pair_mask
        message = F.silu(self.msg_node(g).unsqueeze(1) + self.msg_edge(edge))  # [B, N(i), N(j), H]
        agg = (message * weight.unsqueeze(-1).to(message.dtype)).sum(2, dtype=pair_mask.dtype)  # [B, N, H]
        return g + self.update(torch.cat([g, agg.to(g.dtype)], dim=-1)).to(g.dtype)


class BondGraphScore(nn.Module):
    """Invariant 2D score head: eps_A estimate [B, N, N, C] from the trunk features h [B, N, H], the noised bond
    channels A_t and the noised distances.

    Edges carry [A_t_ij, rbf(|x_i - x_j|), t/T]; `blocks` BondMessages layers pass messages over the noised bond
    graph; the read-out acts on pairs, [g_i + g_j, g_i * g_j, e_ij], so it is symmetric in (i, j) by
    construction. h is layer-normed first: with sum aggregation the trunk's features grow with the atom count.
    """

    def __init__(self, hidden, channels, blocks):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.node = nn.Linear(hidden, hidden)
        self.edge = nn.Linear(channels + RBF_CENTERS + 1, hidden)
        self.layers = nn.ModuleList(BondMessages(hidden, channels) for _ in range(blocks))
        self.pair_sum = nn.Linear(hidden, hidden)
        self.pair_prod = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, h, a_t, dist2, t_frac, pair_mask):
        # h [B, N, H], a_t [B, N, N, C], dist2 [B, N, N], t_frac [B] = t/T, pair_mask [B, N, N]
        b, n = dist2.shape[:2]
        edge_in = torch.cat([a_t, radial_basis(dist2), t_frac[:, None, None, None].expand(b, n, n, 1)], dim=-1)
        edge = self.edge(edge_in.to(h.dtype))  # [B, N, N, H]
        g = self.node(self.norm(h))
        for layer in self.layers:
            g = layer(g, edge, a_t, pair_mask)
        per_node = F.linear(g, self.pair_sum.weight)  # W g, once per atom: W (g_i + g_j) = W g_i + W g_j
        pre = edge + self.pair_prod(g.unsqueeze(2) * g.unsqueeze(1))
        pre = pre + per_node.unsqueeze(2) + per_node.unsqueeze(1)
        return self.out(pre + self.pair_sum.bias)


class MoleculeJAE(nn.Module):
    """Pretraining model: `model(batch, generator=gen)` -> {'loss', 'score_3d', 'score_2d', 'atom_type',
    'contrastive'}."""

    graph_builder = None  # the trunk's graph layout, as on networks.DiffusionModel (None: dense)

    def __init__(self, cfg: ModelConfig, pre: PretrainConfig, diffusion: DiffusionConfig | None = None,
                 loss: LossConfig | None = None):
        super().__init__()
        if cfg.model_class() is not UniGEM or cfg.atom_vocab is None:
            raise ValueError("MoleculeJAE pretrains a UniGEM trunk: it needs model.kind 'unigem' and an atom_vocab")
        # cfg, pre, diffusion and loss were checked where the run config was read (RunConfig.validate)
        diffusion = diffusion or DiffusionConfig()
        loss = loss or LossConfig()
        self.cfg, self.pre = cfg, pre
        # per-molecule terms are divided by the batch's molecules, or by this fixed count (atom-pair-budget
        # batches: every molecule weighs the same whatever its batch, as in UniGEM's loss)
        self.nominal_batch = loss.nominal_batch
        self.num_steps = diffusion.num_steps
        self.schedule = diffusion.schedule_tables()
        hidden, num_types = cfg.hidden, len(cfg.atom_vocab)
        # transferable trunk: the same names and shapes as in networks.UniGEM
        self.embed = nn.Linear(2, hidden)  # [mask, t/T]
        self.shared = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.shared_blocks))
        self.nucleation = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.branch_blocks))
        # pretraining-only parts: they read the trunk's output, none of them feeds it
        self.score_2d = BondGraphScore(hidden, pre.bond_channels, pre.bond_blocks)
        self.type_head = mlp(hidden, hidden, num_types) if pre.atom_types else None
        self.clean_encoder = CleanEncoder(hidden, num_types, pre.encoder_blocks, pre.atom_types)
        self.proj_clean = mlp(hidden, hidden, hidden)  # contrastive projection heads
        self.proj_noised = mlp(hidden, hidden, hidden)
        use_kernel(self, cfg.kernel)  # the trunk and the clean encoder run as a UniGEM's blocks would

    def describe(self) -> str:
        c, p = self.cfg, self.pre
        return (f"moleculejae: UniGEM trunk of {c.shared_blocks} shared + {c.branch_blocks} blocks, 2D head of "
                f"{p.bond_blocks} bond-graph layers, clean encoder of {p.encoder_blocks}, atom types "
                f"{'as targets' if p.atom_types else 'unseen'}")

    def trunk(self, pos_t, node_mask, t):
        """UniGEM's nucleation path, the same function UniGEM runs: (h [B, N, H], eps [B, N, 3])."""
        return run_trunk(self.embed, [*self.shared, *self.nucleation], pos_t, node_mask, t, self.num_steps,
                         self.graph_builder)

    # ----------------------------------------------------------------------------------------------- noise
    def bond_channels(self, batch, dtype):
        """A_0 [B, N, N, C] one-hot bond order (zero on the diagonal / padded pairs) and has_bonds [B] bool."""
        node_mask = batch["node_mask"]
        b, n = node_mask.shape
        order = batch.get("bond_order")
        has_bonds = batch.get("has_bonds")
        if order is None:  # a batch without bond orders (loader with_bonds off): no 2D signal at all
            order, has_bonds = torch.zeros(b, n, n, dtype=torch.long, device=node_mask.device), False
        if has_bonds is None or isinstance(has_bonds, bool):
            has_bonds = torch.full((b,), has_bonds is not False, dtype=torch.bool, device=node_mask.device)
        has_bonds = torch.as_tensor(has_bonds, device=node_mask.device).bool()
        order = torch.as_tensor(order, device=node_mask.device).long()
        a_0 = one_hot(order, self.pre.bond_channels, dtype)
        return a_0 * pair_mask_of(node_mask, dtype).unsqueeze(-1), has_bonds

    def draw_noise(self, batch, generator=None):
        """{'t' [B] int64 as UniGEM draws it, 'eps_x' [B, N, 3] CoM-free, 'eps_a' [B, N, N, C] symmetric}."""
        pos, node_mask = batch["pos"], batch["node_mask"]
        b, n = node_mask.shape
        _, t = draw_unigem_phases(b, self.cfg.t_nucleation, self.num_steps, generator, pos.device)
        eps_x = com_free_noise(pos.shape, node_mask, generator, pos.dtype)
        eps_a = symmetric_noise((b, n, n, self.pre.bond_channels), node_mask, generator, pos.dtype)
        return {"t": t, "eps_x": eps_x, "eps_a": eps_a}

    # ----------------------------------------------------------------------------------------------- network
    def predict(self, batch, noise):
        """Outputs for the given noise (see draw_noise): eps_x [B, N, 3] (the trunk's, CoM-free), eps_a
        [B, N, N, C], atom_type [B, N, K] (or None), z_clean / z_noised [B, H], has_bonds [B], pair_mask."""
        pos, node_mask, atom_type = batch["pos"], batch["node_mask"], batch["atom_type"]
        dtype = pos.dtype
        mask = node_mask.to(dtype).unsqueeze(-1)  # [B, N, 1]
        pair_mask = pair_mask_of(node_mask, dtype)  # [B, N, N]
        t = noise["t"].to(pos.device)
        alpha, sigma = self.schedule.alpha_sigma(t, dtype)
        a_0, has_bonds = self.bond_channels(batch, dtype)
        x_t = alpha[:, None, None] * pos + sigma[:, None, None] * noise["eps_x"]
        # molecules without known bonds get no 2D input (zero channels) and no 2D loss
        known = has_bonds.to(dtype)[:, None, None, None]
        a_t = (alpha[:, None, None, None] * a_0 + sigma[:, None, None, None] * noise["eps_a"]) \
            * pair_mask.unsqueeze(-1) * known

        h, eps_x = self.trunk(x_t, node_mask, t)
        eps_a = self.score_2d(h, a_t, pairwise_dist2(x_t), t.to(dtype) / self.num_steps, pair_mask)
        eps_a = eps_a.to(dtype) * pair_mask.unsqueeze(-1)
        types = self.type_head(h).to(dtype) * mask if self.type_head is not None else None
        c = self.clean_encoder(pos, atom_type, node_mask)  # [B, N, H]
        z_clean = self.proj_clean(masked_mean(c, node_mask)).to(dtype)
        z_noised = self.proj_noised(masked_mean(h, node_mask)).to(dtype)
        return {"eps_x": eps_x, "eps_a": eps_a, "atom_type": types, "z_clean": z_clean, "z_noised": z_noised,
                "has_bonds": has_bonds, "pair_mask": pair_mask}

    # ----------------------------------------------------------------------------------------------- loss
    def loss_terms(self, batch, noise, out):
        node_mask = batch["node_mask"]
        dtype = batch["pos"].dtype
        num_atoms = node_mask.sum(1).to(dtype).clamp(min=1)  # [B]
        nominal = self.nominal_batch

        def mean_over(per_mol, members, share=1.0):
            # per_mol [B] over the molecules `members` [B] (0/1) covers; with a nominal batch, a fixed count
            # (share: the fraction of a batch the term covers by design, 1/2 for the growth phase)
            divisor = members.sum().clamp(min=1) if nominal is None else nominal * share
            return (per_mol * members).sum() / divisor

        everyone = torch.ones_like(num_atoms)
        sq = (out["eps_x"] - noise["eps_x"]).square().sum((1, 2))
        score_3d = mean_over(sq / (3 * num_atoms), everyone)

        channels = self.pre.bond_channels
        pairs = out["pair_mask"].sum((1, 2))  # [B]
        covered = (out["has_bonds"] & (pairs > 0)).to(dtype)  # [B]
        err_2d = (out["eps_a"] - noise["eps_a"]).square() * out["pair_mask"].unsqueeze(-1)
        score_2d = mean_over(err_2d.sum((1, 2, 3)) / (pairs.clamp(min=1) * channels), covered)

        atom_type = score_3d.new_zeros(())
        if out["atom_type"] is not None:  # UniGEM's growth-branch target, on the growth-phase molecules
            growth = (noise["t"].to(node_mask.device) <= self.cfg.t_nucleation).to(dtype)  # [B]
            k = out["atom_type"].shape[-1]
            target = one_hot(batch["atom_type"], k, dtype) * ONE_HOT_SCALE
            err = (out["atom_type"] - target).abs() * node_mask.to(dtype).unsqueeze(-1)
            atom_type = mean_over(err.sum((1, 2)) / (num_atoms * k), growth, share=0.5)

        contrastive = info_nce(out["z_clean"], out["z_noised"], self.pre.temperature)
        loss = score_3d + self.pre.bond_weight * score_2d + atom_type + self.pre.contrastive_weight * contrastive
        return {"loss": loss, "score_3d": score_3d, "score_2d": score_2d, "atom_type": atom_type,
                "contrastive": contrastive}

    def forward(self, batch, generator=None, noise=None):
        """Loss dict for a batch (loader contract, plus bond_order [B, N, N] and optional has_bonds [B]).

        noise (as from draw_noise) fixes the draws (tests); by default they come from `generator`.
        """
        noise = self.draw_noise(batch, generator) if noise is None else noise
        return self.loss_terms(batch, noise, self.predict(batch, noise))


def info_nce(z_a, z_b, temperature):
    """Symmetric InfoNCE of cosine similarities / temperature, positives on the diagonal; 0 for one molecule.

    Computed in float32 at least (the logits of a bf16 matmul are too coarse for a 0.1 temperature).
    """
    dtype = torch.promote_types(z_a.dtype, torch.float32)
    a = F.normalize(z_a.to(dtype), dim=-1, eps=1e-6)
    b = F.normalize(z_b.to(dtype), dim=-1, eps=1e-6)
    plain = torch.autocast(a.device.type, enabled=False) if a.device.type in ("cpu", "cuda") else nullcontext()
    with plain:
        logits = a @ b.T / temperature  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def trunk_state_dict(model: MoleculeJAE) -> dict:
    """The transferable parameters (`embed.*`, `shared.*`, `nucleation.*`), named as in networks.UniGEM."""
    return {name: value for name, value in model.state_dict().items() if name.startswith(TRUNK_PREFIXES)}
