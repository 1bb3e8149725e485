"""Sample molecules from a checkpoint across a Ray cluster and evaluate them (or evaluate real data).

    python evals/generate.py --checkpoint RUN_DIR --n-samples 10000 --out OUT      # local Ray
    ray job submit --working-dir . -- python evals/generate.py --checkpoint /abs/RUN_DIR --out OUT
    python evals/generate.py --dataset data/qm9 --split test --out OUT             # the "data" row

Sampling actors load the EMA model once (one GPU each where there are GPUs) and sample chunks of
similar-sized molecules; atom counts come from the train histogram stored in the checkpoint. Every
chunk has its own seed, derived from --seed and the chunk's index, so the molecules depend on
--seed and not on how many workers there are. Metric work fans out as Ray tasks.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT

import argparse  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger("evals.generate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="evals/generate.py",
        description="Generate molecules from a trained checkpoint over a Ray cluster and compute the EDM-protocol "
                    "and distribution metrics (or compute them for a split of real molecules with --dataset). "
                    "Joins the cluster in RAY_ADDRESS (or the job's cluster) and starts a local one otherwise.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory (its latest checkpoint) or a checkpoint folder")
    src.add_argument("--dataset", help="dataset folder or URL: evaluate its real molecules (the 'data' row)")
    p.add_argument("--out", required=True, help="output folder or URL (s3://...): metrics.json, samples.sdf, plots, report.html")
    p.add_argument("--n-samples", type=int, default=10000, help="molecules to generate (default 10,000, the standard run)")
    p.add_argument("--batch", type=int, default=250, help="molecules per sampling chunk (one actor call)")
    p.add_argument("--steps", type=int, default=None,
                   help="sample on every k-th of the T diffusion steps (default: all T)")
    p.add_argument("--seed", type=int, default=0, help="the samples depend on this and nothing else")
    p.add_argument("--workers", type=int, default=None,
                   help="sampling actors (default: one per GPU, else one per CPU of the cluster)")
    p.add_argument("--split", default="test", help="with --dataset: the split to evaluate (default test)")
    p.add_argument("--reference", default=None,
                   help="dataset for novelty and the distribution metrics (default: the checkpoint's dataset)")
    p.add_argument("--reference-split", default="test", help="split the distribution metrics compare with")
    p.add_argument("--property", action="store_true",
                   help="also evaluate the property MAE on the --reference-split (UniGEM with properties)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    p.add_argument("--wandb-project", default="molscale-evals")
    return p.parse_args(argv)


# --- Ray -----------------------------------------------------------------------------------------

def connect_ray(num_cpus: int | None):
    import ray
    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def sampler_actor_class(ray):
    @ray.remote
    class Sampler:
        """Holds the EMA model of one checkpoint; samples chunks of molecules."""

        def __init__(self, checkpoint: str):
            import torch
            from trainer.export import load_for_eval
            if not torch.cuda.is_available():
                torch.set_num_threads(1)  # one actor per core
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.loaded = load_for_eval(checkpoint, self.device)

        def sample(self, num_atoms: list[int], seed: int, stride: int) -> dict:
            import torch
            from trainer.sampling import sample
            generator = torch.Generator(device=self.device).manual_seed(seed)
            out = sample(self.loaded.model, torch.tensor(num_atoms), stride=stride, generator=generator,
                         device=self.device)
            return {"z": out["z"].cpu().numpy().astype(np.uint8), "pos": out["pos"].float().cpu().numpy(),
                    "num_atoms": out["num_atoms"].cpu().numpy()}

    return Sampler


def chunk_plan(n_samples: int, histogram: dict[int, int], seed: int, batch: int):
    """[(chunk seed, molecule indices, atom counts)]: counts drawn from the histogram, chunks of
    similar sizes (sorted), each chunk's seed fixed by --seed and its index."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sorted(histogram), dtype=np.int64)
    probs = np.asarray([histogram[s] for s in sizes], dtype=np.float64)
    counts = rng.choice(sizes, size=n_samples, p=probs / probs.sum())
    order = np.argsort(counts, kind="stable")
    plan = []
    for c, start in enumerate(range(0, n_samples, batch)):
        idx = order[start:start + batch]
        plan.append((int(seed) * 1_000_003 + c, idx, counts[idx]))
    return plan


def generate(ray, checkpoint: str, n_samples: int, batch: int, stride: int, seed: int, workers: int,
             histogram: dict[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Molecules as (z [N] uint8, pos [N, 3] float32), in the order the atom counts were drawn."""
    from ray.util import ActorPool
    from tqdm import tqdm
    gpus = ray.cluster_resources().get("GPU", 0)
    Sampler = sampler_actor_class(ray).options(num_gpus=1, num_cpus=1) if gpus else \
        sampler_actor_class(ray).options(num_cpus=1)
    plan = chunk_plan(n_samples, histogram, seed, batch)
    actors = [Sampler.remote(checkpoint) for _ in range(max(1, min(workers, len(plan))))]
    pool = ActorPool(actors)
    molecules: list = [None] * n_samples
    results = pool.map(lambda actor, job: actor.sample.remote(job[2].tolist(), job[0], stride), plan)
    for (_, idx, counts), out in tqdm(zip(plan, results), total=len(plan), desc="sampling", unit="chunk"):
        for row, i in enumerate(idx):
            n = int(out["num_atoms"][row])
            molecules[i] = (out["z"][row, :n], out["pos"][row, :n])
    for actor in actors:
        ray.kill(actor)
    return molecules


# --- outputs --------------------------------------------------------------------------------------

def publish(local_dir: str, out_url: str) -> None:
    """Copy the finished output folder to ``out_url`` (a no-op when it is that local folder)."""
    from datasets import storage
    fs, path = storage.get_fs(out_url)
    if storage.is_local(fs) and os.path.abspath(path) == os.path.abspath(local_dir):
        return
    for name in sorted(os.listdir(local_dir)):
        src = os.path.join(local_dir, name)
        if os.path.isfile(src):
            storage.retry(lambda: fs.put_file(src, storage.join(path, name)), f"uploading {name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from evals.pipeline import run
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
