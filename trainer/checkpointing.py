"""Checkpoints in RUN_DIR through DeepSpeed, plus what DeepSpeed does not know.

    RUN_DIR/step00000010/            DeepSpeed's model + optimizer states (every rank saves its part),
                                     client state: step, EMA weights, clipping history, counters
    RUN_DIR/step00000010/rank{r}.pt  per-rank state: data-loader position, RNG states
    RUN_DIR/step00000010/complete    written once every rank has finished
    RUN_DIR/latest                   the newest complete tag, written last and atomically
"""

from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step(\d{8})$")


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
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no 'complete' marker)")
        return os.path.dirname(path), os.path.basename(path)
    tags = complete_tags(path)
    if not tags:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint in that folder")
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
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    rank_file = os.path.join(root, tag, f"rank{dist.get_rank()}.pt")
    if not os.path.exists(rank_file):
        raise FileNotFoundError(f"{rank_file} is missing: was the checkpoint written with another world size?")
    return client_state, torch.load(rank_file, weights_only=False)
