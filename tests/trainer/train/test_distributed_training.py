"""The trainer as users launch it: `deepspeed --num_accelerators 2 trainer/main.py` on CPU (2 gloo ranks),
shards served by a real S3 server, exact kill-and-resume, preemption by SIGTERM, NaN handling, W&B offline."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import time

import numpy as np
import psutil
import pytest
import webdataset as wds

from tests.support import LAUNCH_STEPS, finish, launch, log_tail, metrics, wait_for_rows

STEPS = LAUNCH_STEPS


@pytest.fixture(scope="module")
def s3_data(qm9_small, s3):
    from molscale.datasets.sources.qm9 import build_qm9
    url = "s3://test-bucket/qm9-train"
    build_qm9(url, limit=600, shard_size=40, workers=1, progress=False)
    return url


@pytest.fixture(scope="module")
def reference_run(s3_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    rc = finish(launch(run_dir, s3_data))
    assert rc == 0, log_tail(run_dir)
    return run_dir


def test_two_ranks_from_s3_train_checkpoint_and_log(reference_run):
    rows = metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), f"loss did not fall: {losses}"
    assert {"eps_nucleation", "eps_growth", "molecules_per_s", "grad_norm", "lr", "data_wait_s"} <= rows[0].keys()
    assert rows[14]["valid/mae_lumo"] > 0 and "valid/loss" in rows[29]
    # checkpoints: the last 3 kept, latest written, per-rank state of both ranks
    assert open(reference_run / "latest").read() == "step00000030"
    tags = sorted(p.name for p in reference_run.glob("step*"))
    assert tags == ["step00000010", "step00000020", "step00000030"]
    for tag in tags:
        assert (reference_run / tag / "complete").exists()
        assert (reference_run / tag / "rank0.pt").exists() and (reference_run / tag / "rank1.pt").exists()
    config = json.loads((reference_run / "config.json").read_text())
    assert config["data"]["url"].startswith("s3://") and config["train"]["max_steps"] == STEPS


def test_wandb_offline_run_holds_the_metrics(reference_run):
    from tests.wandb_records import history
    files = glob.glob(str(reference_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    logged = history(files[0], key="trainer/step")
    expected = {r["step"]: r["loss"] for r in metrics(reference_run)}
    assert {step: row["loss"] for step, row in logged.items() if "loss" in row} == expected


def test_kill_and_resume_gives_the_same_losses(reference_run, s3_data, tmp_path):
    run_dir = tmp_path / "killed"
    proc = launch(run_dir, s3_data)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        latest = run_dir / "latest"
        if latest.exists() and latest.read_text() == "step00000010":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + log_tail(run_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics(run_dir))
    assert 10 <= killed_at < STEPS
    rc = finish(launch(run_dir, s3_data, resume=True))
    assert rc == 0, log_tail(run_dir)
    resumed = {r["step"]: r["loss"] for r in metrics(run_dir)}
    reference = {r["step"]: r["loss"] for r in metrics(reference_run)}
    assert resumed == reference


def test_sigterm_saves_a_checkpoint_and_exits_zero(reference_run, s3_data, tmp_path):
    run_dir = tmp_path / "preempted"
    proc = launch(run_dir, s3_data)
    wait_for_rows(proc, run_dir, 13, timeout=400, poll=0.1)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if any("trainer/main.py" in part for part in p.cmdline())
             and "deepspeed.launcher" not in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    for p in ranks:  # what SLURM or Kubernetes do on preemption: SIGTERM to every task
        p.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, log_tail(run_dir)
    stopped_at = int(open(run_dir / "latest").read().removeprefix("step"))
    assert 13 <= stopped_at < STEPS
    assert (run_dir / f"step{stopped_at:08d}" / "complete").exists()
    rc = finish(launch(run_dir, s3_data, f"train.max_steps={stopped_at + 3}", resume=True))
    assert rc == 0, log_tail(run_dir)
    reference = {r["step"]: r["loss"] for r in metrics(reference_run)}
    assert {r["step"]: r["loss"] for r in metrics(run_dir)} == {s: reference[s] for s in range(1, stopped_at + 4)}


def poison(src, dst, shards):
    """Copy a dataset, with every molecule of the named shards scaled to coordinates near 1e30 Angstrom: finite, so
    the loader's sample checks pass, but their squared distances overflow, so the losses are not finite."""
    from molscale.datasets.shards.samples import decode_sample, encode_sample
    from molscale.datasets.shards.tario import read_shard_samples
    shutil.copytree(src, dst)
    for name in shards:
        path = os.path.join(dst, name)
        samples = [decode_sample(s) for s in read_shard_samples(open(path, "rb").read())]
        with open(path, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for s in samples:
                writer.write(encode_sample(s["key"], s["pos"] * 1e30, s["z"], s["props"],
                                           s["bonds"], s["smiles"]))
            writer.close()
    return str(dst)


def test_nan_losses_are_skipped_and_counted(qm9_small, tmp_path):
    from molscale.datasets.shards.manifest import load_manifest
    train = [s["name"] for s in load_manifest(qm9_small).shards("train")]
    url = poison(qm9_small, tmp_path / "some-nan", train[::2])
    run_dir = tmp_path / "nan-some"
    # shards of 40, batches of 8, no shuffle buffer: every batch of a poisoned shard is all NaN
    rc = finish(launch(run_dir, url, "train.max_steps=25", "data.shuffle_buffer=1", "data.batch_size=8",
                       "evaluation.every_steps=0", "train.max_nonfinite_in_row=50", ranks=1))
    assert rc == 0, log_tail(run_dir)
    rows = metrics(run_dir)
    # a skipped step is a step (its update is masked on the device); a record of skipped steps only has no loss
    assert [r["step"] for r in rows] == list(range(1, 26))
    skipped = [r["skipped_in_record"] for r in rows]
    assert all(np.isfinite(r["loss"]) for r, s in zip(rows, skipped) if not s)
    assert all("loss" not in r for r, s in zip(rows, skipped) if s)
    assert 0 < rows[-1]["nonfinite_skipped"] == sum(skipped) < 25


def test_only_nan_losses_stop_the_run_with_a_checkpoint(qm9_small, tmp_path):
    from molscale.datasets.shards.manifest import load_manifest
    train = [s["name"] for s in load_manifest(qm9_small).shards("train")]
    url = poison(qm9_small, tmp_path / "all-nan", train)
    run_dir = tmp_path / "nan-all"
    rc = finish(launch(run_dir, url, "train.max_nonfinite_in_row=4", "evaluation.every_steps=0", launcher="python"))
    assert rc != 0
    # every update was skipped: the checkpoint saved at the read that saw the limit holds the initial weights
    assert "4 non-finite losses or gradients in a row by step 4" in log_tail(run_dir)
    assert (run_dir / "latest").read_text() == "step00000004"


def test_torchrun_launch_trains_the_same_way(qm9_small, tmp_path):
    run_dir = tmp_path / "torchrun"
    rc = finish(launch(run_dir, qm9_small, "train.max_steps=4", "evaluation.every_steps=0", launcher="torchrun"))
    assert rc == 0, log_tail(run_dir)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "latest").read_text() == "step00000004"
    assert (run_dir / "step00000004" / "rank1.pt").exists()


def test_zero2_with_bf16_autocast_trains(qm9_small, tmp_path):
    """ZeRO-2 with bf16 autocast and adaptive clipping through DeepSpeed's optimizer."""
    run_dir = tmp_path / "zero2"
    rc = finish(launch(run_dir, qm9_small, "train.max_steps=6", "deepspeed.zero_stage=2", "deepspeed.bf16=true",
                       "evaluation.every_steps=3", "checkpoint.every_steps=3", "logging.every_steps=4"))
    assert rc == 0, log_tail(run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [3, 4, 6]  # every 4th step, the last, and every validation
    assert "valid/loss" in rows[0] and "valid/loss" not in rows[1]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[0]["valid/mae_lumo"] > 0
    assert (run_dir / "step00000006" / "complete").exists()


def test_paper_recipe_knobs_on_two_ranks(qm9_small, tmp_path):
    """Two optimizer steps per batch (the released loop), the reference loss reduction over the global batch, and
    an lr scaled by the square-root rule with a linear warmup, kept across a resume."""
    import torch
    run_dir = tmp_path / "recipe"
    knobs = ["optimizer.steps_per_batch=2", "loss.reduction=reference", "optimizer.warmup_steps=4",
             "optimizer.lr_scaling=sqrt", "optimizer.lr_reference_batch=8", "optimizer.lr=0.001",
             "evaluation.every_steps=0", "checkpoint.every_steps=4"]
    rc = finish(launch(run_dir, qm9_small, "train.max_steps=4", *knobs))
    assert rc == 0, log_tail(run_dir)
    lr = 0.001 * (2 * 16 / 8) ** 0.5  # global batch 2 ranks x 16 = 32, four times the reference batch
    np.testing.assert_allclose([r["lr"] for r in metrics(run_dir)], [lr * k / 4 for k in (1, 2, 3, 4)])
    states = glob.glob(str(run_dir / "step00000004" / "*model_states.pt"))
    optimizer = torch.load(states[0], map_location="cpu", weights_only=False)["optimizer"]
    assert {float(s["step"]) for s in optimizer["state"].values()} == {8.0}  # 2 AdamW steps per batch

    rc = finish(launch(run_dir, qm9_small, "train.max_steps=6", *knobs, resume=True))
    assert rc == 0, log_tail(run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["lr"] for r in rows[4:]], [lr, lr])  # the warmup is not restarted
    assert all(np.isfinite(r["loss"]) for r in rows)
