"""Checkpoints: the one module that writes and reads them (training, resume, evaluation, init_from).

Written through DeepSpeed, plus what DeepSpeed does not know.

    RUN_DIR/step00000010/            DeepSpeed's model + optimizer states (every rank saves its part),
                                     client state: step, EMA weights, clipping history, counters
    RUN_DIR/step00000010/rank{r}.pt  per-rank state: data-loader position, RNG states
    RUN_DIR/step00000010/complete    written once every rank has finished: JSON with the size and SHA-256 of
                                     every other file of the folder (older checkpoints hold "ok")
    RUN_DIR/latest                   the newest complete tag, written last and atomically

Reading. Resuming a run (``load``) goes through DeepSpeed's own loader: it is this run's own files. Everything
that reads another run's states file (evaluation, prediction, export, init_from: ``read_model_states``)
unpickles it with ``weights_only=True`` and an allow-list of the few types DeepSpeed's model-states file holds
besides tensors and plain containers, so that a planted object cannot run code; a file that needs more is
refused unless the caller trusts it (--trust-pickle, or MOLSCALE_TRUST_PICKLE=1 for init_from).

Damage. ``--resume auto`` checks the digests of the newest checkpoint and, when a file is missing, truncated
or altered, says so in one line and resumes from the newest intact one; evaluation refuses a damaged
checkpoint with one line. Checkpoints written before the digests existed are accepted with a log line.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from molscale.datasets.errors import InputError
from molscale.trainer.model.egnn import use_kernel
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.schedule import DiffusionConfig

TAG_RE = re.compile(r"^step(\d{8})$")
MARKER = "complete"
MARKER_FORMAT = "molscale-checkpoint/1"
TRUST_ENV = "MOLSCALE_TRUST_PICKLE"  # "1": unpickle states files in full (runs code they hold); trusted files only
# Besides tensors, dtypes and plain containers (which weights_only=True allows), DeepSpeed's
# mp_rank_00_model_states.pt holds the module's state dict as an OrderedDict and, with ZeRO, the parameter
# shapes as torch.Size (found by scanning the pickles of stage 0 / stage 2, bf16, warmup and pretraining runs)
STATES_SAFE_GLOBALS = [collections.OrderedDict, torch.Size]

log = logging.getLogger(__name__)


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
    tags = [d for d in os.listdir(run_dir) if TAG_RE.match(d) and os.path.exists(os.path.join(run_dir, d, MARKER))]
    return sorted(tags)


# --- digests: written when a checkpoint is completed, checked before it is used ----------------------------

def _file_digest(path: str) -> dict:
    """{"size", "sha256"} of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _checkpoint_files(folder: str) -> list[str]:
    """The files a checkpoint folder's marker covers: every regular file but the marker and temporary files."""
    return sorted(name for name in os.listdir(folder) if name != MARKER and ".tmp" not in name
                  and os.path.isfile(os.path.join(folder, name)))


def write_marker(folder: str) -> None:
    """Complete ``folder``: its marker, with the size and SHA-256 of each of its files, written atomically."""
    files = {name: _file_digest(os.path.join(folder, name)) for name in _checkpoint_files(folder)}
    _atomic_write(os.path.join(folder, MARKER), json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1))


_verified: dict[tuple, str | None] = {}  # a process verifies an unchanged folder once (Ray tasks load many times)


def checkpoint_problem(folder: str) -> str | None:
    """What is wrong with a complete checkpoint folder's files (one clause naming the file), or None when they
    match the digests of its marker. A marker without digests (older checkpoints) is accepted with a log line."""
    marker = os.path.join(folder, MARKER)
    try:
        stat = os.stat(marker)
        names = _checkpoint_files(folder)
        key = (os.path.abspath(folder), stat.st_mtime_ns, stat.st_size,
               tuple((n, os.stat(os.path.join(folder, n)).st_size, os.stat(os.path.join(folder, n)).st_mtime_ns)
                     for n in names))
    except FileNotFoundError:
        return f"no '{MARKER}' marker"
    if key in _verified:
        return _verified[key]
    with open(marker, errors="replace") as f:
        text = f.read()
    try:
        recorded = json.loads(text)
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("format") != MARKER_FORMAT:
        if text.strip() != "ok":
            problem = f"its '{MARKER}' marker is unreadable"
        else:
            if _main_rank():
                log.info("checkpoint %s was written before checkpoints recorded digests: its files are not "
                         "verified", folder)
            problem = None
        _verified[key] = problem
        return problem
    _verified[key] = problem = _files_problem(folder, recorded.get("files"))
    return problem


def _files_problem(folder: str, files) -> str | None:
    """The first file of ``files`` ({name: {"size", "sha256"}}) that is missing or differs, as a clause."""
    try:
        recorded = sorted((name, int(want["size"]), str(want["sha256"])) for name, want in files.items())
    except (AttributeError, KeyError, TypeError, ValueError):
        return f"its '{MARKER}' marker is unreadable"
    for name, size, sha256 in recorded:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        found = os.path.getsize(path)
        if found != size:
            return f"{name} has {found} bytes, {size} when it was saved (truncated?)"
        if _file_digest(path)["sha256"] != sha256:
            return f"{name} does not match the SHA-256 recorded when it was saved (altered)"
    return None


def _main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _first_intact(root: str, tags: list[str], what: str) -> str:
    """The first of ``tags`` (newest first) whose files are intact; one warning line when it is not the first."""
    damaged = []
    for tag in tags:
        problem = checkpoint_problem(os.path.join(root, tag))
        if problem is None:
            if damaged and _main_rank():
                log.warning("damaged checkpoint%s %s; resuming from the newest intact one, %s",
                            "s" if len(damaged) > 1 else "", "; ".join(f"{t}: {p}" for t, p in damaged),
                            os.path.join(root, tag))
            return tag
        damaged.append((tag, problem))
    raise CheckpointError(f"{what}: every complete checkpoint in {root} is damaged ("
                          + "; ".join(f"{t}: {p}" for t, p in damaged)
                          + "); restore one, or start afresh in a new run directory")


def _auto_tags(run_dir: str) -> list[str]:
    """Complete tags of a run directory in the order --resume auto tries them: the one RUN_DIR/latest names, then
    the older complete ones, newest first (without a usable 'latest': every complete one, newest first)."""
    tags = complete_tags(run_dir)
    latest = os.path.join(run_dir, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if tag in tags:
            return [tag] + [t for t in reversed(tags) if t < tag]
    return list(reversed(tags))


def find_resume(run_dir: str, resume: str | None) -> tuple[str, str] | None:
    """(checkpoint root, tag) to resume from, or None to start fresh.

    ``auto``: the tag in RUN_DIR/latest when complete, else the newest complete one, else None.
    A path: a checkpoint folder (RUN_DIR/stepNNNNNNNN) or a run folder (its newest complete tag).
    The files are checked against the digests recorded at completion: with ``auto`` or a run folder a damaged
    checkpoint is skipped with one warning line naming the file, for the newest intact one; a damaged
    checkpoint folder given by path is refused.
    """
    if not resume:
        return None
    if resume == "auto":
        tags = _auto_tags(run_dir)
        if not tags:
            return None
        newer = [t for t in complete_tags(run_dir) if t > tags[0]]
        if newer and _main_rank():  # completed, then killed before RUN_DIR/latest named it (or another branch's)
            log.warning("%s/latest names %s; the newer complete checkpoint(s) %s are not resumed from",
                        run_dir, tags[0], ", ".join(newer))
        return run_dir, _first_intact(run_dir, tags, "--resume auto")
    path = os.path.abspath(resume.rstrip("/"))
    if TAG_RE.match(os.path.basename(path)):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no 'complete' marker)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"--resume {resume}: corrupt checkpoint: {problem}")
        return os.path.dirname(path), os.path.basename(path)
    tags = complete_tags(path)
    if not tags:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint in that folder")
    return path, _first_intact(path, list(reversed(tags)), f"--resume {resume}")


def save(engine, run_dir: str, step: int, client_state: dict, rank_state: dict, keep_last: int) -> str:
    """Every rank writes its part; once all have (a barrier), rank 0 records the size and SHA-256 of every file in
    the folder's completion marker, then names the tag in RUN_DIR/latest."""
    tag = tag_for(step)
    folder = os.path.join(run_dir, tag)
    if dist.get_rank() == 0 and os.path.exists(os.path.join(folder, MARKER)):
        # a checkpoint of this step from before a resume (one found damaged, say) is overwritten below: until the
        # new marker is written the folder is incomplete, not complete with the digests of other files
        os.remove(os.path.join(folder, MARKER))
    engine.save_checkpoint(run_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, os.path.join(folder, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        write_marker(folder)
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
    """The checkpoint folder for a run directory (the one its 'latest' names, else its newest complete one) or a
    checkpoint folder, its files checked against their digests; a clear error otherwise (a damaged checkpoint is
    refused, never replaced by an older one)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder = os.path.abspath(path.rstrip("/"))
    if TAG_RE.match(os.path.basename(folder)):
        if not os.path.exists(os.path.join(folder, MARKER)):
            raise CheckpointError(f"checkpoint {path}: not a complete checkpoint (no 'complete' marker)")
    else:
        tags = _auto_tags(folder)
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


def model_configs(state: dict) -> tuple[ModelConfig, DiffusionConfig]:
    """The model and noise-process configs a checkpoint's states file describes (older checkpoints kept the
    diffusion fields inside model_config)."""
    model_fields = dict(state["model_config"])
    diffusion_fields = dict(state.get("diffusion_config") or {})
    for name in ("num_steps", "schedule", "precision"):
        if name in model_fields:
            diffusion_fields.setdefault(name, model_fields.pop(name))
    return ModelConfig(**model_fields), DiffusionConfig(**diffusion_fields)


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
