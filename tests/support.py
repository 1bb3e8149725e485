"""What many tests share: the repository root, the environment of a CPU subprocess, free ports, the trainer's
launchers (deepspeed, torchrun, python) and reading their runs, molecules from samples."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: commands run from here, as the README runs them


def cpu_env(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess that runs molscale on the CPU: DeepSpeed's CPU accelerator, W&B offline and
    quiet, one OpenMP thread, Ray without usage reporting, unbuffered output, and none of an enclosing launcher's
    rank variables, W&B key or Ray address. ``extra`` adds or overrides variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               RAY_DISABLE_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_API_KEY", "RAY_ADDRESS"):
        env.pop(name, None)
    env.update(extra)
    return env


def sample_mol(sample):
    """An RDKit molecule (3D conformer, bonds, the sample's key as its name) from a shard sample read with bonds."""
    from rdkit import Chem
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE, 4: Chem.BondType.AROMATIC}
    mol = Chem.RWMol()
    for z in sample["z"]:
        mol.AddAtom(Chem.Atom(int(z)))
    for i, j, order in sample["bonds"]:
        mol.AddBond(int(i), int(j), kinds[int(order)])
    conf = Chem.Conformer(len(sample["z"]))
    for i, p in enumerate(sample["pos"]):
        conf.SetAtomPosition(i, [float(v) for v in p])
    conf.Set3D(True)
    mol.AddConformer(conf)
    mol = mol.GetMol()
    mol.SetProp("_Name", sample["key"])
    return mol


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports. All n sockets stay bound until every port is known: a port released and
    asked for again can come back, and Ray refuses two components on one port (seen in CI)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# A Ray node's component ports: Ray's fixed defaults would collide with any other Ray node on the machine (a
# second test node, a build's or a user's), and Ray refuses two components on one port
RAY_NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                       "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


def port_args(flags, ports) -> list[str]:
    """['--flag', 'port', ...] for each flag and its port (from free_ports)."""
    return [arg for flag, port in zip(flags, ports, strict=True) for arg in (flag, str(port))]


# launch()'s run settings, ahead of a test's own --set values
LAUNCH_STEPS = 30
LAUNCH_SETTINGS = [f"train.max_steps={LAUNCH_STEPS}", "checkpoint.every_steps=10", "logging.progress_bar=false",
          "evaluation.every_steps=15", "data.batch_size=16", "data.shuffle_buffer=64"]




def launch(run_dir, data_url, *extra, ranks=2, resume=False, launcher="deepspeed",
           config="cluster/cpu_smoke.json", script="trainer/main.py"):
    """Start trainer/main.py (or a stand-in ``script``) the way users do: under deepspeed, torchrun or python."""
    bin_dir = os.path.dirname(sys.executable)
    if launcher == "deepspeed":
        cmd = [os.path.join(bin_dir, "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(free_port())]
    elif launcher == "torchrun":
        cmd = [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    else:
        cmd = [sys.executable]
    cmd += [script, "--config", config, "--run-dir", str(run_dir),
            "--set", f"data.url={data_url}"]
    for s in LAUNCH_SETTINGS + list(extra):
        cmd += ["--set", s]
    if resume:
        cmd += ["--resume", "auto"]
    log = open(os.path.join(os.path.dirname(str(run_dir)), os.path.basename(str(run_dir)) + ".log"), "ab")
    return subprocess.Popen(cmd, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, timeout=600):
    """The launched run's exit code; its whole process group killed if it outlives ``timeout``."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def metrics(run_dir):
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_rows(proc, run_dir, rows: int, timeout: float, poll: float = 0.02) -> None:
    """Wait until the launched run has logged ``rows`` metrics rows, ended, or ``timeout`` seconds passed."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(metrics(run_dir)) >= rows:
            return
        time.sleep(poll)


def log_tail(run_dir):
    """The last 3,000 characters of the log launch() wrote beside the run directory."""
    path = str(run_dir) + ".log"
    return open(path, errors="replace").read()[-3000:] if os.path.exists(path) else ""


def generate(*args, env=None, timeout=600):
    """evals/generate.py as a user runs it from the checkout (on the CPU unless ``env`` says otherwise)."""
    return subprocess.run([sys.executable, "evals/generate.py", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cpu_env(), cwd=ROOT)


def read_sdf_coords(path):
    """(name, atomic numbers, coordinates to 1e-4) of each molecule of an SDF file, as written."""
    from rdkit import Chem
    return [(m.GetProp("_Name") if m.HasProp("_Name") else "", [a.GetAtomicNum() for a in m.GetAtoms()],
             m.GetConformer().GetPositions().round(4).tolist())
            for m in Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)]
