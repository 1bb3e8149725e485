"""train.cuda_graphs "step" through trainer/main.py as users run it: on one process (the CPU runs the step body
eagerly) SIGTERM saves and `--resume auto` continues exactly; with two ranks the run falls back to DeepSpeed's
step and says so."""

from __future__ import annotations

import signal

from tests.support import finish, launch, log_tail, metrics, wait_for_rows


def whole_log(run_dir) -> str:
    return open(f"{run_dir}.log", errors="replace").read()

STEPS = 12
SETTINGS = [f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "evaluation.every_steps=6",
            "data.batch_size=8", "data.num_workers=0", 'train.cuda_graphs="step"', "optimizer.warmup_steps=5"]


def test_a_whole_step_run_is_preempted_and_resumes_exactly(qm9_small, tmp_path):
    reference = tmp_path / "reference"
    assert finish(launch(reference, qm9_small, *SETTINGS, ranks=1, launcher="python")) == 0, log_tail(reference)
    expected = {r["step"]: (r["loss"], r["lr"]) for r in metrics(reference)}
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert 'train.cuda_graphs "step": ' in whole_log(reference)  # the closing count of shapes

    run_dir = tmp_path / "preempted"
    proc = launch(run_dir, qm9_small, *SETTINGS, ranks=1, launcher="python")
    wait_for_rows(proc, run_dir, 5, timeout=120)
    assert proc.poll() is None, "the run ended before it could be preempted:\n" + log_tail(run_dir)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, log_tail(run_dir)
    stopped_at = int((run_dir / "latest").read_text().removeprefix("step"))
    assert 5 <= stopped_at < STEPS, log_tail(run_dir)
    assert finish(launch(run_dir, qm9_small, *SETTINGS, ranks=1, launcher="python", resume=True)) == 0, \
        log_tail(run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["step"]: (r["loss"], r["lr"]) for r in rows} == expected
    assert any("valid/loss" in r for r in rows)  # validation (eager) between whole steps


def test_two_ranks_fall_back_to_deepspeeds_step_with_a_log_line(qm9_small, tmp_path):
    run_dir = tmp_path / "two"
    assert finish(launch(run_dir, qm9_small, *SETTINGS[1:], "train.max_steps=3")) == 0, log_tail(run_dir)
    assert 'train.cuda_graphs "step" runs at world size 1; with 2 ranks' in whole_log(run_dir)
    assert [r["step"] for r in metrics(run_dir)][-1] == 3
