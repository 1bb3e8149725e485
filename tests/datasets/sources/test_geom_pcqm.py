"""GEOM-Drugs (msgpack stream, rdkit_folder) and PCQM4Mv2 (SDF + CSV) builders on small real-format files."""

import csv
import gzip
import json
import os
import pickle

import msgpack
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from molscale.datasets.chemistry.bonds import bonds_from_mol
from molscale.datasets.chemistry.elements import GEOM_ATOM_VOCAB
from molscale.datasets.errors import InputError
from molscale.datasets.shards.tario import read_shard_samples
from molscale.datasets.sources.geom import assign_split, build_geom
from molscale.datasets.sources.pcqm4mv2 import build_pcqm4mv2
from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader
from tests.datasets.helpers import all_samples, loader_count, shard_bytes

SMILES = ["CCO", "CCN", "CC(=O)O", "c1ccccc1O", "CC(C)C", "OCCO", "CCCl", "NCC(=O)O", "CC#N", "C1CCCC1",
          "COC", "CCCCO", "c1ccncc1", "CC(F)(F)F", "CCS", "CNC(=O)C", "C=CC=O", "OC1CCCC1", "CCBr", "CP"]
N_CONF = 5
K = 3


def embed(smiles, n=N_CONF, seed=7):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n, randomSeed=seed))
    assert len(ids) == n, smiles
    return mol


def energies(m):
    # distinct, deliberately not sorted: lowest three are conformers 3, 0, 4 (in that order)
    return [-100.0 - m + e for e in (-0.3, 0.1, 0.2, -0.5, -0.25)]


@pytest.fixture(scope="module")
def mols():
    return {s: embed(s) for s in SMILES + ["C[Se]C"]}


@pytest.fixture(scope="module")
def msgpack_source(tmp_path_factory, mols):
    """Three msgpack objects (molecule batches); plus a bad SMILES, a Se molecule and a NaN conformer."""
    path = tmp_path_factory.mktemp("geom") / "drugs_crude.msgpack"

    def entry(mol, m):
        confs = []
        for c, e in enumerate(energies(m)):
            pos = mol.GetConformer(c).GetPositions()
            confs.append({"totalenergy": e, "geom_id": m * 10 + c,
                          "xyz": [[a.GetAtomicNum(), *map(float, p)] for a, p in zip(mol.GetAtoms(), pos)]})
        return {"conformers": confs, "uniqueconfs": len(confs), "charge": 0}

    batches, batch = [], {}
    for m, smi in enumerate(SMILES):
        batch[smi] = entry(mols[smi], m)
        if len(batch) == 8:
            batches.append(batch)
            batch = {}
    bad = entry(mols["CCO"], 20)                 # index 20: unparsable SMILES, coordinates kept
    batch["C1CC(=O"] = bad
    batch["C[Se]C"] = entry(mols["C[Se]C"], 21)  # index 21: unsupported element
    nan = entry(mols["OCCO"], 22)                # index 22: conformer 3 (lowest energy) has a NaN
    nan["conformers"][3]["xyz"][0][2] = float("nan")
    batch["OCCO.O"] = nan
    batches.append(batch)
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        f.writelines(packer.pack(b) for b in batches)
    return str(path)


def check_geom(manifest, samples, k=K):
    by_mol = {}
    for key, (split, s) in samples.items():
        _, mol, rank = key.split("-")
        by_mol.setdefault(int(mol), []).append((int(rank), split, s))
    for m, confs in by_mol.items():
        if m >= 20:
            continue
        assert sorted(r for r, _, _ in confs) == list(range(k))
        expected = sorted(energies(m))[:k]
        for rank, _, s in confs:
            assert s["props"]["energy_rank"] == rank
            assert s["props"]["totalenergy"] == pytest.approx(expected[rank])
            assert set(s["z"].tolist()) <= set(GEOM_ATOM_VOCAB)
            assert np.abs(s["pos"].mean(0)).max() < 1e-4
    assert sum(manifest.count(s) for s in manifest.splits) == len(samples)
    return by_mol


def test_geom_msgpack_by_molecule(tmp_path, msgpack_source):
    from molscale.datasets.cli import main
    out = str(tmp_path / "geom")
    assert main(["build", "geom", "--source", msgpack_source, "--out", out, "--conformers", str(K),
                 "--shard-size", "7", "--no-progress", "--workers", "1", "--interleave", "1"]) == 0
    manifest, samples = all_samples(out)
    assert manifest.atom_vocab == list(GEOM_ATOM_VOCAB)
    assert manifest.splits == ["train", "valid", "test"]
    by_mol = check_geom(manifest, samples)
    # 20 good molecules x 3 + bad-SMILES molecule x 3 + NaN molecule x 3 (the NaN conformer skipped)
    assert len(samples) == 66 and sorted(by_mol) == list(range(21)) + [22]
    for m, confs in by_mol.items():
        assert len({split for _, split, _ in confs}) == 1, f"molecule {m} in two splits"
    for m, smi in enumerate(SMILES):
        assert by_mol[m][0][1] == manifest.splits[assign_split(0, smi)]
        assert by_mol[m][0][2]["smiles"] == smi and by_mol[m][0][2]["bonds"] is None
    # NaN: conformer 3 (lowest) rejected, the ranks go to conformers 0, 4, 1
    nan_e = sorted(e for c, e in enumerate(energies(22)) if c != 3)[:K]
    assert [s["props"]["totalenergy"] for _, _, s in sorted(by_mol[22], key=lambda t: t[0])] == \
        pytest.approx(nan_e)
    rej = manifest.data["rejected"]
    assert rej["reasons"] == {"unsupported element": 1, "non-finite coordinate": 1}
    assert any("Se" in e["reason"] for e in rej["examples"])
    notes = manifest.data["notes"]
    assert notes["unparsable_smiles"]["total"] == 1
    assert notes["conformers_beyond_k"]["total"] == 20 * 2 + 2 + 1
    assert manifest.data["properties"] == {"totalenergy": {"unit": "Hartree"}}
    train_e = [s["props"]["totalenergy"] for sp, s in samples.values() if sp == "train"]
    assert manifest.property_stats()["totalenergy"]["mean"] == pytest.approx(np.mean(train_e))
    # chunks of >= 7 molecules made of whole msgpack objects (8, 8, 7 molecules): one shard per split each
    assert [sh["name"] for sh in manifest.shards("train")] == [f"train-{c:06d}.tar" for c in range(3)]
    assert manifest.data["details"]["chunks"] == 3
    assert not os.path.exists(os.path.join(out, "_parts"))
    assert loader_count(out) == manifest.count("train")
    # rerun with the same parameters: no-op; other parameters: refused
    assert main(["build", "geom", "--source", msgpack_source, "--out", out, "--conformers", str(K),
                 "--shard-size", "7", "--no-progress", "--interleave", "1"]) == 0
    with pytest.raises(InputError, match="already holds"):
        build_geom(out, msgpack_source, conformers=2, shard_size=7, progress=False, interleave=1)


def test_geom_parallel_workers_give_the_same_shards(tmp_path, msgpack_source):
    one = build_geom(str(tmp_path / "w1"), msgpack_source, conformers=K, shard_size=2, workers=1,
                     progress=False, interleave=1)
    two = build_geom(str(tmp_path / "w2"), msgpack_source, conformers=K, shard_size=2, workers=2,
                     progress=False, interleave=1)
    assert one.data["details"]["chunks"] == 3  # a msgpack object is never split between chunks
    assert one.data["splits"] == two.data["splits"] and one.data["rejected"] == two.data["rejected"]
    assert shard_bytes(one.url) == shard_bytes(two.url)


def test_geom_rerun_resumes_a_partial_build(tmp_path, msgpack_source, monkeypatch):
    import molscale.datasets.sources.geom as geom
    reference = build_geom(str(tmp_path / "ref"), msgpack_source, conformers=K, shard_size=7,
                           progress=False, interleave=1)
    out = str(tmp_path / "partial")
    real = geom.add_molecule
    seen = []

    def crash_at_second_chunk(sink, index, *args):
        seen.append(index)
        if index == 8:  # first molecule of the second chunk
            raise RuntimeError("killed")
        return real(sink, index, *args)

    monkeypatch.setattr(geom, "add_molecule", crash_at_second_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        build_geom(out, msgpack_source, conformers=K, shard_size=7, progress=False, interleave=1)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert sorted(os.listdir(os.path.join(out, "_parts"))) == ["build.json", "chunk-000000.json"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # the broken chunk left no temporary
    # other parameters may not finish this partial build
    with pytest.raises(InputError, match="partial build with other parameters"):
        build_geom(out, msgpack_source, conformers=2, shard_size=7, progress=False, interleave=1)
    # what a SIGKILLed worker leaves: a half-written shard under its temporary name
    with open(os.path.join(out, ".tmp-train-000001.tar-killed"), "wb") as f:
        f.write(b"half a shard")
    seen.clear()
    monkeypatch.setattr(geom, "add_molecule", lambda sink, index, *args: (seen.append(index),
                                                                          real(sink, index, *args)))
    manifest = build_geom(out, msgpack_source, conformers=K, shard_size=7, progress=False, interleave=1)
    assert min(seen) == 8  # chunk 0 was not built again
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert manifest.data["splits"] == reference.data["splits"]
    assert manifest.data["rejected"] == reference.data["rejected"]
    assert manifest.data["notes"] == reference.data["notes"]
    assert shard_bytes(out) == shard_bytes(reference.url)


def test_geom_parallel_build_on_s3_resumes(tmp_path, msgpack_source, s3, monkeypatch):
    """Worker processes write shards and part files straight to object storage; a rerun resumes there."""
    import fsspec

    import molscale.datasets.sources.geom as geom
    local = build_geom(str(tmp_path / "local"), msgpack_source, conformers=K, shard_size=7,
                       progress=False, interleave=1)
    url = "s3://test-bucket/geom-parallel"
    real = geom.add_molecule

    def crash_in_last_chunk(sink, index, *args):
        if index == 16:
            raise RuntimeError("killed")
        return real(sink, index, *args)

    monkeypatch.setattr(geom, "add_molecule", crash_in_last_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        build_geom(url, msgpack_source, conformers=K, shard_size=7, progress=False, interleave=1)
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("test-bucket/geom-parallel/_parts")) == \
        ["build.json", "chunk-000000.json", "chunk-000001.json"]
    monkeypatch.setattr(geom, "add_molecule", real)
    remote = build_geom(url, msgpack_source, conformers=K, shard_size=7, workers=2, progress=False, interleave=1)
    assert remote.data["splits"] == local.data["splits"]
    fs.invalidate_cache()
    assert not fs.exists("test-bucket/geom-parallel/_parts")
    for split in remote.splits:
        for shard in remote.shards(split):
            with open(local.shard_url(shard), "rb") as f:
                assert fs.cat_file(remote.shard_url(shard)) == f.read()


def test_pcqm4mv2_rerun_resumes(tmp_path, monkeypatch):
    import molscale.datasets.sources.pcqm4mv2 as pcqm
    sdf, csv_path = write_pcqm(tmp_path, n_sdf=12, n_csv=14)
    reference = build_pcqm4mv2(str(tmp_path / "ref"), sdf, csv_path, shard_size=4, progress=False)
    out = str(tmp_path / "partial")
    real, seen = pcqm.add_record, []

    def crash_at(sink, i, *args):
        if i == 9:
            raise RuntimeError("killed")
        return real(sink, i, *args)

    monkeypatch.setattr(pcqm, "add_record", crash_at)
    with pytest.raises(RuntimeError, match="killed"):
        build_pcqm4mv2(out, sdf, csv_path, shard_size=4, progress=False)
    monkeypatch.setattr(pcqm, "add_record", lambda sink, i, *args: (seen.append(i), real(sink, i, *args)))
    manifest = build_pcqm4mv2(out, sdf, csv_path, shard_size=4, progress=False)
    assert seen == [8, 9, 10, 11]  # chunks 0 and 1 were complete
    assert manifest.data["rejected"] == reference.data["rejected"]  # the CSV tail counted once
    assert manifest.data["splits"] == reference.data["splits"]
    assert manifest.data["notes"] == reference.data["notes"]
    assert shard_bytes(out) == shard_bytes(reference.url)


def test_geom_msgpack_by_conformer_and_limit(tmp_path, msgpack_source):
    out = str(tmp_path / "geomc")
    manifest = build_geom(out, msgpack_source, conformers=2, split_by="conformer", limit=10,
                          progress=False, interleave=1)
    manifest, samples = all_samples(out)
    check_geom(manifest, samples, k=2)
    assert len(samples) == 20 and manifest.data["rejected"]["total"] == 0
    for key, (split, _) in samples.items():
        m, rank = int(key.split("-")[1]), int(key.split("-")[2])
        assert split == manifest.splits[assign_split(0, f"{SMILES[m]}#{rank}")]
    assert len({split for split, _ in samples.values()}) >= 2  # 20 conformers do not all land in one split


@pytest.fixture(scope="module")
def rdkit_folder(tmp_path_factory, mols):
    root = tmp_path_factory.mktemp("rdkit_folder")
    os.makedirs(root / "drugs")
    summary = {}
    names = SMILES[:6] + ["C[Se]C"]
    for m, smi in enumerate(names):
        confs = []
        for c, e in enumerate(energies(m)):
            one = Chem.Mol(mols[smi])  # a copy holding only conformer c, as GEOM stores them
            one.RemoveAllConformers()
            one.AddConformer(Chem.Conformer(mols[smi].GetConformer(c)), assignId=True)
            confs.append({"rd_mol": one, "totalenergy": e, "boltzmannweight": 0.2})
        rel = f"drugs/{m}.pickle"
        with open(root / rel, "wb") as f:
            pickle.dump({"conformers": confs, "smiles": smi}, f)
        summary[smi] = {"pickle_path": rel, "uniqueconfs": N_CONF}
    summary["CCCC"] = {"pickle_path": "drugs/absent.pickle"}   # missing pickle
    with open(root / "summary_drugs.json", "w") as f:
        json.dump(summary, f)
    return str(root)


def test_geom_rdkit_folder_needs_trust_pickle(tmp_path, rdkit_folder, mols):
    out = str(tmp_path / "geomr")
    with pytest.raises(InputError, match="(?s)pickle.*execute"):
        build_geom(out, rdkit_folder, progress=False, interleave=1)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    build_geom(out, rdkit_folder, conformers=K, trust_pickle=True, progress=False, interleave=1)
    manifest, samples = all_samples(out)
    by_mol = check_geom(manifest, samples)
    assert sorted(by_mol) == list(range(6)) and len(samples) == 18
    assert manifest.data["rejected"]["reasons"] == {"unsupported element": 1, "missing pickle": 1}
    for m, confs in by_mol.items():
        ref = bonds_from_mol(Chem.AddHs(Chem.MolFromSmiles(SMILES[m])))
        for _, _, s in confs:
            np.testing.assert_array_equal(s["bonds"], ref)
    phenol = by_mol[3][0][2]["bonds"]
    assert (phenol[:, 2] == 4).sum() == 6  # aromatic ring kept as aromatic
    # coordinates are those of the conformer with that energy rank (CoM removed)
    s = next(s for r, _, s in by_mol[0] if r == 0)
    ref = mols["CCO"].GetConformer(3).GetPositions()
    np.testing.assert_allclose(s["pos"], ref - ref.mean(0), atol=1e-5)
    assert loader_count(out) == manifest.count("train")


def write_pcqm(root, n_sdf, n_csv, nan_gap_at=None, gz=True):
    sdf = root / ("train.sdf.gz" if gz else "train.sdf")
    raw = []
    for i in range(n_sdf):
        mol = embed(SMILES[i % len(SMILES)], n=1, seed=i)
        mol.SetProp("_Name", str(i))
        raw.append(Chem.MolToMolBlock(mol) + "$$$$\n")
    data = "".join(raw).encode()
    with (gzip.open(sdf, "wb") if gz else open(sdf, "wb")) as f:
        f.write(data)
    csv_path = root / "data.csv.gz"
    with gzip.open(csv_path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "smiles", "homolumogap"])
        for i in range(n_csv):
            w.writerow([i, SMILES[i % len(SMILES)], "" if i == nan_gap_at else 3.0 + 0.1 * i])
    return str(sdf), str(csv_path)


def test_pcqm4mv2_build(tmp_path):
    sdf, csv_path = write_pcqm(tmp_path, n_sdf=24, n_csv=27, nan_gap_at=5)
    out = str(tmp_path / "pcqm")
    build_pcqm4mv2(out, sdf, csv_path, shard_size=5, progress=False)
    manifest, samples = all_samples(out)
    assert manifest.splits == ["train", "valid"]
    assert manifest.data["rejected"]["reasons"] == {"missing homolumogap": 1, "csv row without sdf record": 3}
    assert len(samples) == 23 and sum(manifest.count(s) for s in manifest.splits) == 23
    assert manifest.data["properties"] == {"homolumogap": {"unit": "eV"}}
    seen = set()
    for key, (split, s) in samples.items():
        i = int(key.split("-")[1])
        assert s["props"]["homolumogap"] == pytest.approx(3.0 + 0.1 * i)
        assert s["smiles"] == SMILES[i % len(SMILES)]
        ref = Chem.AddHs(Chem.MolFromSmiles(SMILES[i % len(SMILES)]))
        Chem.Kekulize(ref, clearAromaticFlags=True)  # MolToMolBlock writes Kekule bonds, as the real SDF
        np.testing.assert_array_equal(s["bonds"], bonds_from_mol(ref))
        assert split == manifest.splits[assign_split(0, f"pcqm4mv2:{i}", (0.95, 0.05))]
        seen.update(s["z"].tolist())
    assert manifest.atom_vocab == sorted(seen)
    assert loader_count(out) == manifest.count("train")
    # 24 records in chunks of 5, built by 2 processes: the same shards as one process
    assert manifest.data["details"]["chunks"] == 5
    parallel = build_pcqm4mv2(str(tmp_path / "pcqm2"), sdf, csv_path, shard_size=5, workers=2, progress=False)
    assert parallel.data["splits"] == manifest.data["splits"]
    assert parallel.data["rejected"] == manifest.data["rejected"]
    assert shard_bytes(parallel.url) == shard_bytes(out)


def test_pcqm4mv2_more_sdf_than_csv_and_limit(tmp_path):
    sdf, csv_path = write_pcqm(tmp_path, n_sdf=8, n_csv=6, gz=False)
    out = str(tmp_path / "pcqm")
    manifest = build_pcqm4mv2(out, sdf, csv_path, progress=False)
    assert manifest.data["rejected"]["reasons"] == {"sdf record without csv row": 2}
    assert sum(manifest.count(s) for s in manifest.splits) == 6
    manifest = build_pcqm4mv2(str(tmp_path / "lim"), sdf, csv_path, limit=4, progress=False)
    assert sum(manifest.count(s) for s in manifest.splits) == 4 and manifest.data["rejected"]["total"] == 0


def test_pcqm4mv2_misaligned_idx(tmp_path):
    sdf, csv_path = write_pcqm(tmp_path, n_sdf=3, n_csv=3)
    with gzip.open(csv_path, "wt", newline="") as f:
        f.write("idx,smiles,homolumogap\n5,CCO,3.0\n")
    with pytest.raises(InputError, match="idx 5"):
        build_pcqm4mv2(str(tmp_path / "bad"), sdf, csv_path, progress=False)


# --- EDM's conformer split and conformer interleaving ------------------------------------------------------------

def edm_expected_splits(perm, k=K, molecules=23):
    """Split of each EDM-list position from EDM's recipe (valid, test, train in that order of the permutation)."""
    n = molecules * k
    val_end = int(n * 0.1)
    test_end = val_end + int(n * 0.1)
    split = np.array(["train"] * n, dtype=object)
    split[perm[:val_end]], split[perm[val_end:test_end]] = "valid", "test"
    return split


def test_geom_edm_permutation_reproduces_edms_conformer_split(tmp_path, msgpack_source):
    """EDM's list: every molecule (the Se one too, which is rejected here), its K lowest energies in energy order;
    positions perm[:6] validation, perm[6:12] test, the rest train (69 positions)."""
    perm = np.random.RandomState(3).permutation(23 * K).astype("int32")
    perm_file = tmp_path / "geom_permutation.npy"
    np.save(perm_file, perm)
    out = str(tmp_path / "edm")
    manifest = build_geom(out, msgpack_source, conformers=K, split_by="conformer", shard_size=2, workers=2,
                          edm_permutation=str(perm_file), progress=False)
    _, samples = all_samples(out)
    expected = edm_expected_splits(perm)
    for key, (split, s) in samples.items():
        m = int(key.split("-")[1])
        edm_order = list(np.argsort(energies(m), kind="stable")[:K])
        conformer = int(np.argmin([abs(e - s["props"]["totalenergy"]) for e in energies(m)]))
        assert split == expected[K * m + edm_order.index(conformer)], key
    # molecule 22: its lowest conformer (EDM position 0) is rejected here; positions 1 and 2 keep their split
    assert sorted(int(k.split("-")[2]) for k in samples if k.startswith("geom-0000022")) == [0, 1]
    assert manifest.data["notes"]["conformers_not_in_edm_list"]["total"] == 1
    assert manifest.data["details"]["split"]["edm_conformers"] == 69
    assert {split for split, _ in samples.values()} == {"train", "valid", "test"}


def test_geom_edm_permutation_is_checked_before_anything_is_built(tmp_path, msgpack_source):
    from molscale.datasets.cli import main
    wrong = tmp_path / "perm.npy"
    np.save(wrong, np.arange(68))
    out = tmp_path / "never"
    with pytest.raises(InputError, match="holds 68 indices, but EDM's conformer list of this source has 69"):
        build_geom(str(out), msgpack_source, conformers=K, split_by="conformer", edm_permutation=str(wrong),
                   progress=False)
    assert not out.exists()
    np.save(wrong, np.zeros(69, dtype=int))
    with pytest.raises(InputError, match="is not a permutation of 0..68"):
        build_geom(str(out), msgpack_source, conformers=K, split_by="conformer", edm_permutation=str(wrong),
                   progress=False)
    assert main(["build", "geom", "--source", msgpack_source, "--out", str(out), "--edm-permutation",
                 str(wrong), "--no-progress"]) == 2  # by molecule: refused


def synthetic_geom(path, molecules, conformers, seed=0):
    """A msgpack source of small fake molecules (ethanol atoms at random positions, random energies)."""
    rng = np.random.default_rng(seed)
    z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
    batch = {}
    for m in range(molecules):
        batch[f"CCO.{m}"] = {"conformers": [
            {"totalenergy": float(rng.normal()), "xyz": [[a, *rng.normal(size=3).tolist()] for a in z]}
            for _ in range(conformers)]}
    with open(path, "wb") as f:
        f.write(msgpack.packb(batch))
    return str(path)


def same_molecule_pairs_per_batch(url, batch_size=16, buffer=64, epochs=3):
    loader = StreamingLoader(LoaderConfig(url=url, batch_size=batch_size, shuffle_buffer=buffer), rank=0,
                             world_size=1)
    pairs = batches = 0
    for _ in range(epochs):  # each pass over the loader is a new epoch with a new shard order
        for batch in loader:
            molecules = [key.split("-")[1] for key in batch["keys"]]
            counts = np.unique(molecules, return_counts=True)[1]
            pairs += int((counts * (counts - 1) // 2).sum())
            batches += 1
    return pairs / batches


def test_interleaved_conformers_rarely_meet_in_a_batch(tmp_path):
    """120 molecules x 10 conformers; the loader shuffles shard order and a 64-sample buffer. Under a perfect
    shuffle of the train split a batch of 16 holds C(16, 2) x P(two samples share a molecule) pairs of one
    molecule's conformers; interleaved shards stay near that, shards in molecule order far above it."""
    source = synthetic_geom(tmp_path / "fake.msgpack", 120, 10)
    plain = build_geom(str(tmp_path / "plain"), source, conformers=10, shard_size=4, interleave=1, progress=False)
    spread = build_geom(str(tmp_path / "spread"), source, conformers=10, shard_size=4, progress=False)
    assert spread.data["details"]["interleave"]["shards_per_split_and_chunk"] == 10
    assert plain.count("train") == spread.count("train")
    # each interleaved shard holds at most one conformer of a molecule
    for shard in spread.shards("train"):
        with open(spread.shard_url(shard), "rb") as f:
            keys = [s["__key__"].split("-")[1] for s in read_shard_samples(f.read())]
        assert len(keys) == len(set(keys))
    n = spread.count("train")
    samples = all_samples(str(tmp_path / "spread"))[1]
    per_molecule = n / len({key.split("-")[1] for key, (split, _) in samples.items() if split == "train"})
    random_pairs = 16 * 15 / 2 * (per_molecule - 1) / (n - 1)
    plain_pairs = same_molecule_pairs_per_batch(str(tmp_path / "plain"))
    spread_pairs = same_molecule_pairs_per_batch(str(tmp_path / "spread"))
    print(f"pairs per batch: random {random_pairs:.2f}, plain {plain_pairs:.2f}, interleaved {spread_pairs:.2f}")
    assert spread_pairs < 2 * random_pairs
    assert plain_pairs > 4 * random_pairs


def varied_geom(path, molecules=37, per_object=3, seed=5):
    """A msgpack source of ``molecules`` fake molecules in objects of ``per_object``, with 0 to 7 conformers each
    (random distinct energies); molecule 5 holds Se (rejected here, still in EDM's list), molecule 14 a NaN energy,
    molecule 20 a NaN coordinate in its lowest conformer. Returns (path, energies per molecule)."""
    rng = np.random.default_rng(seed)
    atoms = [6, 6, 8, 1, 1, 1, 1, 1, 1]
    objects, energies_of = [{}], []
    for m in range(molecules):
        n = int(rng.integers(0, 8)) if m not in (14, 20) else 6
        z = [6, 34, 6] if m == 5 else atoms
        confs = [{"totalenergy": float(rng.normal()), "xyz": [[a, *rng.normal(size=3).tolist()] for a in z]}
                 for _ in range(n)]
        if m == 14:
            confs[2]["totalenergy"] = float("nan")
        if m == 20:
            confs[int(np.argmin([c["totalenergy"] for c in confs]))]["xyz"][0][1] = float("nan")
        energies_of.append([c["totalenergy"] for c in confs])
        if len(objects[-1]) == per_object:
            objects.append({})
        objects[-1][f"CCO.{m}"] = {"conformers": confs}
    with open(path, "wb") as f:
        f.writelines(msgpack.packb(o) for o in objects)
    return str(path), energies_of


def edm_recipe(energies_of, perm, k):
    """EDM's list and split, written from its recipe: molecules in stream order, each one's k lowest energies
    (numpy argsort, NaN last), appended one by one; perm[:int(0.1 n)] valid, the next int(0.1 n) test, rest train.
    Returns {(molecule, conformer): split name}."""
    items = [(m, int(c)) for m, e in enumerate(energies_of)
             for c in np.argsort(np.asarray(e, float), kind="stable")[:k]]
    assert len(items) == len(perm)
    n = len(items)
    val_end, test_end = int(n * 0.1), int(n * 0.1) + int(n * 0.1)
    names = {i: "train" for i in range(n)}
    names.update({int(i): "valid" for i in perm[:val_end]})
    names.update({int(i): "test" for i in perm[val_end:test_end]})
    return {item: names[i] for i, item in enumerate(items)}


def test_geom_edm_split_counts_every_molecule_of_the_stream(tmp_path):
    """37 molecules with 0-7 conformers, K=4, chunks of 9 molecules: each kept conformer, found by its energy, sits
    in the split EDM's recipe gives its position; rejected molecules and conformers keep their positions; a --limit
    build takes the same full-length permutation and gives the same splits."""
    k = 4
    source, energies_of = varied_geom(tmp_path / "drugs_crude.msgpack")
    n = sum(min(k, len(e)) for e in energies_of)
    assert any(len(e) > k for e in energies_of) and any(0 < len(e) < k for e in energies_of)
    assert any(len(e) == 0 for e in energies_of)
    perm = np.random.default_rng(11).permutation(n).astype("int32")
    perm_file = tmp_path / "geom_permutation.npy"
    np.save(perm_file, perm)
    expected = edm_recipe(energies_of, perm, k)
    manifest = build_geom(str(tmp_path / "full"), source, conformers=k, split_by="conformer", shard_size=2,
                          edm_permutation=str(perm_file), progress=False)
    assert manifest.data["details"]["chunks"] == 5  # objects of 3 molecules, chunks of at least 2 x 4
    split = manifest.data["details"]["split"]
    assert split["edm_conformers"] == n and split["sha256"] and split["edm_permutation"] == str(perm_file)
    _, samples = all_samples(str(tmp_path / "full"))
    kept = {}
    for key, (name, s) in samples.items():
        m, rank = (int(part) for part in key.split("-")[1:])
        c = energies_of[m].index(s["props"]["totalenergy"])
        assert name == expected[m, c], key
        kept.setdefault(m, []).append((rank, c))
    # what is kept: EDM's conformers of each molecule but the ones rejected here, ranks 0.. in energy order
    assert 5 not in kept and 14 in kept and 20 in kept
    for m, pairs in kept.items():
        edm_confs = [c for mm, c in expected if mm == m]
        rejected = {i for i, e in enumerate(energies_of[m]) if not np.isfinite(e)} | \
            ({int(np.nanargmin(energies_of[m]))} if m == 20 else set())
        assert [c for _, c in sorted(pairs)] == [c for c in edm_confs if c not in rejected], m
    assert len(kept[20]) == k - 1  # the fifth-lowest conformer has no EDM position: not kept
    assert {name for name, _ in samples.values()} == {"train", "valid", "test"}
    # --limit: the permutation of the whole file, the same split for the molecules kept
    build_geom(str(tmp_path / "limit"), source, conformers=k, split_by="conformer", shard_size=2, limit=16,
               edm_permutation=str(perm_file), progress=False)
    _, limited = all_samples(str(tmp_path / "limit"))
    assert {key: name for key, (name, _) in limited.items()} == \
        {key: name for key, (name, _) in samples.items() if int(key.split("-")[1]) < 16}


def test_geom_edm_permutation_refusals(tmp_path, msgpack_source, rdkit_folder, caplog):
    perm = tmp_path / "perm.npy"
    np.save(perm, np.arange(69))
    with pytest.raises(InputError, match="msgpack source"):
        build_geom(str(tmp_path / "r"), rdkit_folder, conformers=K, trust_pickle=True, split_by="conformer",
                   edm_permutation=str(perm), progress=False)
    with pytest.raises(InputError, match="--split-by conformer"):
        build_geom(str(tmp_path / "m"), msgpack_source, conformers=K, edm_permutation=str(perm), progress=False)
    archive = tmp_path / "perm.npz"
    np.savez(archive, perm=np.arange(69))
    with pytest.raises(InputError, match=r"perm\.npz: not a numpy \.npy file"):
        build_geom(str(tmp_path / "z"), msgpack_source, conformers=K, split_by="conformer",
                   edm_permutation=str(archive), progress=False)
    with pytest.raises(InputError, match="does not exist"):
        build_geom(str(tmp_path / "a"), msgpack_source, conformers=K, split_by="conformer",
                   edm_permutation=str(tmp_path / "absent.npy"), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing was built
    # without the file: this project's seeded split, with a warning
    with caplog.at_level("WARNING", logger="molscale.datasets.sources.geom"):
        build_geom(str(tmp_path / "seeded"), msgpack_source, conformers=K, split_by="conformer", limit=4,
                   progress=False)
    assert "not the one of the published GEOM tables" in caplog.text


def test_geom_interleaved_build_resumes(tmp_path, msgpack_source, monkeypatch):
    """A killed interleaved build (3 shards per split and chunk) resumes into the same bytes."""
    import molscale.datasets.sources.geom as geom
    reference = build_geom(str(tmp_path / "ref"), msgpack_source, conformers=K, shard_size=2, progress=False)
    assert reference.data["details"]["chunks"] == 3
    names = {sh["name"] for sh in reference.shards("train")}
    assert {"train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"} <= names
    out = str(tmp_path / "partial")
    real = geom.add_molecule

    def crash_in_last_chunk(sink, index, *args):
        if index == 21:
            raise RuntimeError("killed")
        return real(sink, index, *args)

    monkeypatch.setattr(geom, "add_molecule", crash_in_last_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        build_geom(out, msgpack_source, conformers=K, shard_size=2, progress=False)
    assert sorted(os.listdir(os.path.join(out, "_parts"))) == ["build.json", "chunk-000000.json",
                                                               "chunk-000001.json"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    with open(os.path.join(out, ".tmp-train-000007.tar-killed"), "wb") as f:
        f.write(b"half a shard")
    monkeypatch.setattr(geom, "add_molecule", real)
    manifest = build_geom(out, msgpack_source, conformers=K, shard_size=2, progress=False)
    assert manifest.data["splits"] == reference.data["splits"]
    assert shard_bytes(out) == shard_bytes(reference.url)
