"""Noise, time drawing, UniGEM / EDM losses, gradient routing between branches, overfitting."""

import pytest
import torch

from molscale.trainer.model.diffusion import (
    com_free_noise,
    draw_unigem_t,
    remove_mean,
)
from tests.trainer.helpers import make_batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_ATOMS = [3, 7, 5, 9, 4, 6]


def test_com_free_noise_has_zero_mean_over_real_atoms():
    batch = make_batch(NUM_ATOMS)
    noise = com_free_noise((6, 9, 3), batch["node_mask"], torch.Generator().manual_seed(0), torch.float64)
    mask = batch["node_mask"][..., None]
    assert noise.abs().max() > 0.1
    assert (noise * ~mask).abs().max() == 0  # padding stays zero
    com = noise.sum(1) / batch["num_atoms"][:, None]
    assert com.abs().max() < 1e-12
    x = torch.randn(6, 9, 3, dtype=torch.float64) + 5.0
    assert (remove_mean(x, batch["node_mask"]).sum(1)).abs().max() < 1e-12


def test_growth_phase_oversampling_draws_half_the_batch_in_each_phase():
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(1001, dtype=torch.long)
    for _ in range(200):
        t = draw_unigem_t(64, 10, 1000, gen)
        assert int((t <= 10).sum()) == 32 and int((t > 10).sum()) == 32
        assert int(t.min()) >= 0 and int(t.max()) <= 1000
        seen += torch.bincount(t, minlength=1001)
    assert bool((seen[:11] > 0).all())  # every growth step is drawn
    assert seen[11:].gt(0).float().mean() > 0.99  # and nearly every nucleation step
    assert seen[:11].sum() == seen[11:].sum()
    odd = draw_unigem_t(5, 10, 1000, gen)
    assert int((odd <= 10).sum()) == 2


def test_unigem_loss_terms_and_prediction_losses_vanish_after_t_n():
    model = tiny_model("unigem")
    batch = make_batch(NUM_ATOMS)
    gen = torch.Generator().manual_seed(0)
    terms = model(batch, generator=gen)
    expected = {"loss", "eps", "eps_nucleation", "eps_growth", "atom_type", "prop_gap", "prop_mu"}
    assert set(terms) == expected
    assert all(terms[k] > 0 for k in expected)
    total = terms["eps"] + terms["atom_type"] + terms["prop_gap"] + terms["prop_mu"]
    torch.testing.assert_close(terms["loss"], total)
    torch.testing.assert_close(terms["eps"], (terms["eps_nucleation"] + terms["eps_growth"]) / 2)

    late = torch.tensor([11, 500, 1000, 12, 999, 40])  # all t > t_n = 10
    terms = model(batch, generator=gen, t=late)
    for name in ("atom_type", "prop_gap", "prop_mu", "eps_growth"):
        assert terms[name] == 0
    torch.testing.assert_close(terms["loss"], terms["eps_nucleation"])
    terms["loss"].backward()
    for name, param in model.named_parameters():
        if name.startswith(("growth.", "atom_type_head.", "prop_")):
            assert param.grad is None or param.grad.abs().max() == 0, name


def _params_with_gradient(model, t):
    model.zero_grad(set_to_none=True)
    terms = model(make_batch(NUM_ATOMS, seed=1), generator=torch.Generator().manual_seed(0), t=t)
    terms["loss"].backward()
    return {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}


def test_each_phase_reaches_only_its_own_branch():
    model = tiny_model("unigem", layers=3, shared_blocks=1)
    growth = _params_with_gradient(model, torch.tensor([0, 3, 10, 7, 1, 10]))
    assert growth == {"embed", "shared", "growth", "atom_type_head", "prop_node", "prop_out"}
    nucleation = _params_with_gradient(model, torch.tensor([11, 300, 1000, 12, 999, 40]))
    assert nucleation == {"embed", "shared", "nucleation"}


def test_edm_loss_is_normalised_per_dimension():
    model = tiny_model("edm")
    batch = make_batch(NUM_ATOMS)
    terms = model(batch, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "eps", "eps_pos", "eps_h"}
    dims_h = model.h_channels
    assert dims_h == 6  # 5 one-hot channels + charge
    torch.testing.assert_close(terms["loss"], (3 * terms["eps_pos"] + dims_h * terms["eps_h"]) / (3 + dims_h))
    # an untrained net predicts about nothing, so each per-dimension MSE is about the noise variance (~1)
    assert 0.3 < terms["eps_pos"].item() < 3 and 0.3 < terms["eps_h"].item() < 3


def test_losses_are_reproducible_with_a_generator(kind):
    model = tiny_model(kind)
    batch = make_batch(NUM_ATOMS)
    a = model(batch, generator=torch.Generator().manual_seed(5))
    b = model(batch, generator=torch.Generator().manual_seed(5))
    c = model(batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["loss"], c["loss"])


def record_network_calls(model):
    """[(UniGEM branch or 'all', (molecules, padded size))] of each network call the model makes from now on."""
    calls, network = [], model.denoise

    def denoise(*args, **kwargs):
        calls.append((args[3] if isinstance(args[3], str) else "all", tuple(args[0].shape[:2])))
        return network(*args, **kwargs)
    model.denoise = denoise
    return calls


def test_size_chunks_from_host_counts_leave_the_loss_and_gradients_unchanged(kind):
    """Float64, the same generator seed: the batch whole against size chunks planned from the loader's host copy
    of the atom counts (num_atoms_host), one chunk per distinct size within each UniGEM phase."""
    sizes = [3, 9, 4, 8, 5, 9, 2, 6, 7, 3]
    batch = make_batch(sizes, seed=8)
    results = []
    for cost, extra in ((None, {}), (0, {"num_atoms_host": sizes})):
        model = tiny_model(kind, chunk_cost_pairs=cost)
        calls = record_network_calls(model)
        terms = model({**batch, **extra}, generator=torch.Generator().manual_seed(3))
        terms["loss"].backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (whole, grads_whole), (chunked, grads_chunked) = results
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-12, rtol=1e-10)
    assert grads_whole.keys() == grads_chunked.keys()
    for name in grads_whole:
        torch.testing.assert_close(grads_chunked[name], grads_whole[name], atol=1e-12, rtol=1e-9)
    chunks = calls  # the chunked run's
    branches = {"nucleation", "growth"} if kind == "unigem" else {"all"}
    assert {branch for branch, _ in chunks} == branches  # both phases hold molecules
    assert len(chunks) > 2 * len(branches) and sum(b for _, (b, _) in chunks) == len(sizes)
    assert min(n for _, (_, n) in chunks) < max(sizes)  # chunks padded below the batch's largest molecule


def test_host_counts_that_do_not_fit_the_batch_are_refused():
    model = tiny_model(chunk_cost_pairs=0)
    batch = make_batch([3, 5, 4])
    for wrong in ([3, 5], [3, 5, 6]):  # a molecule missing; more atoms than the padded size
        with pytest.raises(ValueError, match="num_atoms_host"):
            model({**batch, "num_atoms_host": wrong}, generator=torch.Generator().manual_seed(0))


def test_tiny_model_overfits_one_batch(kind):
    # fixed noise and times (same generator seed each step): the objective is deterministic and must be learnt
    model = tiny_model(kind, hidden=32, layers=3, dtype=torch.float32)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in make_batch([4, 5, 3, 5], seed=2).items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(150):
        optimizer.zero_grad()
        terms = model(batch, generator=torch.Generator().manual_seed(0))
        terms["loss"].backward()
        optimizer.step()
        history.append({name: value.item() for name, value in terms.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.1 * first["loss"], (first, last)
    assert last["eps"] < 0.5 * first["eps"], (first, last)
    if kind == "unigem":
        assert last["atom_type"] < 0.6 * first["atom_type"], (first, last)
