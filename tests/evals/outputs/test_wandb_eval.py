"""An evaluation's W&B run joins its training run: same project, entity and group, job_type "eval", and a
config link to the run and step it evaluates. Real offline runs, checked through their run files."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT, cpu_env, generate
from tests.wandb_records import history, run_info


@pytest.fixture
def clean_wandb(tmp_path, monkeypatch):
    """No WANDB_* variables, credentials or settings files; wandb re-reads this environment."""
    import wandb
    for name in list(os.environ):
        if name.startswith("WANDB_") or name == "NETRC":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    wandb.teardown()
    yield
    wandb.teardown()


def test_eval_run_target(clean_wandb, monkeypatch):
    from molscale.evals.outputs.wandb_log import eval_init_args
    training = {"entity": "team", "project": "qm9", "id": "abc", "group": "abc", "name": None, "mode": "offline"}
    args = eval_init_args(None, {"n_samples": 5}, training, 1000)
    assert (args["project"], args["entity"], args["group"], args["job_type"]) == ("qm9", "team", "abc", "eval")
    assert args["config"] == {"n_samples": 5, "training_run": "team/qm9/abc", "training_step": 1000}
    assert args["mode"] == "offline"  # no credentials here
    assert eval_init_args("mine", {}, {**training, "entity": None}, 5)["config"]["training_run"] == "abc"
    assert eval_init_args("mine", {}, training, 5)["project"] == "mine"
    data_row = eval_init_args(None, {}, None, None)
    assert (data_row["project"], data_row["group"]) == ("molscale-evals", None) and data_row["config"] == {}
    monkeypatch.setenv("WANDB_PROJECT", "env-p")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-g")
    import wandb
    wandb.teardown()
    args = eval_init_args(None, {}, training, 5)
    assert (args["project"], args["entity"], args["group"]) == ("env-p", "team", "env-g")


def test_evaluation_joins_the_training_runs_group(qm9_small, tmp_path):
    run_dir = tmp_path / "run"
    train_env = cpu_env(WANDB_PROJECT="trained-here")
    r = subprocess.run([sys.executable, "trainer/main.py", "--config", "cluster/cpu_smoke.json",
                        "--run-dir", str(run_dir), "--max-steps", "6", "--set", f"data.url={qm9_small}",
                        "--set", "logging.progress_bar=false", "--set", "evaluation.every_steps=0",
                        "--set", "logging.wandb.project=null", "--set", "logging.wandb.entity=team-x"],
                       capture_output=True, text=True, timeout=600, env=train_env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    train_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    training = run_info(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0])
    assert (training["project"], training["entity"], training["group"]) == ("trained-here", "team-x", train_id)

    out = tmp_path / "eval"
    env = {k: v for k, v in cpu_env().items() if k not in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP")}
    r = generate("--checkpoint", str(run_dir), "--n-samples", "6", "--batch", "6", "--steps", "5",
                 "--num-cpus", "2", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "W&B logging failed" not in r.stderr
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    info = run_info(files[0])
    assert (info["project"], info["entity"], info["group"], info["job_type"]) == \
        ("trained-here", "team-x", train_id, "eval")
    assert info["id"] != train_id
    assert info["config"]["training_run"] == f"team-x/trained-here/{train_id}"
    assert info["config"]["training_step"] == 6 and info["config"]["step"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["validity"] for row in history(files[0]).values() if "validity" in row] == [metrics["validity"]]


def test_report_of_a_grouped_evaluation_shows_the_training_curves():
    from molscale.evals.outputs.wandb_report import build_report
    report = build_report("team", "qm9", "eval-7", {"validity": 0.5}, group="abc")
    grid = report.blocks[-1]
    assert grid.runsets[0].filters == "Metric('Group') == 'abc'"
    assert [(p.x, p.y) for p in grid.panels] == [("trainer/step", ["loss"]), ("trainer/step", ["valid/loss"])]
    assert len(build_report("team", "qm9", "eval-7", {"validity": 0.5}).blocks) == len(report.blocks) - 2
