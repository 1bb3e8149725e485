"""evals/predict.py end to end on real QM9 molecules and a real (tiny, trained here) checkpoint: SDF, XYZ and
SMILES inputs, rows in input order, rejected records listed, Ray fan-out equal to in-process, bad input."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support import ROOT, cpu_env

N_MOLECULES = 12


def predict(*args):
    return subprocess.run([sys.executable, "evals/predict.py", *args], capture_output=True, text=True, timeout=600,
                          env=cpu_env(), cwd=ROOT)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def qm9_test_molecules(qm9_small):
    """The first QM9 test molecules as the shards hold them: (key, z, CoM-free pos, smiles)."""
    from molscale.datasets.shards.manifest import load_manifest
    from molscale.datasets.stream.split_reader import iter_split_samples
    samples = []
    for s in iter_split_samples(load_manifest(qm9_small), "test"):
        pos = s["pos"] - s["pos"].mean(0, keepdims=True)
        samples.append((s["key"], np.asarray(s["z"], dtype=np.int64), pos.astype(np.float32), s.get("smiles", "")))
        if len(samples) == N_MOLECULES:
            return samples
    return samples


def model_predictions(checkpoint, molecules):
    """The model's LUMO for each molecule, computed here in one padded batch (the reference the CLI must match)."""
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.model.sampling import predict_properties
    model = load_for_eval(checkpoint).model
    n_max = max(len(z) for _, z, _, _ in molecules)
    pos = torch.zeros(len(molecules), n_max, 3)
    mask = torch.zeros(len(molecules), n_max, dtype=torch.bool)
    for i, (_, z, p, _) in enumerate(molecules):
        pos[i, :len(z)], mask[i, :len(z)] = torch.from_numpy(p), True
    return predict_properties(model, {"pos": pos, "node_mask": mask})[:, 0].numpy()


def write_xyz(path, molecules, broken_tail=False):
    from molscale.datasets.chemistry.elements import Z_TO_SYMBOL
    lines = []
    for key, z, pos, _ in molecules:
        lines += [str(len(z)), key] + [f"{Z_TO_SYMBOL[int(a)]} {x:.6f} {y:.6f} {w:.6f}" for a, (x, y, w) in zip(z, pos)]
    if broken_tail:
        lines += ["5", "truncated frame", "C 0 0 0", "H 1 0 0"]
    path.write_text("\n".join(lines) + "\n")


def test_sdf_xyz_and_ray_give_the_model_s_predictions_in_input_order(tiny_checkpoint, qm9_test_molecules, tmp_path):
    from molscale.evals.outputs.sdf import write_sdf
    expected = model_predictions(tiny_checkpoint, qm9_test_molecules)
    assert np.ptp(expected) > 0  # the molecules get different predictions, so order is checked

    sdf = tmp_path / "mols.sdf"
    write_sdf([(z, p) for _, z, p, _ in qm9_test_molecules], str(sdf))
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(sdf), "--out", str(tmp_path / "sdf.csv"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(tmp_path / "sdf.csv")
    assert list(rows[0]) == ["index", "name", "smiles", "status", "atoms", "conformers", "lumo (meV)",
                             "lumo_std (meV)", "reason", "note"]
    assert [r_["name"] for r_ in rows] == [f"molecule {i}" for i in range(N_MOLECULES)]
    assert all(r_["status"] == "ok" and r_["conformers"] == "1" and r_["note"] == "" for r_ in rows)
    assert [int(r_["atoms"]) for r_ in rows] == [len(z) for _, z, _, _ in qm9_test_molecules]
    sdf_values = np.array([float(r_["lumo (meV)"]) for r_ in rows])
    np.testing.assert_allclose(sdf_values, expected, rtol=1e-3, atol=0.05)  # SDF keeps 4 decimals

    xyz = tmp_path / "mols.xyz"
    write_xyz(xyz, qm9_test_molecules, broken_tail=True)
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(xyz), "--out", str(tmp_path / "xyz.csv"), "--local")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{N_MOLECULES} of {N_MOLECULES + 1} molecules predicted" in r.stdout and "1 broken XYZ frame" in r.stdout
    rows = read_rows(tmp_path / "xyz.csv")
    assert [r_["name"] for r_ in rows[:-1]] == [key for key, _, _, _ in qm9_test_molecules]
    np.testing.assert_allclose([float(r_["lumo (meV)"]) for r_ in rows[:-1]], expected, rtol=1e-4, atol=0.01)
    last = rows[-1]
    assert last["status"] == "rejected" and last["lumo (meV)"] == ""
    assert "announces 5 atoms and the file ends after 2" in last["reason"]

    # more records than --chunk: Ray tasks (3 chunks), the same rows in the same order
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(xyz), "--out", str(tmp_path / "ray.csv"),
                "--chunk", "5", "--num-cpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # a chunk batches other molecules together than one pass does, so values may differ in float rounding
    ray_rows = read_rows(tmp_path / "ray.csv")
    value_columns = ("lumo (meV)", "lumo_std (meV)")
    assert [{k: v for k, v in r_.items() if k not in value_columns} for r_ in ray_rows] == [
        {k: v for k, v in r_.items() if k not in value_columns} for r_ in rows]
    for column in value_columns:
        ray_values = [float(r_[column]) if r_[column] else np.nan for r_ in ray_rows]
        serial_values = [float(r_[column]) if r_[column] else np.nan for r_ in rows]
        np.testing.assert_allclose(ray_values, serial_values, rtol=1e-5, atol=0.005, equal_nan=True)


def test_smiles_get_conformers_and_unusable_ones_are_listed(tiny_checkpoint, qm9_test_molecules, tmp_path):
    smiles = [s for _, _, _, s in qm9_test_molecules if s][:3]
    text = [f"{s} qm9-{i}" for i, s in enumerate(smiles)]
    text[1:1] = ["C1CC not-a-ring", "", "C1#CC1 cyclopropyne", "CCCl chloroethane"]
    src = tmp_path / "mols.smi"
    src.write_text("\n".join(text) + "\n")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(src), "--conformers", "3", "--out",
                str(tmp_path / "smi.csv"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(tmp_path / "smi.csv")
    assert [r_["name"] for r_ in rows] == ["qm9-0", "not-a-ring", "cyclopropyne", "chloroethane", "qm9-1", "qm9-2"]
    assert [r_["index"] for r_ in rows] == [str(i) for i in range(6)]
    reasons = {r_["name"]: r_["reason"] for r_ in rows if r_["status"] == "rejected"}
    assert reasons["not-a-ring"] == "unparsable SMILES"
    assert reasons["cyclopropyne"].startswith("embedding failed")
    assert reasons["chloroethane"].startswith("element not in the model's atom vocabulary: Cl")
    assert "3 of 6 molecules predicted" in r.stdout
    for row in (rows[0], rows[4], rows[5]):
        assert row["status"] == "ok" and row["smiles"] in smiles
        assert 1 <= int(row["conformers"]) <= 3 and float(row["lumo_std (meV)"]) >= 0
    # predicted from the conformers RDKit embeds: by default the lowest-MMFF-energy one's (they come sorted by
    # energy), with the spread over all of them
    from molscale.datasets.sources.molecule_files import parse_record
    record = parse_record(0, "smiles", (smiles[0], "", {}), 3, 0, (1, 6, 7, 8, 9))
    assert record.energies == sorted(record.energies) and len(record.energies) == len(record.conformers)
    values = model_predictions(tiny_checkpoint, [("", record.z, c, "") for c in record.conformers])
    assert float(rows[0]["lumo (meV)"]) == pytest.approx(values[0], rel=1e-4, abs=0.01)
    assert float(rows[0]["lumo_std (meV)"]) == pytest.approx(values.std(), rel=1e-3, abs=0.01)


def test_conformer_weightings():
    from molscale.evals.property_prediction import KT_KCAL_PER_MOL, conformer_weights, summarise
    energies = [1.0, 1.5, 4.0]
    assert conformer_weights(energies, 3, "equal") == pytest.approx([1 / 3] * 3)
    assert conformer_weights(energies, 3, "lowest") == pytest.approx([1, 0, 0])
    boltzmann = conformer_weights(energies, 3, "boltzmann")
    assert boltzmann.sum() == pytest.approx(1) and boltzmann[0] > boltzmann[1] > boltzmann[2] > 0
    assert boltzmann[1] / boltzmann[0] == pytest.approx(np.exp(-0.5 / KT_KCAL_PER_MOL))
    assert conformer_weights([], 1, "lowest") == pytest.approx([1.0])  # an SDF/XYZ record: one geometry
    values = np.array([[10.0], [20.0], [40.0]])
    value, spread = summarise(values, boltzmann, "boltzmann")
    assert 10 < value[0] < 20 and spread[0] > 0
    value, spread = summarise(values, conformer_weights(energies, 3, "lowest"), "lowest")
    assert value[0] == 10 and spread[0] == pytest.approx(values.std())
    with pytest.raises(ValueError, match="conformer weighting"):
        conformer_weights(energies, 3, "median")


def test_rows_are_flagged_for_what_the_model_has_not_seen(tiny_checkpoint, tmp_path, monkeypatch):
    from molscale.datasets.sources import smiles as smiles_source
    from molscale.evals.property_prediction import predict_chunk
    from molscale.trainer.artifacts import load_for_eval
    loaded = load_for_eval(tiny_checkpoint)
    largest = max(loaded.atom_count_histogram)
    long_chain = "C" * (largest // 3 + 2)  # CnH2n+2: 3n + 2 atoms, more than the training set's largest
    raw = [("smiles", (s, name, {})) for s, name in
           (("CCO", "plain"), ("C[NH3+]", "cation"), ("[CH3]", "radical"), (long_chain, "large"))]
    rows = {r["name"]: r for r in predict_chunk("", 0, raw, ["lumo"], 2, 0, model=loaded.model, max_atoms=largest)}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["plain"]["note"] == ""
    assert "net formal charge +1" in rows["cation"]["note"]
    assert "1 unpaired electron" in rows["radical"]["note"]
    assert f"more than the training set's largest ({largest})" in rows["large"]["note"]
    monkeypatch.setattr(smiles_source, "MMFF_MAX_ITERS", 1)  # no optimisation converges in one iteration
    (row,) = predict_chunk("", 0, raw[:1], ["lumo"], 2, 0, model=loaded.model)
    assert "MMFF did not converge for 2 of 2 conformers in 1 iterations" in row["note"]
    # an SDF record with some hydrogens left out: taken as given, and said so
    from rdkit import Chem
    from rdkit.Chem import AllChem
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    partial = Chem.RWMol(mol)
    partial.RemoveAtom([a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() == 1][0])
    (row,) = predict_chunk("", 0, [("sdf", Chem.MolToMolBlock(partial))], ["lumo"], 1, 0, model=loaded.model)
    assert row["status"] == "ok" and "hydrogens partly given: 1 more" in row["note"], row


def test_bad_input_gets_one_clear_line(tiny_checkpoint, tmp_path):
    out = str(tmp_path / "p.csv")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(tmp_path / "missing.sdf"), "--out", out)
    assert r.returncode == 2 and "missing.sdf: no such file" in r.stderr
    odd = tmp_path / "mols.pdb"
    odd.write_text("ATOM\n")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(odd), "--out", out)
    assert r.returncode == 2 and "unknown molecule file type '.pdb'" in r.stderr
    empty = tmp_path / "empty.smi"
    empty.write_text("\n# nothing here\n")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(empty), "--out", out)
    assert r.returncode == 2 and "empty.smi holds no molecules" in r.stderr
    good = tmp_path / "good.smi"
    good.write_text("CCO\n")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(good), "--properties", "lumo,homo", "--out", out)
    assert r.returncode == 2 and "does not predict homo (it predicts lumo)" in r.stderr
    binary = tmp_path / "bad.sdf"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(binary), "--out", out)
    assert r.returncode == 2 and "cannot be read as text" in r.stderr
    flat = tmp_path / "flat.sdf"
    from rdkit import Chem
    from rdkit.Chem import AllChem
    mol = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(mol)
    flat.write_text(Chem.MolToMolBlock(mol) + "$$$$\n")
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(flat), "--out", out)
    assert r.returncode == 2 and "none of its 1 records could be used" in r.stderr
    rows = read_rows(out)  # the CSV is still written, with the reason
    assert rows[0]["status"] == "rejected" and rows[0]["reason"].startswith("no 3D coordinates")
    # asked for, the drawing's bond table is embedded as its SMILES would be: the same conformers, the same values
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(flat), "--embed-2d", "--conformers", "2",
                "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = read_rows(out)
    assert row["status"] == "ok" and row["smiles"] == "CCO" and row["atoms"] == "9" and row["conformers"] == "2"
    assert "conformers embedded from a 2D record" in row["note"]
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(good), "--conformers", "2", "--out",
                str(tmp_path / "smiles.csv"))
    (from_smiles,) = read_rows(tmp_path / "smiles.csv")
    assert row["lumo (meV)"] == from_smiles["lumo (meV)"] and row["lumo_std (meV)"] == from_smiles["lumo_std (meV)"]
    r = predict("--checkpoint", tiny_checkpoint, "--input", str(good), "--conformers", "0", "--out", out)
    assert r.returncode == 2 and "--conformers must be at least 1" in r.stderr
