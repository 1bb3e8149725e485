"""MoleculeJAE-style pretraining model: the trunk interface is UniGEM's, E(3) equivariance, the 2D head's message
passing, loss terms and weights, atom types on and off, overfitting."""

import json
import time

import pytest
import torch

from molscale.trainer.model.diffusion import LossConfig
from molscale.trainer.model.networks import ModelConfig, UniGEM
from molscale.trainer.model.pretraining import (
    TRUNK_PREFIXES,
    BondGraphScore,
    MoleculeJAE,
    PretrainConfig,
    pair_mask_of,
    trunk_state_dict,
)
from molscale.trainer.train.config import ConfigError, load_config
from tests.trainer.helpers import make_batch, random_orthogonal

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


def tiny_cfg(hidden=16, layers=3, shared_blocks=1):
    return ModelConfig(kind="unigem", hidden=hidden, layers=layers, shared_blocks=shared_blocks, atom_vocab=QM9_VOCAB)


def tiny_jae(hidden=16, layers=3, shared_blocks=1, dtype=torch.float64, seed=0, loss=None, **pre):
    torch.manual_seed(seed)
    return MoleculeJAE(tiny_cfg(hidden, layers, shared_blocks), PretrainConfig(**pre), loss=loss).to(dtype)


def fixed_noise(model, batch, seed=1, t=None):
    noise = model.draw_noise(batch, torch.Generator().manual_seed(seed))
    if t is not None:
        noise["t"] = torch.as_tensor(t, dtype=torch.long)
    return noise


def test_trunk_parameters_match_unigem_by_name_and_shape():
    cfg = tiny_cfg(hidden=24, layers=4, shared_blocks=2)
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
    assert {k.split(".")[0] for k in others} == {"score_2d", "type_head", "clean_encoder", "proj_clean",
                                                  "proj_noised"}
    assert "type_head" not in {k.split(".")[0] for k in MoleculeJAE(cfg, PretrainConfig(atom_types=False)).state_dict()}


def test_the_trunk_sees_exactly_what_unigems_nucleation_branch_sees():
    """The pretrained 3D score is UniGEM's eps: same schedule, same node input, same function, and nothing else
    (atom types, bonds, the clean molecule) reaches the trunk."""
    jae = tiny_jae()
    cfg = jae.cfg
    batch = toy_batch()
    t = [0, 5, 10, 11, 400, 1000]  # both phases and the ends of the schedule
    noise = fixed_noise(jae, batch, t=t)
    out = jae.predict(batch, noise)

    unigem = UniGEM(cfg).to(torch.float64)
    state = trunk_state_dict(jae)
    unigem.load_state_dict(state, strict=False)
    alpha, sigma = unigem.schedule.alpha_sigma(noise["t"], torch.float64)  # UniGEM's own VP schedule
    x_t = alpha[:, None, None] * batch["pos"] + sigma[:, None, None] * noise["eps_x"]
    expected = unigem.denoise(x_t, batch["node_mask"], noise["t"], "nucleation")["eps"]
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(out["eps_x"], expected, atol=0, rtol=0)

    # what the trunk does not see: other atom types, other bonds, no bonds at all
    other = dict(batch, atom_type=(batch["atom_type"] + 2) % 5, bond_order=torch.zeros_like(batch["bond_order"]))
    out_other = jae.predict(other, noise)
    torch.testing.assert_close(out_other["eps_x"], out["eps_x"], atol=0, rtol=0)
    torch.testing.assert_close(out_other["z_noised"], out["z_noised"], atol=0, rtol=0)
    # ... while the auxiliary parts do read them
    assert not torch.allclose(out_other["eps_a"], out["eps_a"])
    assert not torch.allclose(out_other["z_clean"], out["z_clean"])
    # and the time is an input (t/T), as in UniGEM
    _, eps_later = jae.trunk(x_t, batch["node_mask"], noise["t"].clamp(max=999) + 1)
    assert not torch.allclose(eps_later, out["eps_x"])


def test_times_are_drawn_as_unigem_draws_them():
    jae = tiny_jae()
    batch = toy_batch(num_atoms=[4] * 64)
    t = jae.draw_noise(batch, torch.Generator().manual_seed(3))["t"]
    assert int((t <= jae.cfg.t_nucleation).sum()) == 32  # half of the batch in the growth range
    assert int(t.min()) >= 0 and int(t.max()) <= 1000 and int(t.max()) > 100


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_and_translation_rotate_the_3d_score_and_keep_the_losses(reflect):
    model = tiny_jae()
    batch = toy_batch()
    noise = fixed_noise(model, batch, t=[1, 8, 60, 300, 700, 999])
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
    for key in ("eps_a", "atom_type", "z_noised", "z_clean"):
        torch.testing.assert_close(out2[key], out[key], atol=1e-9, rtol=1e-7)
    for name in terms:
        torch.testing.assert_close(terms2[name], terms[name], atol=1e-10, rtol=1e-8)
    # the 2D score is symmetric, zero on the diagonal and at padding
    torch.testing.assert_close(out["eps_a"], out["eps_a"].transpose(1, 2))
    assert out["eps_a"].diagonal(dim1=1, dim2=2).abs().max() == 0
    assert (out["eps_a"] * ~batch["node_mask"][:, :, None, None]).abs().max() == 0


@pytest.mark.parametrize("blocks, reaches", [(0, False), (1, True)])
def test_the_2d_head_passes_messages_over_the_noised_bond_graph(blocks, reaches):
    """A noised bond (i, j) changes the scores of pairs (i, l), l != j, only through message passing."""
    torch.manual_seed(0)
    head = BondGraphScore(8, 5, blocks).double()
    b, n = 1, 6
    node_mask = torch.ones(b, n, dtype=torch.bool)
    pair_mask = pair_mask_of(node_mask, torch.float64)
    h = torch.randn(b, n, 8, dtype=torch.float64)
    a_t = torch.randn(b, n, n, 5, dtype=torch.float64)
    a_t = (a_t + a_t.transpose(1, 2)) * pair_mask[..., None]
    dist2 = torch.rand(b, n, n, dtype=torch.float64) * 4
    dist2 = dist2 + dist2.transpose(1, 2)
    t_frac = torch.tensor([0.3], dtype=torch.float64)
    before = head(h, a_t, dist2, t_frac, pair_mask)
    changed = a_t.clone()
    changed[0, 0, 1] = changed[0, 1, 0] = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0])  # pair (0, 1) becomes double
    after = head(h, changed, dist2, t_frac, pair_mask)
    assert not torch.allclose(after[0, 0, 1], before[0, 0, 1])  # the pair itself always
    elsewhere = (after[0, 0, 2:] - before[0, 0, 2:]).abs().max()
    assert (elsewhere > 1e-8) == reaches, float(elsewhere)


def test_noise_draws_are_reproducible_and_well_formed():
    model = tiny_jae()
    batch = toy_batch()
    a = model.draw_noise(batch, torch.Generator().manual_seed(5))
    b = model.draw_noise(batch, torch.Generator().manual_seed(5))
    for key in a:
        assert torch.equal(a[key], b[key])
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


def test_loss_terms_has_bonds_and_weights():
    model = tiny_jae()
    batch = toy_batch()
    noise = fixed_noise(model, batch, seed=2, t=[0, 3, 10, 11, 500, 900])  # three growth-phase molecules
    terms = model(batch, noise=noise)
    assert set(terms) == {"loss", "score_3d", "score_2d", "atom_type", "contrastive"}
    assert all(v.dim() == 0 and v.dtype == torch.float64 and torch.isfinite(v) for v in terms.values())
    assert all(terms[k] > 0 for k in terms)
    torch.testing.assert_close(terms["loss"], terms["score_3d"] + terms["score_2d"] + terms["atom_type"]
                               + 0.01 * terms["contrastive"])

    # the atom-type term is UniGEM's growth-branch L1, over the growth-phase molecules only
    out = model.predict(batch, noise)
    target = torch.nn.functional.one_hot(batch["atom_type"], 5).double() * 0.25
    err = ((out["atom_type"] - target).abs() * batch["node_mask"][..., None]).sum((1, 2))
    per_mol = err / (torch.tensor(NUM_ATOMS, dtype=torch.float64) * 5)
    torch.testing.assert_close(terms["atom_type"], per_mol[:3].mean())

    # no has_bonds key == all True
    explicit = model(toy_batch(has_bonds=[True] * 6), noise=noise)
    for name in terms:
        torch.testing.assert_close(explicit[name], terms[name])

    # molecules without known bonds: no 2D loss, and their bond orders are not looked at
    none = toy_batch(has_bonds=[False] * 6)
    t_none = model(none, noise=noise)
    assert t_none["score_2d"] == 0 and t_none["score_2d"].requires_grad
    other = dict(none, bond_order=torch.ones_like(none["bond_order"]))
    t_other = model(other, noise=noise)
    for name in terms:
        torch.testing.assert_close(t_other[name], t_none[name])
    t_none["loss"].backward()  # still connected to the graph

    # a partial mask: the 2D term averages over the molecules with known bonds only
    some_batch = toy_batch(has_bonds=[True, False] * 3)
    out = model.predict(some_batch, noise)
    some = model.loss_terms(some_batch, noise, out)
    err = (out["eps_a"] - noise["eps_a"]).square().sum((1, 2, 3))
    pairs = torch.tensor(NUM_ATOMS, dtype=torch.float64)
    torch.testing.assert_close(some["score_2d"], (err / (pairs * (pairs - 1) * 5))[::2].mean())

    # contrastive weight 0 and bond weight 0 remove their terms; a batch of one has no contrastive term
    model.pre.contrastive_weight, model.pre.bond_weight = 0.0, 0.0
    t0 = model(batch, noise=noise)
    assert t0["contrastive"] > 0 and t0["score_2d"] > 0
    torch.testing.assert_close(t0["loss"], t0["score_3d"] + t0["atom_type"], atol=0, rtol=0)
    single = model(toy_batch([5]), generator=torch.Generator().manual_seed(0))
    assert single["contrastive"] == 0 and torch.isfinite(single["loss"])

    # a batch without bond orders at all (loader with_bonds off) trains without the 2D term
    no_key = {k: v for k, v in batch.items() if k != "bond_order"}
    assert model(no_key, generator=torch.Generator().manual_seed(0))["score_2d"] == 0


def test_pretraining_without_atom_types_never_reads_them():
    model = tiny_jae(atom_types=False)
    assert model.type_head is None
    batch = toy_batch()
    noise = fixed_noise(model, batch)
    terms = model(batch, noise=noise)
    assert terms["atom_type"] == 0
    torch.testing.assert_close(terms["loss"], terms["score_3d"] + terms["score_2d"] + 0.01 * terms["contrastive"])
    shuffled = model(dict(batch, atom_type=(batch["atom_type"] + 1) % 5), noise=noise)
    for name in terms:
        torch.testing.assert_close(shuffled[name], terms[name], atol=0, rtol=0)
    # with atom types on, the same change moves the atom-type and contrastive terms
    model_on = tiny_jae()
    on = model_on(batch, noise=noise)
    on_shuffled = model_on(dict(batch, atom_type=(batch["atom_type"] + 1) % 5), noise=noise)
    assert on["atom_type"] != on_shuffled["atom_type"] and on["contrastive"] != on_shuffled["contrastive"]


def test_nominal_batch_weighs_each_molecule_alike_whatever_the_batch():
    batch = toy_batch()
    plain, nominal = tiny_jae(), tiny_jae(loss=LossConfig(nominal_batch=16))
    noise = fixed_noise(plain, batch, t=[0, 3, 10, 11, 500, 900])
    a, b = plain(batch, noise=noise), nominal(batch, noise=noise)
    for name in ("score_3d", "score_2d"):  # every molecule covered: mean over 6 vs sum over a nominal 16
        torch.testing.assert_close(b[name] * 16, a[name] * 6)
    torch.testing.assert_close(b["atom_type"] * 8, a["atom_type"] * 3)  # 3 growth molecules, nominal half 8
    # one molecule's share of the loss does not depend on what else is in its batch
    first = {k: v[:1] for k, v in batch.items()}
    alone = nominal(first, noise={k: v[:1] for k, v in noise.items()})
    parts = nominal.loss_terms(batch, noise, nominal.predict(batch, noise))
    out = nominal.predict(batch, noise)
    sq = (out["eps_x"] - noise["eps_x"]).square().sum((1, 2))[0] / (3 * NUM_ATOMS[0])
    torch.testing.assert_close(alone["score_3d"], sq / 16)
    assert parts["score_3d"] > alone["score_3d"]
    with pytest.raises(ValueError, match="loss.reduction"):  # checked with the run config, as it is loaded
        PretrainConfig().validate(LossConfig(reduction="reference"))


def test_every_parameter_gets_a_gradient_and_bf16_autocast_works():
    model = tiny_jae(dtype=torch.float32)
    batch = toy_batch(dtype=torch.float32)
    noise = fixed_noise(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model(batch, noise=noise)
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
        exact = model(batch, noise=noise)
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
    ("bond_weight", -1.0), ("atom_types", "yes"), ("contrastive_weight", -0.1), ("temperature", 0.0),
    ("encoder_blocks", 0), ("bond_blocks", -1), ("bond_channels", 1),
])
def test_pretrain_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: value}).validate()
    # checked once, where the run config is read; the model itself does not check again
    with pytest.raises(ConfigError, match=field):
        load_config("cluster/cpu_pretrain_smoke.json", [f"pretrain.{field}={json.dumps(value)}"])


def test_pretrain_config_accepts_defaults_and_edge_values():
    PretrainConfig().validate()
    PretrainConfig(contrastive_weight=0.0, bond_weight=0.0, bond_blocks=0, atom_types=False).validate()
    model = tiny_jae(bond_blocks=0, bond_weight=0.0)
    assert len(model.score_2d.layers) == 0
    terms = model(toy_batch(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["loss"], terms["score_3d"] + terms["atom_type"] + 0.01 * terms["contrastive"],
                               atol=0, rtol=0)
