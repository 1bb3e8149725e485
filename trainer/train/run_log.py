"""Metrics of a run: one JSON object per logged step in RUN_DIR/metrics.jsonl and the same in W&B.

Only rank 0 writes; every other rank gets the no-op logger. wandb is imported lazily and runs
offline unless WANDB_MODE=online or WANDB_API_KEY is set (or logging.wandb.mode says otherwise).
"""

from __future__ import annotations

import json
import os
import uuid


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    def __init__(self, run_dir: str, config: dict, wandb_cfg, resume_step: int | None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # A killed run may have logged steps past its last checkpoint; they are redone now.
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.file = open(self.path, "a", buffering=1)
        self.wandb = None
        if wandb_cfg.enabled:
            self.wandb = self._start_wandb(run_dir, config, wandb_cfg)

    @staticmethod
    def _start_wandb(run_dir, config, wandb_cfg):
        import wandb
        mode = wandb_cfg.mode or os.environ.get("WANDB_MODE") or \
            ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = os.path.join(run_dir, "wandb_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
        with open(id_file, "w") as f:
            f.write(run_id)
        return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                          dir=run_dir, config=config, mode=mode, id=run_id, resume="allow")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
