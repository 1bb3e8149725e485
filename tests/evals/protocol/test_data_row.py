"""The protocol on real QM9 molecules (positions from the shards), and the reference caches."""

import json
import os

import fsspec
import pytest

import molscale.evals.protocol.references as references
from molscale.evals.protocol.metrics import compute_metrics, molecule_stats
from molscale.evals.protocol.molecules import load_split_molecules


def test_real_qm9_test_split_is_stable_and_valid(qm9_small):
    molecules = load_split_molecules(qm9_small, "test")
    assert len(molecules) > 30
    ref = references.reference_histograms(qm9_small, "train", use_cache=False)
    m = compute_metrics(molecule_stats(molecules), reference_stats=ref)
    # EDM reports 99.0 % atom / 95.2 % molecule stability and 97.7 % validity for all of QM9
    assert m["atom_stability"] > 0.95
    assert m["mol_stability"] > 0.85
    assert m["validity"] > 0.9
    assert m["uniqueness"] > 0.95
    # a split of the same data set is close to the train distribution
    assert m["atom_type_tv"] < 0.2 and m["bond_type_tv"] < 0.2
    assert m["bond_length_w1"] < 0.02 and m["bond_angle_w1"] < 3.0 and m["valency_w1"] < 0.1


def test_reference_smiles_are_cached_next_to_the_manifest_and_reused(qm9_small, tmp_path, monkeypatch):
    import shutil
    url = str(tmp_path / "ds")
    shutil.copytree(qm9_small, url)
    smiles = references.reference_smiles(url, "train")
    cache = os.path.join(url, "smiles-train-edm-2.json")
    data = json.load(open(cache))
    assert data["protocol"] == references.PROTOCOL_VERSION and set(data["smiles"]) == smiles
    assert data["n_valid"] <= data["n_molecules"] and len(smiles) > 0.8 * data["n_molecules"]
    assert os.path.exists(os.path.join(url, "stats-train-edm-2.json"))
    # second calls read the caches: computing again would fail
    monkeypatch.setattr(references, "split_statistics", lambda *a, **k: pytest.fail("cache not reused"))
    assert references.reference_smiles(url, "train") == smiles
    hist = references.reference_histograms(url, "train")
    assert sum(hist["atom_counts"].values()) == data["n_molecules"]
    # a cache from another protocol version is recomputed
    data["protocol"] = "old"
    with open(cache, "w") as f:
        json.dump(data, f)
    with pytest.raises(pytest.fail.Exception):
        references.reference_smiles(url, "train")


def test_reference_smiles_on_a_remote_filesystem(qm9_small):
    fs = fsspec.filesystem("memory")
    for name in os.listdir(qm9_small):
        if name.endswith(".json") or name.startswith("valid-"):
            fs.pipe_file(f"/qm9/{name}", open(os.path.join(qm9_small, name), "rb").read())
    smiles = references.reference_smiles("memory://qm9", "valid")
    assert fs.exists("/qm9/smiles-valid-edm-2.json") and fs.exists("/qm9/stats-valid-edm-2.json")
    assert set(json.loads(fs.cat_file("/qm9/smiles-valid-edm-2.json"))["smiles"]) == smiles
    fs.rm("/qm9", recursive=True)


def test_caches_of_an_older_protocol_are_never_opened(qm9_small, tmp_path, monkeypatch):
    """An edm-1 cache (hydrogens removed) next to the data is not read, not even opened: the version is in the
    name. Its content here is deliberately wrong, so reading it would change the answer."""
    import shutil
    url = str(tmp_path / "ds")
    shutil.copytree(qm9_small, url)
    for name in ("smiles-train-edm.json", "stats-train-edm.json"):
        with open(os.path.join(url, name), "w") as f:
            json.dump({"protocol": references.PROTOCOL_VERSION, "smiles": ["C"], "histograms": {}}, f)
    opened = []
    real_read = references.storage.read_bytes
    monkeypatch.setattr(references.storage, "read_bytes", lambda fs, path: opened.append(path) or real_read(fs, path))
    smiles = references.reference_smiles(url, "train")
    assert smiles == references.reference_smiles(url, "train", use_cache=False) and smiles != {"C"}
    caches = [path for path in opened if os.path.basename(path).startswith(("smiles-", "stats-"))]
    assert caches and all(path.endswith(f"-{references.PROTOCOL_VERSION}.json") for path in caches)
