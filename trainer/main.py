"""Train a UniGEM or EDM model: the same command under every launcher.

    python trainer/main.py --config cluster/cpu_smoke.json                      # one process
    deepspeed --num_accelerators 2 trainer/main.py --config cluster/cpu_smoke.json
    deepspeed --hostfile cluster/hostfile.example trainer/main.py --config cluster/geom_64gpu.json
    torchrun --nproc_per_node 8 trainer/main.py --config cluster/qm9_8gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    del sys.path[0]  # trainer/ holds molscale.trainer's modules, not top-level ones
if importlib.util.find_spec("molscale") is None:  # a checkout without `pip install -e .`: serve it from here
    sys.modules["molscale"] = types.ModuleType("molscale")
    sys.modules["molscale"].__path__ = [os.path.dirname(_HERE)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Train a UniGEM (or EDM) 3D-molecule diffusion model with DeepSpeed. One JSON config decides "
                    "the run; the same flags work under `python`, `deepspeed` and `torchrun`.")
    p.add_argument("--config", required=True, help="run config (JSON), e.g. cluster/cpu_smoke.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.layers=4 --set data.url=s3://b/qm9 (repeatable)")
    p.add_argument("--run-dir", default=None, help="where checkpoints and logs go (default: train.run_dir)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue from the newest complete checkpoint in the run dir, if any; "
                        "or a checkpoint/run folder. Without it a run dir that holds checkpoints is refused")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: train.max_steps)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def load_inputs(args):
    """(config, manifest or None, note) of a start; every rank reads the same inputs and meets the same errors."""
    from molscale.datasets.errors import InputError
    from molscale.datasets.shards.manifest import ManifestError, load_manifest
    from molscale.trainer.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.train.run_dir = args.run_dir
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.dry_run:
        try:
            return cfg, load_manifest(cfg.data.url, cfg.storage), None
        except Exception as err:  # a dry run must work where the data is not reachable (a laptop, say)
            return cfg, None, f"dataset not reachable from here ({type(err).__name__}: {str(err)[:160]})"
    # The one read of the manifest in this process: the trainer, its loaders and validation get this object.
    try:
        return cfg, load_manifest(cfg.data.url, cfg.storage), None
    except ManifestError as err:
        hint = ""
        if cfg.data.url.rstrip("/").endswith("qm9-smoke"):
            hint = f"\nMake it with: python -m datasets build qm9 --limit 2000 --out {cfg.data.url}"
        raise InputError(f"dataset {cfg.data.url} is not available: {err}{hint}") from None


def run(args) -> int:
    from molscale.datasets.errors import MolscaleError
    try:
        cfg, manifest, note = load_inputs(args)
    except MolscaleError as err:
        err.all_ranks = True  # before any process group: the same on every rank
        raise
    if args.dry_run:
        from molscale.trainer.train.dry_run import print_plan
        return print_plan(cfg, manifest, note)

    from molscale.trainer.train.distributed import init_distributed, lost_rank_error
    init_distributed(cfg.train.collective_timeout_minutes)
    import torch.distributed as dist

    from molscale.trainer.train.loop import Trainer
    try:
        trainer = Trainer(cfg, cfg.train.run_dir, manifest, resume=args.resume)
        code = trainer.train(cfg.train.max_steps)
        dist.barrier()
    except MolscaleError as err:
        if getattr(err, "all_ranks", False):
            # every rank leaves here together: close the process group now, so that no communication thread is
            # still alive when the interpreter exits (that aborted a rank now and then: "terminate called
            # without an active exception", and the launcher reported that rank's signal, not exit code 2)
            dist.destroy_process_group()
        raise
    except RuntimeError as err:  # a rank that is gone makes the others' collectives fail: say so in one line
        lost = lost_rank_error(err, cfg.train.run_dir)
        if lost is None:
            raise
        raise lost from None
    dist.destroy_process_group()
    return code


def main(argv=None) -> int:
    """Exit codes: 0 done (also after a SIGTERM that saved a checkpoint), 2 bad input or config, 1 a failure
    while running. An error every rank meets (config, dataset, resume, ...) is printed once, by rank 0; one
    that a single rank meets (a storage failure, say) by that rank."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from molscale.datasets.errors import MolscaleError, report
    from molscale.trainer.train.config import ConfigError
    from molscale.trainer.train.distributed import launch_rank
    try:
        return run(args)
    except MolscaleError as err:
        rank = launch_rank()
        if getattr(err, "all_ranks", False):
            if rank != 0:
                return err.exit_code
            return report(err, "config error" if isinstance(err, ConfigError) else "error")
        return report(err, f"error (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "error")


if __name__ == "__main__":
    sys.exit(main())
