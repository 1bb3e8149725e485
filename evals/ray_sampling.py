"""Sampling over Ray: actors that hold a checkpoint's EMA model and sample chunks of molecules.

The molecules' atom counts are drawn up front, sorted, and cut into chunks by an atom-pair budget (a chunk of
B molecules padded to N atoms costs B * N^2), so that each chunk is padded only to its own largest molecule.
Each chunk's seed comes from --seed and the chunk's index, so the molecules depend on the seed and not
on how many workers there are, nor on a worker dying: a sampler actor that dies (a node lost, an OOM kill)
is restarted by Ray and its chunk run again with the same seed, giving the same molecules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


def connect_ray(num_cpus: int | None):
    import ray
    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        try:
            # --trust-pickle reaches the workers of a cluster through the job's environment (a local Ray's inherit it)
            trust = {"env_vars": {"MOLSCALE_TRUST_PICKLE": "1"}} if os.environ.get("MOLSCALE_TRUST_PICKLE") else None
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env=trust)
        except ConnectionError as err:  # no cluster there: bad configuration, not a failure of the run
            from molscale.datasets.errors import InputError
            address, why = os.environ["RAY_ADDRESS"], str(err).rstrip(".")
            raise InputError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {why}. Start it "
                             f"(`ray start --head`), fix RAY_ADDRESS, or unset it for a local Ray.") from None
    else:
        # address "local": a Ray of our own, never one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


ACTOR_RESTARTS = 3  # a dead sampler is restarted (it reloads the checkpoint) and its chunk retried this often


def ray_get(ray, refs):
    """ray.get; a MolscaleError raised in a task comes back as itself (one line at the entry point), not
    wrapped in Ray's RayTaskError with the remote traceback."""
    from ray.exceptions import RayTaskError

    from molscale.datasets.errors import MolscaleError
    try:
        return ray.get(refs)
    except RayTaskError as err:
        if isinstance(err.cause, MolscaleError):
            raise err.cause from None
        raise


def sampler_actor_class(ray):
    @ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    class Sampler:
        """Holds the EMA model of one checkpoint; samples chunks of molecules."""

        def __init__(self, checkpoint: str, cuda_graphs: str = "off", precision: str = "fp32",
                     kernel: str | None = None):
            import torch

            from molscale.trainer.artifacts import load_for_eval
            if not torch.cuda.is_available():
                torch.set_num_threads(1)  # one actor per core
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.loaded = load_for_eval(checkpoint, self.device, kernel=kernel)
            self.kernel = effective_kernel(self.loaded.model, self.device)
            if cuda_graphs != "off" and self.device == "cuda":  # ("step": for what whole-step graphs leave)
                self.loaded.model.use_cuda_graphs()
            self.step_graphs = cuda_graphs == "step"
            self.precision = precision
            if self.device == "cuda":  # this process is the actor's own: the flag touches nothing else
                torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

        def sample(self, num_atoms: list[int], seed: int, steps: int | None, sampler: str,
                   guide=None, condition: list | None = None) -> dict:
            import torch

            from molscale.trainer.model.sampling import guidance_for, sample
            generator = torch.Generator(device=self.device).manual_seed(seed)
            guidance = guidance_for(self.loaded.model, guide.property, guide.target, guide.scale, guide.start,
                                    guide.on) if guide else None
            # bf16: the network's Linear layers under autocast, as in bf16 training; coordinates stay float32
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = sample(self.loaded.model, torch.tensor(num_atoms), steps=steps, generator=generator,
                             device=self.device, sampler=sampler, guidance=guidance, condition=condition,
                             step_graphs=self.step_graphs)
            return {"z": out["z"].cpu().numpy().astype(np.uint8), "pos": out["pos"].float().cpu().numpy(),
                    "num_atoms": out["num_atoms"].cpu().numpy(),
                    "node": ray.get_runtime_context().get_node_id(), "kernel": self.kernel,
                    "guidance_tally": guidance.cap_counts() if guidance is not None else (0.0, 0.0)}

    return Sampler


def effective_kernel(model, device) -> str:
    """How the model's EGNN blocks really run on ``device``: model.kernel, except 'fused' where Triton cannot
    run (they then run eagerly, fused_edges logs why)."""
    import torch

    from molscale.trainer.model import fused_edges
    if model.cfg.kernel == "fused" and not fused_edges.runs_on(torch.device(device)):
        return "eager"
    return model.cfg.kernel


def draw_atom_counts(n_samples: int, histogram: dict[int, int], seed: int) -> np.ndarray:
    """[n_samples] atom counts drawn from a {num_atoms: count} histogram with --seed."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sorted(histogram), dtype=np.int64)
    probs = np.asarray([histogram[s] for s in sizes], dtype=np.float64)
    return rng.choice(sizes, size=n_samples, p=probs / probs.sum())


def chunk_plan(n_samples: int, histogram: dict[int, int], seed: int, pair_budget: int, counts=None):
    """[(chunk seed, molecule indices, atom counts)]: counts drawn from the histogram with --seed (or given:
    [n_samples]), sorted and cut into chunks whose padded cost len(chunk) * n_max^2 stays within ``pair_budget``
    (packing.budget_chunks), each chunk's seed fixed by --seed and its index. Nothing here depends on workers."""
    from molscale.trainer.model.packing import budget_chunks
    counts = draw_atom_counts(n_samples, histogram, seed) if counts is None else np.asarray(counts, dtype=np.int64)
    return [(int(seed) * 1_000_003 + c, idx.numpy(), counts[idx.numpy()])
            for c, (idx, _) in enumerate(budget_chunks(counts.tolist(), pair_budget))]


def fixed_count_chunks(counts, batch: int) -> list[tuple[np.ndarray, int]]:
    """[(molecule indices, padded size)] of the plan before pair budgets: the sorted molecules in chunks of
    ``batch``. Kept to report how much padding the budget saves (metrics.json source.sampling_chunks)."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(counts, kind="stable")
    return [(order[i:i + batch], int(counts[order[i:i + batch]].max())) for i in range(0, len(order), batch)]


def plan_summary(plan, pair_budget: int, batch: int) -> dict:
    """The chunk plan in numbers: chunks, budget, and the real / padded atom-pair fraction of this plan next to
    the fixed-count plan of ``batch`` molecules per chunk."""
    from molscale.trainer.model.packing import real_pair_fraction
    counts = np.zeros(sum(len(idx) for _, idx, _ in plan), dtype=np.int64)
    for _, idx, chunk_counts in plan:
        counts[idx] = chunk_counts
    chunks = [(idx, int(chunk_counts.max())) for _, idx, chunk_counts in plan]
    return {"chunks": len(plan), "pair_budget": int(pair_budget),
            "real_pair_fraction": round(real_pair_fraction(counts, chunks), 4),
            "fixed_count_real_pair_fraction": round(real_pair_fraction(counts, fixed_count_chunks(counts, batch)), 4)}


def sampler_capacity(ray) -> tuple[int, str]:
    """How many sampler actors the cluster can hold at once: one per GPU where there are GPUs, else per CPU."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return (gpus, "GPU") if gpus else (max(1, int(resources.get("CPU", 1))), "CPU")


@dataclass
class SampledRun:
    """What sample_over_ray returns."""
    molecules: list            # (z [N] uint8, pos [N, 3] float32) in the order the atom counts were drawn
    chunks_per_node: dict      # chunks sampled per Ray node id
    plan: list                 # the chunk plan (chunk_plan)
    kernels: list              # the kernels the samplers ran (effective_kernel)
    guidance_cap_fraction: float | None  # of the guided (step, molecule) pairs, those whose push was capped


def sample_over_ray(ray, checkpoint: str, settings, steps: int, pair_budget: int, workers: int,
                    histogram: dict[int, int], guide=None, condition: tuple | None = None) -> SampledRun:
    """Sample ``settings.n_samples`` molecules (eval_config.SamplingSettings: seed, sampler, precision, kernel,
    CUDA graphs) with ``steps`` denoising steps over Ray actors. ``pair_budget``: chunk_plan's; ``workers``: at
    most ``sampler_capacity`` (more would wait for resources forever); ``guide``: an eval_config.GuideRequest with
    its start filled in, or None; ``condition``: a conditional model's (atom counts [n_samples], target values
    [n_samples, C] in dataset units), drawn together by the caller."""
    from ray.util import ActorPool
    from tqdm import tqdm
    unit = sampler_capacity(ray)[1]
    Sampler = sampler_actor_class(ray).options(num_gpus=1, num_cpus=1) if unit == "GPU" else \
        sampler_actor_class(ray).options(num_cpus=1)
    counts, targets = condition if condition is not None else (None, None)
    n_samples, sampler = settings.n_samples, settings.sampler
    plan = chunk_plan(n_samples, histogram, settings.seed, pair_budget, counts)
    n_actors = max(1, min(workers, len(plan)))
    actors = [Sampler.remote(checkpoint, settings.cuda_graphs, settings.precision, settings.kernel)
              for _ in range(n_actors)]
    pool = ActorPool(actors)
    molecules: list = [None] * n_samples
    chunks_per_node: dict[str, int] = {}
    kernels: set[str] = set()
    tally = [0.0, 0.0]
    def submit(actor, job):
        chunk_targets = None if targets is None else np.asarray(targets)[job[1]].tolist()
        return actor.sample.remote(job[2].tolist(), job[0], steps, sampler, guide, chunk_targets)

    results = pool.map(submit, plan)
    for (_, idx, counts), out in tqdm(zip(plan, results), total=len(plan), desc="sampling", unit="chunk"):
        for row, i in enumerate(idx):
            n = int(out["num_atoms"][row])
            molecules[i] = (out["z"][row, :n], out["pos"][row, :n])
        chunks_per_node[out["node"]] = chunks_per_node.get(out["node"], 0) + 1
        kernels.add(out["kernel"])
        tally = [a + b for a, b in zip(tally, out["guidance_tally"])]
    for actor in actors:
        ray.kill(actor)
    return SampledRun(molecules, chunks_per_node, plan, sorted(kernels), tally[0] / tally[1] if tally[1] else None)
