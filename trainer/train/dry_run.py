"""``--dry-run``: the resolved plan of a run, printed before any process group or GPU is touched."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.datasets.shards.manifest import Manifest
from molscale.trainer.model.objectives import Objective
from molscale.trainer.train.config import RunConfig
from molscale.trainer.train.factory import build_run_model, make_loader
from molscale.trainer.train.loop import deepspeed_config

EDGE_TENSORS_PER_BLOCK = 8  # rough count of [pairs, hidden] tensors one EGNN block keeps for backward


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB"


def plan(cfg: RunConfig, manifest: Manifest | None, note: str | None = None) -> dict:
    """The plan of a run; ``manifest`` None (with ``note`` saying why) where the dataset is not reachable."""
    world = int(os.environ.get("WORLD_SIZE", cfg.cluster.nodes * cfg.cluster.gpus_per_node))
    out: dict = {"world_size": world, "nodes": cfg.cluster.nodes, "gpus_per_node": cfg.cluster.gpus_per_node}
    # without the dataset, plan with the config's vocabulary or QM9's (the parameter count barely depends on it)
    vocab = manifest.atom_vocab if manifest else (cfg.model.atom_vocab or list(QM9_ATOM_VOCAB))
    model_cfg = dataclasses.replace(cfg.model, atom_vocab=list(cfg.model.atom_vocab or vocab))
    n_props = len(cfg.model.property_columns)
    model = build_run_model(cfg, model_cfg, {"mean": [0.0] * n_props, "mad": [1.0] * n_props})
    params = sum(p.numel() for p in model.parameters())
    ga = cfg.deepspeed.gradient_accumulation_steps
    micro = cfg.data.batch_size
    manifest = cfg.data.training_view(manifest) if manifest else None
    max_atoms = manifest.max_atoms if manifest else None
    if micro:
        out["global_batch_molecules"] = micro * ga * world
        pairs = micro * (max_atoms or 29) ** 2
    else:
        out["global_batch"] = f"atom-pair budget {cfg.data.pair_budget:,} per micro-batch x {ga} x {world}"
        pairs = cfg.data.pair_budget
    if manifest:
        batches = len(make_loader(cfg, manifest, cfg.data.split, True, rank=0, world_size=world))
        out["train_molecules"] = manifest.count(cfg.data.split)
        out["optimizer_steps_per_epoch"] = math.ceil(batches / ga)
        out["epochs_in_max_steps"] = round(cfg.train.max_steps / max(1, math.ceil(batches / ga)), 2)
        if not micro:  # what loss.nominal_batch should be near, so that the loss keeps its usual scale
            out["mean_molecules_per_micro_batch"] = round(manifest.count(cfg.data.split) / world / max(1, batches), 1)
    else:
        out["optimizer_steps_per_epoch"] = f"unknown: {note}"
    zero = cfg.deepspeed.zero_stage
    shard = world if zero >= 1 else 1
    weights, grads = 4 * params, 4 * params / (world if zero >= 2 else 1)
    adam = (12 if cfg.optimizer.amsgrad else 8) * params / shard
    ema = 4 * params if cfg.optimizer.ema_decay > 0 else 0
    path_blocks = cfg.model.layers
    act_bytes = 2 if cfg.deepspeed.bf16 else 4
    activations = pairs * cfg.model.hidden * act_bytes * EDGE_TENSORS_PER_BLOCK * path_blocks
    out.update({
        "objective": cfg.objective + (" (pretraining: trunk = embed, shared, nucleation on UniGEM's inputs and "
                                      f"{cfg.diffusion.schedule} schedule; 3D + 2D scores, atom types "
                                      f"{'as targets' if cfg.pretrain.atom_types else 'unseen'}, contrastive "
                                      f"weight {cfg.pretrain.contrastive_weight})"
                                      if cfg.objective == Objective.MOLECULEJAE else ""),
        "init_from": cfg.init_from,
        "model": model.describe(),
        "hidden": cfg.model.hidden, "atom_types": len(vocab), "properties": cfg.model.properties,
        "condition_on": cfg.model.condition_on, "train_half": cfg.data.half,
        "parameters": params, "precision": "bf16 autocast, float32 weights" if cfg.deepspeed.bf16 else "float32",
        "zero_stage": zero, "max_steps": cfg.train.max_steps,
        "lr": _lr_plan(cfg, world),
        "optimizer_steps_per_batch": cfg.optimizer.steps_per_batch,
        "cuda_graphs": _graphs_plan(cfg, world),
        "loss_reduction": cfg.loss.reduction + (f", divided by {cfg.loss.nominal_batch} molecules whatever the batch"
                                                if cfg.loss.nominal_batch else ""),
        "memory_per_rank_estimate": {
            "weights+grads+optimizer+ema": _gib(weights + grads + adam + ema),
            "activations (rough, largest micro-batch)": _gib(activations),
        },
        "data": cfg.data.url, "run_dir": cfg.train.run_dir,
        "deepspeed_config": deepspeed_config(cfg, world),  # exactly what deepspeed.initialize gets, as JSON
    })
    return out


def _graphs_plan(cfg: RunConfig, world: int) -> str:
    """What train.cuda_graphs will replay (Trainer.__init__ decides the same way)."""
    scope = cfg.train.graph_scope_at(world)
    if scope != cfg.train.graph_scope:
        return (f"the network per batch shape: \"step\" (the whole step) runs at world size 1, this plan has "
                f"{world} ranks (CUDA devices only)")
    return {"off": "off", "network": "the network per batch shape (CUDA devices only)",
            "step": "the whole training step per batch shape, one memory pool (CUDA devices only)"}[scope]


def _lr_plan(cfg: RunConfig, world: int) -> str:
    o = cfg.optimizer
    lr = o.scaled_lr(cfg.global_batch(world))
    text = f"{lr:.3g}"
    if o.lr_scaling != "none":
        text += f" ({o.lr:g} x {o.lr_scaling} scaling from batch {o.lr_reference_batch} to {cfg.global_batch(world)})"
    return text + (f", linear warmup over {o.warmup_steps} steps" if o.warmup_steps else "")


def print_plan(cfg: RunConfig, manifest: Manifest | None, note: str | None = None) -> int:
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    p = plan(cfg, manifest, note)
    width = max(len(k) for k in p)
    print("dry run: nothing is trained\n")
    for k, v in p.items():
        print(f"  {k:<{width}}  {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0
