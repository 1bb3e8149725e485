"""The property classifier (objective 'property', trainer/model/classifier.py): EDM's independent scorer, which
reads atom types as well as positions."""

from __future__ import annotations

import pytest
import torch

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.trainer.model.classifier import PropertyClassifier
from molscale.trainer.model.networks import ModelConfig
from molscale.trainer.model.objectives import Objective
from molscale.trainer.model.sampling import predict_properties
from molscale.trainer.train.config import ConfigError, load_config
from tests.trainer.helpers import make_batch, random_orthogonal

MEAN, MAD = [1.0, -2.0], [3.0, 0.5]


def classifier(seed=0, **overrides) -> PropertyClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=16, layers=3, properties=["gap", "mu"], atom_vocab=list(QM9_ATOM_VOCAB), **overrides)
    return PropertyClassifier(cfg, MEAN, MAD).double().eval()


def test_predictions_are_invariant_to_rotation_translation_and_atom_order():
    model, batch = classifier(), make_batch([5, 3, 7], seed=1)
    with torch.no_grad():
        base = predict_properties(model, batch)
        q = random_orthogonal(2, reflect=True)
        moved = dict(batch, pos=batch["pos"] @ q.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        assert torch.allclose(predict_properties(model, moved), base, atol=1e-10)
        order = torch.tensor([4, 2, 0, 1, 3, 5, 6])  # the first molecule's 5 atoms permuted; padding stays last
        permuted = {k: v[:, order] if k in ("pos", "atom_type", "node_mask") else v for k, v in batch.items()}
        assert torch.allclose(predict_properties(model, permuted)[0], base[0], atol=1e-10)
        extra = 3  # more padding changes nothing
        padded = {k: torch.cat([v, torch.zeros_like(v[:, :extra])], 1) if k in ("pos", "atom_type", "node_mask")
                  else v for k, v in batch.items()}
        assert torch.allclose(predict_properties(model, padded), base, atol=1e-10)


def test_predictions_read_the_atom_types():
    """Unlike UniGEM's head (coordinates only), the classifier grades a molecule whose types are wrong as such."""
    model, batch = classifier(), make_batch([5, 3, 7], seed=1)
    retyped = dict(batch, atom_type=(batch["atom_type"] + 1) % len(QM9_ATOM_VOCAB) * batch["node_mask"])
    with torch.no_grad():
        diff = (predict_properties(model, retyped) - predict_properties(model, batch)).abs()
    assert bool((diff > 1e-6).all())
    with pytest.raises(ValueError, match="reads atom types"):
        predict_properties(model, {k: v for k, v in batch.items() if k != "atom_type"})


def test_loss_is_the_l1_of_normalised_properties_and_predictions_are_in_dataset_units():
    model, batch = classifier(), make_batch([5, 3, 7], seed=3)
    out = model(batch)
    normalised = model.normalised(batch["pos"], batch["atom_type"], batch["node_mask"])
    target = (batch["props"] - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(MAD, dtype=torch.float64)
    assert out["loss"].item() == pytest.approx((normalised - target).abs().mean().item(), rel=1e-12)
    expected = normalised * torch.tensor(MAD, dtype=torch.float64) + torch.tensor(MEAN, dtype=torch.float64)
    assert torch.allclose(predict_properties(model, batch), expected)
    out["loss"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    # the atoms never move (EDM's classifier): the blocks' coordinate MLPs are frozen, everything else trains
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("blocks.") and ".coord_" in n}


def test_the_config_asks_for_properties_and_nothing_to_condition_on():
    with pytest.raises(ConfigError, match="objective 'property' trains a property classifier"):
        load_config("cluster/cpu_smoke.json", ["objective=property", "model.properties=[]"])
    with pytest.raises(ConfigError, match="objective 'property' trains a property classifier"):
        load_config("cluster/cpu_smoke.json", ["objective=property", 'model.condition_on=["mu"]'])
    with pytest.raises(ConfigError, match="train.cuda_graphs covers the diffusion objective only"):
        load_config("cluster/cpu_smoke.json", ["objective=property", "train.cuda_graphs=true"])
    cfg = load_config("cluster/qm9_cond_classifier_1gpu.json")
    assert cfg.objective == Objective.PROPERTY and cfg.data.half == "first"
    with pytest.raises(ValueError, match="conditioned on nothing"):
        classifier(condition_on=["mu"])


def test_the_normalisation_is_copied_once_per_device_and_dtype_and_stays_float64_at_rest():
    model = classifier().to(torch.bfloat16)  # model.to(dtype) must not round the dataset's statistics
    assert model.prop_scale.mean.dtype == torch.float64
    x32, x64 = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)
    first = model.prop_normalisation(x32)
    assert model.prop_normalisation(x32)[0] is first[0] and model.prop_normalisation(x32)[1] is first[1]
    assert first[0].dtype == torch.float32 and model.prop_normalisation(x64)[0].dtype == torch.float64
    torch.testing.assert_close(model.prop_normalisation(x64)[1], torch.as_tensor(MAD, dtype=torch.float64))
