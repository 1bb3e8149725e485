import math

import pytest
import torch

from molscale.trainer.model.schedule import NoiseSchedule, clip_step_ratios

pytestmark = pytest.mark.usefixtures("single_thread")


def test_polynomial_2_values_match_facts():
    sched = NoiseSchedule(1000, "polynomial_2", precision=1e-5)
    t = torch.tensor([0, 10, 1000])
    alpha, sigma = sched.alpha_sigma(t, torch.float64)
    assert sigma[0].item() == pytest.approx(math.sqrt(1e-5), rel=1e-6)  # ~0.0032
    assert sigma[1].item() == pytest.approx(0.0145, rel=0.01)
    assert alpha[2].item() ** 2 == pytest.approx(1e-5, rel=0.01)
    # closed form away from the clipped end: alpha2 = (1 - 2s)(1 - (t/T)^2)^2 + s
    t_mid = torch.tensor([100, 500, 900])
    frac = t_mid.double() / 1000.0
    expected = (1 - 2e-5) * (1 - frac**2) ** 2 + 1e-5
    assert torch.allclose(sched.alpha2[t_mid], expected, rtol=1e-12)


@pytest.mark.parametrize("kind", ["polynomial_2", "cosine"])
def test_schedule_is_monotone_and_variance_preserving(kind):
    sched = NoiseSchedule(1000, kind)
    assert sched.alpha2.dtype == torch.float64 and sched.alpha2.shape == (1001,)
    assert bool((sched.alpha2[1:] < sched.alpha2[:-1]).all())
    assert bool((sched.gamma[1:] > sched.gamma[:-1]).all())
    alpha, sigma = sched.alpha_sigma(torch.arange(1001))
    assert alpha.dtype == torch.float32
    assert torch.allclose(alpha.double() ** 2 + sigma.double() ** 2, torch.ones(1001, dtype=torch.float64), atol=1e-6)
    assert 1e-5 <= sched.alpha2[-1].item() < 1e-3 and sched.alpha2[0].item() == pytest.approx(1 - 1e-5)


def test_clipping_bounds_step_ratios():
    alpha2 = torch.tensor([1.0, 0.5, 1e-6, 0.0], dtype=torch.float64)
    clipped = clip_step_ratios(alpha2, 0.001)
    ratios = clipped / torch.cat([torch.ones(1, dtype=torch.float64), clipped[:-1]])
    assert torch.allclose(ratios, torch.tensor([1.0, 0.5, 0.001, 0.001], dtype=torch.float64))


@pytest.mark.parametrize("t,s", [(500, 499), (700, 300), (11, 10), (1, 0)])
def test_step_coefficients_give_the_gaussian_posterior(t, s):
    # With eps_hat the true noise, mean = z_t/alpha_ts - c eps must equal the posterior mean of q(z_s | z_t, x0).
    sched = NoiseSchedule(1000)
    a2 = sched.alpha2
    alpha_t, alpha_s = a2[t].sqrt(), a2[s].sqrt()
    s2_t, s2_s = 1 - a2[t], 1 - a2[s]
    alpha_ts = alpha_t / alpha_s
    s2_ts = s2_t - alpha_ts**2 * s2_s
    x0, eps = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    z_t = alpha_t * x0 + s2_t.sqrt() * eps
    posterior_mean = alpha_ts * s2_s / s2_t * z_t + alpha_s * s2_ts / s2_t * x0
    posterior_std = (s2_ts * s2_s / s2_t).sqrt()
    inv_alpha_ts, eps_coef, std = sched.step_coefficients(t, s)
    assert z_t.item() * inv_alpha_ts - eps_coef * eps.item() == pytest.approx(posterior_mean.item(), rel=1e-9)
    assert std == pytest.approx(posterior_std.item(), rel=1e-9)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="polynomial_2"):
        NoiseSchedule(1000, "linear")
