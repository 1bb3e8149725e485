"""The two models: UniGEM (multi-branch EGNN with prediction heads) and the EDM joint-diffusion baseline.

Both run the same `EGNNBlock`s (trainer/model/egnn.py). `model(batch)` returns the training loss dict (see
trainer/model/diffusion.py); `model.denoise(...)` is the network itself, used by the losses and the sampler.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from molscale.trainer.model import diffusion
from molscale.trainer.model.branches import Branch
from molscale.trainer.model.cuda_graphs import DenoiseGraphs
from molscale.trainer.model.diffusion import ONE_HOT_SCALE, LossConfig
from molscale.trainer.model.egnn import KERNELS, DenseGraph, EGNNBlock, use_kernel
from molscale.trainer.model.schedule import DiffusionConfig

CHARGE_SCALE = 0.1


@dataclass
class ModelConfig:
    """The network: the ``model`` section of a run config. ``kind`` picks the class (MODEL_CLASSES);
    everything that differs between the kinds is decided by that class."""
    kind: str = "unigem"  # 'unigem' | 'edm'
    hidden: int = 256
    layers: int = 9  # EGNN blocks on each molecule's path (UniGEM paper: QM9 9, GEOM 4)
    shared_blocks: int = 1  # UniGEM: blocks before the nucleation / growth branches
    t_nucleation: int = 10  # UniGEM: growth phase t <= t_nucleation
    properties: list[str] = field(default_factory=list)  # names of the batch["props"] columns to regress
    # Property-conditioned generation (EDM, Hoogeboom et al. 2022, section 3.4 / its released qm9 code: the
    # normalised property is one more input channel of every atom): names of properties the network is given.
    condition_on: list[str] = field(default_factory=list)
    include_charges: bool = True  # EDM: diffuse Z/10 as an extra channel
    atom_vocab: list[int] | None = None  # atomic numbers, in order; a run fills in its dataset's
    chunk_cost_pairs: int | None | str = "auto"  # see trainer/model/packing.py; None: never split a batch
    # 'eager' | 'compiled' (each EGNN block through torch.compile) | 'fused' (the edge MLPs as Triton kernels)
    kernel: str = "eager"  # docs/numerics.md, "Compiled blocks" and "Fused edge kernels"

    @property
    def branch_blocks(self):
        return self.layers - self.shared_blocks

    @property
    def property_columns(self) -> list[str]:
        """The batch["props"] columns a model reads, in order: the regressed properties, then the conditioning
        ones (both normalised with the dataset's train mean and MAD)."""
        return [*self.properties, *self.condition_on]

    def model_class(self) -> type["DiffusionModel"]:
        if self.kind not in MODEL_CLASSES:
            kinds = ", ".join(repr(k) for k in MODEL_CLASSES)
            raise ValueError(f"model.kind must be one of {kinds}, got {self.kind!r}")
        return MODEL_CLASSES[self.kind]

    def validate(self, diffusion: DiffusionConfig | None = None) -> None:
        """The one check of a model configuration (with the noise process it runs on, when given)."""
        model_class = self.model_class()
        if self.layers < 1 or self.hidden < 1:
            raise ValueError("model.layers and model.hidden must be at least 1")
        if self.kernel not in KERNELS:
            raise ValueError(f"model.kernel must be one of {list(KERNELS)}, got {self.kernel!r}")
        if self.atom_vocab is not None and (len(set(self.atom_vocab)) != len(self.atom_vocab) or not self.atom_vocab):
            raise ValueError(f"model.atom_vocab must be distinct atomic numbers, got {self.atom_vocab}")
        if len(set(self.condition_on)) != len(self.condition_on):
            raise ValueError(f"model.condition_on lists a property twice: {self.condition_on}")
        both = sorted(set(self.condition_on) & set(self.properties))
        if both:
            raise ValueError(f"model.condition_on and model.properties share {both}: a head given its own target "
                             f"as input learns nothing; predict it with a separate model (EDM's protocol)")
        cost = self.chunk_cost_pairs
        if not (cost in ("auto", None) or (isinstance(cost, int) and cost >= 0)):
            raise ValueError(f"model.chunk_cost_pairs must be 'auto', null or an integer >= 0, got {cost!r}")
        model_class.check_config(self, diffusion or DiffusionConfig())


def mlp(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def time_channel(t, num_steps, like):
    # t [B] int64 -> t/T broadcast to [B, N, 1] in like's dtype
    frac = (t.to(like.dtype) / num_steps).to(like.device)
    return frac[:, None, None].expand(like.shape[0], like.shape[1], 1)


def node_inputs(channels, context, like):
    """[..., channels, context per atom] -> [B, N, D + C]: the conditioning values context [B, C] (normalised)
    broadcast to every atom, as EDM feeds its context; channels [B, N, D] unchanged when context is None."""
    if context is None:
        return channels
    per_atom = context.to(like.dtype)[:, None, :].expand(channels.shape[0], channels.shape[1], context.shape[-1])
    return torch.cat([channels, per_atom], dim=-1)


class PropertyScale:
    """(mean, mad) [P] of the property ``columns`` (None: 0 and 1), checked, from the dataset manifest. Kept as
    float64 CPU tensors, not buffers, so that model.to(bf16) never rounds them; ``on(like)`` hands them out on
    ``like``'s device and dtype, copied there once per (device, dtype) rather than every step."""

    def __init__(self, prop_mean, prop_mad, columns: list[str]):
        n_props = len(columns)
        mean = torch.zeros(n_props) if prop_mean is None else torch.as_tensor(prop_mean, dtype=torch.float64)
        mad = torch.ones(n_props) if prop_mad is None else torch.as_tensor(prop_mad, dtype=torch.float64)
        if mean.shape != (n_props,) or mad.shape != (n_props,) or bool((mad <= 0).any()):
            raise ValueError(f"prop_mean / prop_mad need {n_props} values (MAD > 0) for properties {columns}")
        self.mean, self.mad = mean.double(), mad.double()
        self._copies: dict = {}  # (device, dtype) -> (mean, mad)

    def on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._copies:
            self._copies[key] = (self.mean.to(like), self.mad.to(like))
        return self._copies[key]


def run_stack(embed, blocks, node_in, pos_t, node_mask, graph_builder=None):
    """The EGNN stack, the one way both models (and UniGEM's pretraining) run their blocks: node features
    embed(node_in) (node_in [B, N, F], zero at padding) and the coordinates pos_t [B, N, 3] through ``blocks`` on
    one graph -> (node features h [B, N, H], eps [B, N, 3], the CoM-free coordinate update). ``graph_builder``: the
    layout the blocks run on (None: the dense one; trainer/bench.py swaps in the research code's edge list)."""
    mask = node_mask.to(pos_t.dtype).unsqueeze(-1)  # [B, N, 1]
    graph = (graph_builder or DenseGraph.build)(pos_t, node_mask)
    h = (embed(node_in) * mask).to(pos_t.dtype)
    h, pos = graph.nodes(h), graph.nodes(pos_t)
    for block in blocks:
        h, pos = graph.run(block, h, pos)
    h, pos = graph.dense(h), graph.dense(pos)
    return h, diffusion.remove_mean(pos - pos_t, node_mask)


def run_trunk(embed, blocks, pos_t, node_mask, t, num_steps, graph_builder=None, context=None):
    """UniGEM's trunk: what the EGNN stack sees and returns, defined once for UniGEM and its pretraining.

    The only inputs are the noised coordinates pos_t [B, N, 3], node_mask [B, N] and the step t [B]: node features
    start from embed([mask, t/T]) (atom types are not an input of UniGEM's generation path), with a conditional
    model's normalised context [B, C] appended to every atom's input. Returns run_stack's (h, eps).
    """
    mask = node_mask.to(pos_t.dtype).unsqueeze(-1)  # [B, N, 1]
    node_in = node_inputs(torch.cat([mask, time_channel(t, num_steps, pos_t)], dim=-1), context, pos_t) * mask
    return run_stack(embed, blocks, node_in, pos_t, node_mask, graph_builder)


class DiffusionModel(nn.Module):
    """What both models share: config, schedule, property normalisation, the loss as forward()."""

    predicts_properties = False  # a property head on the growth branch (UniGEM)
    # the graph layout the blocks run on: None is the dense one; the benchmark (trainer/bench.py) sets the research
    # code's edge-list reference here to time it against the same weights
    graph_builder = None
    generates_molecules = True  # (a property classifier, model/classifier.py, does not)

    def __init__(self, cfg: ModelConfig, diffusion: DiffusionConfig | None = None, prop_mean=None, prop_mad=None,
                 loss: LossConfig | None = None):
        super().__init__()
        # cfg, diffusion and loss were checked where they were read (the run config, a checkpoint, a card)
        diffusion = diffusion or DiffusionConfig()
        self.loss_cfg = loss or LossConfig()  # how forward() reduces the errors of a batch
        if cfg.atom_vocab is None:
            raise ValueError("model.atom_vocab is not set: a run takes its dataset's vocabulary; elsewhere pass the "
                             "atomic numbers the model's atom-type channels stand for")
        self.cfg, self.diffusion = cfg, diffusion
        self.num_steps = diffusion.num_steps
        self.schedule = diffusion.schedule_tables()
        self.prop_scale = PropertyScale(prop_mean, prop_mad, cfg.property_columns)  # regressed, then conditioning
        self.cuda_graphs: DenoiseGraphs | None = None  # set by use_cuda_graphs()

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Run the network on CUDA tensors through CUDA graphs captured per shape (trainer/model/cuda_graphs.py);
        CPU tensors still run eagerly."""
        self.cuda_graphs = DenoiseGraphs(self) if enabled else None

    def prepare_network(self, calls: list[tuple[tuple, dict]]) -> None:
        """Announce the denoise calls [(tensors, keyword arguments)] a training loss is about to make, so that
        their CUDA graphs are captured before its forward starts (trainer/model/cuda_graphs.py); nothing to do
        without graphs."""
        if self.cuda_graphs is not None and calls and calls[0][0][0].is_cuda:
            self.cuda_graphs.prepare([(self._denoise, tensors, static) for tensors, static in calls])

    def branch_of(self, t: int) -> Branch | None:
        """The network that denoises at time t: None for a model of one network (EDM)."""
        return None

    @property
    def switch_time(self) -> int | None:
        """The last time step of the first network, where a two-network model hands over (None: one network)."""
        return None

    def run_network(self, fn, tensors: tuple, **static) -> dict:
        """fn(*tensors, **static), the eager network, or its CUDA graph when graphs are on."""
        if self.cuda_graphs is not None and tensors[0].is_cuda:
            return self.cuda_graphs.run(fn, tensors, static)
        return fn(*tensors, **static)

    def prop_normalisation(self, like):
        """(mean, mad) [P] of the regressed properties on the device and in the dtype of ``like``."""
        mean, mad = self.prop_scale.on(like)
        return mean[: len(self.cfg.properties)], mad[: len(self.cfg.properties)]

    @property
    def num_context(self) -> int:
        return len(self.cfg.condition_on)

    def normalise_context(self, values):
        """Conditioning values [B, C] in dataset units (the order of model.condition_on) -> the network's
        normalised context [B, C]."""
        if not self.num_context:
            raise ValueError("this model is not conditioned on any property (model.condition_on is empty)")
        mean, mad = self.prop_scale.on(values)
        p = len(self.cfg.properties)
        return (values - mean[p:]) / mad[p:]

    def batch_context(self, batch):
        """The normalised context of a training batch (its conditioning columns of batch["props"]), or None."""
        if not self.num_context:
            return None
        return self.normalise_context(batch["props"][:, len(self.cfg.properties):].to(batch["pos"].dtype))

    def check_context(self, context, batch_size: int) -> None:
        """A clear error for a context that does not fit the model (sampling entry points call this)."""
        if self.num_context and context is None:
            raise ValueError(f"this model is conditioned on {self.cfg.condition_on}: sampling needs their values")
        if context is not None and tuple(context.shape) != (batch_size, self.num_context):
            raise ValueError(f"conditioning values must be [{batch_size}, {self.num_context}] "
                             f"({self.cfg.condition_on}), got {list(context.shape)}")

    @property
    def num_atom_types(self):
        return len(self.cfg.atom_vocab)


    @classmethod
    def check_config(cls, cfg: ModelConfig, diffusion: DiffusionConfig) -> None:
        """Checks of the fields this kind of model reads (ModelConfig.validate calls it)."""
        if cfg.properties and not cls.predicts_properties:
            raise ValueError(f"model.properties needs model.kind = 'unigem' ({cfg.kind} has no property head)")

    def forward(self, batch, generator=None, t=None):
        """Training loss dict for a batch; 'loss' is the total to back-propagate. t [B] int64 fixes the time
        steps (tests); by default they are drawn as the model's paper prescribes (trainer/model/diffusion.py)."""
        raise NotImplementedError

    # The sampler (trainer/model/sampling.py) works on a dict of latents: 'pos' (CoM-free coordinates) and
    # whatever else a model diffuses. Each model says what it diffuses and how atom types are read out.
    def initial_latents(self, node_mask, generator, dtype) -> dict:
        raise NotImplementedError

    def predict_noise(self, latents: dict, node_mask, t: int, final: bool, context=None) -> dict:
        """eps estimate per latent at integer time t for the whole batch; final (t = 0) adds the read-out;
        context [B, C]: a conditional model's normalised conditioning values."""
        t_batch = torch.full((node_mask.shape[0],), t, dtype=torch.long, device=node_mask.device)
        return self.noise_estimate(latents, node_mask, t_batch, self.branch_of(t), final, context)

    def noise_estimate(self, latents: dict, node_mask, t_batch, branch, final: bool, context=None) -> dict:
        """predict_noise with the time as a tensor t_batch [B] (every molecule at the same t) and the network
        that t belongs to (branch_of) given: the form a CUDA graph of a whole denoising step replays, where t
        comes from a table on the device."""
        raise NotImplementedError

    def atom_type_scores(self, latents: dict, out: dict, alpha0: float, sigma0: float):
        """[B, N, K] scores whose argmax is the atom type, from the final step's latents and output."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.cfg.kind}: {self.cfg.layers} blocks"


class UniGEM(DiffusionModel):
    """Shared blocks, then a nucleation and a growth branch; atom-type and property heads on the growth branch."""

    predicts_properties = True

    def __init__(self, cfg: ModelConfig, diffusion: DiffusionConfig | None = None, prop_mean=None, prop_mad=None,
                 loss: LossConfig | None = None):
        super().__init__(cfg, diffusion, prop_mean, prop_mad, loss)
        hidden = cfg.hidden
        self.embed = nn.Linear(2 + self.num_context, hidden)  # [1 (atom types are not diffused), t/T, context]
        self.shared = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.shared_blocks))
        self.nucleation = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.branch_blocks))
        self.growth = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.branch_blocks))
        self.atom_type_head = mlp(hidden, hidden, self.num_atom_types)  # normalised one-hot per atom
        self.prop_node = mlp(hidden, hidden, hidden)
        self.prop_out = mlp(hidden, hidden, len(cfg.properties)) if cfg.properties else None

    @classmethod
    def check_config(cls, cfg: ModelConfig, diffusion: DiffusionConfig) -> None:
        super().check_config(cfg, diffusion)
        if not 0 <= cfg.shared_blocks < cfg.layers:
            raise ValueError(f"model.shared_blocks must be in [0, model.layers) (got {cfg.shared_blocks}, "
                             f"{cfg.layers})")
        if not 0 <= cfg.t_nucleation < diffusion.num_steps:
            raise ValueError(f"model.t_nucleation must be in [0, diffusion.num_steps) (got {cfg.t_nucleation})")

    def forward(self, batch, generator=None, t=None, eps=None):
        return diffusion.unigem_loss(self, batch, generator=generator, t=t, eps=eps)

    def branch_of(self, t: int) -> Branch:
        return Branch.GROWTH if t <= self.cfg.t_nucleation else Branch.NUCLEATION

    @property
    def switch_time(self) -> int:
        return self.cfg.t_nucleation

    def initial_latents(self, node_mask, generator, dtype) -> dict:
        b, n = node_mask.shape
        return {"pos": diffusion.com_free_noise((b, n, 3), node_mask, generator, dtype)}

    def noise_estimate(self, latents, node_mask, t_batch, branch, final, context=None):
        # the whole batch goes through the branch of the current phase; the heads are read at t = 0 only
        out = self.denoise(latents["pos"], node_mask, t_batch, branch, heads=final and branch == Branch.GROWTH,
                           context=context)
        return {"pos": out["eps"], **({"atom_type": out["atom_type"]} if "atom_type" in out else {})}

    def atom_type_scores(self, latents, out, alpha0, sigma0):
        return out["atom_type"]

    def describe(self) -> str:
        c = self.cfg
        conditioned = f", conditioned on {c.condition_on}" if c.condition_on else ""
        return f"unigem: {c.layers} blocks on each path ({c.shared_blocks} shared + 2 x {c.branch_blocks}){conditioned}"

    def denoise(self, pos_t, node_mask, t, branch, heads=False, context=None, differentiable=False):
        """pos_t [B, N, 3] noised coordinates, node_mask [B, N] bool, t [B] int64, all molecules in `branch`;
        context [B, C]: the normalised conditioning values (conditional models only).

        Returns eps [B, N, 3] (CoM-free); with heads also atom_type [B, N, K] (normalised one-hot estimate)
        and props [B, P] (normalised properties).
        """
        if differentiable:  # gradients with respect to the inputs (guidance): the eager network, never a graph
            return self._denoise(pos_t, node_mask, t, context, branch=branch, heads=heads)
        tensors = (pos_t, node_mask, t) if context is None else (pos_t, node_mask, t, context)
        return self.run_network(self._denoise, tensors, branch=branch, heads=heads)

    def _denoise(self, pos_t, node_mask, t, context=None, *, branch, heads):
        mask = node_mask.to(pos_t.dtype).unsqueeze(-1)  # [B, N, 1]
        branch_blocks = self.growth if branch == Branch.GROWTH else self.nucleation
        h, eps = run_trunk(self.embed, [*self.shared, *branch_blocks], pos_t, node_mask, t, self.num_steps,
                           self.graph_builder, context)
        out = {"eps": eps}
        if heads:
            if branch != Branch.GROWTH:
                raise ValueError("the atom-type and property heads sit on the growth branch only")
            out["atom_type"] = self.atom_type_head(h).to(pos_t.dtype) * mask
            if self.prop_out is not None:
                pooled = (self.prop_node(h).to(pos_t.dtype) * mask).sum(1)  # [B, H]
                out["props"] = self.prop_out(pooled).to(pos_t.dtype)
        return out


class EDM(DiffusionModel):
    """Joint diffusion of coordinates and atom features h = [one-hot / 4, Z / 10] through one EGNN stack."""

    def __init__(self, cfg: ModelConfig, diffusion: DiffusionConfig | None = None, prop_mean=None, prop_mad=None,
                 loss: LossConfig | None = None):
        super().__init__(cfg, diffusion, prop_mean, prop_mad, loss)
        self.h_channels = self.num_atom_types + int(cfg.include_charges)
        self.embed = nn.Linear(self.h_channels + 1 + self.num_context, cfg.hidden)  # [h_t, t/T, context]
        self.blocks = nn.ModuleList(EGNNBlock(cfg.hidden) for _ in range(cfg.layers))
        self.out = nn.Linear(cfg.hidden, self.h_channels)
        self.register_buffer("charges", torch.tensor(cfg.atom_vocab, dtype=torch.float32), persistent=False)

    def forward(self, batch, generator=None, t=None):
        return diffusion.edm_loss(self, batch, generator=generator, t=t)

    def initial_latents(self, node_mask, generator, dtype) -> dict:
        b, n = node_mask.shape
        pos = diffusion.com_free_noise((b, n, 3), node_mask, generator, dtype)
        return {"pos": pos, "h": diffusion.masked_noise((b, n, self.h_channels), node_mask, generator, dtype)}

    def noise_estimate(self, latents, node_mask, t_batch, branch, final, context=None):
        out = self.denoise(latents["pos"], latents["h"], node_mask, t_batch, context=context)
        return {"pos": out["eps"], "h": out["eps_h"]}

    def atom_type_scores(self, latents, out, alpha0, sigma0):
        # the clean estimate of h at t = 0; its one-hot channels score the types
        return ((latents["h"] - sigma0 * out["h"]) / alpha0)[..., : self.num_atom_types]

    def atom_features(self, atom_type, node_mask, dtype):
        # atom_type [B, N] vocabulary index -> h [B, N, C] = [one-hot / 4, Z / 10], zero at padding
        mask = node_mask.to(dtype).unsqueeze(-1)
        h = diffusion.one_hot(atom_type, self.num_atom_types, dtype) * ONE_HOT_SCALE
        if self.cfg.include_charges:
            charge = self.charges.to(dtype)[atom_type].unsqueeze(-1) * CHARGE_SCALE
            h = torch.cat([h, charge], dim=-1)
        return h * mask

    def denoise(self, pos_t, h_t, node_mask, t, context=None):
        """pos_t [B, N, 3], h_t [B, N, C], node_mask [B, N], t [B], context [B, C'] (conditional models)
        -> eps [B, N, 3] (CoM-free), eps_h [B, N, C]."""
        tensors = (pos_t, h_t, node_mask, t) if context is None else (pos_t, h_t, node_mask, t, context)
        return self.run_network(self._denoise, tensors)

    def _denoise(self, pos_t, h_t, node_mask, t, context=None):
        mask = node_mask.to(pos_t.dtype).unsqueeze(-1)
        node_in = node_inputs(torch.cat([h_t, time_channel(t, self.num_steps, pos_t)], dim=-1), context, pos_t) * mask
        h, eps = run_stack(self.embed, self.blocks, node_in, pos_t, node_mask, self.graph_builder)
        return {"eps": eps, "eps_h": self.out(h).to(pos_t.dtype) * mask}


MODEL_CLASSES = {"unigem": UniGEM, "edm": EDM}


def build_model(cfg: ModelConfig, diffusion: DiffusionConfig | None = None, prop_mean=None,
                prop_mad=None, loss: LossConfig | None = None) -> DiffusionModel:
    """prop_mean / prop_mad: per-property train mean and MAD (dataset manifest), in the order of cfg.properties;
    loss: how the training loss reduces a batch (default: per molecule)."""
    return use_kernel(cfg.model_class()(cfg, diffusion, prop_mean, prop_mad, loss), cfg.kernel)
