"""evals/generate.py: exit codes (2 bad input, 1 a failure while running, one ``error:`` line, no traceback)
and ``--dataset --property``: the train-mean baseline MAE of each property of a real split."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests.support import ROOT, cpu_env

ENV = cpu_env(WANDB_MODE="disabled")  # W&B off entirely: these runs end in errors


def generate(*args):
    return subprocess.run([sys.executable, "evals/generate.py", *args, "--no-wandb"], capture_output=True,
                          text=True, timeout=600, env=ENV, cwd=ROOT)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def props_of_split(url: str, split: str) -> list[dict]:
    """props.json of every sample of a split, read with tarfile and json only."""
    manifest = json.load(open(os.path.join(url, "manifest.json")))
    out = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(os.path.join(url, shard["name"])) as tar:
            out += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".props.json")]
    return out


def atom_counts_of_split(url: str, split: str) -> list[int]:
    """Atoms per sample of a split, in the order props_of_split reads them (z.npy, read with tarfile and numpy)."""
    manifest = json.load(open(os.path.join(url, "manifest.json")))
    out = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(os.path.join(url, shard["name"])) as tar:
            out += [len(np.load(io.BytesIO(tar.extractfile(m).read()))) for m in tar.getmembers()
                    if m.name.endswith(".z.npy")]
    return out


def test_bad_input_exits_2_before_ray_starts(qm9_small, tmp_path):
    r = generate("--checkpoint", "/nonexistent", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in one_error_line(r.stderr)
    r = generate("--dataset", qm9_small, "--split", "tset", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no split 'tset'" in one_error_line(r.stderr)
    r = generate("--dataset", qm9_small, "--n-samples", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--n-samples must be at least 1" in one_error_line(r.stderr)
    r = generate("--dataset", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a complete dataset" in one_error_line(r.stderr)
    no_props = tmp_path / "no-props"
    shutil.copytree(qm9_small, no_props)
    manifest = json.loads((no_props / "manifest.json").read_text())
    manifest["property_stats"] = {}
    (no_props / "manifest.json").write_text(json.dumps(manifest))
    r = generate("--dataset", str(no_props), "--property", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no properties with train-split statistics" in one_error_line(r.stderr)
    assert "Started a local Ray" not in r.stderr + r.stdout
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_corrupt_split_is_a_failure_while_running(qm9_small, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qm9_small, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    for shard in manifest["splits"]["test"]["shards"]:
        path = broken / shard["name"]
        path.write_bytes(path.read_bytes()[:2000])
    r = generate("--dataset", str(broken), "--split", "test", "--num-cpus", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 1, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "corrupt or missing shard" in line and "split 'test'" in line and "Rebuild the dataset" in line


@pytest.fixture(scope="module")
def property_run(qm9_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("prop") / "out"
    r = generate("--dataset", qm9_small, "--split", "test", "--property", "--num-cpus", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((out / "metrics.json").read_text())


def test_dataset_property_reports_the_train_mean_baseline(qm9_small, property_run):
    r, metrics = property_run
    manifest = json.load(open(os.path.join(qm9_small, "manifest.json")))
    train, test = props_of_split(qm9_small, "train"), props_of_split(qm9_small, "test")
    assert len(test) == manifest["splits"]["test"]["count"]
    rows = metrics["property_mae"]
    assert set(rows) == set(manifest["properties"]) and "lumo" in rows
    for name, row in rows.items():
        mean = np.mean([p[name] for p in train])
        expected = np.mean([abs(p[name] - mean) for p in test])
        assert row["mae"] == pytest.approx(expected, rel=1e-9, abs=1e-12), name
        assert row["n"] == len(test) and row["predictor"] == "train mean"
        assert row["unit"] == manifest["properties"][name]["unit"]
        assert metrics[f"mae_{name}"] == row["mae"]
    assert rows["lumo"]["unit"] == "meV" and rows["lumo"]["mae"] > 0
    assert "MAE lumo" in r.stdout and "train mean" in r.stdout
    # the atom-count row: the mean train value of molecules of the same size (the train mean for a size the
    # train split lacks), fitted on this dataset's train split
    train_n, test_n = atom_counts_of_split(qm9_small, "train"), atom_counts_of_split(qm9_small, "test")
    for name, row in rows.items():
        by_size = {}
        for n, p in zip(train_n, train):
            by_size.setdefault(n, []).append(p[name])
        overall = np.mean([p[name] for p in train])
        expected = np.mean([abs(p[name] - (np.mean(by_size[n]) if n in by_size else overall))
                            for n, p in zip(test_n, test)])
        assert row["atom_count_mae"] == pytest.approx(expected, rel=1e-9), name
        assert row["atom_count_fit"] == f"{qm9_small} train"
        assert metrics[f"atom_count_mae_{name}"] == row["atom_count_mae"]
    assert rows["lumo"]["atom_count_mae"] < rows["lumo"]["mae"]  # size alone already beats the train mean
    assert "from the atom count alone" in r.stdout
    assert metrics["n_samples"] == len(test)  # the usual data-row metrics are still there
