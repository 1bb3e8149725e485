"""make gpu-check rehearsed on the CPU: every part runs, and the report holds what BENCHMARKS.md needs."""

import json
import subprocess
import sys

import pytest

from tests.trainer.test_entry_point import ROOT, env


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu(qm9_small, tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, "-m", "trainer.gpu_check", "--device", "cpu", "--quick", "--data", qm9_small,
                        "--out", str(out), "--train-seconds", "4", "--samples", "12",
                        "--parts", "equality,train,sampling"],
                       capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert "bench" not in report  # --parts
    assert report["equality"]["grad_rel_diff"] < 1e-5 and report["equality"]["loss_rel_diff"] < 1e-5
    eager = report["train"]["graphs-bf16"]
    assert eager["exit_code"] == 0 and eager["steps"] > 0 and eager["median_molecules_per_s"] > 0
    assert set(report["train"]) == {"graphs-bf16", "compiled-bf16", "graphs-tf32"}
    sampled = report["sampling"]
    assert sampled["molecules"] == 12 and sampled["evaluations"] == 21
    assert sampled["seconds_at_1000_steps"] == pytest.approx(sampled["sampling_seconds"] * 1001 / 21, rel=0.01)


def test_gpu_check_refuses_a_missing_dataset_and_unknown_parts(tmp_path):
    from molscale.trainer import gpu_check
    assert gpu_check.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert gpu_check.main(["--data", str(tmp_path), "--parts", "bench,warp", "--out", str(tmp_path / "o")]) == 2
