"""Checkpoints as untrusted input and as files that can be damaged (issue 24, points 1 and 2).

1. Everything that reads another run's checkpoint (evaluation, prediction, export, init_from) unpickles its
   states file with ``weights_only=True``: a planted object whose unpickling would create a file is refused
   with one line that names the opt-in (--trust-pickle / MOLSCALE_TRUST_PICKLE), and the file never appears.
2. A completed checkpoint records the size and SHA-256 of its files: ``--resume auto`` skips a truncated or
   altered newest checkpoint with one line and continues exactly from the newest intact one, evaluation
   refuses it, and a kill inside a save on 2 DeepSpeed ranks (before the completion marker) resumes exactly.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

from tests.support import ROOT, cpu_env, finish, launch, log_tail, metrics

STATES = "mp_rank_00_model_states.pt"
RUN = ["--config", "cluster/cpu_smoke.json", "--set", "logging.progress_bar=false", "--set",
       "evaluation.every_steps=0", "--set", "logging.wandb.enabled=false", "--set", "checkpoint.every_steps=2",
       "--set", "data.batch_size=16"]


def train(run_dir, data_url, *extra, max_steps=4):
    """trainer/main.py in one process (rc, stdout + stderr)."""
    r = subprocess.run([sys.executable, "trainer/main.py", *RUN, "--run-dir", str(run_dir), "--max-steps",
                        str(max_steps), "--set", f"data.url={data_url}", *extra],
                       capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    return r.returncode, r.stdout + r.stderr


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run(qm9_small, tmp_path_factory):
    """A real run of 4 steps with checkpoints at steps 2 and 4 (digests recorded), and its per-step losses."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    rc, out = train(run_dir, qm9_small)
    assert rc == 0, out[-3000:]
    assert sorted(p.name for p in run_dir.glob("step*")) == ["step00000002", "step00000004"]
    return run_dir


def copy_run(run, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


# --- 1. no code from artifacts -----------------------------------------------------------------------------

class Payload:
    """Unpickling this creates ``path``: what a planted object could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def plant(run_dir, payload) -> None:
    """Put ``payload`` into the newest checkpoint's states file; the marker says "ok" (the files of a checkpoint
    written before digests existed are not verified, so the planted file is read: the unpickler must hold)."""
    folder = run_dir / "step00000004"
    states = torch.load(folder / STATES, map_location="cpu", weights_only=False)  # our own file
    states["notes"] = payload
    torch.save(states, folder / STATES)
    (folder / "complete").write_text("ok\n")


@pytest.fixture
def planted(run, tmp_path):
    run_dir = copy_run(run, tmp_path, "planted")
    pwned = tmp_path / "pwned"
    plant(run_dir, Payload(str(pwned)))
    return run_dir, pwned


def test_a_planted_payload_is_refused_by_every_library_reader(planted, tmp_path):
    from molscale.trainer import artifacts
    from molscale.trainer.artifacts import export_checkpoint, load_for_eval
    from molscale.trainer.model.networks import build_model
    from molscale.trainer.train import init_from
    from molscale.trainer.train.checkpoints import CheckpointError
    run_dir, pwned = planted
    _, _, clean = artifacts.read_model_states(str(run_dir / "step00000002"))  # an intact one still loads
    model = build_model(*artifacts.model_configs(clean))
    readers = {"evaluation": lambda path: load_for_eval(path),
               "init_from": lambda path: init_from.initialise(model, path),
               "export": lambda path: export_checkpoint(path, str(tmp_path / "out.safetensors"))}
    for what, read in readers.items():
        for path in (str(run_dir), str(run_dir / "step00000004")):
            with pytest.raises(CheckpointError) as err:
                read(path)
            message = str(err.value)
            assert "\n" not in message and "--trust-pickle" in message and "MOLSCALE_TRUST_PICKLE" in message, what
            assert "io.open" in message or "builtins.open" in message, message
            assert not pwned.exists(), f"{what} ran the planted payload"
    assert not (tmp_path / "out.safetensors").exists()


def test_a_planted_payload_is_refused_by_every_command(planted, qm9_small, tmp_path):
    run_dir, pwned = planted
    smiles = tmp_path / "in.smi"
    smiles.write_text("CCO ethanol\n")
    commands = {
        "generate": ["evals/generate.py", "--checkpoint", str(run_dir), "--out", str(tmp_path / "gen"),
                     "--n-samples", "2", "--no-wandb"],
        "predict": ["evals/predict.py", "--checkpoint", str(run_dir), "--input", str(smiles), "--out",
                    str(tmp_path / "preds.csv"), "--local"],
        "export": ["-m", "trainer.export", str(run_dir), "--out", str(tmp_path / "model.safetensors")],
        "init_from": ["trainer/main.py", *RUN, "--run-dir", str(tmp_path / "finetune"), "--max-steps", "1",
                      "--set", f"data.url={qm9_small}", "--set", f"init_from={run_dir}"],
    }
    for what, args in commands.items():
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=cpu_env(),
                           cwd=ROOT)
        output = r.stdout + r.stderr
        assert r.returncode == 2, (what, output[-3000:])
        [line] = error_lines(output)
        assert "refused" in line and ("--trust-pickle" in line or "MOLSCALE_TRUST_PICKLE" in line), (what, line)
        assert "Traceback" not in output, (what, output[-3000:])
        assert not pwned.exists(), f"{what} ran the planted payload"
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "preds.csv").exists()


def test_a_trusted_file_opts_in(run, tmp_path, monkeypatch):
    """Objects beyond the allow-list (a date, here: harmless) load when the caller trusts the file."""
    from molscale.trainer.artifacts import load_for_eval, read_model_states
    from molscale.trainer.train.checkpoints import CheckpointError
    run_dir = copy_run(run, tmp_path)
    plant(run_dir, datetime.date(2024, 1, 1))
    with pytest.raises(CheckpointError, match="datetime.date"):
        read_model_states(str(run_dir))
    assert read_model_states(str(run_dir), trust_pickle=True)[2]["notes"] == datetime.date(2024, 1, 1)
    monkeypatch.setenv("MOLSCALE_TRUST_PICKLE", "1")
    assert load_for_eval(str(run_dir)).step == 4


# --- 2. checkpoints checked ---------------------------------------------------------------------------------

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def alter(path):
    """One byte inside the tensor data changed: the file still reads, with a different weight."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def test_completed_checkpoints_record_the_digests_of_their_files(run):
    import hashlib
    for tag in ("step00000002", "step00000004"):
        folder = run / tag
        marker = json.loads((folder / "complete").read_text())
        assert sorted(marker["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "complete")
        for name, recorded in marker["files"].items():
            data = (folder / name).read_bytes()
            assert recorded == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", [truncate, alter], ids=["truncated", "altered"])
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_evaluation_refuses_it(run, qm9_small, tmp_path, caplog,
                                                                                damage):
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.train.checkpoints import CheckpointError, find_resume
    run_dir = copy_run(run, tmp_path)
    damage(run_dir / "step00000004" / STATES)

    with caplog.at_level(logging.WARNING, logger="molscale.trainer.train.checkpoints"):
        assert find_resume(str(run_dir), "auto") == (str(run_dir), "step00000002")
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "step00000004" in line and STATES in line and "step00000002" in line, line
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint .*step00000004: {STATES}") as err:
        load_for_eval(str(run_dir))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        find_resume(str(run_dir), str(run_dir / "step00000004"))  # named explicitly: refused, not replaced
    assert load_for_eval(str(run_dir / "step00000002")).step == 2

    # the trainer says so in one line and continues exactly from step 2
    rc, out = train(run_dir, qm9_small, "--resume", "auto")
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out
    [warning] = [line for line in out.splitlines() if "damaged checkpoint" in line]
    assert STATES in warning and "step00000002" in warning
    assert f"resumed from {run_dir / 'step00000002'} at step 2" in out
    reference = {r["step"]: r["loss"] for r in metrics(run)}
    assert {r["step"]: r["loss"] for r in metrics(run_dir)} == reference
    assert load_for_eval(str(run_dir)).step == 4  # written again, intact


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(run, tmp_path):
    from molscale.trainer.train.checkpoints import CheckpointError, find_resume
    run_dir = copy_run(run, tmp_path)
    for tag in ("step00000002", "step00000004"):
        truncate(run_dir / tag / "rank0.pt")
    with pytest.raises(CheckpointError, match="every complete checkpoint .* is damaged"):
        find_resume(str(run_dir), "auto")


def test_checkpoints_without_digests_are_accepted_with_a_log_line(run, tmp_path, caplog):
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.train.checkpoints import find_resume
    run_dir = copy_run(run, tmp_path)
    for tag in ("step00000002", "step00000004"):
        (run_dir / tag / "complete").write_text("ok\n")
    with caplog.at_level(logging.INFO, logger="molscale.trainer.train.checkpoints"):
        assert find_resume(str(run_dir), "auto") == (str(run_dir), "step00000004")
        assert load_for_eval(str(run_dir)).step == 4
    assert any("before checkpoints recorded digests" in r.getMessage() for r in caplog.records)


def test_a_start_without_resume_over_checkpoints_is_refused_and_changes_nothing(run, qm9_small, tmp_path):
    """Without --resume the trainer would start again from step 0 in that directory: refused before it writes."""
    run_dir = copy_run(run, tmp_path)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc, out = train(run_dir, qm9_small, "--set", "train.seed=7")  # another config: config.json must survive
    assert rc == 2, out[-3000:]
    assert "Traceback" not in out
    [line] = error_lines(out)
    assert str(run_dir) in line and "step00000004" in line and "--resume auto" in line, line
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_fresh_start_beside_only_an_unfinished_checkpoint_begins_new_metrics(run, qm9_small, tmp_path):
    """A run killed before its first completed save left rows and a folder without its marker: the next start
    (with or without --resume auto: there is nothing to continue) redoes every step and logs each once."""
    from molscale.trainer.train.checkpoints import find_resume
    run_dir = copy_run(run, tmp_path)
    shutil.rmtree(run_dir / "step00000004")
    (run_dir / "step00000002" / "complete").unlink()  # as if killed inside the first save
    (run_dir / "latest").unlink()
    assert find_resume(str(run_dir), None) is None and find_resume(str(run_dir), "auto") is None
    rc, out = train(run_dir, qm9_small, max_steps=2)
    assert rc == 0, out[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}) and rows[-1]["step"] == 2
    reference = {r["step"]: r["loss"] for r in metrics(run) if r["step"] <= 2}
    assert {r["step"]: r["loss"] for r in rows} == reference


# --- a kill inside a save on 2 DeepSpeed ranks -----------------------------------------------------------------

STEPS = 8
KILL_AT = 8
SETTINGS = [f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "evaluation.every_steps=0", "data.batch_size=8"]

# Each rank runs trainer/main.py through this: at the save of step KILL_AT, rank 1 writes DeepSpeed's files and
# half of its own, then the whole job is killed (SIGKILL to its process group), before the completion marker.
KILL_IN_SAVE = """
import os, runpy, signal, sys
from molscale.trainer.train import checkpoints
save = checkpoints.save
def killed_in_save(engine, run_dir, step, client_state, rank_state, keep_last):
    if step == {kill_at} and os.environ["RANK"] == "1":
        tag = checkpoints.tag_for(step)
        engine.save_checkpoint(run_dir, tag=tag, client_state=client_state, save_latest=False)
        with open(os.path.join(run_dir, tag, "rank1.pt"), "wb") as f:
            f.write(b"PK" + bytes(100))
            f.flush()
            os.fsync(f.fileno())
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return save(engine, run_dir, step, client_state, rank_state, keep_last)
checkpoints.save = killed_in_save
sys.argv[0] = "trainer/main.py"
runpy.run_path("trainer/main.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_inside_a_save_on_two_ranks_resumes_exactly(qm9_small, tmp_path):
    reference_dir = tmp_path / "reference"
    assert finish(launch(reference_dir, qm9_small, *SETTINGS)) == 0, log_tail(reference_dir)
    reference = {r["step"]: r["loss"] for r in metrics(reference_dir)}
    assert sorted(reference) == list(range(1, STEPS + 1))

    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE.format(kill_at=KILL_AT))
    run_dir = tmp_path / "killed"
    rc = finish(launch(run_dir, qm9_small, *SETTINGS, script=str(wrapper)))
    assert rc != 0, log_tail(run_dir)
    partial = run_dir / f"step{KILL_AT:08d}"
    assert partial.is_dir() and not (partial / "complete").exists(), log_tail(run_dir)
    assert (run_dir / "latest").read_text() == "step00000004"

    rc = finish(launch(run_dir, qm9_small, *SETTINGS, resume=True))
    assert rc == 0, log_tail(run_dir)
    assert "resumed from" in log_tail(run_dir) and "at step 4" in log_tail(run_dir)
    assert {r["step"]: r["loss"] for r in metrics(run_dir)} == reference
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    marker = json.loads((partial / "complete").read_text())
    assert {"rank0.pt", "rank1.pt", STATES} <= set(marker["files"])
    from molscale.trainer.train.checkpoints import checkpoint_problem
    assert checkpoint_problem(str(partial)) is None


def test_a_stored_model_config_is_checked_where_it_is_read():
    """Configs in checkpoints and exported cards are checked once, when read (the models do not check again)."""
    from molscale.trainer.artifacts import CheckpointError, checked_configs
    with pytest.raises(CheckpointError, match=r"runs/x: it describes a model .*model.kernel must be one"):
        checked_configs({"kernel": "inductor", "atom_vocab": [1, 6]}, {}, "runs/x")
    with pytest.raises(CheckpointError, match="runs/x: it describes a model .*unexpected keyword"):
        checked_configs({"wings": 2}, {}, "runs/x")
    with pytest.raises(CheckpointError, match="runs/x: .*schedule"):
        checked_configs({"atom_vocab": [1, 6]}, {"schedule": "linear"}, "runs/x")
    cfg, diffusion = checked_configs({"atom_vocab": [1, 6], "hidden": 8}, {"num_steps": 500}, "runs/x")
    assert cfg.hidden == 8 and diffusion.num_steps == 500
    # earlier versions stored the graph layout (now a benchmark setting): such checkpoints still load
    assert checked_configs({"atom_vocab": [1, 6], "layout": "dense"}, {}, "runs/x")[0].atom_vocab == [1, 6]
