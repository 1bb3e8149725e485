"""MoleculeJAE-style pretraining as users run it (2 DeepSpeed ranks on CPU, ZeRO-2, bf16 autocast), then
UniGEM fine-tuning that starts from the pretrained trunk through ``init_from``."""

import json

import numpy as np
import pytest
import torch

from tests.support import finish, launch, log_tail, metrics

PRETRAIN = "cluster/cpu_pretrain_smoke.json"


@pytest.fixture(scope="module")
def pretrained(qm9_small, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "jae"
    rc = finish(launch(run_dir, qm9_small, "train.max_steps=40", "checkpoint.every_steps=20",
                       "evaluation.every_steps=20", "data.batch_size=32", "deepspeed.zero_stage=2",
                       "deepspeed.bf16=true", config=PRETRAIN))
    assert rc == 0, log_tail(run_dir)
    return run_dir


def test_pretraining_loss_falls(pretrained):
    rows = metrics(pretrained)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for term in ("loss", "score_3d", "score_2d", "atom_type", "contrastive"):
        values = np.array([r[term] for r in rows])
        assert np.all(np.isfinite(values)), term
        assert values[-10:].mean() < values[:10].mean(), (term, values.round(3).tolist())
    assert rows[-1]["valid/loss"] > 0
    assert (pretrained / "step00000040" / "complete").exists()


def test_a_pretraining_checkpoint_is_not_a_generator(pretrained):
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.train.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="moleculejae pretraining checkpoint"):
        load_for_eval(str(pretrained))


def test_init_from_loads_the_trunk_and_reports(pretrained):
    from molscale.trainer.model.networks import ModelConfig, UniGEM
    from molscale.trainer.train.init_from import checkpoint_weights, initialise
    model = UniGEM(ModelConfig(hidden=32, layers=3, shared_blocks=1, properties=["lumo"], atom_vocab=[1, 6, 7, 8, 9]))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise(model, str(pretrained))
    _, weights = checkpoint_weights(str(pretrained))  # EMA weights
    state = model.state_dict()
    assert report["checkpoint"].endswith("step00000040")
    assert {n.split(".")[0] for n in report["loaded"]} == {"embed", "shared", "nucleation"}
    for name in report["loaded"]:
        torch.testing.assert_close(state[name], weights[name].float())
    assert len(report["copied"]) == len([n for n in state if n.startswith("growth.")])
    for entry in report["copied"]:
        dst, src = entry.split(" <- ")
        assert src == dst.replace("growth.", "nucleation.", 1)
        torch.testing.assert_close(state[dst], weights[src].float())
    assert {n.split(".")[0] for n in report["new"]} == {"atom_type_head", "prop_node", "prop_out"}
    for name in report["new"]:
        torch.testing.assert_close(state[name], fresh[name])  # left as initialised
    assert {n.split(".")[0] for n in report["skipped"]} == {"clean_encoder", "score_2d", "type_head", "proj_clean",
                                                             "proj_noised"}
    assert set(report["skipped"].values()) == {"not in this model"}


def test_finetune_from_pretrained_trunk(pretrained, qm9_small, tmp_path):
    run_dir = tmp_path / "finetune"
    rc = finish(launch(run_dir, qm9_small, f"init_from={pretrained}", "train.max_steps=4",
                       "evaluation.every_steps=0", ranks=2))
    assert rc == 0, log_tail(run_dir)
    report = json.loads((run_dir / "init_from.json").read_text())
    assert len(report["loaded"]) > 0 and len(report["copied"]) > 0
    assert "init_from" in log_tail(run_dir) and "copied" in log_tail(run_dir)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["init_from"] == str(pretrained) and config["objective"] == "diffusion"


def test_bad_pretraining_config_fails_before_work(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "trainer/main.py", "--config", PRETRAIN, "--run-dir", str(tmp_path / "r"),
                          "--set", "pretrain.temperature=0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pretrain.temperature" in out.stderr
    out = subprocess.run([sys.executable, "trainer/main.py", "--config", PRETRAIN, "--run-dir", str(tmp_path / "r"),
                          "--set", 'model.properties=["lumo"]'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model.properties must be empty" in out.stderr
    out = subprocess.run([sys.executable, "trainer/main.py", "--config", PRETRAIN, "--run-dir", str(tmp_path / "r"),
                          "--set", "loss.reduction=reference"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "loss.reduction must be 'molecule'" in out.stderr
    assert not (tmp_path / "r").exists()
