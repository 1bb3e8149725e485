"""Train a UniGEM or EDM model: the same command under every launcher.

    python trainer/main.py --config cluster/cpu_smoke.json                      # one process
    deepspeed --num_accelerators 2 trainer/main.py --config cluster/cpu_smoke.json
    deepspeed --hostfile cluster/hostfile trainer/main.py --config cluster/geom_64gpu.json
    torchrun --nproc_per_node 8 trainer/main.py --config cluster/qm9_8gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
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
                        "or a checkpoint/run folder")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: train.max_steps)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """One process group for every launch mode: plain python gets a world of one."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores; more threads than cores makes every rank crawl.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from molscale.trainer.train.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.run_dir:
        cfg.train.run_dir = args.run_dir
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.dry_run:
        from molscale.trainer.train.dry_run import print_plan
        return print_plan(cfg)

    from molscale.datasets.shards.manifest import ManifestError, load_manifest
    try:
        load_manifest(cfg.data.url, cfg.storage)  # a missing dataset fails here, before any process group
    except ManifestError as err:
        hint = ""
        if cfg.data.url.rstrip("/").endswith("qm9-smoke"):
            hint = f"\nMake it with: python -m datasets build qm9 --limit 2000 --out {cfg.data.url}"
        print(f"error: dataset {cfg.data.url} is not available: {err}{hint}", file=sys.stderr)
        return 2

    init_distributed()
    import torch.distributed as dist

    from molscale.trainer.train.engine import NonFiniteLossError, Trainer, write_config
    if dist.get_rank() == 0:
        write_config(cfg, cfg.train.run_dir)
    trainer = Trainer(cfg, cfg.train.run_dir, resume=args.resume)
    try:
        code = trainer.train(cfg.train.max_steps)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 3
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
