"""Noise schedules (EDM code, equivariant_diffusion/en_diffusion.py): tables over integer t = 0..T, computed in float64.

The tables are plain tensors, not module buffers, so `model.to(torch.bfloat16)` can never round them; every
lookup returns the dtype the caller asks for (float32 in training and sampling, float64 in tests).
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class DiffusionConfig:
    """The noise process: the ``diffusion`` section of a run config (EDM's defaults: T = 1000,
    polynomial_2 with precision 1e-5)."""
    num_steps: int = 1000                  # T
    schedule: str = "polynomial_2"         # polynomial_2 | cosine
    precision: float = 1e-5

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"diffusion.num_steps must be at least 1, got {self.num_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.precision < 0.5:
            raise ValueError(f"diffusion.precision must be in (0, 0.5), got {self.precision}")

    def schedule_tables(self) -> "NoiseSchedule":
        return NoiseSchedule(self.num_steps, self.schedule, self.precision)


def clip_step_ratios(alpha2, min_ratio=0.001):
    """Make alpha2 monotone: clip alpha2_t / alpha2_{t-1} at >= min_ratio and re-multiply (alpha2_{-1} = 1)."""
    padded = torch.cat([alpha2.new_ones(1), alpha2])
    ratios = (padded[1:] / padded[:-1]).clamp(min=min_ratio, max=1.0)
    return torch.cumprod(ratios, dim=0)


def polynomial_alpha2(num_steps, power=2.0, precision=1e-5):
    # alpha2(t) = (1 - (t/T)^p)^2, clipped, then squeezed into [precision, 1 - precision]
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha2 = clip_step_ratios((1.0 - t**power) ** 2)
    return (1.0 - 2.0 * precision) * alpha2 + precision


def cosine_alpha2(num_steps, offset=0.008, precision=1e-5):
    # Nichol & Dhariwal: alpha2(t) = cos^2(((t/T + s)/(1 + s)) pi/2) / cos^2((s/(1 + s)) pi/2), steps clipped
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + offset) / (1.0 + offset) * math.pi / 2) ** 2
    alpha2 = clip_step_ratios(f / f[0])
    return (1.0 - 2.0 * precision) * alpha2 + precision


SCHEDULES = {  # diffusion.schedule name -> alpha_t^2 table [T + 1] for (T, precision)
    "polynomial_2": lambda num_steps, precision: polynomial_alpha2(num_steps, 2.0, precision),
    "cosine": lambda num_steps, precision: cosine_alpha2(num_steps, precision=precision),
}


class NoiseSchedule:
    """alpha_t, sigma_t with alpha_t^2 + sigma_t^2 = 1, for integer t in [0, T]."""

    def __init__(self, num_steps=1000, kind="polynomial_2", precision=1e-5):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {kind!r}; choose one of {list(SCHEDULES)}")
        alpha2 = SCHEDULES[kind](num_steps, precision)
        self.num_steps = num_steps
        self.kind = kind
        self.alpha2 = alpha2  # [T + 1] float64
        self.sigma2 = 1.0 - alpha2
        self.gamma = -(torch.log(alpha2) - torch.log(self.sigma2))  # -log SNR
        self._cache = {}
        self._alpha2_host = alpha2.tolist()  # Python floats (exactly the float64 values)

    def _table(self, name, device, dtype):
        key = (name, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def alpha_sigma(self, t, dtype=torch.float32):
        """t: int64 tensor of any shape -> (alpha_t, sigma_t) with the same shape."""
        alpha2 = self._table("alpha2", t.device, torch.float64)[t]
        return alpha2.sqrt().to(dtype), (1.0 - alpha2).sqrt().to(dtype)

    def host_alpha_sigma(self, t: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) as Python floats (float64), for host-side arithmetic without tensor ops."""
        alpha2 = self._alpha2_host[t]
        return math.sqrt(alpha2), math.sqrt(1.0 - alpha2)

    def step_coefficients(self, t: int, s: int) -> tuple[float, float, float]:
        """Ancestral step t -> s < t (as EDM): returns (1/alpha_{t|s}, eps coefficient, noise std), float64 math
        on the host (Python floats: the sampler's loop creates no tensor and reads nothing from the device).

        mean = z_t / alpha_{t|s} - sigma2_{t|s} / (alpha_{t|s} sigma_t) eps_hat;  std = sigma_{t|s} sigma_s / sigma_t.
        """
        a2_t, a2_s = self._alpha2_host[t], self._alpha2_host[s]
        s2_t, s2_s = 1.0 - a2_t, 1.0 - a2_s
        alpha_ts = math.sqrt(a2_t / a2_s)
        sigma2_ts = s2_t - alpha_ts**2 * s2_s
        eps_coef = sigma2_ts / (alpha_ts * math.sqrt(s2_t))
        std = math.sqrt(sigma2_ts) * math.sqrt(s2_s) / math.sqrt(s2_t)
        return 1.0 / alpha_ts, eps_coef, std
