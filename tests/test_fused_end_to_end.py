"""model.kernel = 'fused' through the commands a user runs: trainer/main.py trains on the fused path (Triton's
interpreter on this CPU), evals/generate.py --kernel fused samples from a checkpoint trained eagerly, and the
samples equal the eager path's to float32 tolerance."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.support import ROOT, cpu_env

pytest.importorskip("triton")
pytestmark = pytest.mark.slow


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600,
                          env=cpu_env(TRITON_INTERPRET="1"), cwd=ROOT)


def train(run_dir, data, kernel):
    return run("trainer/main.py", "--config", "cluster/cpu_smoke.json", "--run-dir", str(run_dir), "--max-steps", "3",
               "--set", f"data.url={data}", "--set", "logging.progress_bar=false", "--set", "evaluation.every_steps=2",
               "--set", "evaluation.max_batches=1", "--set", "logging.wandb.enabled=false",
               "--set", f'model.kernel="{kernel}"')


@pytest.fixture(scope="module")
def eager_run(qm9_small, tmp_path_factory):
    """A run trained on the eager path (both tests sample from it)."""
    run_dir = tmp_path_factory.mktemp("fused-e2e") / "eager"
    eager = train(run_dir, qm9_small, "eager")
    assert eager.returncode == 0, eager.stderr[-3000:]
    return run_dir


def test_training_and_sampling_on_the_fused_path(qm9_small, eager_run, tmp_path):
    fused = train(tmp_path / "fused", qm9_small, "fused")
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert "the EGNN edge MLPs run as Triton kernels on Triton's CPU interpreter" in fused.stderr
    assert "EGNN blocks run eagerly" not in fused.stderr
    # the same data, seeds and steps: the losses agree to float32 rounding of the kernels' summation order
    losses = [[json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
              for run_dir in (tmp_path / "fused", eager_run)]
    assert len(losses[0]) == len(losses[1]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)

    outs = {}
    for kernel in ("fused", "eager"):
        out = tmp_path / f"eval-{kernel}"
        r = run("evals/generate.py", "--checkpoint", str(eager_run), "--n-samples", "6", "--batch", "6",
                "--steps", "4", "--seed", "1", "--num-cpus", "1", "--no-wandb", "--kernel", kernel, "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        outs[kernel] = json.loads((out / "metrics.json").read_text())
    assert outs["fused"]["source"]["kernel"] == "fused" and outs["eager"]["source"]["kernel"] == "eager"
    from rdkit import Chem
    coords = {}
    for kernel in outs:
        supplier = Chem.SDMolSupplier(str(tmp_path / f"eval-{kernel}" / "samples.sdf"), sanitize=False, removeHs=False)
        coords[kernel] = np.concatenate([m.GetConformer().GetPositions() for m in supplier])
    assert coords["fused"].shape == coords["eager"].shape and len(coords["eager"]) > 0
    # the SDF holds 4 decimals; a few steps of an untrained model can put atoms far out, hence a relative bound
    np.testing.assert_allclose(coords["fused"], coords["eager"], rtol=1e-4, atol=2e-3)


def test_without_the_interpreter_a_cpu_sampler_reports_the_eager_path(eager_run, tmp_path):
    """--kernel fused on CPU samplers without TRITON_INTERPRET: they run eagerly and metrics.json says so."""
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "evals/generate.py", "--checkpoint", str(eager_run), "--n-samples", "4",
                        "--steps", "2", "--num-cpus", "1", "--no-wandb", "--kernel", "fused", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in cpu_env().items() if k != "TRITON_INTERPRET"}, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["source"]["kernel"] == "eager"
