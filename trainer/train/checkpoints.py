"""Checkpoints: the one module that writes and reads them (training, resume, evaluation, init_from).

Written through DeepSpeed, plus what DeepSpeed does not know.

    RUN_DIR/step00000010/            DeepSpeed's model + optimizer states (every rank saves its part),
                                     client state: step, EMA weights, clipping history, counters
    RUN_DIR/step00000010/rank{r}.pt  per-rank state: data-loader position, RNG states
    RUN_DIR/step00000010/complete    written once every rank has finished
    RUN_DIR/latest                   the newest complete tag, written last and atomically
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from molscale.datasets.errors import InputError
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.schedule import DiffusionConfig

TAG_RE = re.compile(r"^step(\d{8})$")


class CheckpointError(InputError):
    """A checkpoint (or --resume / --checkpoint / init_from path) that cannot be used; the message says why."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        return []
    tags = [d for d in os.listdir(run_dir) if TAG_RE.match(d) and os.path.exists(os.path.join(run_dir, d, "complete"))]
    return sorted(tags)


def find_resume(run_dir: str, resume: str | None) -> tuple[str, str] | None:
    """(checkpoint root, tag) to resume from, or None to start fresh.

    ``auto``: the tag in RUN_DIR/latest when complete, else the newest complete one, else None.
    A path: a checkpoint folder (RUN_DIR/stepNNNNNNNN) or a run folder (its newest complete tag).
    """
    if not resume:
        return None
    if resume == "auto":
        latest = os.path.join(run_dir, "latest")
        if os.path.exists(latest):
            tag = open(latest).read().strip()
            if os.path.exists(os.path.join(run_dir, tag, "complete")):
                return run_dir, tag
        tags = complete_tags(run_dir)
        return (run_dir, tags[-1]) if tags else None
    path = os.path.abspath(resume.rstrip("/"))
    if TAG_RE.match(os.path.basename(path)):
        if not os.path.exists(os.path.join(path, "complete")):
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no 'complete' marker)")
        return os.path.dirname(path), os.path.basename(path)
    tags = complete_tags(path)
    if not tags:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint in that folder")
    return path, tags[-1]


def save(engine, run_dir: str, step: int, client_state: dict, rank_state: dict, keep_last: int) -> str:
    tag = tag_for(step)
    engine.save_checkpoint(run_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, os.path.join(run_dir, tag, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        _atomic_write(os.path.join(run_dir, tag, "complete"), "ok\n")
        _atomic_write(os.path.join(run_dir, "latest"), tag)
        for old in complete_tags(run_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, root: str, tag: str) -> tuple[dict, dict]:
    """(client state, this rank's state) of a checkpoint, loaded into ``engine``."""
    path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    rank_file = os.path.join(root, tag, f"rank{dist.get_rank()}.pt")
    if not os.path.exists(rank_file):
        raise CheckpointError(f"{rank_file} is missing: was the checkpoint written with another world size?")
    return client_state, torch.load(rank_file, weights_only=False)


# --- reading a trained model (evaluation, init_from) ------------------------------------------------

@dataclass
class LoadedModel:
    model: torch.nn.Module
    step: int
    checkpoint: str
    atom_count_histogram: dict[int, int]
    dataset_url: str
    used_ema: bool
    wandb: dict | None = None  # the training run's W&B identity (entity, project, id, group, name, mode)
    property_units: dict | None = None  # {property: unit} from an exported file's card (None: ask the dataset)


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder for a run directory or checkpoint folder; a clear error otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    is_tag = TAG_RE.match(os.path.basename(os.path.abspath(path)))
    found = find_resume(path, path) if is_tag else find_resume(path, "auto")
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no 'latest' and no step*/complete); "
                              f"train first, or point --checkpoint at a run directory")
    return os.path.join(*found)


def read_model_states(path: str) -> tuple[str, str, dict]:
    """(checkpoint folder, states file, its contents) for a run directory or checkpoint folder."""
    folder = resolve_checkpoint(path)
    states = os.path.join(folder, "mp_rank_00_model_states.pt")
    try:
        state = torch.load(states, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{states} is missing: the checkpoint is incomplete") from None
    except Exception as err:
        raise CheckpointError(f"{states} cannot be read ({type(err).__name__}: {err}): corrupt checkpoint?") from None
    return folder, states, state


def model_weights(state: dict, use_ema: bool = True) -> tuple[dict, bool]:
    """(name -> tensor, whether EMA was used): the module's weights with the EMA shadow over them if asked and
    present (EMA tracks parameters only; buffers come from the module)."""
    weights = state["module"]
    if use_ema and state.get("ema"):
        return {**weights, **state["ema"]["shadow"]}, True
    return weights, False


def model_configs(state: dict) -> tuple[ModelConfig, DiffusionConfig]:
    """The model and noise-process configs a checkpoint's states file describes (older checkpoints kept the
    diffusion fields inside model_config)."""
    model_fields = dict(state["model_config"])
    diffusion_fields = dict(state.get("diffusion_config") or {})
    for name in ("num_steps", "schedule", "precision"):
        if name in model_fields:
            diffusion_fields.setdefault(name, model_fields.pop(name))
    return ModelConfig(**model_fields), DiffusionConfig(**diffusion_fields)


def load_for_eval(path: str, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedModel:
    """The model of a run directory, a checkpoint folder or an exported .safetensors file (trainer/export.py)."""
    if path.endswith(".safetensors") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        return load_exported(path, device)
    folder, states, state = read_model_states(path)
    for key in ("model_config", "module"):
        if key not in state:
            raise CheckpointError(f"{states} has no {key!r}: not a checkpoint written by trainer/main.py")
    if state.get("objective", "diffusion") != "diffusion":
        raise CheckpointError(f"{folder} is a {state['objective']} pretraining checkpoint: it does not generate "
                              f"molecules. Fine-tune from it (config init_from: {path}) and evaluate that run.")
    cfg, diffusion = model_configs(state)
    stats = state.get("prop_stats") or {"mean": None, "mad": None}
    model = build_model(cfg, diffusion, stats["mean"] or None, stats["mad"] or None)
    weights, used_ema = model_weights(state, use_ema)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{states} does not match the model it describes: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, step=int(state.get("step", 0)), checkpoint=folder,
                       atom_count_histogram={int(k): int(v) for k, v in state["atom_count_histogram"].items()},
                       dataset_url=state.get("dataset_url", ""), used_ema=used_ema, wandb=state.get("wandb"))


# --- exported models (trainer/export.py writes them) ------------------------------------------------------

CARD_KEY = "molscale_card"  # safetensors metadata key of the JSON card
CARD_FORMAT = "molscale-model/1"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_card(path: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}): "
                              f"corrupt or truncated?") from None
    if CARD_KEY not in metadata:
        raise CheckpointError(f"{path} has no molscale card: not a file written by `python -m trainer.export`")
    try:
        card = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its molscale card is not JSON ({err})") from None
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: card format {card.get('format')!r} is not {CARD_FORMAT!r}; export it again "
                              f"with this version")
    return card


def load_exported(path: str, device="cpu"):
    """The LoadedModel of an exported file; CheckpointError for a corrupt file or weights that do not fit."""
    from safetensors.torch import load_file
    card = read_card(path)
    try:
        tensors = load_file(path)
    except Exception as err:
        raise CheckpointError(f"{path}: the tensors cannot be read ({type(err).__name__}: {err}): corrupt or "
                              f"truncated?") from None
    if weights_digest(tensors) != card.get("weights_sha256"):
        raise CheckpointError(f"{path}: the weights do not match the digest in its card: the file is corrupt")
    try:
        cfg, diffusion = ModelConfig(**card["model_config"]), DiffusionConfig(**card["diffusion_config"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: its card does not describe a model this version builds ({err})") from None
    stats = card.get("property_stats") or {}
    model = build_model(cfg, diffusion, stats.get("mean") or None, stats.get("mad") or None)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shapes that differ from the card's model
        raise CheckpointError(f"{path}: the weights do not fit the model its card describes: "
                              f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not fit the model its card describes: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, step=int(card.get("step", 0)), checkpoint=os.path.abspath(path),
                       atom_count_histogram={int(k): int(v) for k, v in card["atom_count_histogram"].items()},
                       dataset_url=card.get("dataset", {}).get("url", ""), used_ema=card.get("weights") == "ema",
                       property_units=card.get("property_units"))
