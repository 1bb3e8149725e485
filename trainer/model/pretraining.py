"""MoleculeJAE-style pretraining of the UniGEM trunk (after Du et al., "Molecule Joint Auto-Encoding", NeurIPS 2023).

Objective. A molecule (coordinates x_0, bond graph A_0) is noised along a variance-exploding SDE,
sigma(s) = sigma_min * (sigma_max / sigma_min) ** s with s = k / num_steps, k ~ U{1..num_steps}:

    x_s = x_0 + sigma(s) eps_x      eps_x: Gaussian, CoM-free
    A_s = A_0 + sigma(s) eps_A      A_0: one-hot bond order [B, N, N, C] (0 none .. 4 aromatic) as floats,
                                    eps_A: symmetric, zero on the diagonal and on padded pairs

and the network, conditioned on an encoding of the clean molecule, recovers the noise (denoising score
matching; the score is -eps / sigma):

    score_3d    = mean over molecules of |eps_x_pred - eps_x|^2 / (3 n)              (equivariant head)
    score_2d    = mean over molecules with known bonds of |eps_A_pred - eps_A|^2 over their real
                  off-diagonal pairs and C channels                                   (invariant head)
    contrastive = symmetric InfoNCE between the pooled clean representation and the pooled trunk output of
                  the noised molecule (cosine / temperature; 0 for a batch of one)
    loss        = score_3d + bond_weight * score_2d + contrastive_weight * contrastive

Architecture. The clean encoder (`clean_encoder.*`: atom-type embedding + `encoder_blocks` EGNN blocks on x_0)
gives per-atom features c and the pooled z_clean (its last block's unused coordinate MLP is frozen). The trunk
input is

    h_0 = embed([mask, s]) + atom_embed(atom_type) + proj_cond(c) + bond_in(0.1 sum_j A_s[i, j]) + jae_time(s)

and the trunk runs `shared` then `nucleation` EGNN blocks on (h_0, x_s); eps_x_pred is the CoM-free coordinate
update, as in UniGEM's `denoise`. `score_2d` is an edge MLP on [h_i + h_j, h_i * h_j, A_s_ij, rbf(|x_i - x_j|), s]
(noised coordinates).

Transferable trunk. `embed.*`, `shared.*` and `nucleation.*` have exactly the names and shapes of the same
modules of `trainer.networks.UniGEM` for the same ModelConfig (fine-tuning also copies `nucleation.*` into
`growth.*`). Every other parameter (`clean_encoder.*`, `atom_embed.*`, `proj_cond.*`, `bond_in.*`, `jae_time.*`,
`score_2d.*`, `proj_clean.*`, `proj_noised.*`) is pretraining-only and has no namesake in UniGEM; see
`TRUNK_PREFIXES` / `trunk_state_dict`.

Numerics follow trainer/model/egnn.py: positions, the bond channels, the losses and the node features between
blocks are in the dtype of `pos` (float32; float64 in tests); Linear layers run in bf16 under torch.autocast.
Random draws use `generator` (CPU or device) and are moved to the data's device (trainer/model/diffusion.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from molscale.trainer.model.diffusion import com_free_noise, randint, randn, remove_mean
from molscale.trainer.model.egnn import DenseGraph, EGNNBlock
from molscale.trainer.model.networks import ModelConfig, UniGEM, mlp

TRUNK_PREFIXES = ("embed.", "shared.", "nucleation.")  # parameters shared by name with networks.UniGEM
BOND_AGG_SCALE = 0.1  # sum_j A_s[i, j] counts about N non-bonded pairs in channel 0: keep the trunk input O(1)
RBF_CENTERS = 16  # Gaussian radial basis of the noised distance for the edge head: centres 0..RBF_MAX Angstrom
RBF_MAX = 8.0


@dataclass
class PretrainConfig:
    sigma_min: float = 0.2  # VE SDE noise scale at s -> 0 (Angstrom for coordinates)
    sigma_max: float = 1.0  # ... at s = 1
    num_steps: int = 1000  # s = k / num_steps, k ~ U{1..num_steps}
    contrastive_weight: float = 0.01  # lambda of the contrastive surrogate (1 hurt downstream: Du et al.)
    temperature: float = 0.1  # InfoNCE temperature on cosine similarities
    encoder_blocks: int = 2  # EGNN blocks of the clean-molecule encoder
    bond_weight: float = 1.0  # weight of the 2D bond-channel score term
    bond_channels: int = 5  # one-hot of bond order 0..4 (none, single, double, triple, aromatic)
    time_features: int = 32  # sinusoidal features of the Fourier time embedding (jae_time); 0: none

    def validate(self):
        def check(ok, name, what):
            if not ok:
                raise ValueError(f"pretrain.{name} must be {what}, got {getattr(self, name)!r}")

        check(self.sigma_min > 0, "sigma_min", "> 0")
        check(self.sigma_max >= self.sigma_min, "sigma_max", f">= sigma_min ({self.sigma_min})")
        check(isinstance(self.num_steps, int) and self.num_steps >= 1, "num_steps", "an integer >= 1")
        check(self.contrastive_weight >= 0, "contrastive_weight", ">= 0")
        check(self.temperature > 0, "temperature", "> 0")
        check(isinstance(self.encoder_blocks, int) and self.encoder_blocks >= 1, "encoder_blocks", "an integer >= 1")
        check(self.bond_weight >= 0, "bond_weight", ">= 0")
        check(isinstance(self.bond_channels, int) and self.bond_channels >= 2, "bond_channels", "an integer >= 2")
        check(isinstance(self.time_features, int) and self.time_features >= 0 and self.time_features % 2 == 0,
              "time_features", "an even integer >= 0")

    def sigma(self, s):
        """Noise scale of the VE SDE at s in (0, 1]: sigma_min * (sigma_max / sigma_min) ** s."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** s


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


class FourierTime(nn.Module):
    """Sinusoidal features of the step k = s * num_steps (geometric frequencies), then an MLP to hidden."""

    def __init__(self, features, hidden, num_steps):
        super().__init__()
        self.features, self.num_steps = features, num_steps
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, s):
        # s [B] in the dtype of the positions -> [B, H]
        half = self.features // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=s.dtype, device=s.device) / half)
        angle = (s * self.num_steps)[:, None] * freqs[None, :]
        return self.net(torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1))


class CleanEncoder(nn.Module):
    """Atom-type embedding + EGNN blocks over the clean coordinates -> per-atom features c [B, N, H]."""

    def __init__(self, hidden, num_atom_types, blocks):
        super().__init__()
        self.atom_embed = nn.Embedding(num_atom_types, hidden)
        self.blocks = nn.ModuleList(EGNNBlock(hidden) for _ in range(blocks))
        # only h leaves the encoder: the last block's coordinate MLP would never get a gradient (which trips
        # DDP / ZeRO unused-parameter checks), so it is frozen at its initialisation
        for name, param in self.blocks[-1].named_parameters():
            if name.startswith("coord_"):
                param.requires_grad_(False)

    def forward(self, pos, atom_type, node_mask):
        mask = node_mask.to(pos.dtype).unsqueeze(-1)
        graph = DenseGraph.build(pos, node_mask)
        h = self.atom_embed(atom_type).to(pos.dtype) * mask
        for block in self.blocks:
            h, pos = block(h, pos, graph)
        return h


class EdgeScoreHead(nn.Module):
    """Invariant edge MLP on [h_i + h_j, h_i * h_j, A_s_ij, rbf(|x_i - x_j|), s] -> eps_A estimate [B, N, N, C].

    The distance enters as Gaussian radial basis features (bounded, unlike d2, which reaches 100s of Angstrom^2
    in drug-sized molecules and made the initial 2D loss explode); h is layer-normed first, since the trunk's
    features grow with the molecule size and h_i * h_j is quadratic in them.

    Symmetric in (i, j) by construction. The first layer is applied per block of its input: the h_i + h_j part
    as per-node projections, so only the h_i * h_j part costs an H x H product per pair.
    """

    def __init__(self, hidden, channels):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)  # trunk features grow with the atom count (sum aggregation)
        self.lin_sum = nn.Linear(hidden, hidden)
        self.lin_prod = nn.Linear(hidden, hidden, bias=False)
        self.lin_edge = nn.Linear(channels + RBF_CENTERS + 1, hidden, bias=False)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, h, a_s, dist2, s):
        # h [B, N, H], a_s [B, N, N, C], dist2 [B, N, N], s [B]
        b, n = dist2.shape[:2]
        h = self.norm(h)
        centers = torch.linspace(0.0, RBF_MAX, RBF_CENTERS, dtype=dist2.dtype, device=dist2.device)
        width = RBF_MAX / (RBF_CENTERS - 1)
        rbf = torch.exp(-(torch.sqrt(dist2 + 1e-8).unsqueeze(-1) - centers).square() / (2 * width**2))
        edge = torch.cat([a_s, rbf, s[:, None, None, None].expand(b, n, n, 1)], dim=-1)
        per_node = F.linear(h, self.lin_sum.weight)  # W h, no bias
        pre = self.lin_edge(edge.to(h.dtype))
        pre = pre + self.lin_prod(h[:, :, None, :] * h[:, None, :, :])
        pre = pre + (per_node[:, :, None, :] + per_node[:, None, :, :] + self.lin_sum.bias.to(per_node.dtype))
        return self.out(pre)


class MoleculeJAE(nn.Module):
    """Pretraining model: `model(batch, generator=gen)` -> {'loss', 'score_3d', 'score_2d', 'contrastive'}."""

    def __init__(self, cfg: ModelConfig, pre: PretrainConfig):
        super().__init__()
        if cfg.model_class() is not UniGEM or cfg.atom_vocab is None:
            raise ValueError("MoleculeJAE pretrains a UniGEM trunk: it needs model.kind 'unigem' and an atom_vocab")
        cfg.validate()
        pre.validate()
        self.cfg, self.pre = cfg, pre
        hidden, num_types = cfg.hidden, len(cfg.atom_vocab)
        # transferable trunk: the same names and shapes as in networks.UniGEM
        self.embed = nn.Linear(2, hidden)  # [mask, s] (UniGEM: [mask, t/T])
        self.shared = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.shared_blocks))
        self.nucleation = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.branch_blocks))
        # pretraining-only parts
        self.clean_encoder = CleanEncoder(hidden, num_types, pre.encoder_blocks)
        self.atom_embed = nn.Embedding(num_types, hidden)  # atom types of the noised molecule (not noised)
        self.proj_cond = nn.Linear(hidden, hidden)  # conditioning on the clean encoder's per-atom features
        self.bond_in = nn.Linear(pre.bond_channels, hidden)  # aggregated noised bond channels
        self.jae_time = FourierTime(pre.time_features, hidden, pre.num_steps) if pre.time_features else None
        self.score_2d = EdgeScoreHead(hidden, pre.bond_channels)
        self.proj_clean = mlp(hidden, hidden, hidden)  # contrastive projection heads
        self.proj_noised = mlp(hidden, hidden, hidden)

    def describe(self) -> str:
        c = self.cfg
        return (f"moleculejae: UniGEM trunk of {c.shared_blocks} shared + {c.branch_blocks} blocks, clean encoder "
                f"of {self.pre.encoder_blocks}")

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
        a_0 = F.one_hot(order, self.pre.bond_channels).to(dtype)
        return a_0 * pair_mask_of(node_mask, dtype).unsqueeze(-1), has_bonds

    def draw_noise(self, batch, generator=None):
        """{'k' [B] int64 step in 1..num_steps, 'eps_x' [B, N, 3] CoM-free, 'eps_a' [B, N, N, C] symmetric}."""
        pos, node_mask = batch["pos"], batch["node_mask"]
        b, n = node_mask.shape
        k = randint(1, self.pre.num_steps, b, generator, pos.device)
        eps_x = com_free_noise(pos.shape, node_mask, generator, pos.dtype)
        eps_a = symmetric_noise((b, n, n, self.pre.bond_channels), node_mask, generator, pos.dtype)
        return {"k": k, "eps_x": eps_x, "eps_a": eps_a}

    # ----------------------------------------------------------------------------------------------- network
    def predict(self, batch, noise):
        """Network outputs for the given noise (see draw_noise): eps_x [B, N, 3] (CoM-free), eps_a [B, N, N, C],
        z_clean / z_noised [B, H] (projected pooled representations), plus has_bonds [B] and pair_mask."""
        pos, node_mask, atom_type = batch["pos"], batch["node_mask"], batch["atom_type"]
        dtype = pos.dtype
        mask = node_mask.to(dtype).unsqueeze(-1)  # [B, N, 1]
        pair_mask = pair_mask_of(node_mask, dtype)  # [B, N, N]
        s = noise["k"].to(device=pos.device, dtype=dtype) / self.pre.num_steps  # [B]
        sigma = self.pre.sigma(s)
        a_0, has_bonds = self.bond_channels(batch, dtype)
        x_s = pos + sigma[:, None, None] * noise["eps_x"]
        # molecules without known bonds get no 2D input (zero channels) and no 2D loss
        known = has_bonds.to(dtype)[:, None, None, None]
        a_s = (a_0 + sigma[:, None, None, None] * noise["eps_a"]) * pair_mask.unsqueeze(-1) * known

        c = self.clean_encoder(pos, atom_type, node_mask)  # [B, N, H]
        time_in = torch.cat([mask, s[:, None, None].expand_as(mask) * mask], dim=-1)  # [B, N, 2]
        h = self.embed(time_in).to(dtype) + self.atom_embed(atom_type).to(dtype)
        h = h + self.proj_cond(c).to(dtype) + self.bond_in(a_s.sum(2) * BOND_AGG_SCALE).to(dtype)
        if self.jae_time is not None:
            h = h + self.jae_time(s).to(dtype)[:, None, :]
        h = h * mask

        graph = DenseGraph.build(x_s, node_mask)
        x = x_s
        for block in [*self.shared, *self.nucleation]:
            h, x = block(h, x, graph)
        eps_x = remove_mean(x - x_s, node_mask)
        eps_a = self.score_2d(h, a_s, graph.dist2_in, s).to(dtype) * pair_mask.unsqueeze(-1)
        z_clean = self.proj_clean(masked_mean(c, node_mask)).to(dtype)
        z_noised = self.proj_noised(masked_mean(h, node_mask)).to(dtype)
        return {"eps_x": eps_x, "eps_a": eps_a, "z_clean": z_clean, "z_noised": z_noised,
                "has_bonds": has_bonds, "pair_mask": pair_mask}

    # ----------------------------------------------------------------------------------------------- loss
    def loss_terms(self, batch, noise, out):
        node_mask = batch["node_mask"]
        dtype = batch["pos"].dtype
        num_atoms = node_mask.sum(1).to(dtype)  # [B]
        sq = (out["eps_x"] - noise["eps_x"]).square().sum((1, 2))
        score_3d = (sq / (3 * num_atoms.clamp(min=1))).mean()

        channels = self.pre.bond_channels
        pairs = out["pair_mask"].sum((1, 2))  # [B]
        covered = (out["has_bonds"] & (pairs > 0)).to(dtype)  # [B]
        err_2d = (out["eps_a"] - noise["eps_a"]).square() * out["pair_mask"].unsqueeze(-1)
        per_mol = err_2d.sum((1, 2, 3)) / (pairs.clamp(min=1) * channels)
        score_2d = (per_mol * covered).sum() / covered.sum().clamp(min=1)

        contrastive = info_nce(out["z_clean"], out["z_noised"], self.pre.temperature)
        loss = score_3d + self.pre.bond_weight * score_2d + self.pre.contrastive_weight * contrastive
        return {"loss": loss, "score_3d": score_3d, "score_2d": score_2d, "contrastive": contrastive}

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
    with torch.autocast(a.device.type, enabled=False):
        logits = a @ b.T / temperature  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def trunk_state_dict(model: MoleculeJAE) -> dict:
    """The transferable parameters (`embed.*`, `shared.*`, `nucleation.*`), named as in networks.UniGEM."""
    return {name: value for name, value in model.state_dict().items() if name.startswith(TRUNK_PREFIXES)}
