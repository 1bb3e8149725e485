"""Storage credentials never reach a file a run writes: config.json, checkpoints, metrics, W&B, logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT, cpu_env

SECRETS = {"key": "AKIAFAKEKEY7Q2W9", "secret": "fake-secret-9f8e7d6c5b4a",
           "session_token": "fake-session-token-4c3b2a19"}


def test_a_run_with_credentials_in_its_config_writes_them_nowhere(qm9_small, s3, tmp_path):
    from molscale.datasets.sources.qm9 import build_qm9
    url = "s3://test-bucket/qm9-secrets"
    build_qm9(url, limit=300, shard_size=50, workers=1, progress=False)
    config = json.load(open(os.path.join(ROOT, "cluster", "cpu_smoke.json")))
    # the config-file route (not --set: launchers print their command lines), nested options included
    config["storage"] = {"key": SECRETS["key"], "secret": SECRETS["secret"],
                         "client_kwargs": {"aws_session_token": SECRETS["session_token"]}}
    config["data"]["url"] = url
    config_path = tmp_path / "with-secrets.json"
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    env = cpu_env()
    r = subprocess.run([sys.executable, "trainer/main.py", "--config", str(config_path), "--run-dir", str(run_dir),
                        "--max-steps", "4", "--set", "checkpoint.every_steps=2", "--set", "evaluation.every_steps=2",
                        "--set", "logging.progress_bar=false"], capture_output=True, text=True, timeout=600,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "step00000004" / "complete").exists()  # the credentials were used to read the shards
    written = [os.path.join(folder, name) for folder, _, names in os.walk(run_dir) for name in names]
    assert any("/wandb/" in path for path in written) and any(path.endswith(".pt") for path in written)
    for secret in SECRETS.values():
        assert secret not in r.stdout + r.stderr
        leaks = [path for path in written if secret.encode() in open(path, "rb").read()]
        assert not leaks, f"{secret} written to {leaks}"
    storage = json.loads((run_dir / "config.json").read_text())["storage"]
    assert storage == {"key": "***", "secret": "***", "client_kwargs": {"aws_session_token": "***"}}
