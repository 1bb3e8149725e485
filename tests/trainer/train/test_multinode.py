"""Two "nodes" on loopback with the real launchers: `deepspeed --no_ssh --node_rank 0|1` over a two-host hostfile
and `torchrun --nnodes 2` with c10d rendezvous, one CPU rank each, the run directory shared as on a cluster.
A node that dies makes the other exit with one clear line within seconds (never a hang), and `--resume auto`
on both nodes then continues exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, cpu_env, free_port, metrics

BIN = os.path.dirname(sys.executable)
STEPS = 12
SETTINGS = [f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "logging.progress_bar=false",
            "evaluation.every_steps=0", "data.batch_size=8", "data.shuffle_buffer=64", "logging.wandb.enabled=false"]


def start_node(node_rank, port, hostfile, run_dir, data_url, *extra, resume=False):
    cmd = [os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "trainer/main.py",
           "--config", "cluster/cpu_smoke.json", "--run-dir", str(run_dir), "--set", f"data.url={data_url}"]
    for setting in SETTINGS + list(extra):
        cmd += ["--set", setting]
    cmd += ["--resume", "auto"] if resume else []
    log = open(f"{run_dir}.node{node_rank}.log", "ab")
    return subprocess.Popen(cmd, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def two_nodes(tmp_path, run_dir, data_url, *extra, resume=False):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh starts nothing remotely
    port = free_port()
    return [start_node(r, port, hostfile, run_dir, data_url, *extra, resume=resume) for r in (0, 1)]


def node_log(run_dir, node_rank):
    path = f"{run_dir}.node{node_rank}.log"
    return open(path, errors="replace").read() if os.path.exists(path) else ""


@pytest.fixture(scope="module")
def reference(qm9_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-nodes")
    run_dir = tmp / "reference"
    nodes = two_nodes(tmp, run_dir, qm9_small)
    codes = [node.wait(600) for node in nodes]
    assert codes == [0, 0], node_log(run_dir, 0)[-3000:] + node_log(run_dir, 1)[-3000:]
    return run_dir


def test_two_nodes_train_and_checkpoint_together(reference):
    assert [r["step"] for r in metrics(reference)] == list(range(1, STEPS + 1))
    import torch
    for tag in ("step00000004", "step00000008", "step00000012"):
        states = [torch.load(reference / tag / f"rank{r}.pt", weights_only=False)["loader"] for r in (0, 1)]
        # each node's rank read its own part of the epoch, and both are at the same batch of it
        assert states[0]["world_size"] == states[1]["world_size"] == 2
        assert states[0]["consumed"] == states[1]["consumed"] and states[0]["epoch"] == states[1]["epoch"]


def test_a_lost_node_stops_the_other_with_one_line_and_resume_continues_exactly(reference, qm9_small, tmp_path):
    run_dir = tmp_path / "lost-node"
    nodes = two_nodes(tmp_path, run_dir, qm9_small)
    deadline = time.time() + 400
    while time.time() < deadline and not (run_dir / "latest").exists():
        time.sleep(0.2)
    assert (run_dir / "latest").exists(), node_log(run_dir, 0)[-3000:]
    os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1 is gone: power, network, a reclaimed spot instance
    killed_at = time.time()
    code = nodes[0].wait(120)
    assert time.time() - killed_at < 60
    nodes[1].wait()
    output = node_log(run_dir, 0)
    lines = re.findall(r"^error \(rank 0\): .*$", output, flags=re.MULTILINE)
    assert code == 1 and len(lines) == 1 and "lost contact with another rank" in lines[0], output[-3000:]
    assert "--resume auto" in lines[0] and "Traceback" not in output
    nodes = two_nodes(tmp_path, run_dir, qm9_small, resume=True)
    assert [node.wait(600) for node in nodes] == [0, 0], node_log(run_dir, 0)[-3000:]
    expected = {r["step"]: r["loss"] for r in metrics(reference)}
    assert {r["step"]: r["loss"] for r in metrics(run_dir)} == expected


def test_torchrun_two_nodes_with_c10d_rendezvous(qm9_small, tmp_path):
    run_dir, port = tmp_path / "torchrun", free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "molscale-test", "--node_rank", str(node_rank),
               "trainer/main.py", "--config", "cluster/cpu_smoke.json", "--run-dir", str(run_dir),
               "--set", f"data.url={qm9_small}", "--max-steps", "4"]
        for setting in SETTINGS:
            cmd += ["--set", setting]
        log = open(f"{run_dir}.node{node_rank}.log", "ab")
        nodes.append(subprocess.Popen(cmd, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    assert [node.wait(600) for node in nodes] == [0, 0], node_log(run_dir, 0)[-3000:] + node_log(run_dir, 1)[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "step00000004" / "rank1.pt").exists()
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 4
