"""make gpu-check rehearsed on the CPU: every part runs, and the report holds what BENCHMARKS.md needs."""

import json
import subprocess
import sys

import pytest

from tests.support import ROOT, cpu_env


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu(qm9_small, tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, "-m", "trainer.gpu_check", "--device", "cpu", "--quick", "--data", qm9_small,
                        "--out", str(out), "--train-seconds", "4", "--samples", "12",
                        "--parts", "equality,tune,train,sampling,generate",
                        # two of the default paths (each path is a training process: CI time), one of them
                        # the whole step with fused kernels (Triton's interpreter)
                        "--train-paths", "graphs-bf16,step-fused-bf16"],
                       capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert "bench" not in report  # --parts
    for kernel in ("compiled", "fused"):  # fused: Triton's interpreter (tests/conftest.py)
        equal = report["equality"][kernel]
        assert equal["grad_rel_diff"] < 1e-5 and equal["loss_rel_diff"] < 1e-5, kernel
    whole = report["equality"]["whole_step"]  # on the CPU both Trainers run the step body eagerly: the plumbing
    assert whole["steps"] == 9 and whole["graphs"]["shapes"] == 3 and whole["weight_rel_diff"] == 0.0
    assert report["tune"] == {"skipped": "tiles are a GPU setting"}
    eager = report["train"]["graphs-bf16"]
    assert eager["exit_code"] == 0 and eager["steps"] > 0 and eager["median_molecules_per_s"] > 0
    assert list(report["train"]) == ["graphs-bf16", "step-fused-bf16"]
    fused_step = report["train"]["step-fused-bf16"]  # step: the whole-step body, eagerly on the CPU
    assert fused_step["exit_code"] == 0 and fused_step["steps"] > 0
    assert 'cuda_graphs": "step"' in (out / "train-step-fused-bf16" / "config.json").read_text()
    sampled = report["sampling"]  # in this process: the first training path's checkpoint
    assert sampled["model"].endswith("train-graphs-bf16") and sampled["evaluations"] == 5  # --quick: 4 steps
    assert "fused-bf16-step-graphs" not in sampled  # --quick: the interpreter's slowest paths are left out
    for name in ("eager-bf16", "fused-bf16", "eager-fp32", "fused-fp32", "eager-tf32", "eager-bf16-step-graphs",
                 "eager-fp32-step-graphs", "eager-bf16-chunks-250", "eager-bf16-step-graphs-chunks-250"):
        assert sampled[name]["finite"] and "warnings" not in sampled[name], name
        # both rounded: seconds to 0.001 (scaled by 1001 / 5 here), the scaled time to 0.1
        assert sampled[name]["seconds_at_1000_steps"] == pytest.approx(sampled[name]["sampling_seconds"] * 1001 / 5,
                                                                       abs=0.0005 * 1001 / 5 + 0.05 + 1e-9)
    assert sampled["eager-bf16"]["calls"] == 1 and sampled["eager-bf16-chunks-250"]["calls"] >= 1
    difference = sampled["fused_fp32_vs_eager_fp32"]
    assert 0 <= difference["median"] <= difference["p99"] <= difference["max"]
    assert sampled["step_graphs_fp32_vs_eager_fp32"]["max"] == 0.0  # on the CPU the same steps, run eagerly
    for kernel in ("eager", "fused"):  # end to end: Ray samplers and the EDM metrics
        generated = report["generate"][kernel]
        assert generated["molecules"] == 12 and generated["evaluations"] == 5 and 0 <= generated["validity"] <= 1

    # run again into the same folder (make gpu-check twice): each training path starts afresh, its numbers alone
    r = subprocess.run([sys.executable, "-m", "trainer.gpu_check", "--device", "cpu", "--quick", "--data", qm9_small,
                        "--out", str(out), "--train-seconds", "4", "--parts", "train",
                        "--train-paths", "graphs-bf16,fused-bf16"],  # one path again, one not run before
                       capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = json.loads((out / "gpu_check.json").read_text())["train"]
    for name, result in again.items():
        assert result["exit_code"] == 0 and result["steps"] > 0, (name, result)
        steps = [json.loads(line)["step"] for line in (out / f"train-{name}" / "metrics.jsonl").open()]
        assert steps == sorted(set(steps)), name  # not the first run's rows followed by the second's


def test_gpu_check_refuses_a_missing_dataset_and_unknown_parts(tmp_path):
    from molscale.trainer import gpu_check
    assert gpu_check.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert gpu_check.main(["--data", str(tmp_path), "--parts", "bench,warp", "--out", str(tmp_path / "o")]) == 2
    assert gpu_check.main(["--data", str(tmp_path), "--bench-runs", "bf16-eager,fp16-eager", "--out",
                           str(tmp_path / "o")]) == 2
    assert gpu_check.main(["--data", str(tmp_path), "--train-paths", "graphs-bf16,fast", "--out",
                           str(tmp_path / "o")]) == 2
