"""Trained-model artifacts, the contract between training and evaluation: reading a model out of a run's
checkpoint, and writing and reading the exported ``.safetensors`` file.

Checkpoints. Everything that reads another run's states file (evaluation, prediction, export, init_from:
``read_model_states``) unpickles it with ``weights_only=True`` and an allow-list of the few types DeepSpeed's
model-states file holds besides tensors and plain containers, so that a planted object cannot run code; a file
that needs more is refused unless the caller trusts it (--trust-pickle, or MOLSCALE_TRUST_PICKLE=1 for
init_from). A damaged checkpoint is refused (trainer/train/checkpoints.py checks the digests its completion
marker records).

Exported files. One ``.safetensors`` file with the weights and a JSON card that says how to rebuild them. The
card travels inside the file (safetensors metadata, key ``molscale_card``), so the file alone is enough to
generate and predict: model and diffusion configs, atom vocabulary, property names, units and normalisation,
the train split's atom-count histogram (for sampling molecule sizes), the dataset's URL (without credentials)
and the SHA-256 of its manifest, the training step and which weights were exported (EMA when the run kept them).
A copy of the card is written next to the file as ``<file>.json`` for people and model registries; loading reads
the embedded one. ``weights_sha256`` (over the tensors in name order) makes a corrupted file fail on load.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass

import torch

from molscale.datasets.shards.storage import redact_url
from molscale.trainer.model.egnn import use_kernel
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.objectives import Objective
from molscale.trainer.model.schedule import DiffusionConfig
from molscale.trainer.train.checkpoints import (
    MARKER,
    TAG_RE,
    CheckpointError,
    checkpoint_problem,
    tags_newest_first,
)

TRUST_ENV = "MOLSCALE_TRUST_PICKLE"  # "1": unpickle states files in full (runs code they hold); trusted files only
# Besides tensors, dtypes and plain containers (which weights_only=True allows), DeepSpeed's
# mp_rank_00_model_states.pt holds the module's state dict as an OrderedDict and, with ZeRO, the parameter
# shapes as torch.Size (found by scanning the pickles of stage 0 / stage 2, bf16, warmup and pretraining runs)
STATES_SAFE_GLOBALS = [collections.OrderedDict, torch.Size]

log = logging.getLogger(__name__)


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
    train_half: str | None = None  # data.half: the half of the train split the model was trained on, or None
    objective: str = str(Objective.DIFFUSION)  # 'diffusion' generates; 'property' is a classifier that scores


def evaluated_model(objective: str, cfg: ModelConfig, diffusion: DiffusionConfig, stats: dict, where: str):
    """The untrained model a checkpoint or exported file of ``objective`` holds weights for (``where`` names
    it in errors): a diffusion model or a property classifier; pretraining checkpoints are refused."""
    if objective == Objective.PROPERTY:
        from molscale.trainer.model.classifier import PropertyClassifier
        return PropertyClassifier(cfg, stats.get("mean") or None, stats.get("mad") or None)
    if objective != Objective.DIFFUSION:
        raise CheckpointError(f"{where} is a {objective} pretraining checkpoint: it does not generate molecules or "
                              f"predict properties. Fine-tune from it (config init_from: {where}) and use that run.")
    return build_model(cfg, diffusion, stats.get("mean") or None, stats.get("mad") or None)


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder for a run directory (the one its 'latest' names, else its newest complete one) or a
    checkpoint folder, its files checked against their digests; a clear error otherwise (a damaged checkpoint is
    refused, never replaced by an older one)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder = os.path.abspath(path.rstrip("/"))
    if TAG_RE.match(os.path.basename(folder)):
        if not os.path.exists(os.path.join(folder, MARKER)):
            raise CheckpointError(f"checkpoint {path}: not a complete checkpoint (no '{MARKER}' marker)")
    else:
        tags = tags_newest_first(folder)
        if not tags:
            raise CheckpointError(f"{path} holds no complete checkpoint (no 'latest' and no step*/complete); "
                                  f"train first, or point --checkpoint at a run directory")
        folder = os.path.join(folder, tags[0])
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"corrupt checkpoint {folder}: {problem}; point --checkpoint at an intact checkpoint "
                              f"folder of the run (RUN/stepNNNNNNNN)")
    return folder


def trusted(trust_pickle: bool | None = None) -> bool:
    """Whether states files may be unpickled in full: ``trust_pickle`` when given, else MOLSCALE_TRUST_PICKLE."""
    if trust_pickle is not None:
        return trust_pickle
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def load_states_file(states: str, trust_pickle: bool | None = None) -> dict:
    """A DeepSpeed model-states file read without running code from it: ``weights_only=True`` with
    STATES_SAFE_GLOBALS; anything else in the pickle is refused (CheckpointError) unless trusted."""
    try:
        if trusted(trust_pickle):
            return torch.load(states, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(STATES_SAFE_GLOBALS):
            return torch.load(states, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{states} is missing: the checkpoint is incomplete") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global| Please|\n|$)", str(err))
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{states} cannot be read (UnpicklingError: {err}): corrupt checkpoint?") from None
        what = found.group(1).strip().rstrip(".") if found else "objects beyond tensors and plain data"
        raise CheckpointError(
            f"{states} holds more than tensors and plain data ({what}); unpickling it could run code from the "
            f"file, so it is refused. Only if you trust where it came from: pass --trust-pickle (init_from: set "
            f"{TRUST_ENV}=1)") from None
    except Exception as err:
        raise CheckpointError(f"{states} cannot be read ({type(err).__name__}: {err}): corrupt checkpoint?") from None


def read_model_states(path: str, trust_pickle: bool | None = None) -> tuple[str, str, dict]:
    """(checkpoint folder, states file, its contents) for a run directory or checkpoint folder: the files checked
    against their digests, the states read without running code from them (load_states_file)."""
    folder = resolve_checkpoint(path)
    states = os.path.join(folder, "mp_rank_00_model_states.pt")
    return folder, states, load_states_file(states, trust_pickle)


def model_weights(state: dict, use_ema: bool = True) -> tuple[dict, bool]:
    """(name -> tensor, whether EMA was used): the module's weights with the EMA shadow over them if asked and
    present (EMA tracks parameters only; buffers come from the module)."""
    weights = state["module"]
    if use_ema and state.get("ema"):
        return {**weights, **state["ema"]["shadow"]}, True
    return weights, False


def checked_configs(model_fields: dict, diffusion_fields: dict, where: str) -> tuple[ModelConfig, DiffusionConfig]:
    """The model and noise-process configs of a checkpoint or exported card, checked here, where they are read
    (a run's configs are checked when its config file is loaded; the models themselves do not check again)."""
    # written by earlier versions: the graph layout, a benchmark setting now (any layout computes the same function)
    model_fields = {k: v for k, v in model_fields.items() if k != "layout"}
    try:
        cfg, diffusion = ModelConfig(**model_fields), DiffusionConfig(**diffusion_fields)
        diffusion.validate()
        cfg.validate(diffusion)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: it describes a model this version does not build ({err})") from None
    return cfg, diffusion


def model_configs(state: dict, where: str = "checkpoint") -> tuple[ModelConfig, DiffusionConfig]:
    """The model and noise-process configs a checkpoint's states file describes (older checkpoints kept the
    diffusion fields inside model_config), checked."""
    model_fields = dict(state["model_config"])
    diffusion_fields = dict(state.get("diffusion_config") or {})
    for name in ("num_steps", "schedule", "precision"):
        if name in model_fields:
            diffusion_fields.setdefault(name, model_fields.pop(name))
    return checked_configs(model_fields, diffusion_fields, where)


def load_for_eval(path: str, device: str | torch.device = "cpu", use_ema: bool = True,
                  trust_pickle: bool | None = None, kernel: str | None = None) -> LoadedModel:
    """The model of a run directory, a checkpoint folder or an exported .safetensors file (trainer/export.py).
    ``trust_pickle``: unpickle the states file in full (default: MOLSCALE_TRUST_PICKLE; see load_states_file).
    ``kernel``: run the EGNN blocks this way (model.kernel) instead of the way the model was trained."""
    if path.endswith(".safetensors") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        loaded = load_exported(path, device)
    else:
        loaded = _load_run_checkpoint(path, device, use_ema, trust_pickle)
    if kernel is not None:
        loaded.model.cfg.kernel = kernel
        use_kernel(loaded.model, kernel)
    return loaded


def _load_run_checkpoint(path, device, use_ema, trust_pickle) -> LoadedModel:
    folder, states, state = read_model_states(path, trust_pickle)
    for key in ("model_config", "module"):
        if key not in state:
            raise CheckpointError(f"{states} has no {key!r}: not a checkpoint written by trainer/main.py")
    objective = str(state.get("objective", Objective.DIFFUSION))
    cfg, diffusion = model_configs(state, str(folder))
    model = evaluated_model(objective, cfg, diffusion, state.get("prop_stats") or {}, folder)
    weights, used_ema = model_weights(state, use_ema)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{states} does not match the model it describes: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, step=int(state.get("step", 0)), checkpoint=folder,
                       atom_count_histogram={int(k): int(v) for k, v in state["atom_count_histogram"].items()},
                       dataset_url=state.get("dataset_url", ""), used_ema=used_ema, wandb=state.get("wandb"),
                       train_half=state.get("train_half"), objective=objective)


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
    if "model_config" not in card or "diffusion_config" not in card:
        raise CheckpointError(f"{path}: its card does not describe a model this version builds (no model_config "
                              f"or diffusion_config)")
    cfg, diffusion = checked_configs(card["model_config"], card["diffusion_config"], path)
    objective = str(card.get("objective", Objective.DIFFUSION))
    model = evaluated_model(objective, cfg, diffusion, card.get("property_stats") or {}, path)
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
                       property_units=card.get("property_units"), train_half=card.get("dataset", {}).get("half"),
                       objective=objective)


# --- exporting a run

def manifest_digest(dataset_url: str) -> str | None:
    """SHA-256 of the dataset's manifest.json, or None when it cannot be read from here."""
    from molscale.datasets.shards import storage
    try:
        fs, path = storage.get_fs(dataset_url)
        return hashlib.sha256(fs.cat_file(storage.join(path, "manifest.json"))).hexdigest()
    except Exception:  # an unreachable bucket, a moved folder: the card says "unknown" rather than failing
        return None


def property_units(dataset_url: str, names) -> dict[str, str]:
    """Units of ``names``: the dataset manifest's when it is readable here, else the QM9 table's, else ""."""
    from molscale.datasets.chemistry.properties import QM9_PROPERTIES
    from molscale.datasets.shards.manifest import ManifestError, load_manifest
    units = {p.name: p.unit for p in QM9_PROPERTIES}
    try:
        declared = load_manifest(dataset_url).data.get("properties", {}) if dataset_url else {}
        units.update({n: spec.get("unit", "") for n, spec in declared.items() if isinstance(spec, dict)})
    except (ManifestError, OSError, ValueError):
        pass
    return {n: units.get(n, "") for n in names}


def export_checkpoint(run: str, out: str, use_ema: bool = True) -> dict:
    """Write the weights of ``run`` (a run directory or checkpoint folder) to ``out``; returns the card."""
    from safetensors.torch import save_file
    folder, states, state = read_model_states(run)
    objective = str(state.get("objective", Objective.DIFFUSION))
    if objective == Objective.MOLECULEJAE:
        raise CheckpointError(f"{folder} is a {objective} pretraining checkpoint; export the run fine-tuned from it")
    cfg, diffusion = model_configs(state)
    weights, used_ema = model_weights(state, use_ema)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in weights.items()}
    stats = state.get("prop_stats") or {"mean": None, "mad": None}
    card = {
        "format": CARD_FORMAT,
        "objective": objective,  # what the weights are: a diffusion model, or a property classifier
        "model_config": dataclasses.asdict(cfg),
        "diffusion_config": dataclasses.asdict(diffusion),
        "atom_vocab": list(cfg.atom_vocab),
        "properties": list(cfg.properties),
        "condition_on": list(cfg.condition_on),
        "property_units": property_units(state.get("dataset_url", ""), cfg.property_columns),
        "property_stats": stats,
        "atom_count_histogram": {str(k): int(v) for k, v in state["atom_count_histogram"].items()},
        # the URL as a card may show it: credentials redacted (storage.redact_url); a reader with its own
        # credentials (environment, storage options) still reaches s3://***@bucket/x (storage.url_credentials)
        "dataset": {"url": redact_url(state.get("dataset_url", "")),
                    "manifest_sha256": manifest_digest(state.get("dataset_url", "")),
                    "half": state.get("train_half")},
        "step": int(state.get("step", 0)),
        "weights": "ema" if used_ema else "model",
        "exported_from": os.path.abspath(folder),
        "weights_sha256": weights_digest(tensors),
    }
    folder_out = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder_out, exist_ok=True)
    save_file(tensors, out, metadata={CARD_KEY: json.dumps(card, sort_keys=True)})
    with open(out + ".json", "w") as f:
        json.dump(card, f, indent=1, sort_keys=True)
    return card
