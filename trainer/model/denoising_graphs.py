"""The whole denoising step as one CUDA graph per chunk shape and network (``sample(..., step_graphs=True)``;
``--cuda-graphs step`` of evals/generate.py).

Why: with the network alone replayed as a graph (cuda_graphs.py) the host still launches the sampler's update
around it (24 operator calls for an ancestral step of UniGEM: the coefficients' products, the noise draw, the
projection onto zero centre of mass) and waits in Python between steps. Here one graph holds the network's noise
estimate, the update and the noise draw, so a step is one launch and the host runs ahead of the GPU for the whole
trajectory.

How one graph serves every step of its network: the step's time and update coefficients are rows of tables on
the device (the times of the grid, ``stepper.coefficient_rows`` for its steps), read at a step counter that the
graph itself advances. The latents, and DPM-Solver++(2M)'s previous clean estimate, are written in place.
UniGEM's two branches are different networks, so a chunk has a graph for each (the counter carries over the
switch; DPM-Solver++(2M)'s restart there is a first-order row). The update is the eager sampler's own formula
with tensor coefficients in place of host floats, so the graph computes what sampling.sample computes;
tests/trainer/model/test_denoising_graphs.py checks that bit for bit on the CPU, where the same body runs eagerly.

Random draws: a torch.Generator on the device is registered with each graph, so a replay draws from the
generator's state at that moment, as the eager step does. A generator on another device (a CPU generator for a
GPU model) cannot be captured: such a call samples eagerly and says so once.

Not graphed (they run as before, through the network's graphs where those are on): the read-out at t = 0, once
per chunk; guidance, which differentiates the property head.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from molscale.trainer.model.cuda_graphs import BodyGraphs


def step_graphs_unsupported(guidance, generator, device) -> str | None:
    """Why a sampling call cannot replay whole denoising steps as graphs (None: it can)."""
    if guidance is not None:
        return "guidance differentiates the property head"
    if generator is not None and generator.device.type != torch.device(device).type:
        return f"the generator is on {generator.device.type}, the model on {torch.device(device).type}"
    return None


class DenoisingSteps:
    """The steps t -> s of one sampling grid for any number of chunks, each step one ``BodyGraphs`` run keyed by
    (chunk shape, network). stepper: one of sampling.SAMPLERS."""

    def __init__(self, model, grid: list[int], stepper, generator, dtype, device, capture: bool):
        self.model, self.stepper, self.generator = model, stepper, generator
        steps = list(zip(grid[:-1], grid[1:]))
        self.branches = [model.branch_of(t) for t, _ in steps]
        self.times = torch.tensor([t for t, _ in steps], dtype=torch.long, device=device)  # [K]
        # float64 on the host (as the eager sampler's coefficients), rounded once to the state's dtype
        self.coefficients = torch.tensor(stepper.coefficient_rows(steps, self.branches),
                                         dtype=torch.float64).to(device=device, dtype=dtype)  # [K, C]
        self.graphs = BodyGraphs(capture, "sampling with --cuda-graphs step: the denoising step",
                                 [generator] if generator is not None else [])
        self.chunks: dict[tuple, dict] = {}  # chunk key -> the tensors its graphs read and write

    def run(self, latents: dict, node_mask, context=None) -> dict:
        """Every step of the grid on one chunk's initial latents (not modified) -> its latents at t = 0."""
        key = (tuple(node_mask.shape), tuple((k, v.dtype) for k, v in latents.items()), context is not None)
        state = self.chunks.get(key)
        if state is None:  # the addresses this shape's graphs read: kept, and refilled for the next chunk
            state = self.chunks[key] = {"latents": {k: v.clone() for k, v in latents.items()},
                                        "history": {k: torch.zeros_like(v) for k, v in latents.items()},
                                        "node_mask": node_mask.clone(), "counter": torch.zeros(
                                            1, dtype=torch.long, device=node_mask.device),
                                        "context": None if context is None else context.clone()}
        else:
            for name, z in latents.items():
                state["latents"][name].copy_(z)
            state["node_mask"].copy_(node_mask)
            if context is not None:
                state["context"].copy_(context)
        state["counter"].zero_()
        for previous in state["history"].values():  # (a first-order row weighs it 0, which a non-finite value
            previous.zero_()                         # left by a diverged chunk would turn into NaN)
        with _autocast_without_cache(node_mask.device.type):
            for branch in self.branches:
                self.graphs.run((key, branch), lambda: self._step(state, branch))
        return {k: v.clone() for k, v in state["latents"].items()}

    def _step(self, state: dict, branch) -> None:
        # one denoising step at the counter's row of the tables; device work only
        node_mask, counter, latents = state["node_mask"], state["counter"], state["latents"]
        t_batch = self.times.index_select(0, counter).expand(node_mask.shape[0])
        coefficients = self.coefficients.index_select(0, counter)[0].unbind()
        eps = self.model.noise_estimate(latents, node_mask, t_batch, branch, False, state["context"])
        for name, z in latents.items():
            z.copy_(self.stepper.advance(z, eps[name], coefficients, node_mask, self.generator, name == "pos",
                                         state["history"][name]))
        counter.add_(1)


def _autocast_without_cache(device: str):
    # autocast as the caller set it, without its weight cache: a cast cached inside a capture would hold memory of
    # the graph's pool that only a replay fills
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)
    return nullcontext()


@contextmanager
def network_graphs_off(model):
    """The network runs eagerly inside (a graph of the whole step holds it: no graph replays inside a capture)."""
    kept, model.cuda_graphs = model.cuda_graphs, None
    try:
        yield
    finally:
        model.cuda_graphs = kept
