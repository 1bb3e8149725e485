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
from molscale.datasets.redaction import redact_url
from molscale.datasets.shards.manifest import Manifest
from molscale.trainer.train import checkpoints, init_from
from molscale.trainer.train.clipping import AdaptiveClipper
from molscale.trainer.train.config import RunConfig
from molscale.trainer.train.distributed import accelerator, raise_if_any_rank_failed, run_device
from molscale.trainer.train.ema import EMA
from molscale.trainer.train.factory import build_run_model, make_loader, property_normalisation, resolved_model_config
from molscale.trainer.train.run_log import NullLogger, RunLogger
from molscale.trainer.train.step_graph import StepGraphs
from molscale.trainer.train.step_ledger import StepLedger

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
        # DeepSpeed's throughput timer synchronises the device twice per step even without wall_clock_breakdown
        # (deepspeed/utils/timer.py, ThroughputTimer.start/stop); the loop logs its own molecules/s
        "timers": {"throughput": {"enabled": False}},
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
        if self.rank == 0:  # only once the inputs passed: a refused start leaves the run directory as it was
            write_config(cfg, run_dir)

        scope = cfg.train.graph_scope_at(self.world_size)
        self.whole_step = scope == "step"  # step_graph.py
        if scope != cfg.train.graph_scope and self.rank == 0:
            log.info("train.cuda_graphs \"step\" runs at world size 1; with %d ranks DeepSpeed's step (and its "
                     "all-reduce) stays eager and the network runs as CUDA graphs", self.world_size)
        o = cfg.optimizer
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # MoleculeJAE freezes a few
        self.lr = o.scaled_lr(cfg.global_batch(self.world_size))
        # fused: one kernel per step for all parameters, step counters on the device (the default foreach
        # implementation reads every parameter's step counter on the host), and it takes the skip decision as
        # found_inf (StepLedger.decide_skip) without a host read; the same update rule, amsgrad included
        # (capturable: what a CUDA graph of the whole step needs, with the lr a device tensor; the same arithmetic)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.lr, weight_decay=o.weight_decay,
                                           amsgrad=o.amsgrad, betas=tuple(o.betas), fused=True,
                                           capturable=self.whole_step)
        optimizer = self.optimizer
        # DeepSpeed steps the scheduler with every optimizer step and keeps its state in the checkpoints
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(o.warmup_steps)) \
            if o.warmup_steps else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(cfg, self.world_size))
        self.model = self.engine.module
        if self.world_size == 1:
            # DeepSpeed's backward all-reduces the gradients at any world size: at one rank a concatenation of
            # every gradient, a collective with no peer and a copy back per parameter, for nothing
            self.engine.enable_backward_allreduce = False
        if scope != "off":
            if self.device.type == "cuda" and not self.whole_step:
                self.model.use_cuda_graphs()
            elif self.device.type != "cuda":
                log.info("train.cuda_graphs applies to CUDA devices; this run is on %s and runs eagerly", self.device)
        self.ema = EMA(self.model, o.ema_decay) if o.ema_decay > 0 else None
        self.clipper = AdaptiveClipper(o.clip_history, device=self.device)
        self.ledger = StepLedger(self.device, cfg.train.max_nonfinite_in_row)
        # this rank's SIGTERM request as the step reads it (a device scalar: a graph reads it on every replay)
        self._stop_flag = torch.zeros((), device=self.device)
        self.step_graphs = None
        if self.whole_step:
            self.model.fixed_shapes = True  # no size chunks inside a step: a graph holds one shape
            self.step_graphs = StepGraphs(self._device_step, capture=self.device.type == "cuda")
        self.host_reads = 0
        self.step = 0
        self.stop_requested = False  # every rank's decision, from the all-reduce
        self._sigterm = False  # this rank was signalled (the handler sets it at any moment)

        if self.resume_from:
            problem = None
            try:
                self._load(*self.resume_from)
            except MolscaleError as err:  # e.g. a data-loader position saved with another world size
                problem = err
            raise_if_any_rank_failed(problem)
        if self.whole_step:
            self._lr_on_device()
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

    def _lr_on_device(self) -> None:
        """The lr as a device tensor that the schedule fills in place (a graph reads it on every replay), and the
        optimizer capturable, also after a checkpoint of another run restored its own groups. The schedule keeps
        float base rates, so that it never reads the tensor back."""
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device) \
                if not torch.is_tensor(lr) else lr.to(device=self.device, dtype=torch.float32)
            group["capturable"] = True
        self._constant_lr = float(self.optimizer.param_groups[0]["lr"])  # without a schedule (read once, here)

    def _scheduled_lr(self) -> float:
        """The lr of the coming optimizer step, on the host without reading the device."""
        lr = self.optimizer.param_groups[0]["lr"]
        if not torch.is_tensor(lr):
            return lr
        schedule = self.engine.lr_scheduler
        if schedule is None:
            return self._constant_lr
        return schedule.base_lrs[0] * schedule.lr_lambdas[0](schedule.last_epoch)  # LambdaLR.get_lr's rule

    # --- state -------------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "ema": self.ema.state_dict() if self.ema else None,
                "clipper": self.clipper.state_dict(), **self.ledger.state_dict(),
                # what evaluation needs to rebuild the model without the run config or the dataset
                "model_config": dataclasses.asdict(self.model_cfg),
                "diffusion_config": dataclasses.asdict(self.cfg.diffusion), "prop_stats": self.prop_stats,
                "objective": str(self.cfg.objective),  # a plain string: states files are read with weights_only
                "atom_count_histogram": self.histogram, "dataset_url": redact_url(self.cfg.data.url),
                "train_half": self.cfg.data.half,  # a conditional model's targets are drawn from its own half
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
        self.ledger.load_state_dict(client)
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
        self.saved_step = self.step
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

    def _read(self, value) -> list:
        """The loop's reads of device values on the host, counted: each makes the host wait until the device has
        caught up. A steady-state step makes none (``read_record`` makes one per record; ZeRO stages one per
        step for the clipping threshold DeepSpeed's optimizer takes as a number); the count is logged as
        ``host_reads``."""
        self.host_reads += 1
        return value.tolist()

    def train_step(self, batches) -> None:
        """One optimizer step (gradient accumulation included) with nothing read on the host: the skip, clipping,
        EMA and stop decisions are made on the device (step_ledger.py). A skipped step still counts as a step."""
        self._step_lr = self._scheduled_lr()  # the rate this step uses (the schedule moves on after it)
        if self.whole_step:
            self._whole_train_step(batches)
        else:
            self._engine_train_step(batches)
        self.step += 1
        if self.world_size == 1 and self._sigterm:
            self.stop_requested = True  # this rank's own signal: no other rank to agree with

    def _engine_train_step(self, batches) -> None:
        """The step through DeepSpeed's engine (forward, backward, step), its network eager or as CUDA graphs."""
        ga = self.cfg.deepspeed.gradient_accumulation_steps
        adaptive = self.cfg.optimizer.clip == "adaptive"
        totals = (None, None, None)
        threshold = grad_norm = skip = None
        molecules, wait = 0, 0.0
        for _ in range(ga):
            batch, count, seconds = self._next_batch(batches)
            molecules, wait = molecules + count, wait + seconds
            if self.cfg.loss.reduction == "reference" and self.world_size > 1:
                batch["reference_atoms"] = self._global_largest_molecule(batch)
            losses = self.engine(batch)
            self._raise_stop_flag()
            names, packed = self._pack(losses)
            totals = self._add_micro(totals, packed, ga)
            # a non-finite loss still runs its backward: whether to apply the update is decided on the device
            self.engine.backward(losses["loss"])
            if self.engine.is_gradient_accumulation_boundary():
                threshold, grad_norm = self._clip(adaptive)
                skip = self.ledger.decide_skip(totals[0], grad_norm)
                self.optimizer.found_inf = skip  # the fused optimizer applies nothing where it is 1
                for _ in range(self.cfg.optimizer.steps_per_batch - 1):
                    # the released code's repeated optim.step() on the same (clipped, averaged) gradients;
                    # engine.step() below makes the last one, steps the lr schedule and zeroes the gradients
                    self.engine.optimizer.step()
            self.engine.step()
        if grad_norm is None:  # ZeRO: DeepSpeed's optimizer computed the norm in its step
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else torch.as_tensor(grad_norm, device=self.device)
        self._after_update(names, totals, skip, grad_norm, threshold, adaptive)
        self.ledger.count(molecules, wait)

    def _whole_train_step(self, batches) -> None:
        """The step as one CUDA graph per batch shape (step_graph.py): the batches are copied into the graph's
        buffers, the graph replays ``_device_step``, and the host then advances what DeepSpeed's step would."""
        ga = self.cfg.deepspeed.gradient_accumulation_steps
        micro, counts, waits = zip(*(self._next_batch(batches) for _ in range(ga)))
        self._raise_stop_flag()  # before the replay that reads it
        self.step_graphs.run(list(micro))
        self._engine_bookkeeping(ga)
        self.ledger.count(sum(counts), sum(waits))

    def _next_batch(self, batches) -> tuple[dict, int, float]:
        """(the next batch on the run's device, its molecules, seconds spent getting it)."""
        t0 = time.perf_counter()
        batch = next(batches)
        molecules = int(batch["num_atoms"].shape[0])  # known on the host before the copy
        return self._to_device(batch), molecules, time.perf_counter() - t0

    def _device_step(self, micro: list[dict]) -> None:
        """One whole training step's device work, what step_graph.py captures: the same arithmetic as
        ``_engine_train_step`` with DeepSpeed's forward, backward and step written out (world size 1, ZeRO 0:
        the loss scaled by 1/accumulation, the optimizer's steps, the gradients dropped afterwards)."""
        ga, adaptive = len(micro), self.cfg.optimizer.clip == "adaptive"
        totals = (None, None, None)
        self._drop_grads()  # (after a capture that failed part-way they would hold what its backward never ran)
        for batch in micro:
            with self._autocast():
                losses = self.model(batch)
            names, packed = self._pack(losses)
            totals = self._add_micro(totals, packed, ga)
            (losses["loss"] / ga).backward()
        threshold, grad_norm = self._clip(adaptive)
        skip = self.ledger.decide_skip(totals[0], grad_norm)
        self.optimizer.found_inf = skip
        for _ in range(self.cfg.optimizer.steps_per_batch):
            self.optimizer.step()
        # as DeepSpeed's zero_grad: the next backward makes them anew (in a capture, from the graph's pool; nothing
        # made inside a capture is referenced after it)
        self._drop_grads()
        self.optimizer.found_inf = None
        self._after_update(names, totals, skip, grad_norm, threshold, adaptive)

    def _drop_grads(self) -> None:
        for p in self.trainable:
            p.grad = None

    def _autocast(self):
        """bf16 autocast as DeepSpeed's forward applies it (``deepspeed.bf16``), else nothing."""
        if not self.cfg.deepspeed.bf16:
            return contextlib.nullcontext()
        return torch.autocast(accelerator().device_name(), dtype=torch.bfloat16)

    def _raise_stop_flag(self) -> None:
        """A SIGTERM this rank has had, into the device flag that ``_pack`` sends to every rank."""
        if self._sigterm:
            self._stop_flag.fill_(1.0)

    def _pack(self, losses: dict) -> tuple[list[str], torch.Tensor]:
        """(term names, one vector [non-finite flag, stop request, loss terms]): with several ranks one all-reduce
        makes them every rank's, so that every rank takes the same decisions in the same step."""
        names = sorted(losses)
        values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
        packed = torch.cat([(~torch.isfinite(values)).any().to(values.dtype).reshape(1),
                            self._stop_flag.reshape(1).to(values.dtype),
                            torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)])
        if self.world_size > 1:
            dist.all_reduce(packed)
        return names, packed

    def _add_micro(self, totals: tuple, packed: torch.Tensor, ga: int) -> tuple:
        """(non-finite ranks, stop, loss terms) of the step so far, with one more micro-batch's ``packed``."""
        nonfinite, stop, step_losses = totals
        micro_losses = packed[2:] / (self.world_size * ga)
        return (packed[0] if nonfinite is None else nonfinite + packed[0],
                packed[1] if stop is None else torch.maximum(stop, packed[1]),
                micro_losses if step_losses is None else step_losses + micro_losses)

    def _after_update(self, names, totals, skip, grad_norm, threshold, adaptive) -> None:
        """The clipping history, the EMA and the ledger, after the update (each leaves a skipped step out)."""
        _, stop, step_losses = totals
        if adaptive and grad_norm is not None:
            self.clipper.push(grad_norm, threshold, take=skip == 0)
        if self.ema:
            self.ema.update(self.model, skip)
        self.ledger.record(names, step_losses, skip, stop, grad_norm, threshold if adaptive else None)

    def _engine_bookkeeping(self, ga: int) -> None:
        """What ``engine.step`` advances on the host, for a step it did not run: the lr schedule and the
        engine's step and sample counters (kept in DeepSpeed's checkpoints)."""
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()
        self.engine.global_steps += 1
        self.engine.global_samples += self.engine.train_batch_size()
        self.engine.micro_steps += ga

    def read_record(self) -> dict:
        """The record of the steps since the last read (one host read), and the decisions only the host can act
        on: the stop request of any rank, and the end of the run after ``max_nonfinite_in_row`` skips in a row."""
        record = self.ledger.read(self._read(self.ledger.packed()), self.world_size)
        flags = self.ledger.read_flags
        if flags["stop"]:
            self.stop_requested = True
        if flags["limit_reached"]:
            raise NonFiniteLossError(
                f"{self.cfg.train.max_nonfinite_in_row} non-finite losses or gradients in a row by step {self.step} "
                f"(limit train.max_nonfinite_in_row); every update since the first of them was skipped, so the "
                f"checkpoint saved now holds the last good weights. Lower optimizer.lr or check the data.")
        if record["skipped_in_record"] and self.rank == 0:
            log.warning("steps %d-%d: %d of %d updates skipped (non-finite loss or gradient), %d in a row now",
                        self.step - record["steps_in_record"] + 1, self.step, record["skipped_in_record"],
                        record["steps_in_record"], flags["nonfinite_in_row"])
        record = {"step": self.step, "epoch": self.loader.epoch, **record, "lr": self._step_lr,
                  "host_reads": self.host_reads}
        if self.cfg.optimizer.clip != "adaptive":
            record["clip_threshold"] = None
        self.host_reads = 0
        return record

    def _global_largest_molecule(self, batch: dict) -> torch.Tensor:
        """The largest molecule over every rank's micro-batch (an all-reduce on the device, nothing read on the
        host): the reference reduction's padded size is that of the global batch, as in the released code."""
        largest = batch["num_atoms"].max().to(torch.float32).reshape(1)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return largest[0]

    def _clip(self, adaptive: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Apply this step's clipping threshold; (threshold, gradient norm before clipping), device scalars.

        Without ZeRO the averaged gradients sit in ``p.grad`` after backward: their norm is taken and they are
        scaled by min(1, threshold / (norm + 1e-6)) (torch's clip_grad_norm_ rule) on the device. With ZeRO they
        live in DeepSpeed's partitioned buffers: the threshold is handed to its optimizer as a number (a host
        read) and the norm is None here (DeepSpeed reports it after its step).
        """
        threshold = self.clipper.threshold() if adaptive else None
        if self.cfg.deepspeed.zero_stage == 0:
            grads = [p.grad for p in self.trainable if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if threshold is not None:
                torch._foreach_mul_(grads, (threshold.to(norm.dtype) / (norm + 1e-6)).clamp(max=1.0))
            return threshold, norm
        self.engine.optimizer.clip_grad = self._read(threshold.reshape(1))[0] if threshold is not None else 0.0
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
                self.train_step(batches)
                bar.update(1)
                every = self.cfg.evaluation.every_steps
                validating = self.valid_loader is not None and every and self.step % every == 0
                saving = self.step % self.cfg.checkpoint.every_steps == 0 or self.step == max_steps
                if not (validating or saving or self.stop_requested or self.step == max_steps
                        or self.step % self.cfg.logging.every_steps == 0):
                    continue  # a steady-state step: nothing read on the host
                try:
                    record = self.read_record()
                except NonFiniteLossError:
                    self.save()
                    raise
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", mol_s=f"{record['molecules_per_s']:.0f}")
                if validating:
                    record.update(self.validate())
                self.logger.log(record)  # every read is logged: a record covers the steps since the last one
                if saving:
                    self.save()
                self.ledger.restart_clock()
                if self.stop_requested:
                    break
            if self.stop_requested:
                # saved by this process, not merely present: a checkpoint of this step left by an earlier attempt
                # (found damaged on resume, say) is written again
                if getattr(self, "saved_step", None) != self.step:
                    self.save()
                if self.rank == 0:
                    log.warning("stopped by SIGTERM at step %d; checkpoint saved, resume with --resume auto",
                                self.step)
            return 0
        finally:
            bar.close()
            self.logger.close()
            if self.step_graphs is not None and self.rank == 0:
                g = self.step_graphs.summary()
                log.info("train.cuda_graphs \"step\": %d batch shapes, %d captured as graphs%s", g["shapes"],
                         g["graphs"], " (not on CUDA: each step ran eagerly)" if not self.step_graphs.capture else
                         f" (capture failed: {g['capture_failed']})" if g["capture_failed"] else "")

    def _on_sigterm(self, signum, frame):
        # With several ranks only a step's all-reduce turns this into a stop, which every rank reads at the same
        # later step (read_record): a signal must not make this rank alone stop and save.
        self._sigterm = True


def write_config(cfg: RunConfig, run_dir: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
