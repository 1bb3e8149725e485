"""Run configuration: one JSON file plus ``--set a.b=c`` overrides, validated into typed sections
before any work starts. Unknown or ill-typed keys are reported by their dotted name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

from molscale.trainer.model.pretraining import PretrainConfig


class ConfigError(ValueError):
    pass


@dataclass
class DataSection:
    url: str = "data/qm9-smoke"
    split: str = "train"
    valid_split: str = "valid"
    batch_size: int | None = 64            # molecules per micro-batch per rank (the papers: 64) ...
    pair_budget: int | None = None         # ... or an atom-pair budget per micro-batch
    bucket_bounds: list[int] = field(default_factory=list)
    shuffle_buffer: int = 1000
    num_workers: int = 0
    max_bad_shards: int | None = None


@dataclass
class ModelSection:
    kind: str = "unigem"                   # unigem | edm
    layers: int = 9
    hidden: int = 256
    shared_blocks: int = 1                 # UniGEM: shared blocks, then two branches of layers - shared
    t_nucleation: int = 10
    properties: list[str] = field(default_factory=list)
    include_charges: bool = True
    atom_vocab: list[int] | None = None    # default: the dataset manifest's


@dataclass
class DiffusionSection:
    num_steps: int = 1000
    schedule: str = "polynomial_2"         # polynomial_2 | cosine
    precision: float = 1e-5


@dataclass
class OptimizerSection:
    lr: float = 1e-4
    weight_decay: float = 1e-12
    amsgrad: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip: str = "adaptive"                 # adaptive (EDM: 1.5 mean + 2 std of recent norms) | none
    clip_history: int = 50
    ema_decay: float = 0.9999              # 0 disables EMA


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    bf16: bool = False                     # autocast bf16 for the MLP products; weights stay float32
    gradient_accumulation_steps: int = 1
    extra: dict = field(default_factory=dict)  # merged into the DeepSpeed config as given


@dataclass
class CheckpointSection:
    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class WandbSection:
    enabled: bool = True
    project: str = "molscale"
    entity: str | None = None
    name: str | None = None
    mode: str | None = None                # offline unless WANDB_MODE=online or WANDB_API_KEY is set


@dataclass
class LoggingSection:
    every_steps: int = 1
    progress_bar: bool = True
    wandb: WandbSection = field(default_factory=WandbSection)


@dataclass
class EvaluationSection:
    every_steps: int = 0                   # 0: no periodic validation
    max_batches: int | None = 20


@dataclass
class ClusterSection:
    nodes: int = 1                         # what the config is written for (dry-run plans with it)
    gpus_per_node: int = 1


@dataclass
class TrainSection:
    max_steps: int = 1000
    seed: int = 0
    run_dir: str = "runs/default"
    max_nonfinite_in_row: int = 10         # consecutive NaN/inf losses before the run stops


@dataclass
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    train: TrainSection = field(default_factory=TrainSection)
    storage: dict = field(default_factory=dict)   # fsspec/S3 options; never logged
    objective: str = "diffusion"           # diffusion (model.kind unigem | edm) | moleculejae (pretraining)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # objective moleculejae
    init_from: str | None = None           # run dir or checkpoint whose matching tensors initialise the model

    def to_dict(self, redact: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if redact and d["storage"]:
            d["storage"] = {k: ("***" if k in ("key", "secret", "token") else v) for k, v in d["storage"].items()}
        return d


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
    return cls(**kwargs)


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


def validate(cfg: RunConfig) -> None:
    """Cross-field checks; every message names the key to change."""
    checks = [
        (cfg.objective in ("diffusion", "moleculejae"),
         f"objective must be 'diffusion' or 'moleculejae', got {cfg.objective!r}"),
        (cfg.objective == "diffusion" or not cfg.model.properties,
         "model.properties must be empty for objective 'moleculejae' (pretraining has no property head)"),
        (cfg.objective == "diffusion" or cfg.model.kind == "unigem",
         "objective 'moleculejae' pretrains a UniGEM trunk: set model.kind to 'unigem'"),
        (cfg.model.kind in ("unigem", "edm"), f"model.kind must be 'unigem' or 'edm', got {cfg.model.kind!r}"),
        (cfg.model.layers >= 1 and cfg.model.hidden >= 1, "model.layers and model.hidden must be at least 1"),
        (cfg.model.kind == "edm" or 0 <= cfg.model.shared_blocks < cfg.model.layers,
         f"model.shared_blocks must be in [0, model.layers) (got {cfg.model.shared_blocks}, {cfg.model.layers})"),
        (0 <= cfg.model.t_nucleation < cfg.diffusion.num_steps,
         f"model.t_nucleation must be in [0, diffusion.num_steps) (got {cfg.model.t_nucleation})"),
        (cfg.diffusion.schedule in ("polynomial_2", "cosine"),
         f"diffusion.schedule must be 'polynomial_2' or 'cosine', got {cfg.diffusion.schedule!r}"),
        ((cfg.data.batch_size is None) != (cfg.data.pair_budget is None),
         "set exactly one of data.batch_size and data.pair_budget (the other null)"),
        (cfg.deepspeed.zero_stage in (0, 1, 2), f"deepspeed.zero_stage must be 0, 1 or 2, got {cfg.deepspeed.zero_stage}"),
        (cfg.deepspeed.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps must be >= 1"),
        (cfg.optimizer.clip in ("adaptive", "none"), f"optimizer.clip must be 'adaptive' or 'none', got {cfg.optimizer.clip!r}"),
        (0.0 <= cfg.optimizer.ema_decay < 1.0, f"optimizer.ema_decay must be in [0, 1), got {cfg.optimizer.ema_decay}"),
        (cfg.optimizer.lr > 0, f"optimizer.lr must be positive, got {cfg.optimizer.lr}"),
        (cfg.train.max_steps >= 1, f"train.max_steps must be at least 1, got {cfg.train.max_steps}"),
        (cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps must be at least 1"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be at least 1"),
        (cfg.logging.every_steps >= 1, "logging.every_steps must be at least 1"),
        (cfg.cluster.nodes >= 1 and cfg.cluster.gpus_per_node >= 1, "cluster.nodes and cluster.gpus_per_node must be >= 1"),
        (cfg.model.kind == "unigem" or not cfg.model.properties,
         "model.properties needs model.kind = 'unigem' (EDM has no property head)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.objective == "moleculejae":
        try:
            cfg.pretrain.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.init_from is not None and not os.path.exists(cfg.init_from):
        raise ConfigError(f"init_from: {cfg.init_from} does not exist (give a run directory or a checkpoint "
                          f"folder)")


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
    validate(cfg)
    return cfg
