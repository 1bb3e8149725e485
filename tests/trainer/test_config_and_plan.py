"""trainer/main.py front door: config validation before any work, --dry-run plans."""

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
])
def test_bad_config_fails_before_any_work(override, message):
    r = main_py("--config", "cluster/cpu_smoke.json", "--set", override)
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
    for name in ("cpu_smoke", "qm9_1gpu", "qm9_8gpu", "geom_64gpu"):
        cfg = load_config(f"cluster/{name}.json")
        assert cfg.model.kind == "unigem"
    qm9 = load_config("cluster/qm9_1gpu.json")
    assert (qm9.model.layers, qm9.model.hidden, qm9.model.shared_blocks) == (9, 256, 1)
    assert (qm9.optimizer.lr, qm9.optimizer.weight_decay, qm9.data.batch_size) == (1e-4, 1e-12, 64)
    geom = load_config("cluster/geom_64gpu.json")
    assert (geom.model.layers, geom.model.shared_blocks, geom.deepspeed.zero_stage) == (4, 1, 2)
    assert geom.data.url.startswith("s3://") and len(geom.model.atom_vocab) == 16


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


def test_dry_run_counts_steps_per_epoch(qm9_small):
    r = main_py("--config", "cluster/cpu_smoke.json", "--set", f"data.url={qm9_small}", "--dry-run")
    assert r.returncode == 0, r.stderr
    from molscale.datasets.shards.manifest import load_manifest
    n_train = load_manifest(qm9_small).count("train")
    assert f"train_molecules            {n_train}" in r.stdout
    assert f"optimizer_steps_per_epoch  {-(-n_train // 32)}" in r.stdout
