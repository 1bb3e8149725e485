"""A Ray cluster of two nodes on this machine (`ray start --head` plus `ray start --address`, one CPU each):
sampling actors on both nodes, a killed actor restarted with its chunk retried (the same molecules), --workers
beyond the cluster clamped, and a chunked SMILES build whose tasks run on the cluster from the py_modules upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.support import RAY_NODE_PORT_FLAGS, ROOT, cpu_env, free_ports, port_args, read_sdf_coords

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
CLUSTER_ENV = cpu_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                   RAY_AUTH_MODE="disabled")
HEAD_PORT_FLAGS = (*RAY_NODE_PORT_FLAGS, "--ray-client-server-port")


@pytest.fixture(scope="module")
def two_nodes():
    # all distinct: both nodes share the machine
    gcs, dashboard, *rest = free_ports(2 + len(HEAD_PORT_FLAGS) + len(RAY_NODE_PORT_FLAGS))
    head = [RAY, "start", "--head", "--num-cpus", "1", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats",
            *port_args(HEAD_PORT_FLAGS, rest[:len(HEAD_PORT_FLAGS)])]
    second = [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats", *port_args(RAY_NODE_PORT_FLAGS, rest[len(HEAD_PORT_FLAGS):])]
    try:
        for cmd in (head, second):
            r = subprocess.run(cmd, capture_output=True, text=True, env=CLUSTER_ENV, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=CLUSTER_ENV, timeout=120)


def submit(cluster, *args, out):
    return subprocess.Popen([RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ROOT, "--",
                             "python", "evals/generate.py", *args, "--no-wandb", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CLUSTER_ENV, cwd=ROOT)


SAMPLING = ["--n-samples", "16", "--batch", "2", "--steps", "250", "--seed", "3", "--workers", "5"]


@pytest.fixture(scope="module")
def undisturbed(two_nodes, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray2") / "undisturbed"
    job = submit(two_nodes, "--checkpoint", tiny_checkpoint, *SAMPLING, out=out)
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    return out, log


def test_sampling_uses_both_nodes_and_clamps_workers(undisturbed):
    out, log = undisturbed
    source = json.loads((out / "metrics.json").read_text())["source"]
    assert source["workers"] == 2  # 5 asked, the cluster holds 2 one-CPU actors
    assert "--workers 5 is more than the cluster's 2 CPU(s)" in log
    chunks = source["sampling_chunks"]["chunks"]  # 16 molecules by the pair budget of --batch 2: more than 2
    assert len(source["chunks_per_node"]) == 2 and sum(source["chunks_per_node"].values()) == chunks
    assert len(read_sdf_coords(out / "samples.sdf")) == 16


def test_a_killed_sampler_is_restarted_and_gives_the_same_molecules(two_nodes, tiny_checkpoint, undisturbed,
                                                                       tmp_path):
    out = tmp_path / "disturbed"
    killed = []

    def kill_one_sampler():
        # SIGKILL one actor process while it samples, as a lost node or the OOM killer would
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("ray::Sampler.sample" in part for part in proc.info["cmdline"] or ()):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_sampler)
    killer.start()
    job = submit(two_nodes, "--checkpoint", tiny_checkpoint, *SAMPLING[:-2], "--steps", "1000", out=out)
    job.communicate(timeout=600)
    killer.join()
    assert killed, "no sampler was seen sampling"
    assert job.returncode == 0
    steps_1 = read_sdf_coords(out / "samples.sdf")
    # the same run undisturbed (every chunk's seed is fixed: the restarted actor redoes its chunk exactly)
    again = tmp_path / "again"
    job = submit(two_nodes, "--checkpoint", tiny_checkpoint, *SAMPLING[:-2], "--steps", "1000", out=again)
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    assert steps_1 == read_sdf_coords(again / "samples.sdf")


def test_chunked_smiles_build_on_the_cluster_matches_a_local_build(two_nodes, tmp_path):
    smiles = tmp_path / "mols.smi"
    smiles.write_text("CCO\nc1ccccc1\nCC(=O)O\nCCN\nC1CC1\nCOC\n")
    common = ["-m", "datasets", "build", "smiles", "--input", str(smiles), "--conformers", "2", "--shard-size", "1",
              "--no-progress"]
    local = subprocess.run([sys.executable, *common, "--backend", "process", "--workers", "1",
                            "--out", str(tmp_path / "local")], capture_output=True, text=True, env=cpu_env(), cwd=ROOT,
                           timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = subprocess.run([sys.executable, *common, "--backend", "ray", "--out", str(tmp_path / "cluster")],
                            capture_output=True, text=True, env=dict(CLUSTER_ENV, RAY_ADDRESS=two_nodes["gcs"]),
                            cwd=ROOT, timeout=600)
    assert remote.returncode == 0, remote.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert len(shards) >= 6 and shards == sorted(p.name for p in (tmp_path / "cluster").glob("*.tar"))
    for name in shards:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "cluster" / name).read_bytes(), name
    from ray.util.state import list_tasks
    tasks = list_tasks(address=two_nodes["dashboard"], filters=[("func_or_class_name", "=", "run_chunk")],
                       detail=True, limit=1000)
    assert len({task.node_id for task in tasks}) == 2, "the chunks ran on one node only"
