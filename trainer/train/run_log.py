"""Metrics of a run: one JSON object per logged step in RUN_DIR/metrics.jsonl and the same in W&B.

Only rank 0 writes; every other rank gets the no-op logger. wandb is imported lazily; its mode, project,
entity and group come from trainer/train/wandb_run.py (config > WANDB_* environment > defaults). Credentials
in URLs never reach what is written (the W&B config, the command line W&B records, metrics.jsonl):
storage.redact_urls redacts them first.

W&B drops a log whose step is below the run's last step, so after a kill and ``--resume auto`` from an
earlier checkpoint the redone trainer steps would be lost. The trainer step is therefore logged as the
metric ``trainer/step`` (the x axis of every chart) and the W&B step is a counter that only increases
across every process of the run, kept with the run id in RUN_DIR/wandb_run.json.

W&B is a side channel: when a W&B call fails (its service process gone, e.g. killed by a preemption that
sends SIGTERM to every process of the job), the run warns once and goes on without it, so that the rank
still saves its checkpoint. metrics.jsonl keeps every step.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from molscale.datasets.shards.storage import redact_urls

log = logging.getLogger(__name__)

STATE_FILE = "wandb_run.json"
STEP_METRIC = "trainer/step"


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def log_checkpoint(self, folder: str, step: int) -> None:
        pass

    def identity(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_state(run_dir: str, rows: list[dict]) -> dict:
    """{"id", "next_step"} of this run dir's W&B run; a new run when there is none."""
    path = os.path.join(run_dir, STATE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    legacy = os.path.join(run_dir, "wandb_id")
    if os.path.exists(legacy):  # older runs logged W&B step = trainer step: continue after the last one
        with open(legacy) as f:
            return {"id": f.read().strip(), "next_step": max((r.get("step", 0) for r in rows), default=0) + 1}
    return {"id": uuid.uuid4().hex[:12], "next_step": 0}


class RunLogger:
    def __init__(self, run_dir: str, config: dict, wandb_cfg, resume_step: int | None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        rows = _read_rows(self.path)
        self.wandb = None
        self.log_checkpoints = wandb_cfg.log_checkpoints
        if wandb_cfg.enabled:
            self.state = _load_state(run_dir, rows)  # before the truncation below (legacy runs need every row)
            self.wandb = self._start_wandb(config, wandb_cfg)
        if rows:
            # A killed run may have logged steps past its last checkpoint (every step, if it saved none); they are
            # redone now.
            last_kept = resume_step if resume_step is not None else -1
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= last_kept)
        self.file = open(self.path, "a", buffering=1)

    def _start_wandb(self, config, wandb_cfg):
        import wandb

        from molscale.trainer.train.wandb_run import redacted_argv, resolve_mode, resolve_target
        run_id = self.state["id"]
        target = resolve_target(wandb_cfg.project, wandb_cfg.entity, wandb_cfg.group, "molscale")
        with redacted_argv():  # W&B records the command line; --set data.url=... may hold credentials
            run = wandb.init(id=run_id, resume="allow", dir=self.run_dir, config=redact_urls(config),
                             name=wandb_cfg.name, mode=resolve_mode(wandb_cfg.mode), job_type="train",
                             project=target["project"], entity=target["entity"], group=target["group"] or run_id)
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        # an online run resumed on the server may be further along than this run dir knows
        self.state["next_step"] = max(self.state["next_step"], run.step)
        return run

    def _take_step(self) -> int:
        """The next W&B step, saved as used before it is logged so that no later process reuses it."""
        step = self.state["next_step"]
        self.state["next_step"] = step + 1
        path = os.path.join(self.run_dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.state, f)
        os.replace(path + ".tmp", path)
        return step

    def _wandb_call(self, what: str, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except Exception as err:  # any W&B failure: the run goes on without W&B
            log.warning("W&B %s failed (%s: %s); W&B logging stops, metrics.jsonl goes on", what,
                        type(err).__name__, err)
            self.wandb = None

    def log(self, record: dict) -> None:
        record = redact_urls(record)  # a metric is a number; a string that is a URL is written without credentials
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            values = {k: v for k, v in record.items() if k != "step"}
            self._wandb_call("log", self.wandb.log, {**values, STEP_METRIC: record["step"]}, step=self._take_step())

    def log_checkpoint(self, folder: str, step: int) -> None:
        """The checkpoint folder as a "model" artifact (logging.wandb.log_checkpoints)."""
        if self.wandb is None or not self.log_checkpoints:
            return
        import wandb
        tag = os.path.basename(os.path.normpath(folder))
        artifact = wandb.Artifact(f"{self.wandb.id}-checkpoint", type="model", metadata={STEP_METRIC: step})
        # the default "mutable" policy copies the files now: checkpoint rotation may delete the folder before upload
        artifact.add_dir(folder)
        self._wandb_call("log_artifact", self.wandb.log_artifact, artifact, aliases=[tag, "latest"])

    def identity(self) -> dict | None:
        """The W&B run, for the checkpoint's client state (evaluation joins its project and group)."""
        from molscale.trainer.train.wandb_run import identity
        return identity(self.wandb) if self.wandb is not None else None

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self._wandb_call("finish", self.wandb.finish)
            self.wandb = None
