import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import load_manifest
from molscale.datasets.shards.samples import decode_sample
from molscale.datasets.shards.tario import read_shard_samples
from molscale.datasets.sources import qm9
from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader


def all_samples(url, storage_options=None):
    """Every sample of every split, decoded, keyed by __key__ (reads the shards directly)."""
    from molscale.datasets.shards import storage
    manifest = load_manifest(url, storage_options)
    fs, _ = storage.get_fs(url, storage_options)
    out = {}
    for split in manifest.splits:
        for shard in manifest.shards(split):
            path = storage.get_fs(manifest.shard_url(shard))[1]
            for s in read_shard_samples(fs.cat_file(path)):
                out[s["__key__"]] = (split, decode_sample(s))
    return out


def test_standard_split_matches_the_edm_recipe():
    np.random.seed(0)
    perm = np.random.permutation(130831)
    split_of = qm9.standard_split()
    assert set(np.flatnonzero(split_of == 2)) == set(perm[117748:])
    assert set(np.flatnonzero(split_of == 1)) == set(perm[100000:117748])
    assert (split_of == 0).sum() == 100000


def test_small_build_contents(qm9_small):
    m = load_manifest(qm9_small)
    assert m.atom_vocab == [1, 6, 7, 8, 9]
    assert sum(m.count(s) for s in m.splits) + m.data["rejected"]["total"] == 600
    assert m.data["rejected"]["total"] == 0
    samples = all_samples(qm9_small)
    assert len(samples) == 600
    split_of = qm9.standard_split()
    # the split is defined over positions in gdb-id order (uncharacterized gdb ids are absent)
    position = {f"qm9-{int(row['Index']):06d}": i for i, row in enumerate(qm9.iter_rows(600))}
    assert position.keys() == samples.keys()
    for key, (split, s) in samples.items():
        assert qm9.SPLIT_NAMES[split_of[position[key]]] == split
        assert s["pos"].dtype == np.float32 and s["pos"].shape == (len(s["z"]), 3)
        assert np.abs(s["pos"].mean(0)).max() < 1e-4
        assert set(s["props"]) == {"mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"}
    # gdb 1 is methane: C + 4 H, HOMO -0.3877 Ha = -10550 meV, four C-H single bonds
    _, methane = samples["qm9-000001"]
    assert sorted(methane["z"].tolist()) == [1, 1, 1, 1, 6]
    assert methane["props"]["homo"] == pytest.approx(-0.3877 * 27211.4)
    assert methane["smiles"] == "C"
    assert methane["bonds"].tolist() == [[0, 1, 1], [0, 2, 1], [0, 3, 1], [0, 4, 1]]
    # histogram and shard sizes agree with the samples
    hist = m.atom_count_histogram("train")
    train_sizes = [len(s["z"]) for split, s in samples.values() if split == "train"]
    assert hist == {n: train_sizes.count(n) for n in set(train_sizes)}
    stats = m.property_stats()["lumo"]
    lumo = np.array([s["props"]["lumo"] for split, s in samples.values() if split == "train"])
    assert stats["mean"] == pytest.approx(lumo.mean())
    assert stats["mad"] == pytest.approx(np.abs(lumo - lumo.mean()).mean())
    no_bonds = sum(1 for _, s in samples.values() if s["bonds"] is None)
    assert m.data["notes"]["no_bonds"]["total"] == no_bonds
    # the first 600 hold 6 strained polycyclics that only the Hueckel fallback perceives
    # (tests/datasets/chemistry/test_bonds.py)
    assert m.data["notes"]["bonds_by_hueckel"]["total"] == 6 and no_bonds == 0


def test_rebuild_is_a_noop_and_other_params_are_refused(qm9_small, capsys):
    from molscale.datasets.sources.qm9 import build_qm9
    before = os.stat(os.path.join(qm9_small, "manifest.json")).st_mtime_ns
    build_qm9(qm9_small, limit=600, shard_size=40, workers=1, progress=False)
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(os.path.join(qm9_small, "manifest.json")).st_mtime_ns == before
    with pytest.raises(InputError, match="already holds a complete dataset"):
        build_qm9(qm9_small, limit=601, shard_size=40, workers=1, progress=False)


def test_build_to_s3_reads_back_identical(qm9_small, s3):
    from molscale.datasets.sources.qm9 import build_qm9
    url = "s3://test-bucket/qm9-600"
    build_qm9(url, limit=600, shard_size=40, workers=2, progress=False)
    local, remote = all_samples(qm9_small), all_samples(url)
    assert local.keys() == remote.keys()
    for key in local:
        (sa, a), (sb, b) = local[key], remote[key]
        assert sa == sb and np.array_equal(a["pos"], b["pos"]) and np.array_equal(a["z"], b["z"])
        assert a["props"] == b["props"] and a["smiles"] == b["smiles"]
    # and the loader streams it
    loader = StreamingLoader(LoaderConfig(url=url, batch_size=32), rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(k for k, (split, _) in local.items() if split == "train")


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "datasets", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_killed_build_leaves_no_complete_dataset(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "datasets", "build", "qm9", "--limit", "20000",
                             "--shard-size", "200", "--workers", "1", "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(p.suffix == ".tar" for p in out.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.suffix == ".tar" for p in out.iterdir()), "the build never wrote a shard"
    assert not (out / "manifest.json").exists()
    r = run_cli("inspect", str(out))
    assert r.returncode == 2 and "not a complete dataset" in r.stderr  # a missing dataset is bad input
    with pytest.raises(ValueError, match="not a complete dataset"):
        StreamingLoader(LoaderConfig(url=str(out)), rank=0, world_size=1)


def test_bad_input_gives_clear_messages(tmp_path, qm9_small):
    r = run_cli("build", "zinc", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown source 'zinc'" in r.stderr
    r = run_cli("build", "qm9", "--limit", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--limit must be at least 1" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("build", "qm9", "--limit", "5", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "cannot write to" in r.stderr
    # a manifest that does not match its shards
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", qm9_small, str(broken)], check=True)
    os.unlink(broken / "valid-000001.tar")
    r = run_cli("inspect", str(broken))
    assert r.returncode == 1 and "valid-000001.tar: missing" in r.stdout
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["splits"]["train"]["count"] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("inspect", str(broken))
    assert r.returncode == 2 and "split 'train' says" in r.stderr  # an inconsistent manifest is bad input


def test_inspect_prints_the_summary(qm9_small):
    r = run_cli("inspect", qm9_small)
    assert r.returncode == 0, r.stderr
    for text in ("train", "valid", "test", "[1, 6, 7, 8, 9]", "lumo", "meV", "rejected  0", "all present"):
        assert text in r.stdout


@pytest.mark.slow
def test_full_qm9_build(tmp_path):
    """The whole of QM9: 100,000 / 17,748 / 13,083, atom types 1 6 7 8 9, up to 29 atoms, the standard test split."""
    out = tmp_path / "qm9"
    r = run_cli("build", "qm9", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(str(out))
    assert {s: m.count(s) for s in m.splits} == {"train": 100000, "valid": 17748, "test": 13083}
    assert m.atom_vocab == [1, 6, 7, 8, 9] and m.max_atoms == 29
    np.random.seed(0)
    perm = np.random.permutation(130831)
    gdb_ids = np.array([int(r["Index"]) for r in qm9.iter_rows()])
    expected_test = {f"qm9-{g:06d}" for g in gdb_ids[perm[117748:]]}
    from molscale.datasets.shards import storage
    fs, _ = storage.get_fs(str(out))
    test_keys = {s["__key__"] for shard in m.shards("test")
                 for s in read_shard_samples(fs.cat_file(m.shard_url(shard)))}
    assert test_keys == expected_test


def _mean_atoms(manifest, split):
    histogram = manifest.atom_count_histogram(split)
    return sum(n * c for n, c in histogram.items()) / sum(histogram.values())


def test_a_random_sample_keeps_the_full_datasets_sizes_and_splits(tmp_path, qm9_small):
    """--sample N: a few-label set whose molecules look like the test split's, unlike the first N (small ones)."""
    r = run_cli("build", "qm9", "--sample", "500", "--shard-size", "100", "--no-progress",
                "--out", str(tmp_path / "s0"))
    assert r.returncode == 0, r.stderr[-2000:]
    sampled, first = load_manifest(str(tmp_path / "s0")), load_manifest(qm9_small)  # qm9_small: the first 600
    assert sum(sampled.count(s) for s in sampled.splits) == 500
    assert sampled.data["build"]["sample"] == 500 and sampled.data["build"]["sample_seed"] == 0
    # QM9 has 18.0 atoms a molecule on average; its first ids are much smaller
    assert _mean_atoms(sampled, "train") > _mean_atoms(first, "train") + 3
    assert abs(_mean_atoms(sampled, "train") - _mean_atoms(sampled, "test")) < 1.5
    assert 0.65 < sampled.count("train") / 500 < 0.87  # the standard split is 100,000 of 130,831 (76%)
    # each molecule stays in the split the full build gives it, and the draw depends on the seed alone
    keys = {k: split for k, (split, _) in all_samples(str(tmp_path / "s0")).items()}
    drawn = set(qm9.sampled_positions(500, 0).tolist())
    position_of = {f"qm9-{int(row['Index']):06d}": i for i, row in enumerate(qm9.iter_rows()) if i in drawn}
    assert set(position_of) == set(keys)
    full_split = qm9.standard_split()
    assert all(qm9.SPLIT_NAMES[full_split[position_of[k]]] == split for k, split in keys.items())
    assert run_cli("build", "qm9", "--sample", "500", "--shard-size", "100", "--no-progress",
                   "--out", str(tmp_path / "again")).returncode == 0
    assert set(all_samples(str(tmp_path / "again"))) == set(keys)
    assert run_cli("build", "qm9", "--sample", "500", "--sample-seed", "1", "--shard-size", "100",
                   "--no-progress", "--out", str(tmp_path / "s1")).returncode == 0
    assert set(all_samples(str(tmp_path / "s1"))) != set(keys)
    r = run_cli("build", "qm9", "--sample", "5", "--limit", "5", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "give one of them" in r.stderr
    r = run_cli("build", "geom", "--sample", "5", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--sample draws QM9 molecules" in r.stderr
