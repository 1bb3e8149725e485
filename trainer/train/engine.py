"""The training loop: one Trainer owns data, model, DeepSpeed engine, EMA, clipping, checkpoints, logs.

Every resumable piece is a state provider: the DeepSpeed engine (weights, optimizer), the EMA,
the clipping history and counters (client state, identical on all ranks), and per rank the data
loader position and the RNG states. A resumed run therefore continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from molscale.datasets.errors import MolscaleError, RunError
from molscale.datasets.shards.manifest import Manifest
from molscale.trainer.train import checkpoints, init_from
from molscale.trainer.train.clipping import AdaptiveClipper
from molscale.trainer.train.config import RunConfig
from molscale.trainer.train.distributed import accelerator, raise_if_any_rank_failed, run_device
from molscale.trainer.train.ema import EMA
from molscale.trainer.train.objective import build_run_model, make_loader, property_normalisation, resolved_model_config
from molscale.trainer.train.run_log import NullLogger, RunLogger

log = logging.getLogger("trainer")


class NonFiniteLossError(RunError):
    all_ranks = True  # decided by an all-reduce: every rank raises it in the same step


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The config handed to deepspeed.initialize (``--dry-run`` prints it); ``deepspeed.extra`` is deep-merged
    last, its keys that molscale owns having been refused when the config was loaded (config.py)."""
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
        # every weight and coordinate to bf16 (see docs/numerics.md). By default ZeRO would reduce the
        # gradients of Linear/Conv layers in bf16: deepspeed/runtime/torch_autocast.py, init_autocast_params,
        # sets `comm_dtype` on the parameters of "lower_precision_safe_modules", which zero/stage_1_and_2.py
        # buckets by (BaseOptimizer.get_param_comm_dtype). An empty list marks none: all reduced in float32.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return _deep_merge(out, ds.extra)


def warmup_factor(warmup_steps: int):
    """lr multiplier of optimizer step k (0-based): a linear ramp to 1 over ``warmup_steps`` steps (gradual warmup,
    Goyal et al. 2017), then 1."""
    return lambda step: min(1.0, (step + 1) / warmup_steps)


def _deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, nested objects merged key by key (so zero_optimization keeps its stage)."""
    out = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _deep_merge(out[key], value) if both_dicts else value
    return out


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str, manifest: Manifest, resume: str | None = None):
        """``manifest``: the dataset's, read once by the caller. Everything that can be wrong with the input
        (resume path, vocabulary, property statistics, split sizes) is checked on every rank before the first
        collective; if any rank finds a problem, every rank raises it (see distributed.py)."""
        import deepspeed

        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = run_device()  # the engine's device; every tensor a collective gets lives there
        if self.device.type == "cuda" and not cfg.deepspeed.bf16:
            # fp32 runs: TF32 tensor cores for the matrix products (10-bit mantissa inputs, fp32 accumulation),
            # as PyTorch recommends for Ampere and later; coordinates and reductions are not matmuls
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed = cfg.train.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

        problem = None
        try:
            model = self._prepare(manifest, resume)
        except MolscaleError as err:
            problem = err
        raise_if_any_rank_failed(problem)

        o = cfg.optimizer
        trainable = [p for p in model.parameters() if p.requires_grad]  # MoleculeJAE freezes a few
        self.lr = o.scaled_lr(cfg.global_batch(self.world_size))
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=o.weight_decay, amsgrad=o.amsgrad,
                                      betas=tuple(o.betas))
        # DeepSpeed steps the scheduler with every optimizer step and keeps its state in the checkpoints
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(o.warmup_steps)) \
            if o.warmup_steps else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(cfg, self.world_size))
        self.model = self.engine.module
        if cfg.train.cuda_graphs:
            if self.device.type == "cuda":
                self.model.use_cuda_graphs()
            else:
                log.info("train.cuda_graphs applies to CUDA devices; this run is on %s and runs eagerly", self.device)
        self.ema = EMA(self.model, o.ema_decay) if o.ema_decay > 0 else None
        self.clipper = AdaptiveClipper(o.clip_history)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False  # every rank's decision, from the all-reduce
        self._sigterm = False  # this rank was signalled (the handler sets it at any moment)

        if self.resume_from:
            problem = None
            try:
                self._load(*self.resume_from)
            except MolscaleError as err:  # e.g. a data-loader position saved with another world size
                problem = err
            raise_if_any_rank_failed(problem)
        self.logger = RunLogger(run_dir, cfg.to_dict(), cfg.logging.wandb, self.step if self.resume_from else None) \
            if self.rank == 0 else NullLogger()

    def _prepare(self, manifest: Manifest, resume: str | None) -> torch.nn.Module:
        """The model (initialised, not yet wrapped) and the loaders; raises MolscaleError on bad input."""
        cfg = self.cfg
        manifest = cfg.data.training_view(manifest)  # data.half: the half this run trains on
        self.model_cfg = resolved_model_config(cfg, manifest.atom_vocab)
        self.prop_stats = property_normalisation(cfg, manifest)
        self.histogram = manifest.atom_count_histogram(cfg.data.split)
        model = build_run_model(cfg, self.model_cfg, self.prop_stats)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.resume_from = checkpoints.find_resume(self.run_dir, resume)
        self.init_report = None
        if cfg.init_from and not self.resume_from:
            # before DeepSpeed wraps (and ZeRO partitions) the model; every rank loads the same tensors
            self.init_report = init_from.initialise(model, cfg.init_from)
            if self.rank == 0:
                log.info(init_from.summary(self.init_report))
                init_from.write_report(self.init_report, self.run_dir)
        elif cfg.init_from and self.rank == 0:
            log.info("init_from %s ignored: resuming this run from its own checkpoint", cfg.init_from)

        self.loader = make_loader(cfg, manifest, cfg.data.split, True, self.rank, self.world_size)
        self.valid_loader = make_loader(cfg, manifest, cfg.data.valid_split, False, self.rank, self.world_size) \
            if cfg.evaluation.every_steps and cfg.data.valid_split in manifest.splits else None
        # Validation reads the first batches of the split every time: it restarts from this state.
        self._valid_start = self.valid_loader.state_dict() if self.valid_loader else None
        return model

    # --- state -------------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "ema": self.ema.state_dict() if self.ema else None,
                "clipper": self.clipper.state_dict(), "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row,
                # what evaluation needs to rebuild the model without the run config or the dataset
                "model_config": dataclasses.asdict(self.model_cfg),
                "diffusion_config": dataclasses.asdict(self.cfg.diffusion), "prop_stats": self.prop_stats,
                "objective": self.cfg.objective,
                "atom_count_histogram": self.histogram, "dataset_url": self.cfg.data.url,
                "wandb": self.logger.identity()}  # the W&B run, so that evaluation joins its project and group

    def rank_state(self) -> dict:
        # the device's generator draws the training noise; on the CPU accelerator it is torch_rng itself
        device_rng = accelerator().get_rng_state() if self.device.type != "cpu" else None
        return {"loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(), "device_rng": device_rng,
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
        if mine.get("device_rng") is not None and self.device.type != "cpu":
            accelerator().set_rng_state(mine["device_rng"])
        np.random.set_state(mine["numpy_rng"])
        random.setstate(mine["python_rng"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", os.path.join(root, tag), self.step)

    def save(self) -> str:
        tag = checkpoints.save(self.engine, self.run_dir, self.step, self.client_state(), self.rank_state(),
                               self.cfg.checkpoint.keep_last)
        if self.rank == 0:
            log.info("checkpoint %s", os.path.join(self.run_dir, tag))
            self.logger.log_checkpoint(os.path.join(self.run_dir, tag), self.step)
        return tag

    # --- the loop ----------------------------------------------------------------------------
    def _batches(self):
        while True:
            for batch in self.loader:
                yield batch

    def _to_device(self, batch: dict) -> dict:
        # from pinned (page-locked) host memory a non_blocking copy is truly asynchronous; from pageable memory
        # it would make the host wait for the device
        pin = self.device.type == "cuda"
        return {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _read(self, value):
        """The loop's reads of device values on the host, counted: each stalls the host until the device has
        caught up, so a step makes one per micro-batch (the all-reduced flags and losses) and one for the
        gradient norm, and the count is logged as ``host_reads``."""
        if not torch.is_tensor(value):
            return value
        self.host_reads += 1
        return value.tolist()

    def train_step(self, batches) -> dict | None:
        """One optimizer step (gradient accumulation included); None when the step was skipped."""
        ga = self.cfg.deepspeed.gradient_accumulation_steps
        self.host_reads = 0
        start = time.perf_counter()
        wait = 0.0
        totals: dict[str, float] = {}
        molecules = 0
        threshold, grad_norm = 0.0, None
        lr = self.engine.get_lr()[0]  # the rate this step uses (the schedule moves on in engine.step)
        for _ in range(ga):
            t0 = time.perf_counter()
            batch = self._to_device(next(batches))
            wait += time.perf_counter() - t0
            if self.cfg.loss.reduction == "reference" and self.world_size > 1:
                batch["reference_atoms"] = self._global_largest_molecule(batch)
            losses = self.engine(batch)
            names = sorted(losses)
            values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
            # One all-reduce carries the non-finite flag, the stop request and the loss terms, so that
            # every rank takes the same decision in the same step; all three are made on the device (new_full
            # passes the host flag as a kernel argument: no copy) and read back once.
            nonfinite = (~torch.isfinite(values)).any().to(values.dtype).reshape(1)
            stop = values.new_full((1,), float(self._sigterm))
            packed = torch.cat([nonfinite, stop, torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)])
            dist.all_reduce(packed)
            packed = self._read(packed)
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
                for _ in range(self.cfg.optimizer.steps_per_batch - 1):
                    # the released code's repeated optim.step() on the same (clipped, averaged) gradients;
                    # engine.step() below makes the last one, steps the lr schedule and zeroes the gradients
                    self.engine.optimizer.step()
            self.engine.step()
            for k, v in zip(names, packed[2:]):
                totals[k] = totals.get(k, 0.0) + v / self.world_size / ga
            molecules += int(batch["num_atoms"].shape[0])
        grad_norm = float(self._read(grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()))
        if self.cfg.optimizer.clip == "adaptive":
            self.clipper.push(grad_norm, threshold)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        seconds = time.perf_counter() - start
        return {"step": self.step, "epoch": self.loader.epoch, **totals,
                "lr": lr, "grad_norm": grad_norm,
                "clip_threshold": threshold if self.cfg.optimizer.clip == "adaptive" else None,
                "molecules_per_s": molecules * self.world_size / seconds, "data_wait_s": wait,
                "step_time_s": seconds, "nonfinite_skipped": self.nonfinite_total, "host_reads": self.host_reads}

    def _global_largest_molecule(self, batch: dict) -> torch.Tensor:
        """The largest molecule over every rank's micro-batch (an all-reduce on the device, nothing read on the
        host): the reference reduction's padded size is that of the global batch, as in the released code."""
        largest = batch["num_atoms"].max().to(torch.float32).reshape(1)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return largest[0]

    def _clip(self) -> tuple[float, torch.Tensor | None]:
        """Apply this step's clipping threshold; (threshold, gradient norm before clipping, on the device, or None).

        Without ZeRO the averaged gradients sit in ``p.grad`` after backward, so they are clipped here;
        with ZeRO they live in DeepSpeed's partitioned buffers, so the threshold is handed to its
        optimizer, which reports the norm after the step.
        """
        threshold = self.clipper.threshold() if self.cfg.optimizer.clip == "adaptive" else 0.0
        if self.cfg.deepspeed.zero_stage == 0:
            max_norm = threshold if threshold > 0 else float("inf")
            return threshold, torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.engine.optimizer.clip_grad = threshold
        return threshold, None

    @torch.no_grad()
    def validate(self) -> dict:
        """Every loss term on the validation split (EMA weights; 'valid/loss', 'valid/eps', ...) and, for UniGEM
        with properties, the MAE in dataset units; averaged over the molecules of every rank."""
        from molscale.trainer.model.sampling import predict_properties
        # Sums stay on the run's device: no host read per batch, and NCCL all-reduces device tensors only.
        # Layout: [molecules, property MAE sums..., loss-term sums...]; the terms are the model's (the same
        # names on every rank, which all see the same number of validation batches).
        n_props = len(self.cfg.model.properties)
        sums, names = None, []
        generator = torch.Generator().manual_seed(1234 + self.rank)
        self.valid_loader.load_state_dict(self._valid_start)
        ctx = self.ema.applied_to(self.model) if self.ema else contextlib.nullcontext(self.model)
        with ctx as model:
            model.eval()
            for i, batch in enumerate(self.valid_loader):
                if self.cfg.evaluation.max_batches and i >= self.cfg.evaluation.max_batches:
                    break
                batch = self._to_device(batch)
                n = batch["num_atoms"].shape[0]
                terms = model(batch, generator=generator)
                if sums is None:
                    names = sorted(terms)
                    sums = torch.zeros(1 + n_props + len(names), dtype=torch.float64, device=self.device)
                sums[0] += n
                sums[1 + n_props:] += torch.stack([terms[k].detach().double().reshape(()) for k in names]) * n
                if n_props:
                    pred = predict_properties(model, batch)
                    sums[1:1 + n_props] += (pred - batch["props"][:, :n_props]).abs().sum(0).double()
            model.train()
        if sums is None:
            raise RunError(f"validation split {self.cfg.data.valid_split!r} gave no batch on rank {self.rank}")
        dist.all_reduce(sums)
        count, *rest = sums.tolist()  # the one read back to the host
        out = {f"valid/{name}": total / count for name, total in zip(names, rest[n_props:])}
        for name, total in zip(self.cfg.model.properties, rest[:n_props]):
            out[f"valid/mae_{name}"] = total / count
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
                validated = "valid/loss" in record  # a validation result is always logged
                if self.step % self.cfg.logging.every_steps == 0 or self.step == max_steps or validated:
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
        # Only the all-reduce of a step turns this into stop_requested, the same on every rank in the same step:
        # a signal arriving between a step's all-reduce and its end must not make this rank alone stop and save.
        self._sigterm = True


def write_config(cfg: RunConfig, run_dir: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
