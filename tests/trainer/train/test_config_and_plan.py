"""trainer/main.py front door: config validation before any work, --dry-run plans."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

from molscale.trainer.train.config import ConfigError, load_config


def main_py(*args, **kw):
    return subprocess.run([sys.executable, "trainer/main.py", *args], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.parametrize("override, message", [
    ("model.layer=3", "unknown config key(s): model.layer"),
    ("optimizer.lr=fast", "optimizer.lr: expected a number, got 'fast'"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage must be 0, 1 or 2"),
    ("model.t_nucleation=1000", "model.t_nucleation must be in [0, diffusion.num_steps)"),
    ("data.pair_budget=1000", "set exactly one of data.batch_size and data.pair_budget"),
    ("trainer.steps=3", "unknown config key(s): trainer"),
    ("loss.reduction=sum", "loss.reduction must be one of ['molecule', 'reference']"),
    ("optimizer.steps_per_batch=2 deepspeed.zero_stage=2",
     "optimizer.steps_per_batch > 1 needs deepspeed.zero_stage 0"),
    ("optimizer.lr_scaling=cube", "optimizer.lr_scaling must be one of ['none', 'linear', 'sqrt']"),
    ("data.batch_size=null data.pair_budget=20000 optimizer.lr_scaling=sqrt",
     "optimizer.lr_scaling needs a molecule count per step"),
    ("data.batch_size=null data.pair_budget=20000 loss.reduction=reference",
     "loss.reduction 'reference' is the released code's fixed-size batches"),
    ("data.half=third", "data.half must be one of ['first', 'second'] or null"),
    ('model.condition_on=["lumo"]', "model.condition_on and model.properties share ['lumo']"),
    ("train.cuda_graphs=always", "train.cuda_graphs must be false, true (the same as \"network\") or \"step\""),
    ('train.cuda_graphs="step" deepspeed.zero_stage=1', 'train.cuda_graphs "step" needs deepspeed.zero_stage 0'),
])
def test_bad_config_fails_before_any_work(override, message):
    sets = [arg for part in override.split() for arg in ("--set", part)]
    r = main_py("--config", "cluster/cpu_smoke.json", *sets)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and "process group" not in r.stderr  # nothing was started


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid JSON"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config file nope.json not found"):
        load_config("nope.json")


def test_every_cluster_config_is_valid():
    for name in ("cpu_smoke", "qm9_1gpu", "qm9_8gpu", "qm9_8gpu_paper", "geom_4gpu_paper", "geom_64gpu"):
        cfg = load_config(f"cluster/{name}.json")
        assert cfg.model.kind == "unigem"
    qm9 = load_config("cluster/qm9_1gpu.json")
    assert (qm9.model.layers, qm9.model.hidden, qm9.model.shared_blocks) == (9, 256, 1)
    assert (qm9.optimizer.lr, qm9.optimizer.weight_decay, qm9.data.batch_size) == (1e-4, 1e-12, 64)
    geom = load_config("cluster/geom_64gpu.json")
    assert (geom.model.layers, geom.model.shared_blocks, geom.deepspeed.zero_stage) == (4, 1, 2)
    assert geom.data.url.startswith("s3://") and len(geom.model.atom_vocab) == 16


@pytest.mark.parametrize("pretrain, finetune", [
    ("cpu_pretrain_smoke", "cpu_smoke"), ("cpu_pretrain_moses", "cpu_demo"),
    ("pcqm4mv2_pretrain_64gpu", "qm9_1gpu"), ("geom_pretrain_64gpu", "geom_64gpu"),
])
def test_pretraining_configs_pretrain_the_trunk_of_their_finetuning_config(pretrain, finetune):
    """Same objective in every pretraining config, and a trunk that init_from can load whole: the same blocks,
    width, t_n and noise schedule as the UniGEM it initialises."""
    import dataclasses

    from molscale.trainer.model.networks import UniGEM
    from molscale.trainer.model.pretraining import TRUNK_PREFIXES, MoleculeJAE
    pre, fine = load_config(f"cluster/{pretrain}.json"), load_config(f"cluster/{finetune}.json")
    assert pre.objective == "moleculejae" and fine.objective == "diffusion"
    assert pre.diffusion == fine.diffusion
    vocab = [1, 6, 7, 8, 9]
    jae = MoleculeJAE(dataclasses.replace(pre.model, atom_vocab=pre.model.atom_vocab or vocab), pre.pretrain,
                      pre.diffusion, pre.loss)
    unigem = UniGEM(dataclasses.replace(fine.model, atom_vocab=fine.model.atom_vocab or vocab), fine.diffusion)
    trunk = {k: v.shape for k, v in jae.state_dict().items() if k.startswith(TRUNK_PREFIXES)}
    assert trunk == {k: v.shape for k, v in unigem.state_dict().items() if k.startswith(TRUNK_PREFIXES)}
    assert pre.model.t_nucleation == fine.model.t_nucleation


def test_dry_run_of_a_pretraining_config_names_the_objective():
    r = main_py("--config", "cluster/geom_pretrain_64gpu.json", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "moleculejae (pretraining: trunk = embed, shared, nucleation on UniGEM's inputs" in r.stdout
    assert "world_size                 64" in r.stdout


def test_missing_dataset_says_how_to_make_it(tmp_path):
    r = main_py("--config", "cluster/cpu_smoke.json", "--set", f"data.url={tmp_path}/qm9-smoke")
    assert r.returncode == 2
    assert f"python -m datasets build qm9 --limit 2000 --out {tmp_path}/qm9-smoke" in r.stderr


def test_dry_run_plans_64_gpus():
    r = main_py("--config", "cluster/geom_64gpu.json", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "world_size                 64" in out
    assert "1 shared + 2 x 3" in out and "atom_types                 16" in out
    assert "dataset not reachable" in out  # no S3 here: said, not crashed
    assert "cuda_graphs                off" in out
    r = main_py("--config", "cluster/geom_64gpu.json", "--set", 'train.cuda_graphs="step"', "--set",
                "deepspeed.zero_stage=0", "--dry-run")
    assert 'the network per batch shape: "step" (the whole step) runs at world size 1, this plan has 64 ranks' \
        in r.stdout, r.stderr


def test_dry_run_counts_steps_per_epoch(qm9_small):
    r = main_py("--config", "cluster/cpu_smoke.json", "--set", f"data.url={qm9_small}", "--dry-run")
    assert r.returncode == 0, r.stderr
    from molscale.datasets.shards.manifest import load_manifest
    n_train = load_manifest(qm9_small).count("train")
    assert f"train_molecules            {n_train}" in r.stdout
    assert f"optimizer_steps_per_epoch  {-(-n_train // 32)}" in r.stdout


def test_deepspeed_extra_is_deep_merged():
    from molscale.trainer.train.loop import deepspeed_config
    cfg = load_config("cluster/cpu_smoke.json", ["deepspeed.zero_stage=2",
                                                 'deepspeed.extra={"zero_optimization": {"overlap_comm": true}}'])
    assert deepspeed_config(cfg, 4)["zero_optimization"] == {"stage": 2, "overlap_comm": True}


@pytest.mark.parametrize("extra, message", [
    ({"zero_optimization": {"stage": 1}}, "deepspeed.extra.zero_optimization.stage: molscale sets it; "
                                          "use deepspeed.zero_stage"),
    ({"train_batch_size": 64}, "deepspeed.extra.train_batch_size: molscale sets it; use data.batch_size and "
                               "deepspeed.gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 2}, "use deepspeed.gradient_accumulation_steps"),
    ({"gradient_clipping": 1.0}, "deepspeed.extra.gradient_clipping: molscale sets it; use optimizer.clip"),
    ({"bf16": {"enabled": True}}, "deepspeed.extra.bf16: molscale sets it; use deepspeed.bf16"),
    ({"torch_autocast": {"enabled": True}}, "deepspeed.extra.torch_autocast: molscale sets it; use deepspeed.bf16"),
])
def test_deepspeed_extra_cannot_set_what_molscale_owns(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("cluster/cpu_smoke.json", [f"deepspeed.extra={json.dumps(extra)}"])


def test_zero3_through_extra_fails_before_any_work(tmp_path):
    """A config error, one line, before the dataset is even looked at (it does not exist here)."""
    r = main_py("--config", "cluster/cpu_smoke.json", "--set", f"data.url={tmp_path}/none",
                "--set", 'deepspeed.extra={"zero_optimization": {"stage": 3}}')
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "config error: deepspeed.extra.zero_optimization.stage: molscale sets it; use deepspeed.zero_stage "
        "(0, 1 or 2: EMA, clipping and export need stage <= 2)"]


def test_bf16_refuses_a_deepspeed_without_torch_autocast(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.16.9" if name == "deepspeed" else real(name))
    with pytest.raises(ConfigError, match=r"deepspeed.bf16 needs DeepSpeed >= 0.17.2 .*installed: 0.16.9"):
        load_config("cluster/cpu_smoke.json", ["deepspeed.bf16=true"])
    load_config("cluster/cpu_smoke.json", ["deepspeed.bf16=false"])  # float32 runs need no torch_autocast


def test_dry_run_prints_the_deepspeed_config_it_would_use():
    from molscale.trainer.train.loop import deepspeed_config
    extra = ["--set", 'deepspeed.extra={"zero_optimization": {"overlap_comm": true}}', "--set", "deepspeed.bf16=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    r = main_py("--config", "cluster/geom_64gpu.json", *extra, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip().startswith("deepspeed_config ")]
    assert len(lines) == 1, r.stdout
    printed = json.loads(lines[0].split("deepspeed_config", 1)[1])
    assert printed == deepspeed_config(load_config("cluster/geom_64gpu.json", [extra[1], extra[3]]), 64)
    assert printed["torch_autocast"]["lower_precision_safe_modules"] == []  # ZeRO-2 with bf16: fp32 reduction
