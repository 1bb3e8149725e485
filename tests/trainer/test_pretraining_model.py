"""MoleculeJAE-style pretraining model: trunk names shared with UniGEM, E(3) equivariance, loss terms, overfitting."""

import time

import pytest
import torch

from molscale.trainer.model.networks import ModelConfig, UniGEM
from molscale.trainer.model.pretraining import (
    TRUNK_PREFIXES,
    MoleculeJAE,
    PretrainConfig,
    trunk_state_dict,
)
from tests.trainer.model_helpers import make_batch, random_orthogonal

QM9_VOCAB = [1, 6, 7, 8, 9]

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_ATOMS = [3, 7, 5, 9, 4, 6]


def toy_batch(num_atoms=NUM_ATOMS, dtype=torch.float64, seed=0, has_bonds=None):
    """make_batch plus a bond graph: a chain with random orders 1..4 and a few extra ring-closing bonds."""
    batch = make_batch(num_atoms, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    b, n = batch["node_mask"].shape
    order = torch.zeros(b, n, n, dtype=torch.int8)
    for m, count in enumerate(num_atoms):
        for i in range(count - 1):
            o = int(torch.randint(1, 5, (1,), generator=gen))
            order[m, i, i + 1] = order[m, i + 1, i] = o
        if count >= 5:
            order[m, 0, count - 1] = order[m, count - 1, 0] = 4
    batch["bond_order"] = order
    if has_bonds is not None:
        batch["has_bonds"] = torch.as_tensor(has_bonds, dtype=torch.bool)
    return batch


def tiny_jae(hidden=16, layers=3, shared_blocks=1, dtype=torch.float64, seed=0, **pre):
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="unigem", hidden=hidden, layers=layers, shared_blocks=shared_blocks, atom_vocab=QM9_VOCAB)
    return MoleculeJAE(cfg, PretrainConfig(**pre)).to(dtype)


def test_trunk_parameters_match_unigem_by_name_and_shape():
    cfg = ModelConfig(kind="unigem", hidden=24, layers=4, shared_blocks=2, atom_vocab=QM9_VOCAB)
    jae = MoleculeJAE(cfg, PretrainConfig(encoder_blocks=3))
    unigem = UniGEM(cfg).state_dict()
    jae_state = jae.state_dict()
    trunk = {k for k in jae_state if k.startswith(TRUNK_PREFIXES)}
    assert {k.split(".")[0] for k in trunk} == {"embed", "shared", "nucleation"}
    # the whole UniGEM trunk is covered (nucleation.* also initialises growth.*)
    assert trunk == {k for k in unigem if k.startswith(TRUNK_PREFIXES)}
    for name in trunk:
        assert jae_state[name].shape == unigem[name].shape, name
    others = set(jae_state) - trunk
    assert others and not others & set(unigem)
    assert {k.split(".")[0] for k in others} == {
        "clean_encoder", "atom_embed", "proj_cond", "bond_in", "jae_time", "score_2d", "proj_clean", "proj_noised"}
    # what fine-tuning does: load the trunk by name, copy nucleation into growth
    target = UniGEM(cfg)
    state = trunk_state_dict(jae)
    state.update({"growth." + k[len("nucleation."):]: v for k, v in state.items() if k.startswith("nucleation.")})
    result = target.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(not k.startswith(("embed.", "shared.", "nucleation.", "growth.")) for k in result.missing_keys)
    torch.testing.assert_close(target.growth[0].msg_i.weight, jae.nucleation[0].msg_i.weight)


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_and_translation_rotate_the_3d_score_and_keep_the_losses(reflect):
    model = tiny_jae()
    batch = toy_batch()
    noise = model.draw_noise(batch, torch.Generator().manual_seed(1))
    out = model.predict(batch, noise)
    terms = model.loss_terms(batch, noise, out)

    q = random_orthogonal(3, reflect)
    shift = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    mask = batch["node_mask"][..., None]
    moved = dict(batch, pos=(batch["pos"] @ q.T + shift) * mask)
    moved_noise = dict(noise, eps_x=noise["eps_x"] @ q.T)
    out2 = model.predict(moved, moved_noise)
    terms2 = model.loss_terms(moved, moved_noise, out2)

    assert out["eps_x"].abs().max() > 1e-4  # not trivially zero
    torch.testing.assert_close(out2["eps_x"], out["eps_x"] @ q.T, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out2["eps_a"], out["eps_a"], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out2["z_noised"], out["z_noised"], atol=1e-9, rtol=1e-7)
    for name in terms:
        torch.testing.assert_close(terms2[name], terms[name], atol=1e-10, rtol=1e-8)
    # the 2D score is symmetric, zero on the diagonal and at padding
    torch.testing.assert_close(out["eps_a"], out["eps_a"].transpose(1, 2))
    assert out["eps_a"].diagonal(dim1=1, dim2=2).abs().max() == 0
    assert (out["eps_a"] * ~batch["node_mask"][:, :, None, None]).abs().max() == 0


def test_noise_draws_are_reproducible_and_well_formed():
    model = tiny_jae(num_steps=50)
    batch = toy_batch()
    a = model.draw_noise(batch, torch.Generator().manual_seed(5))
    b = model.draw_noise(batch, torch.Generator().manual_seed(5))
    for key in a:
        assert torch.equal(a[key], b[key])
    assert int(a["k"].min()) >= 1 and int(a["k"].max()) <= 50
    mask = batch["node_mask"]
    assert (a["eps_x"] * mask[..., None]).sum(1).abs().max() < 1e-12  # CoM-free
    eps_a = a["eps_a"]
    assert eps_a.shape == (6, 9, 9, 5)
    assert torch.equal(eps_a, eps_a.transpose(1, 2))
    assert eps_a.diagonal(dim1=1, dim2=2).abs().max() == 0
    pair = mask[:, :, None] & mask[:, None, :]
    assert (eps_a * ~pair[..., None]).abs().max() == 0
    real = eps_a[pair & ~torch.eye(9, dtype=torch.bool)]
    assert 0.7 < float(real.std()) < 1.3
    # same generator state -> same loss
    l1 = model(batch, generator=torch.Generator().manual_seed(7))["loss"]
    l2 = model(batch, generator=torch.Generator().manual_seed(7))["loss"]
    assert torch.equal(l1, l2)
    assert PretrainConfig().sigma(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.2, 1.0])


def test_loss_terms_has_bonds_and_weights():
    model = tiny_jae()
    gen_seed = 2
    batch = toy_batch()
    terms = model(batch, generator=torch.Generator().manual_seed(gen_seed))
    assert set(terms) == {"loss", "score_3d", "score_2d", "contrastive"}
    assert all(v.dim() == 0 and v.dtype == torch.float64 and torch.isfinite(v) for v in terms.values())
    assert terms["score_3d"] > 0 and terms["score_2d"] > 0 and terms["contrastive"] > 0
    torch.testing.assert_close(terms["loss"], terms["score_3d"] + terms["score_2d"] + 0.01 * terms["contrastive"])

    # no has_bonds key == all True
    explicit = model(toy_batch(has_bonds=[True] * 6), generator=torch.Generator().manual_seed(gen_seed))
    for name in terms:
        torch.testing.assert_close(explicit[name], terms[name])

    # molecules without known bonds: no 2D loss, and their bond orders are not looked at
    none = toy_batch(has_bonds=[False] * 6)
    t_none = model(none, generator=torch.Generator().manual_seed(gen_seed))
    assert t_none["score_2d"] == 0 and t_none["score_2d"].requires_grad
    other = dict(none, bond_order=torch.ones_like(none["bond_order"]))
    t_other = model(other, generator=torch.Generator().manual_seed(gen_seed))
    for name in terms:
        torch.testing.assert_close(t_other[name], t_none[name])
    t_none["loss"].backward()  # still connected to the graph

    # a partial mask: the 2D term averages over the molecules with known bonds only
    some_batch = toy_batch(has_bonds=[True, False] * 3)
    noise = model.draw_noise(some_batch, torch.Generator().manual_seed(gen_seed))
    out = model.predict(some_batch, noise)
    some = model.loss_terms(some_batch, noise, out)
    err = (out["eps_a"] - noise["eps_a"]).square().sum((1, 2, 3))
    pairs = torch.tensor(NUM_ATOMS, dtype=torch.float64)
    per_mol = err / (pairs * (pairs - 1) * 5)
    torch.testing.assert_close(some["score_2d"], per_mol[::2].mean())

    # contrastive weight 0 removes the term; a batch of one has no contrastive term
    model.pre.contrastive_weight = 0.0
    t0 = model(batch, generator=torch.Generator().manual_seed(gen_seed))
    assert t0["contrastive"] > 0
    torch.testing.assert_close(t0["loss"], t0["score_3d"] + t0["score_2d"], atol=0, rtol=0)
    single = model(toy_batch([5]), generator=torch.Generator().manual_seed(0))
    assert single["contrastive"] == 0 and torch.isfinite(single["loss"])

    # a batch without bond orders at all (loader with_bonds off) trains 3D only
    no_key = {k: v for k, v in batch.items() if k != "bond_order"}
    assert model(no_key, generator=torch.Generator().manual_seed(0))["score_2d"] == 0


def test_every_parameter_gets_a_gradient_and_bf16_autocast_works():
    model = tiny_jae(dtype=torch.float32)
    batch = toy_batch(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model(batch, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert frozen and all(name.startswith("clean_encoder.blocks.1.coord_") for name in frozen)
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    with torch.no_grad():
        exact = model(batch, generator=torch.Generator().manual_seed(0))
    for name in terms:  # bf16 matmuls: close, not equal
        torch.testing.assert_close(terms[name], exact[name], rtol=0.1, atol=0.02)


def test_a_few_adam_steps_reduce_the_loss():
    model = tiny_jae(hidden=32, dtype=torch.float32, seed=0)
    batch = toy_batch(dtype=torch.float32, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    noise = model.draw_noise(batch, gen)  # a fixed noise draw: the model must be able to fit it
    losses = []
    start = time.perf_counter()
    for _ in range(60):
        terms = model(batch, noise=noise)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    elapsed = time.perf_counter() - start
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert elapsed < 10, elapsed
    # and with fresh noise every step the loss still falls
    model = tiny_jae(hidden=32, dtype=torch.float32, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        terms = model(batch, generator=gen)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses


@pytest.mark.parametrize("field, value", [
    ("sigma_min", 0.0), ("sigma_min", -1.0), ("sigma_max", 0.1), ("num_steps", 0), ("contrastive_weight", -0.1),
    ("temperature", 0.0), ("encoder_blocks", 0), ("bond_weight", -1.0), ("bond_channels", 1),
    ("time_features", 3), ("time_features", -2),
])
def test_pretrain_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: value}).validate()
    cfg = ModelConfig(kind="unigem", hidden=8, layers=2, atom_vocab=QM9_VOCAB)
    with pytest.raises(ValueError, match=field):
        MoleculeJAE(cfg, PretrainConfig(**{field: value}))


def test_pretrain_config_accepts_defaults_and_edge_values():
    PretrainConfig().validate()
    PretrainConfig(sigma_min=0.5, sigma_max=0.5, contrastive_weight=0.0, bond_weight=0.0, time_features=0).validate()
    model = tiny_jae(time_features=0, bond_weight=0.0)
    assert model.jae_time is None
    terms = model(toy_batch(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["loss"], terms["score_3d"] + 0.01 * terms["contrastive"], atol=0, rtol=0)
