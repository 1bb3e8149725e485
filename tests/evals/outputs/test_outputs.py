"""SDF round trip, plots and report."""

import os

import numpy as np

from molscale.evals.outputs.report import write_report
from molscale.evals.outputs.sdf import read_sdf, write_sdf
from molscale.evals.protocol.metrics import (
    compute_metrics,
    molecule_stats,
    reference_statistics,
)
from tests.evals.helpers import embedded, kekule_benzene, star


def with_hydrogens(smiles):
    """The protocol's SMILES of a molecule: canonical, hydrogens as explicit atoms (EDM's convention)."""
    from rdkit import Chem
    return Chem.MolToSmiles(Chem.AddHs(Chem.MolFromSmiles(smiles)))


def test_sdf_round_trip_keeps_atoms_coordinates_bonds_and_flags(tmp_path):
    molecules = [embedded("CCO"), embedded("CC#N"), kekule_benzene(), star(6, 1, 5, 1.05)]
    path = str(tmp_path / "sub" / "samples.sdf")
    assert write_sdf(molecules, path) == 4
    records = read_sdf(path)
    assert len(records) == 4
    for (z, pos), rec in zip(molecules, records):
        assert np.array_equal(z, rec["z"])
        assert np.abs(pos - rec["pos"]).max() < 1e-4  # SDF keeps 4 decimals
    assert [r["props"]["valid"] for r in records] == [1, 1, 1, 0]
    assert [r["props"]["index"] for r in records] == [0, 1, 2, 3]
    assert records[1]["props"]["smiles"] == with_hydrogens("CC#N") and "smiles" not in records[3]["props"]
    # acetonitrile: C#N triple bond as inferred; the invalid carbon keeps its five written bonds
    assert 3 in records[1]["bonds"][:, 2]
    assert records[3]["bonds"].tolist() == [[0, k, 1] for k in range(1, 6)]
    # benzene: written kekulised, six ring bonds alternating
    ring = [b for b in records[2]["bonds"].tolist() if b[1] < 6]
    assert len(ring) == 6 and sorted(b[2] for b in ring) == [1, 1, 1, 2, 2, 2]


def test_report_writes_html_and_the_plots_it_references(tmp_path):
    molecules = [embedded(s) for s in ("CCO", "CC#N", "CC(N)=O")] + [kekule_benzene()]
    stats = molecule_stats(molecules)
    ref = reference_statistics(molecules[:2])
    metrics = compute_metrics(stats, train_smiles={"CCO"}, reference_stats=ref)
    out = str(tmp_path / "report")
    path = write_report(metrics, out, stats["histograms"], ref, stats["valid_smiles"], notes={"dataset": "x<y"})
    page = open(path).read()
    for name in ("atom_counts.png", "bond_lengths.png", "bond_angles.png", "metrics_table.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    for name in ("atom_counts.png", "bond_lengths.png", "bond_angles.png"):
        assert f"src='{name}'" in page
    assert with_hydrogens("c1ccccc1") in page and with_hydrogens("CC#N") in page and "x&lt;y" in page
    assert "mol_stability" in page and f"{metrics['validity']:.4f}" in page


def test_report_without_reference_or_histograms(tmp_path):
    stats = molecule_stats([embedded("C")])
    path = write_report(compute_metrics(stats), str(tmp_path), stats["histograms"])
    assert "n/a" in open(path).read()  # novelty and distribution metrics unknown
    path = write_report(compute_metrics(stats), str(tmp_path / "bare"))
    assert os.path.exists(path)
