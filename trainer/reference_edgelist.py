"""Edge-list reference layout of the same EGNN block (the layout of the research code), for the benchmark
(trainer/bench.py sets it as a model's ``graph_builder``; training and sampling never use it).

Atoms are flattened to one list of nodes and the graph is a list of directed edges (row i <- col j). Each
layer gathers h[row] and h[col], concatenates them with the edge attributes into an [E, 2H + 2] tensor, runs
the unsplit MLP on it and scatter-adds the messages into their receiving node. It uses the parameters of
`trainer.model.egnn.EGNNBlock` unchanged, so all layouts compute the same function with the same weights.

Two edge sets:
- all_slots=True ('edge-list', as the EDM/UniGEM research code): every padded molecule of N slots is a full
  N x N edge set (padding and self-pairs included), and edge / node masks zero what is not real.
- all_slots=False ('edge-list-real'): only ordered pairs of distinct real atoms, no padding at all.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from molscale.trainer.model.egnn import (
    AGGREGATION_NORM,
    COORD_RANGE,
    NORM_CONSTANT,
    EGNNBlock,
)


@dataclass
class EdgeGraph:
    node_mask: torch.Tensor  # [B, N] bool, the padded layout to return to
    all_slots: bool  # nodes are all B * N slots (True) or only the real atoms (False)
    flat_mask: torch.Tensor  # [M, 1] 1 for real atoms
    row: torch.Tensor  # [E] receiving node i
    col: torch.Tensor  # [E] sending node j
    edge_mask: torch.Tensor  # [E, 1] 1 for pairs of distinct real atoms
    dist2_in: torch.Tensor  # [E, 1] squared distances at the network input

    @classmethod
    def build(cls, pos, node_mask, all_slots=True):
        # pos [B, N, 3], node_mask [B, N] bool
        b, n = node_mask.shape
        real_pair = node_mask[:, :, None] & node_mask[:, None, :]
        real_pair &= ~torch.eye(n, dtype=torch.bool, device=pos.device)  # [B, N, N]
        if all_slots:
            mol, i, j = torch.ones_like(real_pair).nonzero(as_tuple=True)
            row, col = mol * n + i, mol * n + j
            edge_mask = real_pair[mol, i, j]
            flat_mask = node_mask.reshape(-1)
        else:
            flat_id = torch.full((b, n), -1, dtype=torch.long, device=pos.device)
            flat_id[node_mask] = torch.arange(int(node_mask.sum()), device=pos.device)
            mol, i, j = real_pair.nonzero(as_tuple=True)
            row, col = flat_id[mol, i], flat_id[mol, j]
            edge_mask = torch.ones_like(row, dtype=torch.bool)
            flat_mask = node_mask[node_mask]
        graph = cls(node_mask, all_slots, flat_mask.to(pos.dtype)[:, None], row, col,
                    edge_mask.to(pos.dtype)[:, None], None)
        flat_pos = graph.nodes(pos)
        graph.dist2_in = (flat_pos[row] - flat_pos[col]).square().sum(-1, keepdim=True)
        return graph

    def nodes(self, x):
        # [B, N, C] -> [M, C]
        return x.reshape(-1, x.shape[-1]) if self.all_slots else x[self.node_mask]

    def dense(self, x):
        # [M, C] -> [B, N, C], zeros at padding
        if self.all_slots:
            return x.reshape(*self.node_mask.shape, x.shape[-1])
        out = x.new_zeros(*self.node_mask.shape, x.shape[-1])
        out[self.node_mask] = x
        return out

    def run(self, block, h, pos):
        return edgelist_block(block, h, pos, self)


def segment_sum(values, index, num_segments):
    # values [E, C], index [E] -> [num_segments, C]
    out = values.new_zeros(num_segments, values.shape[1])
    return out.scatter_add_(0, index.unsqueeze(1).expand(-1, values.shape[1]), values)


def joint_linear(lin_i, lin_j, lin_e, edge_in):
    """The unsplit first edge layer Linear(2H + 2 -> H) of the research code, from the split parameters."""
    weight = torch.cat([lin_i.weight, lin_j.weight, lin_e.weight], dim=1)  # [H, 2H + 2]
    return F.linear(edge_in, weight, lin_i.bias)


def edgelist_block(block: EGNNBlock, h, pos, graph: EdgeGraph):
    # h [M, H], pos [M, 3]
    row, col = graph.row, graph.col
    diff = pos[row] - pos[col]  # [E, 3]
    dist2 = diff.square().sum(-1, keepdim=True)  # [E, 1]
    edge_attr = torch.cat([dist2, graph.dist2_in], dim=1)  # [E, 2]

    edge_in = torch.cat([h[row], h[col], edge_attr.to(h.dtype)], dim=1)  # [E, 2H + 2]
    m = F.silu(block.msg_out(F.silu(joint_linear(block.msg_i, block.msg_j, block.msg_e, edge_in))))
    m = m * torch.sigmoid(block.gate(m)) * graph.edge_mask.to(m.dtype)
    agg = segment_sum(m.to(h.dtype), row, h.shape[0]) / AGGREGATION_NORM
    h = h + block.node_out(F.silu(block.node_in(torch.cat([h, agg], dim=1)))).to(h.dtype)
    h = h * graph.flat_mask

    edge_in = torch.cat([h[row], h[col], edge_attr.to(h.dtype)], dim=1)
    hidden = F.silu(joint_linear(block.coord_i, block.coord_j, block.coord_e, edge_in))
    phi = block.coord_out(F.silu(block.coord_hidden(hidden)))  # [E, 1]
    unit = diff / (torch.sqrt(dist2 + 1e-8) + NORM_CONSTANT)
    trans = unit * torch.tanh(phi.to(pos.dtype)) * COORD_RANGE * graph.edge_mask
    pos = pos + segment_sum(trans, row, pos.shape[0]) / AGGREGATION_NORM
    pos = pos * graph.flat_mask
    return h, pos


GRAPH_LAYOUTS = {  # --layout name -> builder(pos [B, N, 3], node_mask [B, N]), or None for the model's dense one
    "dense": None,
    "edge-list": partial(EdgeGraph.build, all_slots=True),  # reference: the research code's layout
    "edge-list-real": partial(EdgeGraph.build, all_slots=False),  # reference without padded pairs
}
