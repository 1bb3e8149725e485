"""Dense E(n)-equivariant GNN block (EDM variant: released code egnn/egnn_new.py, EquivariantBlock).

Molecules are padded to N atoms and every molecule is a fully connected graph without self-loops, so edge
tensors are dense [B, N, N, ...] with an edge mask; no index lists, gathers or scatters. What makes it fast:

- The first layer of each edge MLP acts on [h_i; h_j; d2_ij; d2in_ij]. It is split exactly into per-node
  projections, W [h_i; h_j; e_ij] + b = (W_i h_i + b) + W_j h_j + W_e e_ij, so the [B, N, N, 2H+2] concatenation
  and its (2H+2) x H product per edge are never formed: one H x H product per edge MLP remains.
- Masks are applied to per-edge scalars (gate, coordinate weight), never to [B, N, N, H] tensors.
- Padding is kept small by running a batch as chunks of similar-sized molecules (trainer/model/packing.py).
- model.kernel = 'compiled' runs each block through torch.compile (Inductor), one specialisation per input
  shape, shared by all blocks (compiled_step below; docs/numerics.md, "Compiled blocks").

Numerics (docs/numerics.md): positions, differences, distances, the coordinate sum and the neighbour sum of messages
are float32 (the dtype of `pos`; float64 in tests) and never autocast; the Linear layers run in bf16 when the
caller enables torch.autocast. The node features h stay in the dtype of `pos` between blocks.

The edge-list reference (`trainer/reference_edgelist.py`, for the benchmark) runs the same parameters in the research
code's layout.
"""

import functools
import inspect
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from molscale.trainer.model import fused_edges

COORD_RANGE = 15.0  # tanh coordinate update range
NORM_CONSTANT = 1.0  # unit_ij = (x_i - x_j) / (|x_i - x_j| + NORM_CONSTANT)
AGGREGATION_NORM = 1.0  # sum aggregation divided by this factor


@dataclass
class DenseGraph:
    """Geometry shared by all blocks of one forward pass in the dense layout."""

    node_mask: torch.Tensor  # [B, N, 1], 1 for real atoms, in the dtype of pos
    edge_mask: torch.Tensor  # [B, N, N], 1 where i != j and both atoms are real
    dist2_in: torch.Tensor  # [B, N, N], squared distances at the network input (Angstrom^2)

    @classmethod
    def build(cls, pos, node_mask):
        # pos [B, N, 3], node_mask [B, N] bool
        mask = node_mask.to(pos.dtype)
        n = pos.shape[1]
        not_self = 1.0 - torch.eye(n, dtype=pos.dtype, device=pos.device)
        edge_mask = mask[:, :, None] * mask[:, None, :] * not_self
        dist2_in = pairwise_dist2(pos)
        return cls(mask[..., None], edge_mask, dist2_in)

    def nodes(self, x):
        """Dense tensors are already in this layout."""
        return x

    def dense(self, x):
        return x

    def run(self, block, h, pos):
        return block(h, pos, self)


def pairwise_dist2(pos):
    # pos [B, N, 3] -> squared distances [B, N, N], computed from differences (exact zero on the diagonal)
    diff = pos[:, :, None, :] - pos[:, None, :, :]
    return diff.square().sum(-1)


class EGNNBlock(nn.Module):
    """One EDM equivariant block: a gated message-passing layer on h, then a tanh coordinate update."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden
        # message MLP phi_e on [h_i; h_j; d2_ij; d2in_ij]; its first layer is stored split by input block
        self.msg_i, self.msg_j, self.msg_e = split_linear(hidden)
        self.msg_out = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)  # attention gate, sigmoid
        # node MLP phi_h on [h_i; agg_i], residual
        self.node_in = nn.Linear(2 * hidden, hidden)
        self.node_out = nn.Linear(hidden, hidden)
        # coordinate MLP phi_x on [h_i; h_j; d2_ij; d2in_ij] (h after the message-passing update)
        self.coord_i, self.coord_j, self.coord_e = split_linear(hidden)
        self.coord_hidden = nn.Linear(hidden, hidden)
        self.coord_out = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(self.coord_out.weight, gain=0.001)

    kernel = "eager"  # 'eager' | 'compiled' | 'fused' (model.kernel); set on a built model by use_kernel()

    def forward(self, h, pos, graph: DenseGraph):
        # h [B, N, H] node features, pos [B, N, 3] Angstrom
        if self.kernel == "compiled":
            return compiled_step(self, h, pos, graph)
        fused = self.kernel == "fused" and fused_edges.runs_on(h.device)
        return self.step(h, pos, graph.node_mask, graph.edge_mask, graph.dist2_in, fused=fused)

    def step(self, h, pos, node_mask, edge_mask, dist2_in, fused=False):
        """The block's arithmetic on plain tensors (what torch.compile traces for model.kernel = 'compiled');
        fused=True runs the two edge MLPs as Triton kernels (trainer/model/fused_edges.py), the rest as here."""
        diff = pos[:, :, None, :] - pos[:, None, :, :]  # [B, N, N, 3], x_i - x_j
        dist2 = diff.square().sum(-1)  # [B, N, N]
        edge_attr = torch.stack([dist2, dist2_in], dim=-1)  # [B, N, N, 2]

        # messages m_ij = phi_e(h_i, h_j, e_ij), gated by sigmoid(w . m_ij) and summed over neighbours j
        if fused:
            agg = fused_edges.fused_edge_mlp(fused_edges.MESSAGE, self.msg_i(h), self.msg_j(h), edge_attr,
                                             self.msg_e, self.msg_out, self.gate, edge_mask)
            agg = agg.to(h.dtype) / AGGREGATION_NORM
        else:
            m = F.silu(self.msg_out(edge_hidden(self.msg_i, self.msg_j, self.msg_e, h, edge_attr)))  # [B, N, N, H]
            gate = torch.sigmoid(self.gate(m).squeeze(-1)) * edge_mask  # [B, N, N]
            agg = (m * gate.unsqueeze(-1).to(m.dtype)).sum(2, dtype=h.dtype) / AGGREGATION_NORM  # [B, N, H]
        node_in = torch.cat([h, agg], dim=-1)  # [B, N, 2H]
        h = h + self.node_out(F.silu(self.node_in(node_in))).to(h.dtype)
        h = h * node_mask

        # x_i += sum_j (x_i - x_j) / (|x_i - x_j| + 1) * tanh(phi_x(h_i, h_j, e_ij)) * range
        if fused:
            phi = fused_edges.fused_edge_mlp(fused_edges.COORDINATE, self.coord_i(h), self.coord_j(h), edge_attr,
                                             self.coord_e, self.coord_hidden, self.coord_out)
        else:
            hidden = edge_hidden(self.coord_i, self.coord_j, self.coord_e, h, edge_attr)
            phi = self.coord_out(F.silu(self.coord_hidden(hidden))).squeeze(-1)  # [B, N, N]
        weight = torch.tanh(phi.to(pos.dtype)) * (COORD_RANGE / AGGREGATION_NORM) * edge_mask
        unit = diff / (torch.sqrt(dist2 + 1e-8) + NORM_CONSTANT).unsqueeze(-1)  # [B, N, N, 3]
        pos = pos + (unit * weight.unsqueeze(-1)).sum(2)
        pos = pos * node_mask
        return h, pos


def split_linear(hidden):
    """The first edge layer Linear(2H + 2 -> H) as three blocks acting on h_i (with the bias), h_j and e_ij.

    Initialised as the unsplit layer would be (uniform in +-1/sqrt(2H + 2)), so the split changes nothing.
    """
    bound = (2 * hidden + 2) ** -0.5
    blocks = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden, bias=False), nn.Linear(2, hidden, bias=False)
    for layer in blocks:
        nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.uniform_(blocks[0].bias, -bound, bound)
    return blocks


def edge_hidden(lin_i, lin_j, lin_e, h, edge_attr):
    """silu(W_i h_i + b + W_j h_j + W_e e_ij) for all pairs: the first edge layer without the concatenation.

    W_e e_ij stays a Linear of in-features 2: written as two broadcast multiply-adds it fuses with the sums and the
    SiLU under model.kernel = 'compiled', but measured on a CPU that was slower (its weight gradient becomes a
    reduction over all pairs instead of one matrix product), in eager and compiled runs alike.
    h [B, N, H], edge_attr [B, N, N, 2] -> [B, N, N, H]
    """
    pre = lin_e(edge_attr.to(h.dtype))  # [B, N, N, H]; in-place adds below: Linear does not save its output
    pre += lin_i(h).unsqueeze(2)
    pre += lin_j(h).unsqueeze(1)
    return F.silu(pre)


# ------------------------------------------------------------------------------ model.kernel = 'compiled'
KERNELS = ("eager", "compiled", "fused")
# Compiled code is specialised to its input shapes (dynamic=False): each padded size N (QM9: up to 29; sampling:
# any size up to the dataset's largest) and batch size is its own entry, and a training step makes two per shape
# (the first block's pos has no gradient, the later blocks' has), validation and sampling one more without
# gradients: about 90 for QM9's 29 sizes. torch's default of 8 would raise after 8 shapes (fullgraph=True);
# shapes past this limit run eagerly, with one warning.
RECOMPILE_LIMIT = 128

log = logging.getLogger("trainer")
_compiled_shapes: set = set()  # the inputs compiled so far in this process (for the compile-time log line)
_eager_shapes: set = set()  # inputs past RECOMPILE_LIMIT: run eagerly without asking torch.compile again


def use_kernel(module: nn.Module, kernel: str) -> nn.Module:
    """Run every EGNNBlock inside `module` eagerly or through torch.compile (model.kernel)."""
    if kernel not in KERNELS:
        raise ValueError(f"model.kernel must be one of {list(KERNELS)}, got {kernel!r}")
    for block in module.modules():
        if isinstance(block, EGNNBlock):
            block.kernel = kernel
    return module


def _step(block, h, pos, node_mask, edge_mask, dist2_in):
    return block.step(h, pos, node_mask, edge_mask, dist2_in)


@functools.cache
def _compiled():
    # one compiled function for all blocks: the block is an argument and its parameters are graph inputs, so
    # blocks of the same width share each shape's code (and any model's copy, e.g. the EMA, reuses it)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    log.info("model.kernel=compiled: compiled code is cached in %s (TORCHINDUCTOR_CACHE_DIR)", cache_dir())
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.12: this function's own
        return torch.compile(_step, fullgraph=True, dynamic=False, recompile_limit=RECOMPILE_LIMIT)
    # older torch (a GPU image's own build): the process-wide limit, raised only
    import torch._dynamo as dynamo
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(_step, fullgraph=True, dynamic=False)


def _shape_key(block, h, pos):
    device = h.device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    return (tuple(h.shape), h.dtype, pos.dtype, device, torch.is_grad_enabled(), autocast, block.training,
            h.requires_grad, pos.requires_grad)


def _python_dispatch_mode_active() -> bool:
    """torch.compile cannot trace under a Python dispatch mode (the benchmark's operator and FLOP counters, the
    tests' sync detectors): there the block runs eagerly, so those counts are the eager path's."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is not None


def compiled_step(block, h, pos, graph: DenseGraph):
    """block.step through Inductor; the first call of each new input shape is timed and logged (it compiles,
    or loads the compiled code from the on-disk cache, docs/numerics.md)."""
    args = (block, h, pos, graph.node_mask, graph.edge_mask, graph.dist2_in)
    key = _shape_key(block, h, pos)
    if key in _eager_shapes or _python_dispatch_mode_active():
        return _step(*args)
    start = time.perf_counter()
    try:
        out = _compiled()(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        if not _eager_shapes:
            log.warning("model.kernel=compiled: more than %d input shapes; new shapes run eagerly",
                        RECOMPILE_LIMIT)
        _eager_shapes.add(key)
        return _step(*args)
    if key not in _compiled_shapes:
        _compiled_shapes.add(key)
        # the forward's compile; the backward compiles on its first use (about as long again, not in this line)
        log.info("model.kernel=compiled: EGNN block compiled for h %s (%s, grad %s) in %.1f s", list(h.shape),
                 str(h.dtype).removeprefix("torch."), key[4], time.perf_counter() - start)
    return out
