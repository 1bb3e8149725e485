import numpy as np
import pytest
import torch

from molscale.evals.protocol.chemistry import novelty, uniqueness
from molscale.evals.protocol.distribution import (
    distribution_metrics,
    histograms_from_json,
    histograms_to_json,
    total_variation,
)
from molscale.evals.protocol.metrics import (
    analyse_molecule,
    compute_metrics,
    evaluate,
    merge_stats,
    molecule_stats,
    reference_statistics,
)
from molscale.evals.protocol.molecules import as_molecule_list, from_padded
from tests.evals.helpers import embedded, kekule_benzene, star

DIST_KEYS = ("atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1")


def test_uniqueness_and_novelty_on_hand_made_lists():
    assert uniqueness(["CCO", "CCO", "C", "N"]) == pytest.approx(3 / 4)
    assert uniqueness([]) == 0.0
    assert novelty(["CCO", "CCO", "C", "N"], {"C", "O"}) == pytest.approx(2 / 3)
    assert novelty(["CCO"], ["CCO"]) == 0.0
    assert novelty([], {"C"}) == 0.0


def test_uniqueness_novelty_and_valid_unique_through_evaluate():
    molecules = [embedded("CCO"), embedded("CCO", seed=3), embedded("CC#N"), star(7, 1, 4, 1.0)]
    train_smiles = set(molecule_stats([embedded("CCO", seed=11)])["valid_smiles"])  # the same convention
    m = evaluate(molecules, train_smiles=train_smiles)
    assert m["validity"] == pytest.approx(3 / 4)
    assert m["uniqueness"] == pytest.approx(2 / 3)
    assert m["valid_unique"] == pytest.approx(2 / 4)
    assert m["novelty"] == pytest.approx(1 / 2)


def test_smiles_keep_explicit_hydrogens_as_edm():
    """A CH3 radical and methane are different molecules (EDM's SMILES keep the hydrogens as atoms); removing the
    hydrogens would merge them and count one unique molecule instead of two."""
    methane = (np.array([6, 1, 1, 1, 1]), star(6, 1, 4, 1.09)[1])
    methyl = (np.array([6, 1, 1, 1]), star(6, 1, 3, 1.09)[1])
    stats = molecule_stats([methane, methyl, embedded("CCO", seed=3), embedded("CCO", seed=5)])
    smiles = stats["valid_smiles"]
    assert len(smiles) == 4 and smiles[0] != smiles[1]
    assert smiles[2] == smiles[3]  # two conformers of one molecule, atoms in the same order: one SMILES
    assert all("[H]" in s for s in smiles)
    assert uniqueness(smiles) == pytest.approx(3 / 4)


def test_total_variation_has_no_half():
    assert total_variation({1: 5}, {6: 3}) == pytest.approx(2.0)
    assert total_variation({1: 1, 6: 1}, {1: 1, 6: 1}) == 0.0
    assert np.isnan(total_variation({}, {1: 1}))


def _mixture():
    return [embedded(s) for s in ("CCO", "CC#N", "CC(N)=O", "OCC=O", "C1CC1")] + [kekule_benzene()]


def test_distances_are_zero_for_identical_sets_and_positive_otherwise():
    ref = reference_statistics(_mixture())
    same = distribution_metrics(reference_statistics(_mixture()), ref)
    assert all(same[k] == 0.0 for k in DIST_KEYS), same
    # all-stable molecules share their valencies, so add an over-bonded carbon to move valency_w1 too
    different = [embedded(s) for s in ("CCCC", "C#CC=O", "NCCF")] + [star(6, 1, 5, 1.05)]
    other = distribution_metrics(reference_statistics(different), ref)
    assert all(other[k] > 0 for k in DIST_KEYS), other


def test_bond_length_w1_measures_a_stretch_in_angstrom():
    molecules = _mixture()
    ref = reference_statistics(molecules)
    stretched = reference_statistics([(z, pos * 1.01) for z, pos in molecules])  # bonds 1 % longer
    w1 = distribution_metrics(stretched, ref)["bond_length_w1"]
    assert 0.005 < w1 < 0.03  # bonds of about 1.1-1.5 A grow by 0.011-0.015 A


def test_histograms_survive_json():
    hist = reference_statistics(_mixture())
    back = histograms_from_json(histograms_to_json(hist))
    assert distribution_metrics(back, hist) == distribution_metrics(hist, hist)
    assert back["bond_types"] == hist["bond_types"] and 4 in back["bond_types"]  # aromatic from benzene


def test_chunks_merge_to_the_single_pass_result():
    molecules = _mixture() + [star(6, 1, 5, 1.05), embedded("CCO")]
    ref = reference_statistics(molecules[:3])
    whole = evaluate(molecules, train_smiles={"CCO"}, reference_stats=ref)
    parts = [molecule_stats(molecules[i:i + 3]) for i in range(0, len(molecules), 3)]
    merged_stats = merge_stats(parts)
    merged = compute_metrics(merged_stats, train_smiles={"CCO"}, reference_stats=ref)
    assert merged == pytest.approx(whole)
    # one validity flag per molecule, in input order across chunks (property rows over the valid ones read it)
    single = molecule_stats(molecules)
    assert merged_stats["valid"] == single["valid"] and len(single["valid"]) == len(molecules)
    assert sum(single["valid"]) == single["n_valid"] and single["valid"][-1] and not all(single["valid"])
    assert set(DIST_KEYS) <= set(merged) and merged["n_samples"] == len(molecules)


def test_padded_batches_and_tensors_give_the_same_molecules():
    molecules = [embedded("CCO"), embedded("C"), embedded("CC#N")]
    n_max = max(len(z) for z, _ in molecules)
    pos = np.zeros((3, n_max, 3), np.float32)
    atom_z = np.zeros((3, n_max), np.int64)
    mask = np.zeros((3, n_max), np.float32)
    for b, (z, p) in enumerate(molecules):
        pos[b, :len(z)], atom_z[b, :len(z)], mask[b, :len(z)] = p, z, 1
    padded = from_padded(torch.from_numpy(pos), torch.from_numpy(atom_z), torch.from_numpy(mask)[..., None])
    for (z1, p1), (z2, p2) in zip(molecules, padded):
        assert np.array_equal(z1, z2) and np.array_equal(p1, p2)
    assert evaluate((pos, atom_z, mask)) == evaluate(molecules)
    assert evaluate({"pos": pos, "atom_z": atom_z, "node_mask": mask}) == evaluate(molecules)
    assert len(as_molecule_list([{"z": z, "pos": p} for z, p in molecules])) == 3
    with pytest.raises(ValueError, match="does not match"):
        as_molecule_list([(np.array([6, 1]), np.zeros((3, 3)))])


def test_empty_input_gives_zeros_not_errors():
    m = evaluate([])
    assert m["n_samples"] == 0 and m["validity"] == 0.0 and m["atom_stability"] == 0.0
    m = evaluate([(np.zeros(0, np.int64), np.zeros((0, 3), np.float32)), (np.array([6]), np.zeros((1, 3)))])
    assert m["n_samples"] == 2 and m["mol_stability"] == 0.0 and m["validity"] == 0.5  # lone C -> methane


def test_metrics_carry_intervals_that_bracket_their_fractions():
    molecules = _mixture() + [star(6, 1, 5, 1.05), embedded("CCO"), embedded("CC#N"), embedded("C")]
    m = evaluate(molecules)
    for name in ("mol_stability", "validity", "valid_unique"):
        assert 0 <= m[f"{name}_ci95_low"] <= m[name] <= m[f"{name}_ci95_high"] <= 1, name
        assert m[f"{name}_ci95_high"] - m[f"{name}_ci95_low"] > 0.1  # a handful of molecules: a wide interval
    # atom stability's error with molecules as clusters, from the per-molecule counts
    stable = np.array([int(analyse_molecule(z, p).stable.sum()) for z, p in molecules], dtype=float)
    atoms = np.array([len(z) for z, _ in molecules], dtype=float)
    p = stable.sum() / atoms.sum()
    n = len(molecules)
    expected = np.sqrt(n / (n - 1) * ((stable - p * atoms) ** 2).sum()) / atoms.sum()
    assert m["atom_stability"] == pytest.approx(p) and m["atom_stability_se"] == pytest.approx(expected)
    assert evaluate(molecules[:1])["atom_stability_se"] is None  # one molecule: no spread to measure
