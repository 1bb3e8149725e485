"""W&B as its users expect: wandb's own mode resolution (offline without credentials), WANDB_PROJECT /
WANDB_ENTITY / WANDB_RUN_GROUP, a killed and resumed run that keeps every step, checkpoints as artifacts.
All runs are real offline W&B runs, checked through their run files."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import finish, launch, log_tail, metrics
from tests.wandb_records import artifacts, history, run_info


@pytest.fixture
def clean_wandb(tmp_path, monkeypatch):
    """No credentials, no settings files, no WANDB_* variables: a fresh machine, never the real user's config."""
    import wandb
    for name in list(os.environ):
        if name.startswith("WANDB_") or name == "NETRC":
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # wandb reads the environment once per process: start from this one
    yield home
    wandb.teardown()


def test_no_credentials_gives_an_offline_run_without_asking(clean_wandb, tmp_path):
    import wandb

    from molscale.trainer.train.wandb_run import has_credentials, resolve_mode
    assert not has_credentials() and resolve_mode() == "offline"
    run = wandb.init(dir=str(tmp_path), mode=resolve_mode(), project="p")
    assert run.offline
    run.finish()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))


def test_explicit_config_mode_wins(clean_wandb, monkeypatch):
    from molscale.trainer.train.wandb_run import resolve_mode
    assert resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("disabled") == "disabled"


@pytest.mark.parametrize("mode", ["online", "disabled"])
def test_wandb_mode_variable_is_left_to_wandb(clean_wandb, monkeypatch, mode):
    from molscale.trainer.train.wandb_run import resolve_mode, wandb_settings
    monkeypatch.setenv("WANDB_MODE", mode)
    assert resolve_mode() is None and wandb_settings().mode == mode


def test_wandb_offline_command_is_left_to_wandb(clean_wandb, tmp_path):
    from molscale.trainer.train.wandb_run import resolve_mode, wandb_settings
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "offline"], cwd=tmp_path,
                       env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert resolve_mode() is None and wandb_settings().mode == "offline"


def test_a_logged_in_user_gets_wandbs_default(clean_wandb, monkeypatch):
    from molscale.trainer.train.wandb_run import has_credentials, resolve_mode
    netrc = clean_wandb / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert has_credentials() and resolve_mode() is None  # wandb's default: online


def test_api_key_variable_counts_as_credentials(clean_wandb, monkeypatch):
    from molscale.trainer.train.wandb_run import resolve_mode
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode() is None


def test_project_entity_group_precedence(clean_wandb, monkeypatch):
    from molscale.trainer.train.wandb_run import resolve_target
    training = {"project": "train-p", "entity": "train-e", "group": "train-g"}
    assert resolve_target(None, None, None, "molscale") == {"project": "molscale", "entity": None, "group": None}
    assert resolve_target(None, None, None, "x", fallback=training) == \
        {"project": "train-p", "entity": "train-e", "group": "train-g"}
    monkeypatch.setenv("WANDB_PROJECT", "env-p")
    monkeypatch.setenv("WANDB_ENTITY", "env-e")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-g")
    import wandb
    wandb.teardown()
    assert resolve_target(None, None, None, "x", fallback=training) == \
        {"project": "env-p", "entity": "env-e", "group": "env-g"}
    assert resolve_target("cfg-p", "cfg-e", "cfg-g", "x", fallback=training) == \
        {"project": "cfg-p", "entity": "cfg-e", "group": "cfg-g"}


def test_a_run_dir_of_the_old_layout_keeps_its_run_and_continues_after_its_last_step(tmp_path):
    from molscale.trainer.train.run_log import _load_state
    (tmp_path / "wandb_id").write_text("oldrun\n")  # before wandb_run.json, W&B step = trainer step
    assert _load_state(str(tmp_path), [{"step": 1}, {"step": 2}, {"step": 7}]) == {"id": "oldrun", "next_step": 8}
    fresh = _load_state(str(tmp_path / "new"), [])
    assert fresh["next_step"] == 0 and len(fresh["id"]) == 12


# --- a real training run: killed after a checkpoint, resumed --------------------------------------------------

STEPS = 40
EVERY = 8


def checkpoint_step(run_dir) -> int | None:
    latest = run_dir / "latest"
    return int(latest.read_text().removeprefix("step")) if latest.exists() else None


def offline_runs(run_dir) -> list[str]:
    """The run files of the run dir's offline W&B runs, oldest first (one per process)."""
    return sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))


def logged_steps(run_dir) -> list[int]:
    files = offline_runs(run_dir)
    return sorted(history(files[-1], key="trainer/step")) if files else []


def test_killed_and_resumed_run_keeps_every_step_in_one_wandb_run(qm9_small, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-entity")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    # wandb-core writes the run file every 15 s, and a killed process loses what it had not written yet
    monkeypatch.setenv("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.1")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging, not the user's home
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run_dir = tmp_path / "run"
    extra = [f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "evaluation.every_steps=0",
             "logging.wandb.project=null", "logging.wandb.log_checkpoints=true"]
    proc = launch(run_dir, qm9_small, *extra, ranks=1, launcher="python")
    deadline = time.time() + 400
    # kill once W&B holds steps past the last checkpoint: the resumed run logs them again
    while time.time() < deadline and proc.poll() is None:
        done = checkpoint_step(run_dir)
        if done and max(logged_steps(run_dir), default=0) > done + 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + log_tail(run_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resume_at = checkpoint_step(run_dir)
    rc = finish(launch(run_dir, qm9_small, *extra, ranks=1, launcher="python", resume=True))
    assert rc == 0, log_tail(run_dir)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))

    state = json.loads((run_dir / "wandb_run.json").read_text())
    first, second = files = offline_runs(run_dir)
    assert all(f.endswith(f"run-{state['id']}.wandb") for f in files)
    killed, resumed = history(first), history(second)  # keyed by the W&B step
    assert max(row["trainer/step"] for row in killed.values()) > resume_at  # steps that are redone
    # W&B steps only increase across the two processes, so W&B drops none of the redone steps
    assert min(resumed) > max(killed) and state["next_step"] == max(resumed) + 1
    trainer_steps = {row["trainer/step"] for row in [*killed.values(), *resumed.values()]}
    assert sorted(trainer_steps) == list(range(1, STEPS + 1))
    assert {row["trainer/step"]: row["loss"] for row in resumed.values()} == \
        {r["step"]: r["loss"] for r in metrics(run_dir) if r["step"] > resume_at}

    # project and entity from the environment, the run's own id as group; the same in the checkpoint
    info = run_info(second)
    assert info["id"] == state["id"] and info["project"] == "env-project" and info["entity"] == "env-entity"
    assert info["group"] == state["id"] and info["job_type"] == "train"
    from molscale.trainer.artifacts import load_for_eval
    assert load_for_eval(str(run_dir)).wandb == {"entity": "env-entity", "project": "env-project", "id": state["id"],
                                                 "group": state["id"], "name": None, "mode": "offline"}

    # every checkpoint as a "model" artifact
    logged = artifacts(first) + artifacts(second)
    assert {a["name"] for a in logged} == {state["id"] + "-checkpoint"} and {a["type"] for a in logged} == {"model"}
    assert [sorted(a["aliases"]) for a in artifacts(second)] == \
        [["latest", f"step{step:08d}"] for step in range(resume_at + EVERY, STEPS + 1, EVERY)]
    assert "mp_rank_00_model_states.pt" in artifacts(second)[-1]["files"]
    assert artifacts(second)[-1]["metadata"] == {"trainer/step": STEPS}
