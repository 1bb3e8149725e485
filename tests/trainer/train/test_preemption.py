"""Preemption as SLURM and Kubernetes do it: SIGTERM to every process of the job, DataLoader workers included.

The ranks must finish their step, save a checkpoint and exit 0 while their workers carry on (a worker that
died on the signal used to take its rank down with "DataLoader worker ... is killed by signal"), and
`--resume auto` must then continue exactly as if the run had never stopped, workers and all (the loader
resumes its worker streams in their round-robin order). And the SLURM script must pass its SIGTERM on to
the ranks and live until they have saved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from tests.support import ROOT, finish, launch, log_tail, metrics, wait_for_rows

STEPS = 16
SETTINGS = [f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "evaluation.every_steps=0",
            "data.batch_size=8", "data.num_workers=2", "data.prefetch_factor=2"]

# The deepspeed launcher reports no exit codes of its ranks once it is stopped by a signal itself, so each
# rank runs trainer/main.py through this and leaves its exit code next to the run's log.
RECORD_EXIT = """
import os, runpy, sys
code = 1
try:
    sys.argv[0] = "trainer/main.py"
    runpy.run_path("trainer/main.py", run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    raise
finally:
    run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
    with open(f"{run_dir}.rank{os.environ['RANK']}.exit", "w") as f:
        f.write(str(code))
"""


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def reference_with_workers(qm9_small, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "reference-workers"
    rc = finish(launch(run_dir, qm9_small, *SETTINGS))
    assert rc == 0, log_tail(run_dir)
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def test_sigterm_to_every_process_saves_and_resumes_exactly(reference_with_workers, qm9_small, tmp_path):
    assert sorted(reference_with_workers) == list(range(1, STEPS + 1))
    wrapper = tmp_path / "record_exit.py"
    wrapper.write_text(RECORD_EXIT)
    run_dir = tmp_path / "preempted"
    proc = launch(run_dir, qm9_small, *SETTINGS, script=str(wrapper))
    wait_for_rows(proc, run_dir, 5, timeout=120)
    assert proc.poll() is None, "the run ended before it could be preempted:\n" + log_tail(run_dir)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    [agent] = [p for p in tree if "deepspeed.launcher.launch" in " ".join(cmdline(p))]
    ranks = agent.children()
    workers = [w for rank in ranks for w in rank.children() if cmdline(w) == cmdline(rank)]  # forked
    assert (len(ranks), len(workers)) == (2, 4), [cmdline(p)[:4] for p in tree]
    for p in tree:  # launcher, deepspeed.launcher.launch, both ranks, their DataLoader workers, W&B's service
        with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived helper process may be gone already
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, log_tail(run_dir)
    proc.wait()  # the `deepspeed` runner itself has no SIGTERM handler: it dies at once (-15), as on a cluster

    exits = {rank: open(f"{run_dir}.rank{rank}.exit").read() if os.path.exists(f"{run_dir}.rank{rank}.exit")
             else "none (killed)" for rank in (0, 1)}
    assert exits == {0: "0", 1: "0"}, log_tail(run_dir)
    stopped_at = int((run_dir / "latest").read_text().removeprefix("step"))
    assert 5 <= stopped_at < STEPS, log_tail(run_dir)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped_at + 1))
    for name in ("complete", "rank0.pt", "rank1.pt"):
        assert (run_dir / f"step{stopped_at:08d}" / name).exists()
    assert f"stopped by SIGTERM at step {stopped_at}" in log_tail(run_dir)

    rc = finish(launch(run_dir, qm9_small, *SETTINGS, resume=True))
    assert rc == 0, log_tail(run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step logged once
    assert {r["step"]: r["loss"] for r in rows} == reference_with_workers


SBATCH = str(ROOT / "cluster" / "slurm_geom_64gpu.sbatch")
FAKE_RANK = """
import os, signal, sys, time
rank = sys.argv[1].removeprefix("--local_rank=")
def save_and_exit(signum, frame):
    time.sleep(2)  # finishing the step and saving take a while
    open(f"saved{rank}", "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, save_and_exit)
open(f"started{rank}", "w").close()
while True:
    time.sleep(0.1)
"""
SHIMS = {  # SLURM and DeepSpeed stand-ins; pkill is the real one, confined to the test's session
    "scontrol": "echo node1\n",
    "srun": 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    "pkill": 'exec {pkill} -s 0 "$@"\n',
    "deepspeed": "echo \"$@\" > launcher_args\n"  # 2 ranks as DeepSpeed starts them; dies on SIGTERM like it
                 "python3 -u trainer/main.py --local_rank=0 & a=$!\n"
                 "python3 -u trainer/main.py --local_rank=1 & b=$!\n"
                 "wait $a && wait $b\n",
}


def test_slurm_script_passes_sigterm_to_the_ranks_and_waits_for_them(tmp_path):
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0
    pkill = shutil.which("pkill")
    if pkill is None:
        pytest.skip("no pkill")
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in SHIMS.items():
        (shims / name).write_text("#!/bin/bash\n" + body.format(pkill=pkill))
        (shims / name).chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "main.py").write_text(FAKE_RANK)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1")
    proc = subprocess.Popen(["bash", SBATCH, "--set", "train.max_steps=10"], env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not all((tmp_path / f"started{r}").exists() for r in (0, 1)):
            time.sleep(0.05)
        assert proc.poll() is None and (tmp_path / "started1").exists()
        proc.send_signal(signal.SIGTERM)  # --signal=B:TERM: to the batch script only
        assert proc.wait(30) == 0
        assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()  # it waited for both ranks
    finally:
        with contextlib.suppress(ProcessLookupError):  # anything the script left behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "launcher_args").read_text().strip().endswith(
        "trainer/main.py --config cluster/geom_64gpu.json --resume auto --set train.max_steps=10")
