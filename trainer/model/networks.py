"""The two models: UniGEM (multi-branch EGNN with prediction heads) and the EDM joint-diffusion baseline.

Both run the same `EGNNBlock`s (trainer/egnn.py). `model(batch)` returns the training loss dict (see
trainer/diffusion.py); `model.denoise(...)` is the network itself, used by the losses and the sampler.
"""

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.trainer.model import diffusion
from molscale.trainer.model.egnn import DenseGraph, EGNNBlock
from molscale.trainer.model.reference_edgelist import EdgeGraph
from molscale.trainer.model.schedule import NoiseSchedule

GRAPH_LAYOUTS = {  # name -> builder(pos [B, N, 3], node_mask [B, N]) of the graph the blocks run on
    "dense": DenseGraph.build,
    "edge-list": partial(EdgeGraph.build, all_slots=True),  # reference: the research code's layout
    "edge-list-real": partial(EdgeGraph.build, all_slots=False),  # reference without padded pairs
}
ONE_HOT_SCALE = 0.25  # EDM normalisation factors [1, 4, 10] for (x, one-hot, charge)
CHARGE_SCALE = 0.1


@dataclass
class ModelConfig:
    kind: str = "unigem"  # 'unigem' | 'edm'
    hidden: int = 256
    layers: int = 9  # EGNN blocks on each molecule's path (QM9 9, GEOM 4)
    shared_blocks: int = 1  # UniGEM: blocks before the nucleation / growth branches
    t_nucleation: int = 10  # growth phase: t <= t_nucleation
    num_steps: int = 1000  # T
    schedule: str = "polynomial_2"  # or 'cosine'
    precision: float = 1e-5
    atom_vocab: list[int] = field(default_factory=lambda: list(QM9_ATOM_VOCAB))  # atomic numbers, in order
    properties: list[str] = field(default_factory=list)  # names of the batch["props"] columns to regress
    include_charges: bool = True  # EDM: diffuse Z/10 as an extra channel
    layout: str = "dense"  # 'dense', or the reference layouts 'edge-list' / 'edge-list-real' (benchmark)
    chunk_cost_pairs: int | None | str = "auto"  # see trainer/packing.py; None: never split a batch

    @property
    def branch_blocks(self):
        return self.layers - self.shared_blocks

    def validate(self):
        if self.kind not in ("unigem", "edm"):
            raise ValueError(f"model kind must be 'unigem' or 'edm', got {self.kind!r}")
        if self.layout not in GRAPH_LAYOUTS:
            raise ValueError(f"layout must be one of {list(GRAPH_LAYOUTS)}, got {self.layout!r}")
        if self.kind == "unigem" and not 0 <= self.shared_blocks < self.layers:
            raise ValueError(f"need 0 <= shared_blocks < layers, got {self.shared_blocks} and {self.layers}")
        if not 0 <= self.t_nucleation < self.num_steps:
            raise ValueError(f"t_nucleation {self.t_nucleation} must lie in [0, num_steps={self.num_steps})")
        if len(set(self.atom_vocab)) != len(self.atom_vocab) or not self.atom_vocab:
            raise ValueError(f"atom_vocab must be distinct atomic numbers, got {self.atom_vocab}")
        cost = self.chunk_cost_pairs
        if not (cost in ("auto", None) or (isinstance(cost, int) and cost >= 0)):
            raise ValueError(f"chunk_cost_pairs must be 'auto', null or an integer >= 0, got {cost!r}")


def mlp(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def time_channel(t, num_steps, like):
    # t [B] int64 -> t/T broadcast to [B, N, 1] in like's dtype
    frac = (t.to(like.dtype) / num_steps).to(like.device)
    return frac[:, None, None].expand(like.shape[0], like.shape[1], 1)


class DiffusionModel(nn.Module):
    """What both models share: config, schedule, property normalisation, the loss as forward()."""

    def __init__(self, cfg: ModelConfig, prop_mean=None, prop_mad=None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.num_steps, cfg.schedule, cfg.precision)
        n_props = len(cfg.properties)
        mean = torch.zeros(n_props) if prop_mean is None else torch.as_tensor(prop_mean, dtype=torch.float64)
        mad = torch.ones(n_props) if prop_mad is None else torch.as_tensor(prop_mad, dtype=torch.float64)
        if mean.shape != (n_props,) or mad.shape != (n_props,) or bool((mad <= 0).any()):
            raise ValueError(f"prop_mean / prop_mad need {n_props} values (MAD > 0) for properties {cfg.properties}")
        # plain float64 tensors, not buffers: never rounded by model.to(bf16); they come from the dataset manifest
        self.prop_mean, self.prop_mad = mean.double(), mad.double()

    @property
    def num_atom_types(self):
        return len(self.cfg.atom_vocab)

    def build_graph(self, pos, node_mask):
        return GRAPH_LAYOUTS[self.cfg.layout](pos, node_mask)

    def run_blocks(self, blocks, h, pos, graph):
        for block in blocks:
            h, pos = graph.run(block, h, pos)
        return h, pos

    def forward(self, batch, generator=None, t=None):
        """Training loss dict for a batch (see trainer/diffusion.py: model_loss)."""
        return diffusion.model_loss(self, batch, generator=generator, t=t)


class UniGEM(DiffusionModel):
    """Shared blocks, then a nucleation and a growth branch; atom-type and property heads on the growth branch."""

    def __init__(self, cfg: ModelConfig, prop_mean=None, prop_mad=None):
        super().__init__(cfg, prop_mean, prop_mad)
        hidden = cfg.hidden
        self.embed = nn.Linear(2, hidden)  # [constant 1 (atom types are not diffused), t/T]
        self.shared = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.shared_blocks))
        self.nucleation = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.branch_blocks))
        self.growth = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.branch_blocks))
        self.atom_type_head = mlp(hidden, hidden, self.num_atom_types)  # normalised one-hot per atom
        self.prop_node = mlp(hidden, hidden, hidden)
        self.prop_out = mlp(hidden, hidden, len(cfg.properties)) if cfg.properties else None

    def branch_of(self, t: int):
        return "growth" if t <= self.cfg.t_nucleation else "nucleation"

    def denoise(self, pos_t, node_mask, t, branch, heads=False):
        """pos_t [B, N, 3] noised coordinates, node_mask [B, N] bool, t [B] int64, all molecules in `branch`.

        Returns eps [B, N, 3] (CoM-free); with heads also atom_type [B, N, K] (normalised one-hot estimate)
        and props [B, P] (normalised properties).
        """
        mask = node_mask.to(pos_t.dtype).unsqueeze(-1)  # [B, N, 1]
        node_in = torch.cat([mask, time_channel(t, self.cfg.num_steps, pos_t) * mask], dim=-1)
        graph = self.build_graph(pos_t, node_mask)
        h = (self.embed(node_in) * mask).to(pos_t.dtype)
        h, pos = graph.nodes(h), graph.nodes(pos_t)
        branch_blocks = self.growth if branch == "growth" else self.nucleation
        h, pos = self.run_blocks([*self.shared, *branch_blocks], h, pos, graph)
        h, pos = graph.dense(h), graph.dense(pos)
        out = {"eps": diffusion.remove_mean(pos - pos_t, node_mask)}
        if heads:
            if branch != "growth":
                raise ValueError("the atom-type and property heads sit on the growth branch only")
            out["atom_type"] = self.atom_type_head(h).to(pos_t.dtype) * mask
            if self.prop_out is not None:
                pooled = (self.prop_node(h).to(pos_t.dtype) * mask).sum(1)  # [B, H]
                out["props"] = self.prop_out(pooled).to(pos_t.dtype)
        return out


class EDM(DiffusionModel):
    """Joint diffusion of coordinates and atom features h = [one-hot / 4, Z / 10] through one EGNN stack."""

    def __init__(self, cfg: ModelConfig, prop_mean=None, prop_mad=None):
        super().__init__(cfg, prop_mean, prop_mad)
        self.h_channels = self.num_atom_types + int(cfg.include_charges)
        self.embed = nn.Linear(self.h_channels + 1, cfg.hidden)  # [h_t, t/T]
        self.blocks = nn.ModuleList(EGNNBlock(cfg.hidden) for _ in range(cfg.layers))
        self.out = nn.Linear(cfg.hidden, self.h_channels)
        self.register_buffer("charges", torch.tensor(cfg.atom_vocab, dtype=torch.float32), persistent=False)

    def atom_features(self, atom_type, node_mask, dtype):
        # atom_type [B, N] vocabulary index -> h [B, N, C] = [one-hot / 4, Z / 10], zero at padding
        mask = node_mask.to(dtype).unsqueeze(-1)
        h = F.one_hot(atom_type, self.num_atom_types).to(dtype) * ONE_HOT_SCALE
        if self.cfg.include_charges:
            charge = self.charges.to(dtype)[atom_type].unsqueeze(-1) * CHARGE_SCALE
            h = torch.cat([h, charge], dim=-1)
        return h * mask

    def denoise(self, pos_t, h_t, node_mask, t):
        """pos_t [B, N, 3], h_t [B, N, C], node_mask [B, N], t [B] -> eps [B, N, 3] (CoM-free), eps_h [B, N, C]."""
        mask = node_mask.to(pos_t.dtype).unsqueeze(-1)
        node_in = torch.cat([h_t, time_channel(t, self.cfg.num_steps, pos_t)], dim=-1) * mask
        graph = self.build_graph(pos_t, node_mask)
        h = (self.embed(node_in) * mask).to(pos_t.dtype)
        h, pos = self.run_blocks(self.blocks, graph.nodes(h), graph.nodes(pos_t), graph)
        h, pos = graph.dense(h), graph.dense(pos)
        return {
            "eps": diffusion.remove_mean(pos - pos_t, node_mask),
            "eps_h": self.out(h).to(pos_t.dtype) * mask,
        }


def build_model(cfg: ModelConfig, prop_mean=None, prop_mad=None) -> DiffusionModel:
    """prop_mean / prop_mad: per-property train mean and MAD (dataset manifest), in the order of cfg.properties."""
    model_cls = {"unigem": UniGEM, "edm": EDM}.get(cfg.kind)
    if model_cls is None:
        raise ValueError(f"model kind must be 'unigem' or 'edm', got {cfg.kind!r}")
    return model_cls(cfg, prop_mean, prop_mad)
