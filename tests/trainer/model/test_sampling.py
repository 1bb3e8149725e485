"""Samplers (ancestral, DDIM, DPM-Solver++(2M)) on respaced grids, atom counts from a histogram, branch routing while
sampling, property prediction."""

import pytest
import torch

from molscale.trainer.model.sampling import (
    SAMPLERS,
    DPMSolver2M,
    ancestral_step,
    ddim_step,
    predict_properties,
    sample,
    sample_num_atoms,
    timestep_grid,
)
from tests.trainer.helpers import make_batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_atom_counts_follow_the_histogram():
    counts = sample_num_atoms({5: 1, 9: 3, 12: 0}, 4000, torch.Generator().manual_seed(0))
    assert counts.dtype == torch.long and set(counts.tolist()) == {5, 9}
    assert (counts == 9).float().mean().item() == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="positive count"):
        sample_num_atoms({5: 0}, 3)


def test_timestep_grid_counts_steps_and_holds_the_branch_switch():
    assert timestep_grid(1000) == list(range(1000, -1, -1))
    assert timestep_grid(1000, None, 10) == list(range(1000, -1, -1))
    assert timestep_grid(1000, 4) == [1000, 750, 500, 250, 0]
    assert timestep_grid(10, 1) == [10, 0] and timestep_grid(1000, 1, 10) == [1000, 0]
    assert timestep_grid(1000, 2, 10) == [1000, 10, 0]
    assert timestep_grid(1000, 500, 10) == list(range(1000, -1, -2))  # what the old stride 2 visited
    for steps in (3, 25, 50, 100, 200, 333, 990, 999):
        grid = timestep_grid(1000, steps, 10)
        assert len(grid) == steps + 1 and grid[0] == 1000 and grid[-1] == 0
        assert all(a > b for a, b in zip(grid, grid[1:])) and 10 in grid
        assert sum(t <= 10 for t in grid[:-1]) >= 1  # at least one growth-branch step before the read-out
    assert timestep_grid(1000, 100, 10)[-5:] == [40, 30, 20, 10, 0]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"sampling steps must be in \[1, 1000\]"):
            timestep_grid(1000, bad, 10)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1000, 27])
def test_samples_are_com_free_and_well_formed(kind, steps, sampler):
    model = tiny_model(kind, hidden=8, layers=2, dtype=torch.float32)
    num_atoms = torch.tensor([3, 6, 4])
    out = sample(model, num_atoms, steps=steps, generator=torch.Generator().manual_seed(0), sampler=sampler)
    mask = out["node_mask"]
    assert out["pos"].shape == (3, 6, 3) and out["pos"].dtype == torch.float32
    assert torch.equal(mask.sum(1), num_atoms)
    assert torch.isfinite(out["pos"]).all()
    assert out["pos"][mask].abs().max() > 0.1
    scale = out["pos"].abs().max()  # an untrained net lets coordinates grow; CoM must still be ~0
    assert (out["pos"].sum(1) / num_atoms[:, None]).abs().max() < 1e-6 * scale
    assert (out["pos"][~mask].abs().max() == 0) and (out["atom_type"][~mask].abs().max() == 0)
    assert int(out["atom_type"].max()) < 5
    assert set(out["z"][mask].tolist()) <= {1, 6, 7, 8, 9} and int(out["z"][~mask].abs().max()) == 0


def test_sampling_is_reproducible_and_chunking_is_invisible():
    model = tiny_model("unigem", hidden=8, layers=2, dtype=torch.float32)
    num_atoms = torch.tensor([3, 6, 4, 6, 2])
    a = sample(model, num_atoms, steps=10, generator=torch.Generator().manual_seed(1))
    b = sample(model, num_atoms, steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["pos"], b["pos"]) and torch.equal(a["atom_type"], b["atom_type"])


def test_unigem_sampling_routes_each_step_to_its_phase_branch():
    model = tiny_model("unigem", hidden=8, layers=2, dtype=torch.float32)
    calls = []
    original = model.denoise

    def spy(pos, node_mask, t, branch, heads=False, context=None):
        calls.append((int(t[0]), branch, heads))
        return original(pos, node_mask, t, branch, heads, context)

    model.denoise = spy
    for sampler in SAMPLERS:
        calls.clear()
        sample(model, torch.tensor([4, 4]), steps=40, generator=torch.Generator().manual_seed(0), sampler=sampler)
        assert [c[0] for c in calls] == timestep_grid(1000, 40, 10)  # one chunk: K steps, then the read-out at 0
        assert len(calls) == 41
        for t, branch, heads in calls:
            assert branch == ("growth" if t <= 10 else "nucleation")
            assert heads == (t == 0)


def test_unknown_sampler_is_refused():
    model = tiny_model("unigem", hidden=8, layers=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(model, torch.tensor([3]), steps=2, sampler="euler")


def test_ancestral_step_matches_the_forward_marginals():
    # With the true noise as eps_hat, z_s must be distributed as alpha_s x0 + sigma_s eps' (CoM-free)
    model = tiny_model("unigem", hidden=8, layers=2)
    sched = model.schedule
    gen = torch.Generator().manual_seed(0)
    n_mol, n_atoms = 4000, 3
    mask = torch.ones(n_mol, n_atoms, dtype=torch.bool)
    x0 = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 0.8, 0.0], [-0.5, -0.8, 0.0]], dtype=torch.float64).expand(n_mol, -1, -1)
    for t, s in [(600, 599), (600, 200), (12, 3)]:
        alpha_t, sigma_t = sched.alpha_sigma(torch.tensor(t), torch.float64)
        alpha_s, sigma_s = sched.alpha_sigma(torch.tensor(s), torch.float64)
        eps = torch.randn(n_mol, n_atoms, 3, generator=gen, dtype=torch.float64)
        eps = eps - eps.mean(1, keepdim=True)
        z_t = alpha_t * x0 + sigma_t * eps
        z_s = ancestral_step(sched, z_t, eps, t, s, mask, gen)
        residual = (z_s - alpha_s * x0) / sigma_s  # should be CoM-free standard noise
        assert residual.mean(1).abs().max() < 1e-9
        assert residual.mean(0).abs().max() < 0.08
        var = residual.var(0) * n_atoms / (n_atoms - 1)  # per-coordinate variance in the CoM-free subspace
        assert var.mean().item() == pytest.approx(1.0, abs=0.03)


def test_final_step_recovers_a_point_mass_with_an_oracle_denoiser(kind):
    # If the data is a single molecule x0 and eps_hat is exact, the sampler must return x0 and its atom types.
    model = tiny_model(kind, hidden=8, layers=2)
    x0 = torch.tensor([[0.0, 0.0, 1.2], [0.0, 1.1, -0.6], [0.9, -0.5, -0.6]], dtype=torch.float64)
    x0 = x0 - x0.mean(0)
    types = torch.tensor([1, 3, 0])
    one_hot = torch.nn.functional.one_hot(types, 5).double() * 0.25

    def oracle(z_pos, *args):
        t = args[1] if kind == "unigem" else args[-1]  # unigem: (mask, t, branch); edm: (h, mask, t)
        alpha, sigma = model.schedule.alpha_sigma(t, torch.float64)
        eps = (z_pos - alpha[:, None, None] * x0) / sigma[:, None, None]
        out = {"eps": eps, "atom_type": one_hot.expand(len(t), -1, -1)}
        if kind == "edm":
            h0 = model.atom_features(types.expand(len(t), -1), torch.ones(len(t), 3, dtype=torch.bool), torch.float64)
            out["eps_h"] = (args[0] - alpha[:, None, None] * h0) / sigma[:, None, None]
        return out

    model.denoise = lambda *args, **kwargs: oracle(*args)
    for sampler in SAMPLERS:
        out = sample(model, torch.tensor([3, 3]), steps=20, generator=torch.Generator().manual_seed(0),
                     sampler=sampler)
        torch.testing.assert_close(out["pos"], x0.expand(2, -1, -1), atol=1e-8, rtol=0)
        assert torch.equal(out["atom_type"], types.expand(2, -1))


def _exact_eps_for_gaussian_data(schedule, z, t, scale):
    # data x0 ~ N(0, scale^2) in the CoM-free subspace: E[eps | z_t] = sigma_t z_t / (alpha_t^2 scale^2 + sigma_t^2)
    alpha, sigma = schedule.host_alpha_sigma(t)
    return z * (sigma / (alpha**2 * scale**2 + sigma**2))


@pytest.mark.parametrize("sampler", ["ddim", "dpm2m"])
def test_deterministic_samplers_follow_the_probability_flow(sampler):
    # For Gaussian data the probability-flow ODE maps z_T to z_0 = z_T * sqrt(alpha_0^2 s^2 + sigma_0^2) /
    # sqrt(alpha_T^2 s^2 + sigma_T^2) exactly; a consistent solver gets closer with more steps, and the
    # second-order one converges faster than DDIM.
    model = tiny_model("unigem", hidden=8, layers=2)
    sched, scale = model.schedule, 1.7
    mask = torch.ones(1, 4, dtype=torch.bool)
    z_T = torch.tensor([[[1.0, -0.5, 0.2], [-0.3, 0.4, 0.9], [0.1, 0.6, -1.4], [-0.8, -0.5, 0.3]]],
                       dtype=torch.float64)
    z_T = z_T - z_T.mean(1, keepdim=True)

    def variance(t):
        alpha, sigma = sched.host_alpha_sigma(t)
        return alpha**2 * scale**2 + sigma**2

    exact = z_T * (variance(0) / variance(1000)) ** 0.5

    def solve(steps):
        grid, z = timestep_grid(1000, steps, 10), z_T
        solver = DPMSolver2M(sched)
        for t, s in zip(grid[:-1], grid[1:]):
            eps = _exact_eps_for_gaussian_data(sched, z, t, scale)
            z = ddim_step(sched, z, eps, t, s, mask) if sampler == "ddim" else solver.step("pos", z, eps, t, s, mask)
        return (z - exact).abs().max().item() / exact.abs().max().item()

    errors = [solve(k) for k in (10, 40, 160)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02
    if sampler == "dpm2m":
        assert errors[1] / errors[2] > 6.0  # two doublings of the steps: first order (DDIM) gains 4, this about 10


def test_dpm_solver_restarts_its_history_at_the_branch_switch():
    model = tiny_model("unigem", hidden=8, layers=2, dtype=torch.float32)
    restarts = []
    original = DPMSolver2M.restart
    try:
        DPMSolver2M.restart = lambda self: restarts.append(1) or original(self)
        sample(model, torch.tensor([3, 3]), steps=30, generator=torch.Generator().manual_seed(0), sampler="dpm2m")
    finally:
        DPMSolver2M.restart = original
    assert len(restarts) == 2  # at construction and when the grid first reaches t_n (the growth branch)


def test_property_prediction_returns_dataset_units():
    model = tiny_model("unigem", hidden=8, layers=2)  # prop_mean [1, 2], prop_mad [3, 0.5]
    batch = make_batch([3, 5, 4])
    last = model.prop_out[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 1.0]))
    pred = predict_properties(model, batch)
    expected = torch.tensor([[1.0, 2.5]], dtype=torch.float64).expand(3, -1)
    torch.testing.assert_close(pred, expected)

    seen = []
    original = model.denoise
    model.denoise = lambda pos, mask, t, branch, heads=False, **kw: (
        seen.append((t.tolist(), branch, heads)) or original(pos, mask, t, branch, heads))
    predict_properties(model, batch)
    assert all(branch == "growth" and heads and set(t) == {0} for t, branch, heads in seen)


def test_guidance_pulls_samples_toward_the_target_of_an_exact_model():
    # Gaussian data (exact eps) and a head that reads the mean squared atom distance from the centre, r2: guided
    # samples land nearer the asked r2 than unguided ones from the same noise, and more so with a larger scale.
    from molscale.trainer.model.sampling import guidance_for
    model = tiny_model("unigem", hidden=8, layers=2)  # prop_mean [1, 2], prop_mad [3, 0.5]: r2 is "gap"
    scale_x = 1.0

    def r2(x, node_mask):
        mask = node_mask.to(x.dtype)
        return ((x * x).sum(-1) * mask).sum(1) / mask.sum(1)

    def oracle(pos_t, node_mask, t, context=None, *, branch, heads):
        alpha, sigma = model.schedule.alpha_sigma(t, torch.float64)
        eps = pos_t * (sigma / (alpha**2 * scale_x**2 + sigma**2))[:, None, None] * node_mask[..., None]
        out = {"eps": eps}
        if heads:
            out["atom_type"] = torch.zeros(*pos_t.shape[:2], 5, dtype=pos_t.dtype)
            gap_normalised = (r2(pos_t, node_mask) - 1.0) / 3.0
            out["props"] = torch.stack([gap_normalised, torch.zeros_like(gap_normalised)], -1)
        return out

    model._denoise = oracle
    num_atoms = torch.full((64,), 6)
    plain = sample(model, num_atoms, steps=50, generator=torch.Generator().manual_seed(0))
    plain_r2 = r2(plain["pos"], plain["node_mask"])
    target = 2.0 * float(plain_r2.mean())
    gaps = []
    for scale in (10.0, 100.0):  # guiding from t = 300 on (at higher noise, large scales make the steps unstable)
        guided = sample(model, num_atoms, steps=50, generator=torch.Generator().manual_seed(0),
                        guidance=guidance_for(model, "gap", target, scale=scale, start=300, on="noisy"))
        gaps.append(float((r2(guided["pos"], guided["node_mask"]) - target).abs().mean()))
        assert (guided["pos"].sum(1) / 6).abs().max() < 1e-9  # CoM-free
    unguided_gap = float((plain_r2 - target).abs().mean())
    assert unguided_gap > gaps[0] > gaps[1] and gaps[1] < 0.75 * unguided_gap
    # the head read on the predicted clean molecule at t = 0 (the released UniGEM's way) pulls the same way
    # (its default range, t <= 100, moves the molecules less: sigma_t is small there)
    clean = guidance_for(model, "gap", target, scale=100.0)  # the default reading: clean, from t = 100
    assert (clean.on, clean.start) == ("clean", 100)
    assert guidance_for(model, "gap", target, scale=100.0, on="noisy").start == 300
    clean_gaps = []
    for guidance in (clean, guidance_for(model, "gap", target, scale=100.0, start=300, on="clean")):
        guided = sample(model, num_atoms, steps=50, generator=torch.Generator().manual_seed(0), guidance=guidance)
        clean_gaps.append(float((r2(guided["pos"], guided["node_mask"]) - target).abs().mean()))
    assert unguided_gap > clean_gaps[0] > clean_gaps[1]
    steps_guided = sum(1 for t in timestep_grid(model.num_steps, 50, model.switch_time)[:-1] if t <= 100)
    assert 0 <= clean.cap_fraction() <= 1 and float(clean.tally[1]) == 64 * steps_guided  # molecules x steps
    # the growth phase only (t <= t_n, 10 of the 1000 steps, where sigma_t < 0.02): a small pull, in the same
    # direction
    late = sample(model, num_atoms, steps=1000, generator=torch.Generator().manual_seed(0),
                  guidance=guidance_for(model, "gap", target, scale=100.0, start=model.cfg.t_nucleation,
                                        on="noisy"))
    unguided = sample(model, num_atoms, steps=1000, generator=torch.Generator().manual_seed(0))
    late_gap = float((r2(late["pos"], late["node_mask"]) - target).abs().mean())
    assert late_gap < float((r2(unguided["pos"], unguided["node_mask"]) - target).abs().mean())


def test_guided_estimate_is_equivariant_and_com_free():
    from molscale.trainer.model.diffusion import remove_mean
    from molscale.trainer.model.sampling import guidance_for, guided_eps
    from tests.trainer.helpers import random_orthogonal
    model = tiny_model("unigem", hidden=16, layers=3, dtype=torch.float64)
    guide = guidance_for(model, "gap", 4.0, scale=5.0, start=model.num_steps, on="noisy")
    node_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    pos = remove_mean(torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                      node_mask)
    q = random_orthogonal(4, reflect=True)
    clean = guidance_for(model, "gap", 4.0, scale=5.0, start=model.num_steps, on="clean")
    for t, guidance in ((5, guide), (300, guide), (5, clean), (300, clean)):
        # growth (one pass gives eps and the gradient) and nucleation (nucleation eps + gradient); noisy and clean
        eps = None if t <= 10 else model.predict_noise({"pos": pos}, node_mask, t, final=False)["pos"]
        eps_q = None if t <= 10 else model.predict_noise({"pos": pos @ q}, node_mask, t, final=False)["pos"]
        a = guided_eps(model, pos, node_mask, t, eps, guidance)
        b = guided_eps(model, pos @ q, node_mask, t, eps_q, guidance)
        torch.testing.assert_close(a @ q, b, atol=1e-9, rtol=1e-7)
        assert a.sum(1).abs().max() < 1e-10 and a[1, 5:].abs().max() == 0
        unguided = model.predict_noise({"pos": pos}, node_mask, t, final=False)["pos"]
        assert (a - unguided).abs().max() > 1e-6  # the gradient term is there
    with pytest.raises(ValueError, match="not 'lumo'"):
        guidance_for(model, "lumo", 0.0, 1.0)
    with pytest.raises(ValueError, match="reads the head on one of"):
        guidance_for(model, "gap", 0.0, 1.0, on="x0")
    with pytest.raises(ValueError, match="positive"):
        guidance_for(model, "gap", 0.0, -1.0)
    # scale 0 is the control arm: exactly the unguided molecules
    atoms = torch.tensor([4, 6])
    draw = lambda guidance: sample(model, atoms, steps=12, generator=torch.Generator().manual_seed(2),  # noqa: E731
                                   guidance=guidance)["pos"]
    assert torch.equal(draw(guidance_for(model, "gap", 4.0, scale=0.0)), draw(None))
    assert not torch.equal(draw(guidance_for(model, "gap", 4.0, scale=50.0, start=300)), draw(None))
    with pytest.raises(ValueError, match="property head"):
        guidance_for(tiny_model("edm"), "gap", 0.0, 1.0)


def test_the_cap_fraction_counts_the_capped_pushes():
    from molscale.trainer.model.sampling import guidance_for
    model = tiny_model("unigem", hidden=16, layers=3, dtype=torch.float64)
    atoms = torch.tensor([4, 6, 5])
    fractions = {}
    for scale in (1e-9, 1e9):  # a vanishing push is never capped; an enormous one always
        guidance = guidance_for(model, "gap", 40.0, scale=scale, start=50)
        sample(model, atoms, steps=20, generator=torch.Generator().manual_seed(2), guidance=guidance)
        fractions[scale] = guidance.cap_fraction()
    assert fractions == {1e-9: 0.0, 1e9: 1.0}
    assert guidance_for(model, "gap", 40.0, scale=1.0).cap_fraction() is None  # nothing guided yet
