"""trainer/main.py as a front door: the manifest is read once per process, and an error is one line, printed
once (by rank 0 under a launcher), with the documented exit code (2 bad input, 1 failure while running)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support import ROOT, cpu_env, free_port

QUIET = ["--set", "logging.progress_bar=false", "--set", "logging.wandb.enabled=false"]

# Runs trainer/main.py in this process under an audit hook that records every open() of a manifest.json,
# whatever code path opens it (fsspec, json, a loader); the count goes to the file named by argv[1].
COUNTING_RUNNER = """
import json, runpy, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith("manifest.json"):
        opened.append(args[0])
sys.addaudithook(hook)
out, sys.argv = sys.argv[1], ["trainer/main.py"] + sys.argv[2:]
code = 0
try:
    runpy.run_path("trainer/main.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code
with open(out, "w") as f:
    json.dump({"opened": opened, "code": code}, f)
"""




def counted_start(tmp_path, *args):
    out = tmp_path / "opened.json"
    r = subprocess.run([sys.executable, "-c", COUNTING_RUNNER, str(out), *args], capture_output=True, text=True,
                       timeout=600, env=cpu_env(), cwd=ROOT)
    assert out.exists(), r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["code"] in (0, None), r.stderr[-3000:]
    return result["opened"]


def test_one_training_start_reads_the_manifest_once(qm9_small, tmp_path):
    # training with periodic validation and checkpoints: the trainer, both loaders and validation share one read
    opened = counted_start(tmp_path, "--config", "cluster/cpu_smoke.json", "--run-dir", str(tmp_path / "run"),
                           "--max-steps", "4", "--set", f"data.url={qm9_small}", "--set", "evaluation.every_steps=2",
                           "--set", "checkpoint.every_steps=2", *QUIET)
    assert opened == [os.path.join(qm9_small, "manifest.json")]
    assert (tmp_path / "run" / "step00000004" / "complete").exists()
    # the loop's own host reads: one per record (logging.every_steps is 1 here), none between records
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["host_reads"] for r in rows] == [1, 1, 1, 1]


def test_a_dry_run_reads_the_manifest_once(qm9_small, tmp_path):
    opened = counted_start(tmp_path, "--config", "cluster/cpu_smoke.json", "--set", f"data.url={qm9_small}",
                           "--dry-run")
    assert len(opened) == 1


def error_lines(text: str) -> list[str]:
    return re.findall(r"^(?:config )?error(?: \(rank \d+\))?: .*$", text, flags=re.MULTILINE)


def deepspeed_start(*args, ranks=2):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_accelerators", str(ranks),
           "--master_port", str(free_port()), "trainer/main.py", "--config", "cluster/cpu_smoke.json", *QUIET, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)


def test_a_bad_resume_under_two_ranks_is_one_line_from_rank_0(qm9_small, tmp_path):
    """The error is found while the Trainer is built, on both ranks, after the process group exists."""
    r = deepspeed_start("--run-dir", str(tmp_path / "run"), "--set", f"data.url={qm9_small}",
                        "--resume", str(tmp_path / "nowhere" / "step00000010"))
    output = r.stdout + r.stderr
    assert r.returncode == 2, output[-3000:]
    assert error_lines(output) == [f"error: --resume {tmp_path}/nowhere/step00000010: not a complete checkpoint "
                                   f"(no 'complete' marker)"], output[-3000:]
    assert "Traceback" not in output


def test_a_bad_config_under_two_ranks_is_one_line(qm9_small, tmp_path):
    r = deepspeed_start("--run-dir", str(tmp_path / "run"), "--set", f"data.url={qm9_small}",
                        "--set", "optimizer.lr=-1")
    output = r.stdout + r.stderr
    assert r.returncode == 2, output[-3000:]
    assert error_lines(output) == ["config error: optimizer.lr must be positive, got -1.0"], output[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ('model.properties=["nope"]', "model.properties ['nope'] have no statistics in"),
    ("data.num_workers=400", "fewer than ranks x workers = 400"),
    ("model.atom_vocab=[1,6,7,8]", "model.atom_vocab [1, 6, 7, 8] differs from the dataset's [1, 6, 7, 8, 9]"),
])
def test_bad_input_found_while_building_the_trainer_exits_2(qm9_small, tmp_path, override, message):
    r = subprocess.run([sys.executable, "trainer/main.py", "--config", "cluster/cpu_smoke.json", *QUIET,
                        "--run-dir", str(tmp_path / "run"), "--set", f"data.url={qm9_small}", "--set", override],
                       capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
