"""Samplers (ancestral as EDM's sample_p_zs_given_zt, deterministic DDIM and DPM-Solver++(2M)) and property
prediction, for UniGEM and EDM models.

``steps`` K is the number of denoising steps, each one network evaluation, on a respaced grid of integer times
T = t_0 > t_1 > ... > t_K = 0 (timestep_grid); every sampler then reads the molecule out with one more evaluation
at t = 0: x = (z_0 - sigma_0 eps_hat) / alpha_0 (EDM's sample_p_xh_given_z0), which for UniGEM is also where the
growth branch's head gives the atom types. K = T is EDM's 1000-step sampler. UniGEM routes the whole batch through
the branch of the current phase; the grid always holds t_n, so the growth branch takes over exactly there, and
the multistep solver restarts its history at that switch (the two branches are different networks).
Sampler state is float32 (the dtype of the model's first parameter when that is float64, for tests).
"""

import logging
import math
from dataclasses import dataclass, field

import torch

from molscale.trainer.model.branches import Branch
from molscale.trainer.model.diffusion import (
    all_molecules,
    chunk_cost,
    com_free_noise,
    masked_noise,
    remove_mean,
    size_chunks,
    size_plan,
)
from molscale.trainer.model.packing import plan_chunks, take

log = logging.getLogger("trainer")

# Guidance defaults, measured (BENCHMARKS.md, "Guidance"): on a CPU UniGEM guided toward a LUMO one MAD below the
# train mean, scale 100 from t = 300 took an independent predictor's MAE to the target from 841 (unguided) to 364
# meV; the growth phase alone (t <= t_n, where sigma_t < 0.02) with scale 10 moved it to 810. A sweep of the clean
# reading (BENCHMARKS.md, "Guidance: the scale"): 100 not separable from 30 on an independent classifier, 10 keeps
# most of the gain at half the atom-stability cost; 100 kept.
GUIDE_SCALE = 100.0
GUIDE_FROM = 300
# where the property head is read: "noisy" at x_t (this project's first guidance), "clean" at the clean molecule
# the network predicts from x_t, x0_hat = (x_t - sigma_t eps_hat) / alpha_t, with the head at t = 0 where it was
# trained, as the released UniGEM guides (its sampler, for t < 100)
GUIDE_ON = ("noisy", "clean")
GUIDE_FROM_BY_ON = {"noisy": GUIDE_FROM, "clean": 100}
# The default reading: "clean". Against "noisy" on 3 targets x 2 models x 2 sampling seeds, scored by an
# independent classifier (BENCHMARKS.md, "Guidance: the two readings"), the two were not separable in MAE to the
# target, validity or atom stability; "clean" reads the head only where it was trained, caps fewer steps and
# sampled in 0.7x the time (it guides from t = 100, not 300: fewer steps with the extra head pass).
GUIDE_ON_DEFAULT = "clean"


def sample_num_atoms(histogram, num_samples, generator=None):
    """Atom counts drawn from a {num_atoms: count} histogram -> LongTensor [num_samples]."""
    sizes = torch.tensor([int(n) for n in histogram], dtype=torch.long)
    weights = torch.tensor([float(c) for c in histogram.values()], dtype=torch.float64)
    if len(sizes) == 0 or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("the atom-count histogram must hold at least one positive count")
    if generator is not None:
        weights = weights.to(generator.device)
    draws = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    return sizes[draws.cpu()]


def _even_points(start, stop, count):
    # count + 1 integers from start down to stop, as evenly spaced as integers allow
    return [round(start + (stop - start) * i / count) for i in range(count + 1)]


def timestep_grid(num_steps, steps=None, t_switch=None):
    """K = ``steps`` denoising steps (default: all T) -> [T, ..., 0], K + 1 strictly decreasing integer times.

    The grid is evenly spaced in t. With ``t_switch`` (UniGEM's t_n) it holds t_switch, and the steps are shared
    between (t_switch, T] and [0, t_switch] in proportion to their lengths (at least one each when K >= 2), so a
    few-step grid still denoises on the growth branch before the read-out. steps = T gives every integer time.
    """
    steps = num_steps if steps is None else steps
    if not 1 <= steps <= num_steps:
        raise ValueError(f"sampling steps must be in [1, {num_steps}] (the diffusion's T), got {steps}")
    if not t_switch or t_switch >= num_steps or steps < 2:
        return _even_points(num_steps, 0, steps)
    growth = min(max(1, round(steps * t_switch / num_steps)), t_switch, steps - 1)
    nucleation = steps - growth
    if nucleation > num_steps - t_switch:  # more steps than integer times above t_switch: give the rest below
        nucleation, growth = num_steps - t_switch, steps - (num_steps - t_switch)
    return _even_points(num_steps, t_switch, nucleation) + _even_points(t_switch, 0, growth)[1:]


def _state_dtype(model):
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def sample(model, num_atoms, steps=None, generator=None, device=None, sampler="ancestral", guidance=None,
           condition=None, step_graphs=False):
    """Generate molecules. num_atoms: LongTensor [B] (e.g. from sample_num_atoms); steps: denoising steps K
    (default T); sampler: one of SAMPLERS; guidance: a Guidance (guidance_for) or None; condition: [B, C] target
    values in dataset units of a conditional model's model.condition_on (required for such a model);
    step_graphs: each denoising step (network, update, noise) as one CUDA graph per chunk shape and network
    (denoising_graphs.py; the same molecules; on a CPU the same body runs eagerly); not with guidance (the call
    then samples as without it and logs why).

    Returns pos [B, N, 3] (Angstrom, CoM-free), node_mask [B, N], atom_type [B, N] (vocabulary index, 0 at
    padding), z [B, N] (atomic numbers, 0 at padding), num_atoms [B]; N = max(num_atoms).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_atoms = torch.as_tensor(num_atoms, dtype=torch.long).cpu()
    batch_size, n_max = len(num_atoms), int(num_atoms.max())
    grid = timestep_grid(model.num_steps, steps, model.switch_time)
    if guidance is not None and guidance.scale == 0:
        guidance = None  # the control arm: the same draws as unguided sampling
    context = None
    if condition is not None:
        context = model.normalise_context(torch.as_tensor(condition, dtype=torch.float64).to(device))
    model.check_context(context, batch_size)
    pos = torch.zeros(batch_size, n_max, 3, dtype=_state_dtype(model), device=device)
    atom_type = torch.zeros(batch_size, n_max, dtype=torch.long, device=device)
    steps_run = _graphed_steps(model, grid, sampler, guidance, generator, pos.dtype, device) if step_graphs else None
    for idx, n_pad in plan_chunks(num_atoms.tolist(), chunk_cost(model, device)):
        node_mask = torch.arange(n_pad)[None, :] < num_atoms[idx][:, None]  # [b, n_pad]
        chunk_context = None if context is None else take(context, idx).to(pos.dtype)
        pos_c, type_c = _sample_chunk(model, node_mask.to(device), grid, generator, pos.dtype, sampler, guidance,
                                      chunk_context, steps_run)
        pos[idx.to(device), :n_pad] = pos_c
        atom_type[idx.to(device), :n_pad] = type_c
    node_mask = (torch.arange(n_max)[None, :] < num_atoms[:, None]).to(device)
    vocab = torch.tensor(model.cfg.atom_vocab, dtype=torch.long, device=device)
    z = torch.where(node_mask, vocab[atom_type], 0)
    return {"pos": pos, "node_mask": node_mask, "atom_type": atom_type, "z": z, "num_atoms": num_atoms.to(device)}


def ancestral_step(schedule, z_t, eps_hat, t: int, s: int, node_mask, generator=None, com_free=True):
    """z_s ~ p(z_s | z_t) for s < t, with eps_hat the network's noise estimate. z_t, eps_hat [B, N, D].

    Coordinates (com_free) get CoM-free noise and are projected back to zero CoM after the step.
    """
    return ancestral_update(z_t, eps_hat, schedule.step_coefficients(t, s), node_mask, generator, com_free)


def ancestral_update(z_t, eps_hat, coefficients, node_mask, generator=None, com_free=True):
    """ancestral_step with its coefficients (1/alpha_{t|s}, eps coefficient, noise std) given: Python floats, or
    0-dim tensors read from a table on the device (a CUDA graph of the whole step, denoising_graphs.py)."""
    inv_alpha_ts, eps_coef, std = coefficients
    draw = com_free_noise if com_free else masked_noise
    z_s = z_t * inv_alpha_ts - eps_coef * eps_hat + std * draw(z_t.shape, node_mask, generator, z_t.dtype)
    return _project(z_s, node_mask, com_free)


def _project(z, node_mask, com_free):
    # coordinates back onto the zero-CoM subspace (round-off drifts off it); other latents zero at padding
    return remove_mean(z, node_mask) if com_free else z * node_mask.to(z.dtype).unsqueeze(-1)


def ddim_step(schedule, z_t, eps_hat, t: int, s: int, node_mask, com_free=True):
    """Deterministic DDIM (eta = 0): z_s = alpha_s x_hat + sigma_s eps_hat, x_hat = (z_t - sigma_t eps_hat) / alpha_t.

    Both terms are CoM-free when z_t and eps_hat are, so the step stays in the zero-CoM subspace."""
    return ddim_update(z_t, eps_hat, ddim_coefficients(schedule, t, s), node_mask, com_free)


def ddim_coefficients(schedule, t: int, s: int) -> tuple[float, float]:
    """DDIM's step t -> s as z_s = c_z z_t + c_eps eps_hat: (c_z, c_eps), float64 on the host."""
    a_t, s_t = schedule.host_alpha_sigma(t)
    a_s, s_s = schedule.host_alpha_sigma(s)
    return a_s / a_t, s_s - a_s * s_t / a_t


def ddim_update(z_t, eps_hat, coefficients, node_mask, com_free=True):
    """ddim_step with its coefficients (ddim_coefficients, or 0-dim tensors from a table on the device) given."""
    c_z, c_eps = coefficients
    return _project(z_t * c_z + eps_hat * c_eps, node_mask, com_free)


def dpm2m_update(z_t, eps_hat, coefficients, node_mask, x_prev=None, com_free=True):
    """One DPM-Solver++(2M) step from its coefficients (DPMSolver2M.coefficients) -> (z_s, x_hat): x_hat, the clean
    estimate at t, is what the next step's second-order update reuses. x_prev None: first order."""
    inv_a_t, s_t, w_hat, w_prev, sigma_ratio, c_direction = coefficients
    x_hat = (z_t - eps_hat * s_t) * inv_a_t
    direction = x_hat if x_prev is None else x_hat * w_hat - x_prev * w_prev
    return _project(z_t * sigma_ratio - direction * c_direction, node_mask, com_free), x_hat


class DPMSolver2M:
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): the second-order step reuses the clean
    estimate of the previous step, so it costs one network evaluation per step, like DDIM. Its first step, and
    the first after ``restart()`` (the UniGEM branch switch), is first order, which is DDIM's step.

    Like every stepper it is also a formula of per-step coefficients for the whole-step CUDA graphs
    (denoising_graphs.py; ``coefficient_rows``, ``advance``): there the previous clean estimate is a buffer on
    the device, and a first-order step's row weighs it 0."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.restart()

    def restart(self):
        self.previous = {}  # latent name -> (lambda at its time, x_hat)

    def _lambda(self, t):
        alpha, sigma = self.schedule.host_alpha_sigma(t)
        return math.log(alpha / sigma)

    def step(self, name, z_t, eps_hat, t: int, s: int, node_mask, generator=None, com_free=True):
        lam_prev, x_prev = self.previous.get(name, (None, None))
        z_s, x_hat = dpm2m_update(z_t, eps_hat, self.coefficients(t, s, lam_prev), node_mask, x_prev, com_free)
        self.previous[name] = (self._lambda(t), x_hat)
        return z_s

    def coefficients(self, t: int, s: int, lam_prev: float | None = None) -> tuple[float, ...]:
        """(1/alpha_t, sigma_t, weight of x_hat, weight of the previous x_hat, sigma_s/sigma_t,
        alpha_s expm1(-h)) for the step t -> s, h = lambda_s - lambda_t; lam_prev: lambda at the previous step's
        time, None for a first-order step (weights 1 and 0)."""
        a_t, s_t = self.schedule.host_alpha_sigma(t)
        a_s, s_s = self.schedule.host_alpha_sigma(s)
        lam_t = self._lambda(t)
        h = self._lambda(s) - lam_t
        w_hat, w_prev = 1.0, 0.0
        if lam_prev is not None:
            r = (lam_t - lam_prev) / h
            w_hat, w_prev = 1.0 + 0.5 / r, 0.5 / r
        return 1.0 / a_t, s_t, w_hat, w_prev, s_s / s_t, a_s * math.expm1(-h)

    def coefficient_rows(self, steps: list[tuple[int, int]], branches: list) -> list[tuple[float, ...]]:
        """coefficients of each step (t, s) of a grid whose steps run on ``branches``: first order at the first
        step and where the branch changes (the sampler's restart)."""
        rows, lam_prev = [], None
        for k, (t, s) in enumerate(steps):
            if k and branches[k] != branches[k - 1]:
                lam_prev = None
            rows.append(self.coefficients(t, s, lam_prev))
            lam_prev = self._lambda(t)
        return rows

    def advance(self, z_t, eps_hat, coefficients, node_mask, generator, com_free, history):
        """A step from a row of coefficient_rows; history: the previous step's x_hat (any finite values before a
        first-order step), overwritten in place with this step's."""
        z_s, x_hat = dpm2m_update(z_t, eps_hat, coefficients, node_mask, history, com_free)
        history.copy_(x_hat)
        return z_s


class AncestralSampler:
    """EDM's stochastic sampler as a stepper: one ancestral_step per latent; nothing carried between steps.

    Every stepper is also a formula of per-step coefficients (``coefficient_rows``, ``advance``): a CUDA graph of
    the whole denoising step (denoising_graphs.py) reads them from a table on the device."""

    def __init__(self, schedule):
        self.schedule = schedule

    def restart(self):
        pass

    def step(self, name, z_t, eps_hat, t: int, s: int, node_mask, generator=None, com_free=True):
        return self.update(z_t, eps_hat, self.coefficients(t, s), node_mask, generator, com_free)

    def coefficients(self, t: int, s: int) -> tuple[float, ...]:
        return self.schedule.step_coefficients(t, s)

    def coefficient_rows(self, steps: list[tuple[int, int]], branches: list) -> list[tuple[float, ...]]:
        return [self.coefficients(t, s) for t, s in steps]

    def advance(self, z_t, eps_hat, coefficients, node_mask, generator, com_free, history):
        return self.update(z_t, eps_hat, coefficients, node_mask, generator, com_free)  # (no history)

    @staticmethod
    def update(z_t, eps_hat, coefficients, node_mask, generator=None, com_free=True):
        return ancestral_update(z_t, eps_hat, coefficients, node_mask, generator, com_free)


class DDIMSampler(AncestralSampler):
    """Deterministic DDIM (eta = 0) as a stepper: one ddim_step per latent."""

    def coefficients(self, t: int, s: int) -> tuple[float, ...]:
        return ddim_coefficients(self.schedule, t, s)

    @staticmethod
    def update(z_t, eps_hat, coefficients, node_mask, generator=None, com_free=True):
        return ddim_update(z_t, eps_hat, coefficients, node_mask, com_free)


SAMPLERS = {"ancestral": AncestralSampler, "ddim": DDIMSampler, "dpm2m": DPMSolver2M}  # --sampler name -> stepper


@dataclass
class Guidance:
    """Classifier guidance by UniGEM's own property head, no retraining: sampling follows the score of
    p(x_t | y) = p(x_t) p(y | x_t) with p(y | x_t) = N(y; f(x_t), 1 / scale) in normalised property units, f the
    growth branch's head read at x_t. As eps = -sigma_t score, the guided estimate is
    eps + sigma_t * grad_x [scale / 2 * (f(x_t) - target)^2], at every step with t <= ``start`` (steps above t_n
    read the growth branch out of its training range and cost one more evaluation each; the growth phase alone
    moves coordinates little, as sigma_t is small there). f is invariant, so the gradient is equivariant and free
    of the CoM. The added term is capped, per molecule, at the norm of eps (an undertrained head's gradients are
    huge). Scale 0 samples exactly as without guidance: the control arm of a guidance measurement.

    ``on = "clean"`` reads the head at x0_hat instead (GUIDE_ON), holding eps_hat fixed: the gradient with respect
    to x_t is the head's at x0_hat divided by alpha_t. ``tally`` counts, over the guided steps and molecules, how
    often the cap bound ([capped, guided], device tensors, read once after sampling): where it binds on most
    steps, the scale is nominal."""
    property_index: int
    target: float   # normalised: (value - train mean) / train MAD
    scale: float
    start: int
    on: str = GUIDE_ON_DEFAULT
    tally: list = field(default_factory=list, compare=False)

    def cap_counts(self) -> tuple[float, float]:
        """(capped, guided) (step, molecule) pairs so far, read from the device."""
        return (float(self.tally[0]), float(self.tally[1])) if self.tally else (0.0, 0.0)

    def cap_fraction(self) -> float | None:
        """Of the guided (step, molecule) pairs, the fraction whose push the cap shortened; None before any."""
        capped, guided = self.cap_counts()
        return capped / guided if guided else None


def guidance_for(model, name: str, value: float, scale: float = GUIDE_SCALE, start: int | None = None,
                 on: str = GUIDE_ON_DEFAULT) -> Guidance:
    """Guidance toward ``value`` (dataset units) of property ``name`` at every step with t <= ``start`` (default
    GUIDE_FROM_BY_ON[on], at most T), the head read ``on`` x_t or x0_hat; ValueError for what cannot be
    guided."""
    if on not in GUIDE_ON:
        raise ValueError(f"guidance reads the head on one of {list(GUIDE_ON)}, not {on!r}")
    if not (model.predicts_properties and model.cfg.properties):
        raise ValueError("guidance needs a UniGEM model with a property head (model.properties)")
    if name not in model.cfg.properties:
        raise ValueError(f"the model predicts {list(model.cfg.properties)}, not {name!r}")
    if not scale >= 0:
        raise ValueError(f"the guidance scale must be positive, or 0 for the unguided control (got {scale})")
    start = min(GUIDE_FROM_BY_ON[on], model.num_steps) if start is None else start
    if not 1 <= start <= model.num_steps:
        raise ValueError(f"guidance start must be in [1, {model.num_steps}] (got {start})")
    j = list(model.cfg.properties).index(name)
    mean, mad = (v.double()[j].item() for v in model.prop_normalisation(torch.zeros(1)))
    return Guidance(j, (value - mean) / mad, float(scale), int(start), on)


def guided_eps(model, pos, node_mask, t: int, eps, guidance: Guidance, context=None):
    """The guided eps estimate of coordinates ``pos`` at time t (Guidance); eps: the unguided one (None in the
    growth phase, where the guided pass gives it); context: a conditional model's normalised context."""
    alpha, sigma = model.schedule.host_alpha_sigma(t)
    if guidance.on == "clean":
        if eps is None:
            eps = model.predict_noise({"pos": pos}, node_mask, t, final=False, context=context)["pos"]
        x0 = remove_mean((pos - sigma * eps) / alpha, node_mask).detach()
        # the head where it was trained (t = 0) on the predicted clean molecule; d x0_hat / d x_t = 1 / alpha_t
        # with eps_hat held fixed, so one differentiable pass at t = 0 is all the guidance costs
        grad = _head_gradient(model, x0, node_mask, 0, guidance, context)[0] / alpha
    else:
        grad, out = _head_gradient(model, pos, node_mask, t, guidance, context)
        if model.branch_of(t) == Branch.GROWTH:
            eps = out["eps"].detach()  # the same pass gave the growth branch's own estimate
    push = remove_mean(sigma * grad.to(eps.dtype), node_mask)
    # A head far from its training data (an undertrained model, large t) can have gradients that throw atoms
    # hundreds of Angstrom away in one step: the push is capped, per molecule, at the size of eps itself.
    size = lambda x: x.square().sum((1, 2), keepdim=True).sqrt()  # noqa: E731
    ratio = size(eps) / size(push).clamp(min=1e-12)  # [b, 1, 1]
    if not guidance.tally:
        guidance.tally.extend([ratio.new_zeros(()), ratio.new_zeros(())])
    guidance.tally[0] += (ratio < 1).sum()  # on the device: read once, after sampling
    guidance.tally[1] += ratio.numel()
    push = push * torch.clamp(ratio, max=1.0)
    return remove_mean(eps + push, node_mask)


def _head_gradient(model, pos, node_mask, t: int, guidance: Guidance, context):
    """(d/d pos of scale / 2 (head(pos, t) - target)^2, the growth branch's outputs) on the eager network
    (CUDA graphs replay forward passes only)."""
    t_batch = torch.full((node_mask.shape[0],), t, dtype=torch.long, device=node_mask.device)
    with torch.enable_grad():
        x = pos.detach().requires_grad_(True)
        out = model.denoise(x, node_mask, t_batch, Branch.GROWTH, heads=True, context=context, differentiable=True)
        error = out["props"][:, guidance.property_index].float() - guidance.target
        (grad,) = torch.autograd.grad(0.5 * guidance.scale * (error * error).sum(), x)
    return grad, out


def _graphed_steps(model, grid, sampler, guidance, generator, dtype, device):
    """The grid's steps as graphs of the whole step (denoising_graphs.DenoisingSteps), or None (logged) where
    this call cannot have them."""
    from molscale.trainer.model.denoising_graphs import DenoisingSteps, step_graphs_unsupported
    why_not = step_graphs_unsupported(guidance, generator, device)
    if why_not is not None:
        log.info("sampling: whole-step CUDA graphs are off for this call (%s); it samples step by step", why_not)
        return None
    return DenoisingSteps(model, grid, SAMPLERS[sampler](model.schedule), generator, dtype, device,
                          capture=torch.device(device).type == "cuda")


def _sample_chunk(model, node_mask, grid, generator, dtype, sampler="ancestral", guidance=None, context=None,
                  steps_run=None):
    # node_mask [b, n] -> pos [b, n, 3], atom_type [b, n]; the model says which latents it diffuses;
    # steps_run: a DenoisingSteps that runs the grid's steps as graphs of the whole step
    latents = model.initial_latents(node_mask, generator, dtype)
    stepper = SAMPLERS[sampler](model.schedule)
    if steps_run is not None:
        from molscale.trainer.model.denoising_graphs import network_graphs_off
        with network_graphs_off(model):
            latents = steps_run.run(latents, node_mask, context)
        grid = grid[-1:]  # the steps are done: only the read-out is left
    for prev_t, t, s in zip([grid[0]] + grid[:-2], grid[:-1], grid[1:]):
        if guidance is not None and t <= guidance.start and model.branch_of(t) == Branch.GROWTH:
            eps = {"pos": guided_eps(model, latents["pos"], node_mask, t, None, guidance, context)}
        else:
            eps = model.predict_noise(latents, node_mask, t, final=False, context=context)
            if guidance is not None and t <= guidance.start:
                eps = {"pos": guided_eps(model, latents["pos"], node_mask, t, eps["pos"], guidance, context)}
        if model.branch_of(t) != model.branch_of(prev_t):
            stepper.restart()  # the network changed: its earlier estimate is not a history of this one
        latents = {name: stepper.step(name, z, eps[name], t, s, node_mask, generator, com_free=name == "pos")
                   for name, z in latents.items()}
    # final prediction at t = 0
    out = model.predict_noise(latents, node_mask, 0, final=True, context=context)
    alpha0, sigma0 = model.schedule.host_alpha_sigma(0)
    pos = remove_mean((latents["pos"] - sigma0 * out["pos"]) / alpha0, node_mask)
    type_scores = model.atom_type_scores(latents, out, alpha0, sigma0)
    atom_type = torch.where(node_mask, type_scores.argmax(-1), 0)
    return pos, atom_type


@torch.no_grad()
def predict_properties(model, batch):
    """UniGEM property prediction in dataset units: clean coordinates at t = 0 through the growth branch.

    batch: pos [B, N, 3], node_mask [B, N] (and, for a model conditioned on other properties, their values in
    batch["props"] as a training batch holds them). Returns [B, P] in the units of batch["props"].
    A property classifier (model/classifier.py) reads batch["atom_type"] as well and predicts in one pass.
    """
    from molscale.trainer.model.classifier import PropertyClassifier
    if isinstance(model, PropertyClassifier):
        return model.predict_properties(batch)
    if not (model.predicts_properties and model.cfg.properties):
        raise ValueError("property prediction needs a UniGEM model configured with properties")
    if model.num_context and "props" not in batch:
        raise ValueError(f"this model is conditioned on {model.cfg.condition_on}: its predictions need those values")
    context = model.batch_context(batch)
    pos, node_mask = batch["pos"], batch["node_mask"]
    batch_size, n_max = node_mask.shape
    out = pos.new_zeros(batch_size, len(model.cfg.properties))
    plan = size_plan(model, batch)  # from host counts, or none: nothing read back from a GPU
    molecules = all_molecules(batch_size, plan, pos.device)
    for _, idx, n_pad in size_chunks({Branch.GROWTH: molecules}, plan, n_max, pos.device):
        t = torch.zeros(len(idx), dtype=torch.long, device=pos.device)
        pred = model.denoise(take(pos, idx, n_pad), take(node_mask, idx, n_pad), t, Branch.GROWTH, heads=True,
                             context=None if context is None else take(context, idx))["props"]
        out[idx] = pred.to(out.dtype)
    mean, mad = model.prop_normalisation(out)
    return out * mad + mean
