"""Dense E(n)-equivariant GNN block (EDM variant: released code egnn/egnn_new.py, EquivariantBlock).

Molecules are padded to N atoms and every molecule is a fully connected graph without self-loops, so edge
tensors are dense [B, N, N, ...] with an edge mask; no index lists, gathers or scatters. What makes it fast:

- The first layer of each edge MLP acts on [h_i; h_j; d2_ij; d2in_ij]. It is split exactly into per-node
  projections, W [h_i; h_j; e_ij] + b = (W_i h_i + b) + W_j h_j + W_e e_ij, so the [B, N, N, 2H+2] concatenation
  and its (2H+2) x H product per edge are never formed: one H x H product per edge MLP remains.
- Masks are applied to per-edge scalars (gate, coordinate weight), never to [B, N, N, H] tensors.
- Padding is kept small by running a batch as chunks of similar-sized molecules (trainer/model/packing.py).

Numerics (docs/numerics.md): positions, differences, distances, the coordinate sum and the neighbour sum of messages
are float32 (the dtype of `pos`; float64 in tests) and never autocast; the Linear layers run in bf16 when the
caller enables torch.autocast. The node features h stay in the dtype of `pos` between blocks.

The edge-list reference (`trainer/model/reference_edgelist.py`) runs the same parameters in the research code's layout.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def forward(self, h, pos, graph: DenseGraph):
        # h [B, N, H] node features, pos [B, N, 3] Angstrom
        diff = pos[:, :, None, :] - pos[:, None, :, :]  # [B, N, N, 3], x_i - x_j
        dist2 = diff.square().sum(-1)  # [B, N, N]
        edge_attr = torch.stack([dist2, graph.dist2_in], dim=-1)  # [B, N, N, 2]

        # messages m_ij = phi_e(h_i, h_j, e_ij), gated by sigmoid(w . m_ij) and summed over neighbours j
        m = F.silu(self.msg_out(edge_hidden(self.msg_i, self.msg_j, self.msg_e, h, edge_attr)))  # [B, N, N, H]
        gate = torch.sigmoid(self.gate(m).squeeze(-1)) * graph.edge_mask  # [B, N, N]
        agg = (m * gate.unsqueeze(-1).to(m.dtype)).sum(2, dtype=h.dtype) / AGGREGATION_NORM  # [B, N, H]
        node_in = torch.cat([h, agg], dim=-1)  # [B, N, 2H]
        h = h + self.node_out(F.silu(self.node_in(node_in))).to(h.dtype)
        h = h * graph.node_mask

        # x_i += sum_j (x_i - x_j) / (|x_i - x_j| + 1) * tanh(phi_x(h_i, h_j, e_ij)) * range
        hidden = edge_hidden(self.coord_i, self.coord_j, self.coord_e, h, edge_attr)
        phi = self.coord_out(F.silu(self.coord_hidden(hidden))).squeeze(-1)  # [B, N, N]
        weight = torch.tanh(phi.to(pos.dtype)) * (COORD_RANGE / AGGREGATION_NORM) * graph.edge_mask
        unit = diff / (torch.sqrt(dist2 + 1e-8) + NORM_CONSTANT).unsqueeze(-1)  # [B, N, N, 3]
        pos = pos + (unit * weight.unsqueeze(-1)).sum(2)
        pos = pos * graph.node_mask
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

    h [B, N, H], edge_attr [B, N, N, 2] -> [B, N, N, H]
    """
    pre = lin_e(edge_attr.to(h.dtype))  # [B, N, N, H]; in-place adds below: Linear does not save its output
    pre += lin_i(h).unsqueeze(2)
    pre += lin_j(h).unsqueeze(1)
    return F.silu(pre)
