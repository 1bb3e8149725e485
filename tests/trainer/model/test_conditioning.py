"""Property-conditioned models (model.condition_on) and the train-split halves of EDM's protocol (data.half)."""

import dataclasses

import pytest
import torch

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import ManifestError, load_manifest
from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.sampling import predict_properties, sample
from tests.trainer.helpers import make_batch, random_orthogonal


def conditional_model(kind="unigem", properties=("mu",), seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, hidden=16, layers=3, properties=list(properties) if kind == "unigem" else [],
                      condition_on=["gap"], atom_vocab=list(QM9_ATOM_VOCAB))
    n = len(cfg.property_columns)
    # mean / MAD of [mu, gap] (UniGEM) or [gap] (EDM): the context is the last column
    return build_model(cfg, prop_mean=[2.0, 250.0][-n:], prop_mad=[1.0, 40.0][-n:]).double()


def test_config_refuses_a_property_both_predicted_and_given():
    with pytest.raises(ValueError, match="share \\['gap'\\]"):
        ModelConfig(properties=["gap"], condition_on=["gap"], atom_vocab=[1, 6]).validate()
    with pytest.raises(ValueError, match="twice"):
        ModelConfig(condition_on=["gap", "gap"], atom_vocab=[1, 6]).validate()


def test_unconditional_models_keep_their_input_width():
    # checkpoints of unconditional models load unchanged: the context adds input columns only when asked for
    plain = build_model(ModelConfig(hidden=8, layers=2, atom_vocab=[1, 6]))
    assert plain.embed.weight.shape == (8, 2) and plain.num_context == 0
    assert conditional_model().embed.weight.shape == (16, 3)


@pytest.mark.parametrize("kind", ["unigem", "edm"])
def test_the_context_reaches_the_network_and_keeps_it_equivariant(kind):
    model = conditional_model(kind)
    batch = make_batch([5, 3], num_props=len(model.cfg.property_columns), seed=1)
    t = torch.tensor([500, 3])
    low, high = torch.tensor([[-1.0], [-1.0]], dtype=torch.float64), torch.tensor([[1.5], [1.5]], dtype=torch.float64)

    def eps(pos, context):
        if kind == "unigem":
            return model.denoise(pos, batch["node_mask"], t, "nucleation", context=context)["eps"]
        h = model.atom_features(batch["atom_type"], batch["node_mask"], torch.float64)
        return model.denoise(pos, h, batch["node_mask"], t, context=context)["eps"]

    assert not torch.allclose(eps(batch["pos"], low), eps(batch["pos"], high))
    q = random_orthogonal(3, reflect=True)
    rotated = eps(batch["pos"] @ q.T, high)
    torch.testing.assert_close(rotated, eps(batch["pos"], high) @ q.T, atol=1e-9, rtol=1e-7)
    com = (rotated * batch["node_mask"][..., None]).sum(1)
    torch.testing.assert_close(com, torch.zeros_like(com), atol=1e-9, rtol=0)


def test_training_reads_the_conditioning_column_normalised():
    model = conditional_model()
    batch = make_batch([4, 6, 5], num_props=2, seed=2)
    batch["props"] = torch.tensor([[1.0, 210.0], [2.0, 250.0], [3.0, 330.0]], dtype=torch.float64)
    torch.testing.assert_close(model.batch_context(batch), torch.tensor([[-1.0], [0.0], [2.0]], dtype=torch.float64))
    seen = []
    original = model.denoise
    model.denoise = lambda *a, context=None, **k: seen.append(context) or original(*a, context=context, **k)
    terms = model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["loss"]) and "prop_mu" in terms and "prop_gap" not in terms
    given = torch.cat([c for c in seen]).flatten().sort().values
    torch.testing.assert_close(given, torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64))
    # the property head's target is mu alone, normalised with mu's statistics
    prediction = predict_properties(model, batch)
    assert prediction.shape == (3, 1)


def test_sampling_needs_and_follows_the_condition():
    model = conditional_model()
    atoms = torch.tensor([4, 4, 5])
    with pytest.raises(ValueError, match="conditioned on \\['gap'\\]"):
        sample(model, atoms, steps=5)
    with pytest.raises(ValueError, match="must be \\[3, 1\\]"):
        sample(model, atoms, steps=5, condition=[[200.0, 1.0]] * 3)
    with pytest.raises(ValueError, match="not conditioned"):
        plain = build_model(dataclasses.replace(model.cfg, condition_on=[]), prop_mean=[2.0], prop_mad=[1.0])
        sample(plain, atoms, steps=5, condition=[[200.0]] * 3)
    draw = lambda value: sample(model, atoms, steps=8, generator=torch.Generator().manual_seed(4),  # noqa: E731
                                sampler="ddim", condition=[[value]] * 3)["pos"]
    torch.testing.assert_close(draw(200.0), draw(200.0))
    assert not torch.allclose(draw(200.0), draw(400.0))


def test_halves_of_a_split_are_disjoint_shard_ranges_that_cover_it(qm9_small):
    manifest = load_manifest(qm9_small)
    shards = [s["name"] for s in manifest.shards("train")]
    first, second = manifest.half("train", "first"), manifest.half("train", "second")
    names = [[s["name"] for s in m.shards("train")] for m in (first, second)]
    assert names[0] + names[1] == shards and names[0] and names[1]
    assert first.count("train") + second.count("train") == manifest.count("train")
    assert abs(first.count("train") - second.count("train")) <= max(s["count"] for s in manifest.shards("train"))
    assert sum(first.atom_count_histogram("train").values()) == first.count("train")
    assert first.shards("valid") == manifest.shards("valid")  # the other splits are untouched
    assert first.half("train", "first") is first
    with pytest.raises(ManifestError, match="already its first half"):
        first.half("train", "second")
    with pytest.raises(ManifestError, match="data.half must be one of"):
        manifest.half("train", "third")
    with pytest.raises(InputError, match="data.half must be one of"):
        LoaderConfig(url=qm9_small, half="both")


def test_a_loader_with_data_half_reads_that_half_only(qm9_small):
    full = load_manifest(qm9_small)
    seen = {}
    for half in ("first", "second"):
        cfg = LoaderConfig(url=qm9_small, batch_size=16, half=half)
        loader = StreamingLoader(cfg, shuffle=False, rank=0, world_size=1, properties=["lumo"])
        # a molecule by its LUMO and its coordinates' spread (QM9's LUMO values alone repeat)
        keys = [(float(v), round(float(p.square().sum()), 3))
                for b in loader for v, p in zip(b["props"][:, 0], b["pos"])]
        assert len(keys) == full.half("train", half).count("train")
        seen[half] = set(keys)
        # validation is the whole valid split whatever the half
        valid = StreamingLoader(cfg, split="valid", shuffle=False, rank=0, world_size=1, properties=["lumo"])
        assert sum(len(b["props"]) for b in valid) == full.count("valid")
    assert not seen["first"] & seen["second"]

