"""Property-conditioned generation end to end, EDM's protocol: a conditional UniGEM trained on the second half
of the train split, a LUMO predictor on the first, evals/generate.py scoring the samples against their targets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from molscale.datasets.shards.manifest import load_manifest
from molscale.evals.conditional import atom_count_predictions, correlation
from tests.support import ROOT, cpu_env


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          env=cpu_env(), cwd=ROOT)


def train(run_dir, data, *sets):
    args = ["--config", "cluster/cpu_smoke.json", "--run-dir", str(run_dir), "--max-steps", "6",
            "--set", f"data.url={data}", "--set", "logging.progress_bar=false", "--set", "evaluation.every_steps=0",
            "--set", "logging.wandb.enabled=false"]
    for item in sets:
        args += ["--set", item]
    return run("trainer/main.py", *args)


@pytest.fixture(scope="module")
def halves(qm9_small, tmp_path_factory):
    """(conditional run on the second half, LUMO predictor on the first half)."""
    root = tmp_path_factory.mktemp("halves")
    conditional = train(root / "conditional", qm9_small, "model.properties=[]", 'model.condition_on=["lumo"]',
                        "data.half=second")
    assert conditional.returncode == 0, conditional.stderr[-3000:]
    scorer = train(root / "scorer", qm9_small, "data.half=first")
    assert scorer.returncode == 0, scorer.stderr[-3000:]
    return str(root / "conditional"), str(root / "scorer")


@pytest.fixture(scope="module")
def classifier(qm9_small, tmp_path_factory):
    """EDM's independent scorer: a property classifier (objective 'property') on the first half."""
    root = tmp_path_factory.mktemp("classifier")
    r = train(root / "run", qm9_small, "objective=property", "data.half=first")
    assert r.returncode == 0, r.stderr[-3000:]
    return str(root / "run")


def test_a_classifier_scores_the_conditional_samples_with_their_atom_types(halves, classifier, tiny_checkpoint,
                                                                           tmp_path):
    from molscale.evals.property_prediction import predict_conformers
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.model.classifier import PropertyClassifier
    from tests.support import read_sdf_coords
    conditional, _ = halves
    loaded = load_for_eval(classifier)
    assert isinstance(loaded.model, PropertyClassifier) and loaded.objective == "property"
    r = run("evals/generate.py", "--checkpoint", conditional, "--n-samples", "12", "--batch", "6", "--steps", "5",
            "--seed", "3", "--num-cpus", "2", "--no-wandb", "--scorer", classifier,
            "--unconditional-baseline", tiny_checkpoint, "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    lumo = metrics["conditional"]["properties"]["lumo"]
    assert metrics["conditional"]["scorer"] == classifier and lumo["real_molecules_mae"] > 0
    # the #Atoms row through the same scorer: an unconditional model's molecules for the same atom counts
    assert lumo["unconditional_mae"] > 0 and metrics["conditional_unconditional_mae_lumo"] == lumo["unconditional_mae"]
    assert lumo["unconditional_mae"] != lumo["mae"]
    corr = lumo["unconditional_target_prediction_corr"]  # the atom-count level of the generated row's correlation
    assert corr is None or -1.0 <= corr <= 1.0
    # the row is the classifier's reading of the generated atoms and positions, as written to samples.sdf
    written = [(np.array(z), np.array(pos, dtype=np.float32))
               for _, z, pos in read_sdf_coords(tmp_path / "o" / "samples.sdf")]
    expected = predict_conformers(loaded.model, written, 64)[:, 0]
    assert lumo["prediction_mean"] == pytest.approx(float(expected.mean()), rel=1e-3, abs=1e-2)
    # ... which reads the atom types: the same positions with every atom carbon are graded otherwise
    carbons = predict_conformers(loaded.model, [(np.full_like(z, 6), pos) for z, pos in written], 64)[:, 0]
    assert np.abs(carbons - expected).max() > 1e-3

    refused = run("evals/generate.py", "--checkpoint", classifier, "--no-wandb", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "is a property classifier" in refused.stderr
    for args, message in ((["--scorer", classifier, "--unconditional-baseline", conditional],
                           "must be an unconditional generative model"),
                          (["--unconditional-baseline", tiny_checkpoint], "it needs --checkpoint and --scorer")):
        refused = run("evals/generate.py", "--checkpoint", conditional, *args, "--no-wandb", "--out",
                      str(tmp_path / "x"))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
    exported = tmp_path / "classifier.safetensors"
    assert run("-m", "trainer.export", classifier, "--out", str(exported)).returncode == 0
    again = load_for_eval(str(exported))
    assert again.objective == "property" and again.train_half == "first"
    assert np.allclose(predict_conformers(again.model, written, 64)[:, 0], expected)


def test_a_run_on_half_the_train_split_plans_and_records_that_half(qm9_small, halves, tmp_path):
    plan = run("trainer/main.py", "--config", "cluster/cpu_smoke.json", "--set", f"data.url={qm9_small}",
               "--set", 'model.condition_on=["gap"]', "--set", "data.half=first", "--dry-run")
    assert plan.returncode == 0, plan.stderr[-2000:]
    full = load_manifest(qm9_small)
    first = full.half("train", "first").count("train")
    assert first < full.count("train")
    assert f"train_molecules            {first}\n" in plan.stdout
    assert 'condition_on               ["gap"]' in plan.stdout
    config = json.load(open(f"{halves[0]}/config.json"))
    assert config["data"]["half"] == "second" and config["model"]["condition_on"] == ["lumo"]
    # the checkpoint and the exported file record the half, for evaluation to draw targets from it
    from molscale.trainer.artifacts import load_for_eval
    assert load_for_eval(halves[0]).train_half == "second" and load_for_eval(halves[1]).train_half == "first"
    exported = tmp_path / "conditional.safetensors"
    assert run("-m", "trainer.export", halves[0], "--out", str(exported)).returncode == 0
    assert json.loads(exported.with_suffix(".safetensors.json").read_text())["dataset"]["half"] == "second"
    assert load_for_eval(str(exported)).train_half == "second"


def test_conditional_generation_is_scored_by_the_other_halfs_predictor(qm9_small, halves, tmp_path):
    conditional, scorer = halves
    common = ["--checkpoint", conditional, "--n-samples", "12", "--batch", "6", "--steps", "5", "--seed", "3",
              "--num-cpus", "2", "--no-wandb", "--scorer", scorer]
    r = run("evals/generate.py", *common, "--out", str(tmp_path / "drawn"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "drawn" / "metrics.json").read_text())
    block, lumo = metrics["conditional"], metrics["conditional"]["properties"]["lumo"]
    assert block["n"] == 12 and block["scorer"] == scorer
    # targets come from the half the conditional model trained on (recorded in its checkpoint), as EDM draws them
    second = load_manifest(qm9_small).half("train", "second").count("train")
    assert f"pairs of {second} molecules of the second half of the train split" in block["targets"], block["targets"]
    assert metrics["source"]["condition_on"] == ["lumo"]
    test_count = load_manifest(qm9_small).count("test")
    assert lumo["unit"] == "meV" and lumo["real_molecules_n"] == test_count
    assert lumo["mae"] > 0 and lumo["real_molecules_mae"] > 0 and lumo["shuffled_targets_mae"] > 0
    assert lumo["atom_count_mae"] > 0
    assert "prediction_mean" in lumo and "unconditional_mae" not in lumo  # no --unconditional-baseline here
    assert block["n_valid"] == round(metrics["validity"] * 12)
    assert (lumo["mae_valid"] is None) == (block["n_valid"] == 0)  # the scorer's MAE over the valid molecules
    assert lumo["target_std"] > 0  # targets of real molecules, not one value
    assert metrics["conditional_mae_lumo"] == lumo["mae"]
    assert "cond. MAE lumo" in r.stdout

    fixed = run("evals/generate.py", *common, "--target", "lumo=-500", "--out", str(tmp_path / "fixed"))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    row = json.loads((tmp_path / "fixed" / "metrics.json").read_text())["conditional"]["properties"]["lumo"]
    assert row["target_mean"] == -500.0 and row["target_std"] == 0.0
    assert row["real_molecules_mae"] == pytest.approx(lumo["real_molecules_mae"])  # the same scorer, same split


def test_bad_conditional_input_is_refused_before_ray_starts(halves, tiny_checkpoint, tmp_path):
    conditional, scorer = halves
    cases = [
        (["--checkpoint", tiny_checkpoint, "--target", "lumo=-500"], "is not conditioned on any property"),
        (["--checkpoint", conditional, "--target", "mu=1"], "the model is conditioned on ['lumo']"),
        (["--checkpoint", conditional, "--target", "lumo=low"], "give PROPERTY=VALUE pairs"),
        (["--checkpoint", conditional, "--scorer", conditional], "predicts [], not ['lumo']"),
        (["--checkpoint", tiny_checkpoint, "--scorer", scorer], "it needs --guide or a conditional checkpoint"),
        (["--dataset", "data/none", "--target", "lumo=1"], "--target sets a conditional checkpoint's targets"),
    ]
    for args, message in cases:
        r = run("evals/generate.py", *args, "--n-samples", "4", "--no-wandb", "--out", str(tmp_path / "x"))
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-2000:])
        assert "Started a local Ray instance" not in r.stderr + r.stdout, args


def test_the_atom_count_baseline_predicts_the_train_mean_of_each_size():
    train_counts = np.array([5, 5, 9, 9, 9])
    train_values = np.array([[1.0], [3.0], [10.0], [20.0], [30.0]])
    got = atom_count_predictions(train_counts, train_values, np.array([9, 5, 7]))
    # size 7 is not in the train split: the overall train mean
    np.testing.assert_allclose(got[:, 0], [20.0, 2.0, 12.8])


def test_correlation_is_pearsons_and_undefined_for_a_constant_column():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert correlation(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert correlation(a, 2 * a + 1) == pytest.approx(1.0) and correlation(a, -a) == pytest.approx(-1.0)
    assert correlation(a, np.full(50, 3.0)) is None and correlation(np.zeros(50), b) is None
