"""What many tests share: the repository root and the environment of a CPU subprocess."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: commands run from here, as the README runs them


def cpu_env(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess that runs molscale on the CPU: DeepSpeed's CPU accelerator, W&B offline and
    quiet, one OpenMP thread, Ray without usage reporting, unbuffered output, and none of an enclosing launcher's
    rank variables, W&B key or Ray address. ``extra`` adds or overrides variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               RAY_DISABLE_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_API_KEY", "RAY_ADDRESS"):
        env.pop(name, None)
    env.update(extra)
    return env
