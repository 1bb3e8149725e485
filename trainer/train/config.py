"""Run configuration: one JSON file plus ``--set a.b=c`` overrides, validated into typed sections
before any work starts. Unknown or ill-typed keys are reported by their dotted name.

The sections are the components' own configs: ``data`` is the loader's LoaderConfig, ``model`` the
network's ModelConfig, ``diffusion`` the noise process's DiffusionConfig, ``pretrain`` the pretraining
objective's PretrainConfig; the rest configure the training loop itself. Each checks its own fields in
one ``validate``; RunConfig.validate adds the checks that span sections.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import typing
from dataclasses import dataclass, field

from molscale.datasets.errors import InputError
from molscale.datasets.shards.storage import redact, redact_urls
from molscale.datasets.stream.loader import LoaderConfig
from molscale.trainer.model.diffusion import LossConfig
from molscale.trainer.model.networks import ModelConfig, UniGEM
from molscale.trainer.model.objectives import Objective
from molscale.trainer.model.pretraining import PretrainConfig
from molscale.trainer.model.schedule import DiffusionConfig


class ConfigError(InputError):
    """A config key is unknown, ill-typed or out of range; the message names it."""


# lr multiplier as a function of (global batch / the batch lr was tuned for)
LR_SCALINGS = {"none": lambda ratio: 1.0, "linear": lambda ratio: ratio, "sqrt": lambda ratio: ratio ** 0.5}


@dataclass
class OptimizerSection:
    lr: float = 1e-4
    weight_decay: float = 1e-12
    amsgrad: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip: str = "adaptive"                 # adaptive (EDM: 1.5 mean + 2 std of recent norms) | none
    clip_history: int = 50
    ema_decay: float = 0.9999              # 0 disables EMA
    # The released UniGEM loop calls optim.step() twice on each batch's gradients (train_test.py, train_epoch)
    # and updates the EMA once; 2 reproduces that, 1 is the usual single step.
    steps_per_batch: int = 1
    warmup_steps: int = 0                  # linear warmup from 0 to the (scaled) lr over this many optimizer steps
    # lr for a global batch B: lr x (B / lr_reference_batch) ('linear', Goyal et al. 2017), x sqrt(B / ref)
    # ('sqrt', the square-root rule for Adam of Malladi et al. 2022), or lr as given ('none')
    lr_scaling: str = "none"
    lr_reference_batch: int = 64           # the batch `lr` was tuned for (the paper's QM9 batch)

    def validate(self) -> None:
        _require(self.clip in ("adaptive", "none"), f"optimizer.clip must be 'adaptive' or 'none', got {self.clip!r}")
        _require(0.0 <= self.ema_decay < 1.0, f"optimizer.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(self.lr > 0, f"optimizer.lr must be positive, got {self.lr}")
        _require(self.clip_history >= 1, "optimizer.clip_history must be at least 1")
        _require(self.steps_per_batch >= 1, f"optimizer.steps_per_batch must be at least 1, got {self.steps_per_batch}")
        _require(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.lr_scaling in LR_SCALINGS,
                 f"optimizer.lr_scaling must be one of {list(LR_SCALINGS)}, got {self.lr_scaling!r}")
        _require(self.lr_reference_batch >= 1, "optimizer.lr_reference_batch must be at least 1")

    def scaled_lr(self, global_batch: int | None) -> float:
        """The learning rate for ``global_batch`` molecules per optimizer step (None: not fixed; only 'none')."""
        if self.lr_scaling == "none":
            return self.lr
        return self.lr * LR_SCALINGS[self.lr_scaling](global_batch / self.lr_reference_batch)



# DeepSpeed config keys that molscale sets itself, and what to set instead.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "data.batch_size and deepspeed.gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "deepspeed.gradient_accumulation_steps",
    "gradient_clipping": "optimizer.clip (molscale clips with an adaptive threshold)",
    "bf16": "deepspeed.bf16 (bf16 autocast with float32 weights)",
    "fp16": "deepspeed.bf16 (fp16 is not supported)",
    "torch_autocast": "deepspeed.bf16",
    "communication_data_type": "nothing: gradients are reduced in float32 (docs/numerics.md)",
    "optimizer": "optimizer.* (molscale builds the optimizer; DeepSpeed would ignore this section)",
}
# The first DeepSpeed release with the "torch_autocast" config section: the commit "Enable torch.autocast with
# ZeRO (#6993)" is first in tag v0.17.2. Older releases ignore the section and train silently in float32.
DEEPSPEED_TORCH_AUTOCAST = "0.17.2"


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    bf16: bool = False                     # autocast bf16 for the MLP products; weights stay float32
    gradient_accumulation_steps: int = 1
    extra: dict = field(default_factory=dict)  # deep-merged into the DeepSpeed config; see DEEPSPEED_OWNED_KEYS

    def validate(self) -> None:
        _require(self.zero_stage in (0, 1, 2), f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _require(self.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps must be >= 1")
        for key, instead in DEEPSPEED_OWNED_KEYS.items():
            _require(key not in self.extra, f"deepspeed.extra.{key}: molscale sets it; use {instead}")
        zero = self.extra.get("zero_optimization", {})
        _require(isinstance(zero, dict), "deepspeed.extra.zero_optimization: expected an object")
        # EMA, clipping (Trainer._clip) and checkpoint export assume ZeRO stage <= 2 and read deepspeed.zero_stage
        _require("stage" not in zero, "deepspeed.extra.zero_optimization.stage: molscale sets it; use "
                                      "deepspeed.zero_stage (0, 1 or 2: EMA, clipping and export need stage <= 2)")
        if self.bf16:
            installed = _installed_version("deepspeed")
            _require(installed is not None and _release(installed) >= _release(DEEPSPEED_TORCH_AUTOCAST),
                     f"deepspeed.bf16 needs DeepSpeed >= {DEEPSPEED_TORCH_AUTOCAST} (its torch_autocast section); "
                     f"installed: {installed}. Upgrade DeepSpeed or set deepspeed.bf16=false")


@dataclass
class CheckpointSection:
    every_steps: int = 1000
    keep_last: int = 3

    def validate(self) -> None:
        _require(self.every_steps >= 1, "checkpoint.every_steps must be at least 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last must be at least 1")


@dataclass
class WandbSection:
    enabled: bool = True
    project: str | None = None             # None: WANDB_PROJECT, else "molscale"
    entity: str | None = None              # None: WANDB_ENTITY, else your default entity
    name: str | None = None
    mode: str | None = None                # None: wandb decides (WANDB_MODE, `wandb offline`), offline if no login
    group: str | None = None               # None: WANDB_RUN_GROUP, else the run's id (its evaluations join it)
    log_checkpoints: bool = False          # every saved checkpoint as a W&B "model" artifact


@dataclass
class LoggingSection:
    every_steps: int = 1
    progress_bar: bool = True
    wandb: WandbSection = field(default_factory=WandbSection)

    def validate(self) -> None:
        _require(self.every_steps >= 1, "logging.every_steps must be at least 1")


@dataclass
class EvaluationSection:
    every_steps: int = 0                   # 0: no periodic validation
    max_batches: int | None = 20

    def validate(self) -> None:
        _require(self.every_steps >= 0, "evaluation.every_steps must be >= 0 (0: no periodic validation)")
        _require(self.max_batches is None or self.max_batches >= 1, "evaluation.max_batches must be >= 1 or null")


@dataclass
class ClusterSection:
    nodes: int = 1                         # what the config is written for (dry-run plans with it)
    gpus_per_node: int = 1

    def validate(self) -> None:
        _require(self.nodes >= 1 and self.gpus_per_node >= 1, "cluster.nodes and cluster.gpus_per_node must be >= 1")


@dataclass
class TrainSection:
    max_steps: int = 1000
    seed: int = 0
    run_dir: str = "runs/default"
    max_nonfinite_in_row: int = 10         # consecutive NaN/inf losses before the run stops
    collective_timeout_minutes: float = 10.0  # a rank waiting this long for the others gives up (not 30: PyTorch's)
    # CUDA runs (docs/numerics.md): false; true or "network": the network as CUDA graphs per batch shape; "step":
    # the whole training step (forward, backward, clipping, optimizer, EMA) as one graph per batch shape
    cuda_graphs: bool | str = False

    @property
    def graph_scope(self) -> str:
        """What train.cuda_graphs asks to replay as CUDA graphs: 'off', 'network' or 'step'."""
        return {False: "off", True: "network"}.get(self.cuda_graphs, self.cuda_graphs)

    def graph_scope_at(self, world_size: int) -> str:
        """What a run of ``world_size`` ranks replays: 'step' needs one rank (DeepSpeed's all-reduce runs from its
        Python backward, which a graph would not rerun); with more, the network's graphs."""
        return "network" if self.graph_scope == "step" and world_size > 1 else self.graph_scope

    def validate(self) -> None:
        _require(self.cuda_graphs in (False, True, "network", "step"),
                 f"train.cuda_graphs must be false, true (the same as \"network\") or \"step\", "
                 f"got {self.cuda_graphs!r}")
        _require(self.max_steps >= 1, f"train.max_steps must be at least 1, got {self.max_steps}")
        _require(self.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row must be at least 1")
        _require(self.collective_timeout_minutes > 0, "train.collective_timeout_minutes must be positive")


@dataclass
class RunConfig:
    data: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # atom_vocab null: the dataset's
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    train: TrainSection = field(default_factory=TrainSection)
    storage: dict = field(default_factory=dict)   # fsspec/S3 options; never logged (to_dict redacts)
    objective: str = str(Objective.DIFFUSION)  # model/objectives.py: diffusion (model.kind) | moleculejae | property
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # objective moleculejae
    init_from: str | None = None           # run dir or checkpoint whose matching tensors initialise the model

    def to_dict(self, redacted: bool = True) -> dict:
        """Plain dict of the config; unless asked, credentials are redacted: those in ``storage`` (nested ones
        too) and those in every URL (data.url, init_from, an endpoint: ``s3://***@bucket/x``, ``?token=***``).
        What is written or logged (RUN_DIR/config.json, the W&B config) is this; the run uses the real values."""
        d = dataclasses.asdict(self)
        if redacted:
            d = redact_urls(d)
            d["storage"] = redact(d["storage"])
        return d

    def global_batch(self, world_size: int) -> int | None:
        """Molecules per optimizer step over all ranks: data.batch_size (or, with atom-pair budgets,
        loss.nominal_batch) x gradient accumulation x ranks; None when neither fixes a count."""
        per_rank = self.data.batch_size or self.loss.nominal_batch
        return per_rank * self.deepspeed.gradient_accumulation_steps * world_size if per_rank else None

    def validate(self) -> None:
        """Every section's own checks, then the checks that span sections; raises ConfigError."""
        try:
            # data (the loader's LoaderConfig) checked itself when it was built, as it does wherever it is built
            for section in (self.diffusion, self.loss, self.optimizer, self.deepspeed, self.checkpoint,
                            self.logging, self.evaluation, self.cluster, self.train):
                section.validate()
            self.model.validate(self.diffusion)
            if self.objective == Objective.MOLECULEJAE:
                self.pretrain.validate(self.loss)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _require(self.objective in list(Objective),
                 f"objective must be one of {[str(o) for o in Objective]}, got {self.objective!r}")
        _require(not (self.train.cuda_graphs and self.objective != Objective.DIFFUSION),
                 f"train.cuda_graphs covers the diffusion objective only; unset it for objective {self.objective!r}")
        _require(self.train.graph_scope != "step" or self.deepspeed.zero_stage == 0,
                 "train.cuda_graphs \"step\" needs deepspeed.zero_stage 0 (the graph runs the optimizer on the "
                 "gradients in p.grad, which ZeRO keeps partitioned in its own buffers); use true for the network's "
                 "graphs")
        if self.objective == Objective.PROPERTY:
            _require(bool(self.model.properties) and not self.model.condition_on,
                     "objective 'property' trains a property classifier: set model.properties (at least one) and "
                     "leave model.condition_on empty")
        if self.objective == Objective.MOLECULEJAE:
            _require(not self.model.properties,
                     "model.properties must be empty for objective 'moleculejae' (pretraining has no property head)")
            _require(not self.model.condition_on,
                     "model.condition_on must be empty for objective 'moleculejae' (pretraining is unconditional; "
                     "a conditional fine-tune loads every trunk tensor but the input embedding)")
            _require(self.model.model_class() is UniGEM,
                     "objective 'moleculejae' pretrains a UniGEM trunk: set model.kind to 'unigem'")
        _require(self.optimizer.steps_per_batch == 1 or self.deepspeed.zero_stage == 0,
                 "optimizer.steps_per_batch > 1 needs deepspeed.zero_stage 0 (the repeated steps reuse the averaged "
                 "gradients in p.grad, which ZeRO keeps partitioned in its own buffers)")
        _require(self.optimizer.lr_scaling == "none" or self.global_batch(1) is not None,
                 "optimizer.lr_scaling needs a molecule count per step: set data.batch_size, or loss.nominal_batch "
                 "with atom-pair budgets")
        _require(not (self.loss.reduction == "reference" and self.data.batch_size is None),
                 "loss.reduction 'reference' is the released code's fixed-size batches: set data.batch_size, or use "
                 "reduction 'molecule' with loss.nominal_batch for atom-pair budgets")
        _require(self.init_from is None or os.path.exists(self.init_from),
                 f"init_from: {self.init_from} does not exist (give a run directory or a checkpoint folder)")


def _installed_version(distribution: str) -> str | None:
    """The installed version, from the package metadata: cheap, nothing is imported."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version such as 0.19.8 or 0.18.0+cu124."""
    return tuple(int(part or 0) for part in re.match(r"(\d+)\.(\d+)\.?(\d*)", version).groups())


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_type(value, annotation, where: str):
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    raise ConfigError(f"{where}: cannot check type {annotation}")


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected an object, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                          f"(known in {where or 'the top level'}: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, InputError) as err:  # a section that checks itself on construction (LoaderConfig)
        raise ConfigError(str(err)) from None


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string, e.g. data.url=s3://bucket/x
    return key.strip(), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        key, value = _parse_override(text)
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return values


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path:
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    values = apply_overrides(values, overrides or [])
    values.pop("_comment", None)
    cfg = _build(RunConfig, values, "")
    cfg.validate()
    return cfg
