"""Training checkpoints: writing them, finding the one to resume from, resuming (training's side).

Written through DeepSpeed, plus what DeepSpeed does not know.

    RUN_DIR/step00000010/            DeepSpeed's model + optimizer states (every rank saves its part),
                                     client state: step, EMA weights, clipping history, counters
    RUN_DIR/step00000010/rank{r}.pt  per-rank state: data-loader position, RNG states
    RUN_DIR/step00000010/complete    written once every rank has finished: JSON with the size and SHA-256 of
                                     every other file of the folder (older checkpoints hold "ok")
    RUN_DIR/latest                   the newest complete tag, written last and atomically

Resuming a run (``load``) goes through DeepSpeed's own loader: it is this run's own files. Reading a trained
model out of a checkpoint for anything else (evaluation, prediction, export, init_from) is trainer/artifacts.py's.

Damage. ``--resume auto`` checks the digests of the newest checkpoint and, when a file is missing, truncated
or altered, says so in one line and resumes from the newest intact one; evaluation refuses a damaged
checkpoint with one line (``checkpoint_problem``). Checkpoints written before the digests existed are accepted
with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist

from molscale.datasets.errors import InputError

TAG_RE = re.compile(r"^step(\d{8})$")
MARKER = "complete"
MARKER_FORMAT = "molscale-checkpoint/1"

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


def tags_newest_first(run_dir: str) -> list[str]:
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

    No ``resume``: None, and a run directory that already holds a complete checkpoint is refused (starting
    again from step 0 there would append to its metrics and, from the first save on, rotate its checkpoints out).
    ``auto``: the tag in RUN_DIR/latest when complete, else the newest complete one, else None.
    A path: a checkpoint folder (RUN_DIR/stepNNNNNNNN) or a run folder (its newest complete tag).
    The files are checked against the digests recorded at completion: with ``auto`` or a run folder a damaged
    checkpoint is skipped with one warning line naming the file, for the newest intact one; a damaged
    checkpoint folder given by path is refused.
    """
    if not resume:
        tags = complete_tags(run_dir)
        if tags:
            raise CheckpointError(f"{run_dir} already holds checkpoints (newest {tags[-1]}): pass --resume auto to "
                                  "continue that run, or give another --run-dir to start a new one")
        return None
    if resume == "auto":
        tags = tags_newest_first(run_dir)
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
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no '{MARKER}' marker)")
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


