"""Users' own data: `build sdf|xyz --properties` on real QM9 molecules written as files, `build smiles
--properties` from CSV columns, then training on the new property and predicting it for a file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from rdkit import Chem

from tests.support import ROOT, cpu_env, sample_mol

N_MOLECULES = 60


def datasets_cli(*args):
    return subprocess.run([sys.executable, "-m", "datasets", *args, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=cpu_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def qm9_samples(qm9_small):
    from molscale.datasets.shards.manifest import load_manifest
    from molscale.datasets.stream.split_reader import iter_split_samples
    return list(iter_split_samples(load_manifest(qm9_small), "train", with_bonds=True, limit=N_MOLECULES))




def write_sdf(path, samples, extra_bad=True):
    with Chem.SDWriter(str(path)) as writer:
        writer.SetKekulize(False)
        for s in samples:
            mol = sample_mol(s)
            mol.SetProp("gap", f"{s['props']['gap']:.4f}")
            writer.write(mol)
        if extra_bad:
            missing = sample_mol(samples[0])  # no gap tag
            missing.SetProp("_Name", "no-gap")
            writer.write(missing)
            text = sample_mol(samples[1])
            text.SetProp("_Name", "text-gap")
            text.SetProp("gap", "n/a")
            writer.write(text)


def load(url):
    from molscale.datasets.shards.manifest import load_manifest
    return load_manifest(url)


def test_build_sdf_keeps_coordinates_bonds_and_a_chosen_property(qm9_samples, tmp_path):
    sdf = tmp_path / "mine.sdf"
    write_sdf(sdf, qm9_samples)
    out = tmp_path / "mine"
    r = datasets_cli("build", "sdf", "--input", str(sdf), "--properties", "gap:meV", "--out", str(out),
                     "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = load(str(out))
    assert sum(manifest.count(s) for s in manifest.splits) == N_MOLECULES
    assert manifest.data["rejected"]["total"] == 2
    assert manifest.data["rejected"]["reasons"] == {"missing property": 1, "property not a number": 1}
    assert manifest.data["properties"] == {"gap": {"unit": "meV"}}
    assert manifest.atom_vocab == sorted({int(a) for s in qm9_samples for a in s["z"]})
    from molscale.datasets.stream.split_reader import iter_split_samples
    built = {s["key"]: s for split in manifest.splits for s in iter_split_samples(manifest, split, with_bonds=True)}
    by_index = {int(k.split("-")[1]): s for k, s in built.items()}
    train_gaps = []
    for index, source in enumerate(qm9_samples):
        got = by_index[index]
        np.testing.assert_allclose(got["pos"], source["pos"] - source["pos"].mean(0), atol=2e-4)  # SDF: 4 decimals
        assert got["z"].tolist() == source["z"].tolist()
        assert got["bonds"].tolist() == source["bonds"].tolist()
        assert got["props"]["gap"] == pytest.approx(source["props"]["gap"], abs=1e-3)
    for s in iter_split_samples(manifest, "train"):
        train_gaps.append(s["props"]["gap"])
    assert manifest.property_stats()["gap"]["mean"] == pytest.approx(np.mean(train_gaps), rel=1e-6)

    bad = tmp_path / "bad.sdf"
    bad.write_text("")
    r = datasets_cli("build", "sdf", "--input", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "holds no molecules" in r.stderr
    r = datasets_cli("build", "xyz", "--input", str(sdf), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "is a sdf file by its name" in r.stderr
    r = datasets_cli("build", "sdf", "--input", str(sdf), "--properties", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "none of its records could be used" in r.stderr and "missing property" in r.stderr


def test_build_xyz_perceives_bonds_and_reads_extended_comments(qm9_samples, tmp_path):
    from molscale.datasets.chemistry.elements import Z_TO_SYMBOL
    lines = []
    for s in qm9_samples[:20]:
        lines += [str(len(s["z"])), f"name={s['key']} mu={s['props']['mu']:.5f}"]
        lines += [f"{Z_TO_SYMBOL[int(a)]} {x:.6f} {y:.6f} {w:.6f}" for a, (x, y, w) in zip(s["z"], s["pos"])]
    lines += ["3", "name=bad mu=1.0", "C 0 0 0", "C 1.5 0 0"]  # a truncated last frame
    src = tmp_path / "mine.xyz"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "xyz"
    r = datasets_cli("build", "xyz", "--input", str(src), "--properties", "mu:D", "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = load(str(out))
    assert sum(manifest.count(s) for s in manifest.splits) == 20
    assert manifest.data["rejected"]["reasons"] == {"broken XYZ frame": 1}
    from molscale.datasets.stream.split_reader import iter_split_samples
    built = [s for split in manifest.splits for s in iter_split_samples(manifest, split, with_bonds=True)]
    source = {i: s for i, s in enumerate(qm9_samples[:20])}
    for s in built:
        original = source[int(s["key"].split("-")[1])]
        assert s["props"]["mu"] == pytest.approx(original["props"]["mu"], abs=1e-5)
        assert sorted(map(tuple, s["bonds"][:, :2].tolist())) == sorted(map(tuple, original["bonds"][:, :2].tolist()))


def test_build_smiles_carries_csv_columns_as_properties(tmp_path):
    src = tmp_path / "mols.csv"
    src.write_text("id,smiles,logp\na,CCO,-0.31\nb,c1ccccc1,2.13\nc,CCN,oops\nd,CC(=O)O,\ne,CCOC,0.7\n")
    out = tmp_path / "smi"
    r = datasets_cli("build", "smiles", "--input", str(src), "--conformers", "2", "--properties", "logp",
                     "--backend", "process", "--workers", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = load(str(out))
    assert manifest.data["rejected"]["reasons"] == {"property not a number": 1, "missing property": 1}
    assert manifest.data["properties"]["logp"] == {"unit": ""}
    from molscale.datasets.stream.split_reader import iter_split_samples
    values = {s["smiles"]: s["props"]["logp"] for split in manifest.splits for s in iter_split_samples(manifest, split)}
    assert values == {"CCO": -0.31, "c1ccccc1": 2.13, "CCOC": 0.7}
    r = datasets_cli("build", "smiles", "--input", str(src), "--properties", "logd", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "has no column logd (its columns: id, smiles, logp)" in r.stderr


@pytest.mark.slow
def test_train_on_your_own_property_and_predict_it(qm9_samples, tmp_path):
    sdf = tmp_path / "mine.sdf"
    write_sdf(sdf, qm9_samples, extra_bad=False)
    data = tmp_path / "mine"
    r = datasets_cli("build", "sdf", "--input", str(sdf), "--properties", "gap:meV", "--out", str(data),
                     "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "trainer/main.py", "--config", "cluster/cpu_smoke.json", "--run-dir", str(run),
                        "--max-steps", "3", "--set", f"data.url={data}", "--set", 'model.properties=["gap"]',
                        "--set", "data.batch_size=8", "--set", "evaluation.every_steps=0",
                        "--set", "logging.progress_bar=false", "--set", "logging.wandb.enabled=false"],
                       capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert "prop_gap" in rows[-1]
    out = tmp_path / "preds.csv"
    r = subprocess.run([sys.executable, "evals/predict.py", "--checkpoint", str(run), "--input", str(sdf),
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out, newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == N_MOLECULES and "gap (meV)" in preds[0]
    assert all(p["status"] == "ok" for p in preds)
