"""Shared fixtures: real QM9 shards built once per session, a tiny checkpoint trained on them, and a real S3
server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import ROOT, cpu_env, free_port

# model.kernel = 'fused' on the CPU: Triton's interpreter, chosen when the kernels are defined (at import)
os.environ.setdefault("TRITON_INTERPRET", "1")


class S3Server:
    """moto's ThreadedMotoServer: a real S3 HTTP endpoint; stop/start keeps the stored objects."""

    def __init__(self):
        from moto.server import ThreadedMotoServer
        self._cls = ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        import logging
        import socket
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        # moto's start() waits forever when its thread cannot bind; say why instead (a forked child that
        # outlived its test still holds the listening socket of the server it was forked beside)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as err:
                raise RuntimeError(f"S3 test server: port {self.port} is held by another process ({err}); "
                                   "a leaked DataLoader worker (StreamingLoader.close) is the usual cause") from err
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="session")
def s3():
    """A running S3 server with bucket ``test-bucket``; the AWS_* variables point every client at it."""
    server = S3Server()
    server.start()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="test-bucket")
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def qm9_small(tmp_path_factory):
    """The first 600 QM9 molecules as shards of 40 (several shards per split)."""
    from molscale.datasets.sources.qm9 import build_qm9
    out = str(tmp_path_factory.mktemp("qm9") / "qm9-600")
    build_qm9(out, limit=600, shard_size=40, workers=1, progress=False)
    return out


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
