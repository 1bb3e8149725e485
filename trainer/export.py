"""Load a trained model for sampling and evaluation: the float32 EMA weights of a checkpoint.

Accepts a run directory (its ``latest`` complete checkpoint) or one checkpoint folder
(RUN_DIR/stepNNNNNNNN). Everything needed travels in the checkpoint's client state: the model
configuration, property normalisation, the train atom-count histogram and the dataset URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from trainer import checkpointing
from trainer.networks import ModelConfig, build_model


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    step: int
    checkpoint: str
    atom_count_histogram: dict[int, int]
    dataset_url: str
    used_ema: bool


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder for a run directory or checkpoint folder; a clear error otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        found = checkpointing.find_resume(path, "auto") if not checkpointing.TAG_RE.match(
            os.path.basename(os.path.abspath(path))) else checkpointing.find_resume(path, path)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
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


def load_for_eval(path: str, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedModel:
    folder, states, state = read_model_states(path)
    for key in ("model_config", "module"):
        if key not in state:
            raise CheckpointError(f"{states} has no {key!r}: not a checkpoint written by trainer/main.py")
    if state.get("objective", "diffusion") != "diffusion":
        raise CheckpointError(f"{folder} is a {state['objective']} pretraining checkpoint: it does not generate "
                              f"molecules. Fine-tune from it (config init_from: {path}) and evaluate that run.")
    cfg = ModelConfig(**state["model_config"])
    stats = state.get("prop_stats") or {"mean": None, "mad": None}
    model = build_model(cfg, stats["mean"] or None, stats["mad"] or None)
    weights, used_ema = model_weights(state, use_ema)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{states} does not match the model it describes: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, step=int(state.get("step", 0)), checkpoint=folder,
                       atom_count_histogram={int(k): int(v) for k, v in state["atom_count_histogram"].items()},
                       dataset_url=state.get("dataset_url", ""), used_ema=used_ema)
