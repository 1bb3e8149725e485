"""SMILES lists and MOSES -> RDKit conformers (ETKDGv3 + MMFF94) -> shards, in processes and as Ray tasks."""

import gzip
import os

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from molscale.datasets.chemistry.bonds import bonds_from_mol
from molscale.datasets.errors import InputError
from molscale.datasets.sources.geom import assign_split
from molscale.datasets.sources.smiles import build_smiles, moses_file, read_smiles
from tests.datasets.helpers import all_samples, loader_count, shard_bytes

GOOD = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCN(CC)CC", "OC(=O)CCl", "C1CCOC1"]
LINES = ["CCO ethanol", "c1ccccc1O", "C1CC(=O", "C[Se]C", "CC(=O)Nc1ccc(O)cc1", "", "# a comment",
         "CCN(CC)CC", "OC(=O)CCl", "C1CCOC1"]
K = 3


def mmff_energy(smiles, pos):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    conf = mol.GetConformer(AllChem.EmbedMolecule(mol, randomSeed=1))
    for i, p in enumerate(pos):
        conf.SetAtomPosition(i, p.tolist())
    props = AllChem.MMFFGetMoleculeProperties(mol)
    return AllChem.MMFFGetMoleculeForceField(mol, props).CalcEnergy()


@pytest.fixture()
def smiles_file(tmp_path):
    path = tmp_path / "mols.smi"
    path.write_text("\n".join(LINES) + "\n")
    return str(path)


def test_smiles_file_conformers(tmp_path, smiles_file):
    out = str(tmp_path / "smi")
    manifest = build_smiles(out, smiles_file, conformers=K, shard_size=3, workers=1, backend="process",
                            progress=False)
    manifest, samples = all_samples(out)
    assert manifest.data["rejected"]["reasons"] == {"unparsable smiles": 1, "unsupported element": 1}
    assert manifest.data["notes"]["molecules_read"]["total"] == 8
    by_mol = {}
    for key, (split, s) in samples.items():
        _, index, rank = key.split("-")
        by_mol.setdefault(int(index), []).append((int(rank), split, s))
    # input positions (blank and comment lines are not molecules): 0 1 [2 bad] [3 Se] 4 5 6 7
    assert sorted(by_mol) == [0, 1, 4, 5, 6, 7] and len(samples) == 6 * K
    for index, smiles in zip(sorted(by_mol), GOOD):
        confs = sorted(by_mol[index], key=lambda c: c[0])
        assert [r for r, _, _ in confs] == list(range(K))
        assert len({split for _, split, _ in confs}) == 1
        assert confs[0][1] == manifest.splits[assign_split(0, Chem.MolToSmiles(Chem.AddHs(Chem.MolFromSmiles(smiles))))]
        energies = [s["props"]["mmff_energy"] for _, _, s in confs]
        assert energies == sorted(energies)
        ref_mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        for _, _, s in confs:
            assert s["smiles"] == smiles
            np.testing.assert_array_equal(s["bonds"], bonds_from_mol(ref_mol))
            np.testing.assert_array_equal(s["z"], [a.GetAtomicNum() for a in ref_mol.GetAtoms()])
            assert np.abs(s["pos"].mean(0)).max() < 1e-4
            # the stored geometry is an MMFF minimum whose energy is the one recorded
            assert mmff_energy(smiles, s["pos"].astype(np.float64)) == pytest.approx(s["props"]["mmff_energy"],
                                                                                   abs=0.05)
    assert loader_count(out) == manifest.count("train")


def test_smiles_over_ray_matches_processes(tmp_path, smiles_file):
    from molscale.datasets.cli import main
    ray_out = str(tmp_path / "ray")
    assert main(["build", "smiles", "--input", smiles_file, "--out", ray_out, "--conformers", "2",
                 "--shard-size", "2", "--workers", "2", "--no-progress"]) == 0
    ref = build_smiles(str(tmp_path / "proc"), smiles_file, conformers=2, shard_size=2, workers=1,
                       backend="process", progress=False)
    ray_manifest = all_samples(ray_out)[0]
    assert ray_manifest.data["details"]["chunks"] == 4
    assert ray_manifest.data["splits"] == ref.data["splits"]
    assert shard_bytes(ray_out) == shard_bytes(ref.url)


def test_read_smiles_csv_and_gzip(tmp_path):
    path = tmp_path / "m.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("id,SMILES,score\n1,CCO,0.5\n2,c1ccccc1,0.1\n")
    assert list(read_smiles(str(path))) == ["CCO", "c1ccccc1"]


def test_moses_input(tmp_path):
    path = moses_file("moses")
    with gzip.open(path, "rt") as f:
        first = [line.strip() for line in f][1:5]
    manifest = build_smiles(str(tmp_path / "moses"), "moses", conformers=1, limit=4, workers=1,
                            backend="process", progress=False)
    _, samples = all_samples(manifest.url)
    assert manifest.data["notes"]["molecules_read"]["total"] == 4
    assert sorted(s["smiles"] for _, s in samples.values()) == sorted(first)
    assert manifest.data["source"]["name"] == "moses"
    with pytest.raises(InputError, match="splits train, test"):
        moses_file("moses:valid")


def test_smiles_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_smiles(str(tmp_path / "x"), str(tmp_path / "missing.smi"), progress=False)
    with pytest.raises(InputError, match="--conformers"):
        build_smiles(str(tmp_path / "x"), "moses", conformers=0, progress=False)
    assert not os.path.exists(tmp_path / "x")


def test_the_first_molecule_of_a_seed_0_build_gets_distinct_conformers():
    """RDKit's randomSeed 0 gives K identical conformers; molecule 0 of a seed-0 build must not get them."""
    from rdkit import Chem

    from molscale.datasets.sources.smiles import conformers, embedding_seed
    mol = Chem.AddHs(Chem.MolFromSmiles("CCCCO"))
    ranked = conformers(mol, 4, embedding_seed(0, 0))
    positions = [mol.GetConformer(conf_id).GetPositions() for _, conf_id, _ in ranked]
    assert len(positions) == 4
    assert max(float(abs(positions[0] - p).max()) for p in positions[1:]) > 0.5
    assert embedding_seed(0, 7) == 7 and embedding_seed(2, 7) == 2_000_013  # every other molecule as before
    assert 0 < embedding_seed(5000, 3) < 2**31  # a large --seed wraps instead of overflowing RDKit's int

