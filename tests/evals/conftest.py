"""Fixtures of the evaluation tests: a tiny real UniGEM checkpoint trained once per session."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, cpu_env


@pytest.fixture(scope="session")
def tiny_checkpoint(qm9_small, tmp_path_factory):
    """A real UniGEM checkpoint (LUMO head): cpu_smoke trained for 6 steps on the small QM9 shards."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    r = subprocess.run([sys.executable, "trainer/main.py", "--config", "cluster/cpu_smoke.json",
                        "--run-dir", str(run_dir), "--max-steps", "6", "--set", f"data.url={qm9_small}",
                        "--set", "logging.progress_bar=false", "--set", "evaluation.every_steps=0",
                        "--set", "logging.wandb.enabled=false"],
                       capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(run_dir)
