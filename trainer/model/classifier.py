"""An independent property predictor that reads atom types and positions: the scorer of EDM's conditional
protocol (objective ``property``).

EDM (Hoogeboom et al. 2022, section 4.2) scores property-conditioned samples with a separate EGNN property
classifier trained on the half of the QM9 train split that the conditional model did not see (released code:
``qm9/property_prediction/main_qm9_prop.py`` and ``models_property.py``: an EGNN over one-hot atom types and
inter-atomic distances of the clean molecule, node MLP, sum over atoms, graph MLP, L1 loss on the property
normalised by the train mean and mean absolute deviation). This is that design on this project's EGNN blocks:
unlike UniGEM's own head, which reads coordinates only, it sees the generated atom types, so a molecule whose
types are wrong is scored as what it is.

``model(batch)`` -> {'loss', 'l1'} (the normalised L1, as EDM trains it); ``predict_properties(batch)`` ->
[B, P] in dataset units. Sizes come from the run's ``model`` section: ``hidden`` and ``layers`` (EDM's
classifier: 128 hidden, 7 layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from molscale.trainer.model.diffusion import one_hot
from molscale.trainer.model.egnn import DenseGraph, EGNNBlock, use_kernel
from molscale.trainer.model.networks import ModelConfig, PropertyScale, mlp


class PropertyClassifier(nn.Module):
    predicts_properties = True
    generates_molecules = False
    num_context = 0  # never conditioned

    def __init__(self, cfg: ModelConfig, prop_mean=None, prop_mad=None):
        super().__init__()
        if cfg.atom_vocab is None:
            raise ValueError("model.atom_vocab is not set: the classifier's one-hot inputs are the dataset's elements")
        if not cfg.properties or cfg.condition_on:
            raise ValueError("a property classifier regresses model.properties (at least one) and is conditioned on "
                             "nothing (model.condition_on empty)")
        self.cfg = cfg
        self.prop_scale = PropertyScale(prop_mean, prop_mad, cfg.properties)
        hidden = cfg.hidden
        self.embed = nn.Linear(len(cfg.atom_vocab), hidden)  # one-hot atom type -> h
        self.blocks = nn.ModuleList(EGNNBlock(hidden) for _ in range(cfg.layers))
        # EDM's classifier passes messages over the input geometry and never moves the atoms: the blocks'
        # coordinate MLPs are not used, so they are frozen (the trainer optimises what requires grad)
        for block in self.blocks:
            for name, parameter in block.named_parameters():
                if name.startswith("coord_"):
                    parameter.requires_grad_(False)
        self.node_head = mlp(hidden, hidden, hidden)
        self.graph_head = mlp(hidden, hidden, len(cfg.properties))
        use_kernel(self, cfg.kernel)

    def describe(self) -> str:
        return (f"property classifier: {self.cfg.layers} EGNN blocks x {self.cfg.hidden} over atom types and "
                f"positions -> {', '.join(self.cfg.properties)}")

    def prop_normalisation(self, like: torch.Tensor):
        """(mean, mad) [P] on the device and in the dtype of ``like``."""
        return self.prop_scale.on(like)

    def normalised(self, pos, atom_type, node_mask) -> torch.Tensor:
        """[B, P] normalised predictions for clean molecules: pos [B, N, 3], atom_type [B, N] (indices into
        model.atom_vocab), node_mask [B, N]."""
        mask = node_mask.to(pos.dtype).unsqueeze(-1)
        h = self.embed(one_hot(atom_type, len(self.cfg.atom_vocab), pos.dtype)) * mask
        graph = DenseGraph.build(pos, node_mask)
        for block in self.blocks:
            h, _ = block(h, pos, graph)  # every block sees the input geometry (see __init__)
        per_atom = self.node_head(h).to(pos.dtype) * mask
        return self.graph_head(per_atom.sum(1)).to(pos.dtype)  # EDM: sum over atoms, then the graph MLP

    def predict_properties(self, batch) -> torch.Tensor:
        """[B, P] in the units of the dataset (batch: pos, atom_type, node_mask)."""
        if "atom_type" not in batch:
            raise ValueError("the property classifier reads atom types: the batch has no 'atom_type'")
        out = self.normalised(batch["pos"], batch["atom_type"], batch["node_mask"])
        mean, mad = self.prop_normalisation(out)
        return out * mad + mean

    def forward(self, batch, generator=None):
        """The training loss: mean over molecules of the L1 error of the normalised properties (EDM's
        main_qm9_prop.py). ``generator`` is unused (nothing is random) and kept for the loop's call."""
        pred = self.normalised(batch["pos"], batch["atom_type"], batch["node_mask"])
        n_props = len(self.cfg.properties)
        mean, mad = self.prop_normalisation(pred)
        target = (batch["props"][:, :n_props].to(pred.dtype) - mean) / mad
        l1 = (pred - target).abs().mean()
        return {"loss": l1, "l1": l1.detach()}
