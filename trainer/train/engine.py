"""The training loop: one Trainer owns data, model, DeepSpeed engine, EMA, clipping, checkpoints, logs.

Every resumable piece is a state provider: the DeepSpeed engine (weights, optimizer), the EMA,
the clipping history and counters (client state, identical on all ranks), and per rank the data
loader position and the RNG states. A resumed run therefore continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from molscale.datasets.shards.manifest import load_manifest
from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.train import checkpoints, init_from
from molscale.trainer.train.clipping import AdaptiveClipper
from molscale.trainer.train.config import RunConfig
from molscale.trainer.train.ema import EMA
from molscale.trainer.train.run_log import NullLogger, RunLogger

log = logging.getLogger("trainer")


class NonFiniteLossError(RuntimeError):
    pass


def model_config(cfg: RunConfig, atom_vocab: list[int]) -> ModelConfig:
    m, d = cfg.model, cfg.diffusion
    return ModelConfig(kind=m.kind, hidden=m.hidden, layers=m.layers, shared_blocks=m.shared_blocks,
                       t_nucleation=m.t_nucleation, num_steps=d.num_steps, schedule=d.schedule,
                       precision=d.precision, atom_vocab=list(atom_vocab), properties=list(m.properties),
                       include_charges=m.include_charges)


def build_run_model(cfg: RunConfig, model_cfg: ModelConfig, prop_mean=None, prop_mad=None) -> torch.nn.Module:
    """The model the run's objective trains: UniGEM/EDM diffusion, or the MoleculeJAE pretraining model."""
    if cfg.objective == "moleculejae":
        from molscale.trainer.model.pretraining import MoleculeJAE
        return MoleculeJAE(model_cfg, cfg.pretrain)
    return build_model(model_cfg, prop_mean, prop_mad)


def loader_config(cfg: RunConfig, split: str, shuffle: bool = True) -> LoaderConfig:
    """The data loader's settings for ``split`` of a run (training, validation and --dry-run agree)."""
    d = cfg.data
    return LoaderConfig(url=d.url, split=split, batch_size=d.batch_size, pair_budget=d.pair_budget,
                        bucket_bounds=tuple(d.bucket_bounds), shuffle=shuffle, shuffle_buffer=d.shuffle_buffer,
                        seed=cfg.train.seed, num_workers=d.num_workers, max_bad_shards=d.max_bad_shards,
                        properties=tuple(cfg.model.properties), storage=cfg.storage,
                        with_bonds=cfg.objective == "moleculejae")  # the 2D channels of pretraining


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    ds = cfg.deepspeed
    micro = cfg.data.batch_size or 1  # with pair budgets the molecule count varies; DS only logs it
    out = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": micro * ds.gradient_accumulation_steps * world_size,
        "zero_optimization": {"stage": ds.zero_stage},
        "gradient_clipping": 0.0,  # the Trainer clips (adaptive threshold, see Trainer._clip)
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if ds.bf16:
        # Autocast keeps float32 weights, geometry and reductions; DeepSpeed's "bf16" mode would cast
        # every weight and coordinate to bf16 (see DESIGN.md, Numerics).
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    out.update(ds.extra)
    return out


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str, resume: str | None = None):
        import deepspeed

        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if torch.cuda.is_available() else torch.device("cpu")
        seed = cfg.train.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

        manifest = load_manifest(cfg.data.url, cfg.storage)
        vocab = cfg.model.atom_vocab or manifest.atom_vocab
        if vocab != manifest.atom_vocab:
            raise ValueError(f"model.atom_vocab {vocab} differs from the dataset's {manifest.atom_vocab}")
        stats = manifest.property_stats()
        missing = [p for p in cfg.model.properties if p not in stats]
        if missing:
            raise ValueError(f"model.properties {missing} have no statistics in {cfg.data.url}")
        prop_mean = [stats[p]["mean"] for p in cfg.model.properties]
        prop_mad = [stats[p]["mad"] for p in cfg.model.properties]
        self.prop_stats = {"mean": prop_mean, "mad": prop_mad}
        self.histogram = manifest.atom_count_histogram(cfg.data.split)
        self.model_cfg = model_config(cfg, vocab)
        model = build_run_model(cfg, self.model_cfg, prop_mean or None, prop_mad or None)
        self.num_params = sum(p.numel() for p in model.parameters())
        found = checkpoints.find_resume(run_dir, resume)
        self.init_report = None
        if cfg.init_from and not found:
            # before DeepSpeed wraps (and ZeRO partitions) the model; every rank loads the same tensors
            self.init_report = init_from.initialise(model, cfg.init_from)
            if self.rank == 0:
                log.info(init_from.summary(self.init_report))
                init_from.write_report(self.init_report, run_dir)
        elif cfg.init_from and self.rank == 0:
            log.info("init_from %s ignored: resuming this run from its own checkpoint", cfg.init_from)

        self.loader = self._loader(manifest, cfg.data.split, shuffle=True)
        self.valid_loader = self._loader(manifest, cfg.data.valid_split, shuffle=False) \
            if cfg.evaluation.every_steps and cfg.data.valid_split in manifest.splits else None
        # Validation reads the first batches of the split every time: it restarts from this state.
        self._valid_start = self.valid_loader.state_dict() if self.valid_loader else None

        o = cfg.optimizer
        trainable = [p for p in model.parameters() if p.requires_grad]  # MoleculeJAE freezes a few
        optimizer = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay, amsgrad=o.amsgrad,
                                      betas=tuple(o.betas))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg, self.world_size))
        self.model = self.engine.module
        self.ema = EMA(self.model, o.ema_decay) if o.ema_decay > 0 else None
        self.clipper = AdaptiveClipper(o.clip_history)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False

        if found:
            self._load(*found)
        self.logger = RunLogger(run_dir, cfg.to_dict(), cfg.logging.wandb, self.step if found else None) \
            if self.rank == 0 else NullLogger()

    def _loader(self, manifest, split, shuffle):
        return StreamingLoader(loader_config(self.cfg, split, shuffle), rank=self.rank, world_size=self.world_size,
                               manifest=manifest)

    # --- state -------------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "ema": self.ema.state_dict() if self.ema else None,
                "clipper": self.clipper.state_dict(), "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row,
                # what evaluation needs to rebuild the model without the run config or the dataset
                "model_config": dict(vars(self.model_cfg)), "prop_stats": self.prop_stats,
                "objective": self.cfg.objective,
                "atom_count_histogram": self.histogram, "dataset_url": self.cfg.data.url}

    def rank_state(self) -> dict:
        return {"loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}

    def _load(self, root: str, tag: str) -> None:
        client, mine = checkpoints.load(self.engine, root, tag)
        self.step = client["step"]
        if self.ema and client.get("ema"):
            self.ema.load_state_dict(client["ema"])
        self.clipper.load_state_dict(client["clipper"])
        self.nonfinite_total = client["nonfinite_total"]
        self.nonfinite_in_row = client["nonfinite_in_row"]
        self.loader.load_state_dict(mine["loader"])
        torch.set_rng_state(mine["torch_rng"])
        if mine.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda_rng"])
        np.random.set_state(mine["numpy_rng"])
        random.setstate(mine["python_rng"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", os.path.join(root, tag), self.step)

    def save(self) -> str:
        tag = checkpoints.save(self.engine, self.run_dir, self.step, self.client_state(), self.rank_state(),
                                 self.cfg.checkpoint.keep_last)
        if self.rank == 0:
            log.info("checkpoint %s", os.path.join(self.run_dir, tag))
        return tag

    # --- the loop ----------------------------------------------------------------------------
    def _batches(self):
        while True:
            for batch in self.loader:
                yield batch

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batches) -> dict | None:
        """One optimizer step (gradient accumulation included); None when the step was skipped."""
        ga = self.cfg.deepspeed.gradient_accumulation_steps
        start = time.perf_counter()
        wait = 0.0
        totals: dict[str, float] = {}
        molecules = 0
        threshold, grad_norm = 0.0, None
        for _ in range(ga):
            t0 = time.perf_counter()
            batch = self._to_device(next(batches))
            wait += time.perf_counter() - t0
            losses = self.engine(batch)
            names = sorted(losses)
            values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
            # One all-reduce carries the non-finite flag, the stop request and the loss terms, so that
            # every rank takes the same decision in the same step.
            flags = torch.tensor([float(not torch.isfinite(values).all()), float(self.stop_requested)],
                                 device=values.device)
            packed = torch.cat([flags, torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)])
            dist.all_reduce(packed)
            if packed[1] > 0:
                self.stop_requested = True
            if packed[0] > 0:
                self.nonfinite_total += 1
                self.nonfinite_in_row += 1
                if self.rank == 0:
                    log.warning("step %d: non-finite loss on %d rank(s); skipped (%d in a row)",
                                self.step + 1, int(packed[0]), self.nonfinite_in_row)
                if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step + 1} "
                        f"(limit train.max_nonfinite_in_row); a checkpoint of the last good state was saved. "
                        f"Lower optimizer.lr or check the data.")
                return None
            self.nonfinite_in_row = 0
            self.engine.backward(losses["loss"])
            if self.engine.is_gradient_accumulation_boundary():
                threshold, grad_norm = self._clip()
            self.engine.step()
            for k, v in zip(names, (packed[2:] / self.world_size).tolist()):
                totals[k] = totals.get(k, 0.0) + v / ga
            molecules += int(batch["num_atoms"].shape[0])
        if grad_norm is None:
            grad_norm = float(self.engine.get_global_grad_norm())
        if self.cfg.optimizer.clip == "adaptive":
            self.clipper.push(grad_norm, threshold)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        seconds = time.perf_counter() - start
        return {"step": self.step, "epoch": self.loader.epoch, **totals,
                "lr": self.engine.get_lr()[0], "grad_norm": grad_norm,
                "clip_threshold": threshold if self.cfg.optimizer.clip == "adaptive" else None,
                "molecules_per_s": molecules * self.world_size / seconds, "data_wait_s": wait,
                "step_time_s": seconds, "nonfinite_skipped": self.nonfinite_total}

    def _clip(self) -> tuple[float, float | None]:
        """Apply this step's clipping threshold; (threshold, gradient norm before clipping or None).

        Without ZeRO the averaged gradients sit in ``p.grad`` after backward, so they are clipped here;
        with ZeRO they live in DeepSpeed's partitioned buffers, so the threshold is handed to its
        optimizer, which reports the norm after the step.
        """
        threshold = self.clipper.threshold() if self.cfg.optimizer.clip == "adaptive" else 0.0
        if self.cfg.deepspeed.zero_stage == 0:
            max_norm = threshold if threshold > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            return threshold, float(norm)
        self.engine.optimizer.clip_grad = threshold
        return threshold, None

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss on the validation split (EMA weights) and, for UniGEM with properties, the MAE in
        dataset units; averaged over ranks."""
        from molscale.trainer.model.sampling import predict_properties
        sums = torch.zeros(2 + len(self.cfg.model.properties), dtype=torch.float64)
        generator = torch.Generator().manual_seed(1234 + self.rank)
        self.valid_loader.load_state_dict(self._valid_start)
        ctx = self.ema.applied_to(self.model) if self.ema else _nullcontext(self.model)
        with ctx as model:
            model.eval()
            for i, batch in enumerate(self.valid_loader):
                if self.cfg.evaluation.max_batches and i >= self.cfg.evaluation.max_batches:
                    break
                batch = self._to_device(batch)
                n = batch["num_atoms"].shape[0]
                sums[0] += float(model(batch, generator=generator)["loss"]) * n
                sums[1] += n
                if self.cfg.model.properties:
                    pred = predict_properties(model, batch)
                    sums[2:] += (pred - batch["props"]).abs().sum(0).double().cpu()
            model.train()
        dist.all_reduce(sums)
        out = {"valid/loss": float(sums[0] / sums[1])}
        for i, name in enumerate(self.cfg.model.properties):
            out[f"valid/mae_{name}"] = float(sums[2 + i] / sums[1])
        return out

    def train(self, max_steps: int) -> int:
        """Train until ``max_steps``; returns the process exit code (0, also after preemption)."""
        from tqdm import tqdm
        signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.rank != 0 or not self.cfg.logging.progress_bar)
        batches = self._batches()
        try:
            while self.step < max_steps:
                try:
                    record = self.train_step(batches)
                except NonFiniteLossError:
                    self.save()
                    raise
                if record is None:
                    if self.stop_requested:
                        break
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", mol_s=f"{record['molecules_per_s']:.0f}")
                every = self.cfg.evaluation.every_steps
                if self.valid_loader is not None and every and self.step % every == 0:
                    record.update(self.validate())
                if self.step % self.cfg.logging.every_steps == 0 or self.step == max_steps:
                    self.logger.log(record)
                if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == max_steps:
                    self.save()
                if self.stop_requested:
                    break
            if self.stop_requested:
                if not os.path.exists(os.path.join(self.run_dir, checkpoints.tag_for(self.step), "complete")):
                    self.save()
                if self.rank == 0:
                    log.warning("stopped by SIGTERM at step %d; checkpoint saved, resume with --resume auto",
                                self.step)
            return 0
        finally:
            bar.close()
            self.logger.close()

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True  # acted upon at the end of the current step, on every rank together


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def write_config(cfg: RunConfig, run_dir: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
