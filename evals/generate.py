"""Sample molecules from a checkpoint across a Ray cluster and evaluate them (or evaluate real data).

    python evals/generate.py --checkpoint RUN_DIR --n-samples 10000 --out OUT      # local Ray
    ray job submit --working-dir . -- python evals/generate.py --checkpoint /abs/RUN_DIR --out OUT
    python evals/generate.py --dataset data/qm9 --split test --out OUT             # the "data" row
    python evals/generate.py --molecules other_model.sdf --reference data/qm9 --out OUT   # molecules from elsewhere

Sampling actors load the EMA model once (one GPU each where there are GPUs) and sample chunks of
similar-sized molecules; atom counts come from the train histogram stored in the checkpoint, and the
sorted molecules are cut into chunks by an atom-pair budget (--pair-budget, or --batch molecules of the
mean size). Every chunk has its own seed, derived from --seed and the chunk's index, so the molecules
depend on --seed (and the budget) and not on how many workers there are. Metric work fans out as Ray tasks.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import types

SAMPLING_PRECISIONS = ("fp32", "tf32", "bf16")  # the network's matrix products while sampling (--precision)
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    del sys.path[0]  # evals/ holds molscale.evals' modules, not top-level ones
if importlib.util.find_spec("molscale") is None:  # a checkout without `pip install -e .`: serve it from here
    sys.modules["molscale"] = types.ModuleType("molscale")
    sys.modules["molscale"].__path__ = [os.path.dirname(_HERE)]


def _steps_list(text: str) -> list[int]:
    try:  # their values are checked with the rest of the configuration (eval_config.SamplingSettings)
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers such as 1000 or 1000,100,25") from None


def parse_args(argv=None):
    from molscale.evals.eval_config import SAMPLING_GRAPHS, EvalConfig, SamplingSettings
    from molscale.trainer.model.egnn import KERNELS
    from molscale.trainer.model.sampling import GUIDE_FROM, GUIDE_ON, GUIDE_ON_DEFAULT, GUIDE_SCALE, SAMPLERS
    p = argparse.ArgumentParser(
        prog="evals/generate.py",
        description="Generate molecules from a trained checkpoint over a Ray cluster and compute the EDM-protocol "
                    "and distribution metrics (or compute them for a split of real molecules with --dataset). "
                    "Joins the cluster in RAY_ADDRESS (or the job's cluster) and starts a local one otherwise.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory (its latest checkpoint) or a checkpoint folder")
    src.add_argument("--dataset", help="dataset folder or URL: evaluate its real molecules (the 'data' row)")
    src.add_argument("--molecules", metavar="FILE",
                     help="evaluate the 3D molecules of an SDF or XYZ file (another model's samples, say) with the "
                          "same metrics and outputs; records that cannot be read are counted and listed in "
                          "metrics.json. Novelty and the distribution metrics need --reference")
    p.add_argument("--out", required=True,
                   help="output folder or URL (s3://...): metrics.json, samples.sdf, plots, report.html")
    p.add_argument("--n-samples", type=int, default=SamplingSettings.n_samples,
                   help="molecules to generate (default 10,000, the standard run)")
    p.add_argument("--batch", type=int, default=SamplingSettings.batch,
                   help="molecules per sampling chunk (one actor call) on average (default 250): chunks are cut by "
                        "an atom-pair budget of what this many molecules of the train histogram's mean size cost "
                        "(mean N^2), so chunks of small molecules hold more and chunks of large ones fewer")
    p.add_argument("--pair-budget", type=int, default=None, metavar="PAIRS",
                   help="atom pairs per sampling chunk (a chunk of B molecules padded to N atoms costs B * N^2); "
                        "default: from --batch. The molecules are sorted by size and each chunk takes the next "
                        "while its cost stays within the budget, so it is padded only to its own largest molecule")
    p.add_argument("--steps", type=_steps_list, default=None, metavar="K[,K2,...]",
                   help="denoising steps K, one network evaluation each, on a grid respaced evenly over the T "
                        "diffusion steps and holding UniGEM's t_n (default: all T); every sampler adds one read-out "
                        "evaluation at t = 0. Several (--steps 1000,100,25): sample the same molecules at each K and "
                        "add the quality-against-steps table and plot to the report (outputs are the first K's)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=SamplingSettings.sampler,
                   help="ancestral (EDM's stochastic sampler; default), ddim (deterministic DDIM, eta 0) or dpm2m "
                        "(DPM-Solver++(2M), deterministic, second order, one evaluation per step); quality against "
                        "steps in BENCHMARKS.md")
    p.add_argument("--guide", metavar="PROPERTY=VALUE", default=None,
                   help="steer sampling toward a property value (dataset units) with the gradient of the model's own "
                        "growth-branch property head (classifier guidance, no retraining; UniGEM with that property)")
    p.add_argument("--guide-scale", type=float, default=GUIDE_SCALE,
                   help=f"guidance strength: 1 / variance of the Gaussian likelihood of the target in normalised "
                        f"property units (default {GUIDE_SCALE:g}, measured in BENCHMARKS.md). 0 samples without "
                        f"guidance but still reports the distance to the target: the control arm")
    p.add_argument("--guide-from", type=int, default=None, metavar="T0",
                   help=f"guide at every step with t <= T0 (default {GUIDE_FROM} with --guide-on noisy, 100 with "
                        f"clean; with noisy, steps above t_n read the growth branch outside the times it was trained "
                        f"on and cost one more network evaluation each; the growth phase alone moves the molecules "
                        f"little)")
    p.add_argument("--guide-on", choices=GUIDE_ON, default=GUIDE_ON_DEFAULT,
                   help="where guidance reads the property head: 'clean' (default) at the clean molecule the "
                        "network predicts from x_t, with the head at t = 0 where it was trained, as the released "
                        "UniGEM guides (default --guide-from 100), or 'noisy' at the noisy coordinates x_t (the "
                        "head was trained for t <= t_n only; default --guide-from 300). Measured against each other "
                        "in BENCHMARKS.md: not separable in quality, 'clean' faster. metrics.json 'guidance' "
                        "reports how often the push was capped (cap_fraction)")
    p.add_argument("--target", metavar="PROPERTY=VALUE", default=None,
                   help="a conditional checkpoint (model.condition_on): give every molecule this target (dataset "
                        "units; atom counts from the train histogram). Default: (atom count, value) pairs of real "
                        "train molecules of the checkpoint's dataset (or --reference), from the half it trained on "
                        "(data.half) when it trained on one, as EDM evaluates")
    p.add_argument("--scorer", default=None, metavar="CHECKPOINT",
                   help="an independently trained property predictor (run directory or exported file): a property "
                        "classifier (objective property, EDM's scorer: reads atom types and positions) or a UniGEM "
                        "with model.properties (reads positions only). It predicts the guided "
                        "or conditioned property of the generated molecules. With --guide: its MAE to the target "
                        "next to the guiding model's own (metrics.json 'guidance'). With a conditional checkpoint: "
                        "EDM's protocol, a predictor trained on the other half of the train split (data.half); "
                        "metrics.json 'conditional' holds the MAE between targets and its predictions, with the "
                        "reference rows 'real molecules' and 'shuffled targets' on the --reference-split")
    p.add_argument("--unconditional-baseline", default=None, metavar="CHECKPOINT",
                   help="with a conditional checkpoint and --scorer: also sample this unconditional model for the "
                        "same atom counts (same seed and sampler) and score it against the same targets with the "
                        "same scorer (metrics.json conditional 'unconditional_mae'): the like-for-like version of "
                        "EDM's #Atoms row, what the atom counts alone give once the scorer's own error is in both "
                        "rows")
    p.add_argument("--seed", type=int, default=SamplingSettings.seed,
                   help="the samples depend on this and nothing else")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint whose states file pickles more than tensors and plain data (refused "
                        "by default: unpickling it runs code from the file). Only for files you trust, as GEOM's "
                        "--trust-pickle")
    p.add_argument("--cuda-graphs", nargs="?", const="network", default=SamplingSettings.cuda_graphs,
                   choices=SAMPLING_GRAPHS,
                   help="on GPU samplers, replay CUDA graphs captured per chunk shape: 'network' (the bare flag) the "
                        "network; 'step' each whole denoising step (network, update and noise: one launch a step; "
                        "guided sampling runs as 'network'). Fewer "
                        "launches; helps small chunks, where the GPU waits on the host. The same molecules either "
                        "way; CPU samplers run the same steps without graphs")
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, default=SamplingSettings.precision,
                   help="the network's matrix products while sampling: fp32 (as the research code samples; default), "
                        "tf32 (TF32 tensor cores on GPUs) or bf16 (autocast, as bf16 training; coordinates stay "
                        "fp32). Speeds and a small CPU quality comparison in BENCHMARKS.md")
    p.add_argument("--kernel", choices=list(KERNELS), default=None,
                   help="how the samplers run the EGNN blocks: eager, compiled (torch.compile) or fused (Triton edge "
                        "kernels, on CUDA GPUs; elsewhere they run eagerly with one log line). Default: as the model "
                        "was trained (model.kernel)")
    p.add_argument("--workers", type=int, default=None,
                   help="sampling actors (default: one per GPU, else one per CPU of the cluster)")
    p.add_argument("--split", default="test", help="with --dataset: the split to evaluate (default test)")
    p.add_argument("--reference", default=None,
                   help="dataset for novelty and the distribution metrics (default: the checkpoint's or --dataset's; "
                        "none with --molecules)")
    p.add_argument("--reference-split", default=EvalConfig.reference_split,
                   help="split the distribution metrics compare with")
    p.add_argument("--property", action="store_true",
                   help="also report property MAEs: with --checkpoint, the model's (UniGEM with properties) on the "
                        "--reference-split; with --dataset, the train-mean baseline on --split. Either way in "
                        "dataset units, next to that baseline")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    p.add_argument("--wandb-project", default=None, help="default: WANDB_PROJECT, the training run's, molscale-evals")
    return p.parse_args(argv)


def eval_config(args):
    """The command line as the frozen, checked EvalConfig that everything below this entry point reads."""
    from molscale.evals.eval_config import (
        EvalConfig,
        FromFile,
        FromModel,
        FromSplit,
        GuideRequest,
        SamplingSettings,
        parse_targets,
    )
    source = (FromModel(args.checkpoint) if args.checkpoint else FromFile(args.molecules) if args.molecules
              else FromSplit(args.dataset, args.split))
    sampling = SamplingSettings(
        n_samples=args.n_samples, batch=args.batch, pair_budget=args.pair_budget,
        steps=tuple(args.steps) if args.steps is not None else None, sampler=args.sampler, seed=args.seed,
        workers=args.workers, cuda_graphs=args.cuda_graphs, precision=args.precision, kernel=args.kernel)
    guide = (GuideRequest.parse(args.guide, args.guide_scale, args.guide_from, args.guide_on)
             if args.guide is not None else None)
    return EvalConfig(source=source, out=args.out, sampling=sampling, guide=guide,
                      targets=parse_targets(args.target) if args.target is not None else None,
                      scorer=args.scorer, unconditional_baseline=args.unconditional_baseline,
                      reference=args.reference, reference_split=args.reference_split,
                      property_mae=args.property, num_cpus=args.num_cpus, wandb=not args.no_wandb,
                      wandb_project=args.wandb_project)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trust_pickle:  # through the environment, so that the Ray workers that load the checkpoint trust it too
        os.environ["MOLSCALE_TRUST_PICKLE"] = "1"
    from molscale.datasets.errors import MolscaleError, report
    from molscale.evals.pipeline import run
    try:
        return run(eval_config(args))
    except MolscaleError as err:  # 2: bad arguments, dataset or checkpoint; 1: failed while running
        return report(err)        # anything else is a bug and keeps its traceback


if __name__ == "__main__":
    sys.exit(main())
