import numpy as np
import pytest
from rdkit import Chem

from molscale.evals.protocol.bond_tables import (
    allowed_valences,
    bond_length_pm,
    bond_thresholds_angstrom,
)
from molscale.evals.protocol.metrics import analyse_molecule, evaluate
from molscale.evals.protocol.stability import bond_order_matrix, molecule_stability
from tests.evals.helpers import embedded, kekule_benzene, pair, star


def test_tables_are_symmetric_and_match_facts():
    assert bond_length_pm("C", "H", 1) == bond_length_pm(1, 6, 1) == 109
    assert bond_length_pm("O", "C", 2) == 120
    assert bond_length_pm("N", "C", 3) == 116
    assert bond_length_pm("H", "H", 2) is None
    assert allowed_valences("P") == (3, 5) and allowed_valences(80) == (1, 2)
    thresholds = bond_thresholds_angstrom()
    assert np.array_equal(thresholds, thresholds.transpose(0, 2, 1))
    assert thresholds[0, 6, 6] == pytest.approx(1.64) and thresholds[1, 6, 6] == pytest.approx(1.39)
    assert thresholds[2, 6, 6] == pytest.approx(1.23) and thresholds[1, 1, 6] == -np.inf


@pytest.mark.parametrize("distance, order", [
    (1.6399, 1), (1.6401, 0),      # C-C single: b1 154 + 10 pm
    (1.3899, 2), (1.3901, 1),      # double: b2 134 + 5 pm
    (1.2299, 3), (1.2301, 2),      # triple: b3 120 + 3 pm
    (0.5, 3),                      # very close still counts as the highest order the pair has
])
def test_carbon_carbon_orders_at_the_edges(distance, order):
    z, pos = pair(6, 6, distance)
    assert bond_order_matrix(z, pos)[0, 1] == order


@pytest.mark.parametrize("z1, z2, edge_angstrom", [(1, 6, 1.19), (8, 1, 1.06), (1, 1, 0.84), (9, 6, 1.45)])
def test_pairs_without_double_bonds_stay_single(z1, z2, edge_angstrom):
    assert bond_order_matrix(*pair(z1, z2, edge_angstrom - 1e-4))[0, 1] == 1
    assert bond_order_matrix(*pair(z1, z2, edge_angstrom + 1e-4))[0, 1] == 0
    assert bond_order_matrix(*pair(z1, z2, 0.3))[0, 1] == 1


def test_pair_missing_from_the_table_never_bonds():
    assert bond_order_matrix(*pair(5, 6, 1.0))[0, 1] == 0  # B-C has no entry in the EDM table


def test_matrix_is_symmetric_with_empty_diagonal():
    z, pos = embedded("CC(=O)N")
    order = bond_order_matrix(z, pos)
    assert order.shape == (len(z), len(z))
    assert np.array_equal(order, order.T) and not order.diagonal().any()


@pytest.mark.parametrize("smiles", ["C", "CCO", "CC#N", "O", "C=O", "CC(N)=O", "C#C"])
def test_known_molecules_are_stable_and_valid(smiles):
    z, pos = embedded(smiles)
    result = analyse_molecule(z, pos)
    assert result.stable.all() and result.molecule_stable
    assert result.valid and result.smiles == Chem.MolToSmiles(Chem.AddHs(Chem.MolFromSmiles(smiles)))  # H explicit


def heavy_atoms(smiles):
    return Chem.MolToSmiles(Chem.RemoveHs(Chem.MolFromSmiles(smiles)))


def test_kekule_benzene_is_stable_and_aromatic():
    z, pos = kekule_benzene()
    result = analyse_molecule(z, pos)
    assert result.molecule_stable and result.valid and result.smiles == "[H]c1c([H])c([H])c([H])c([H])c1[H]"
    ring = result.kind[:6, :6]
    assert (ring[np.nonzero(ring)] == 4).all() and np.count_nonzero(ring) == 12


def test_symmetric_benzene_fails_the_edm_protocol():
    # All C-C at 1.395 A: single (< 1.64) but not double (>= 1.39), so carbons reach valence 3 only.
    # RDKit then fills in hydrogens: valid, but as cyclohexane. This is how the protocol behaves.
    z, pos = kekule_benzene(1.395, 1.395)
    result = analyse_molecule(z, pos)
    assert result.valence[:6].tolist() == [3] * 6 and not result.stable[:6].any()
    assert result.valid and heavy_atoms(result.smiles) == "C1CCCCC1" and result.smiles.count("[H]") == 6


def test_carbon_with_five_neighbours_is_unstable_and_invalid():
    z, pos = star(6, 1, 5, 1.05)
    result = analyse_molecule(z, pos)
    assert result.valence[0] == 5 and not result.stable[0] and result.stable[1:].all()
    assert not result.molecule_stable and not result.valid and result.smiles is None


def test_over_valent_nitrogen_is_unstable_and_invalid():
    z, pos = star(7, 1, 4, 1.0)
    result = analyse_molecule(z, pos)
    assert result.valence[0] == 4 and not result.stable[0]
    assert not result.valid


def test_atoms_too_far_apart_break_the_molecule_into_fragments():
    z, pos = embedded("CCO")
    hydrogen = int(np.flatnonzero(z == 1)[0])
    pos = pos.copy()
    pos[hydrogen] += 6.0  # far from everything
    result = analyse_molecule(z, pos)
    assert result.valence[hydrogen] == 0 and not result.stable[hydrogen]
    assert not result.molecule_stable
    assert result.stable.sum() == len(z) - 2  # the lone H and the carbon it left
    # RDKit fills the missing hydrogen in (valid), but the SMILES keeps the six hydrogens that are there, so the
    # molecule is not counted as ethanol by uniqueness and novelty (EDM's convention)
    assert result.valid and heavy_atoms(result.smiles) == "CCO"
    assert result.smiles != Chem.MolToSmiles(Chem.AddHs(Chem.MolFromSmiles("CCO")))


def test_molecule_stability_counts():
    assert molecule_stability(*embedded("CCO")) == (9, 9, True)
    assert molecule_stability(*star(7, 1, 4, 1.0)) == (4, 5, False)


def test_fractions_over_a_mixed_list():
    molecules = [embedded("CCO"), embedded("C"), star(6, 1, 5, 1.05), star(7, 1, 4, 1.0)]
    m = evaluate(molecules)
    assert m["n_samples"] == 4
    assert m["atom_stability"] == pytest.approx((9 + 5 + 5 + 4) / (9 + 5 + 6 + 5))
    assert m["mol_stability"] == pytest.approx(0.5)
    assert m["validity"] == pytest.approx(0.5)
    assert m["uniqueness"] == 1.0 and m["valid_unique"] == pytest.approx(0.5)
    assert m["novelty"] is None and m["atom_type_tv"] is None


def test_unknown_atomic_number_is_a_clear_error():
    with pytest.raises(ValueError, match="atom_vocab"):
        bond_order_matrix(np.array([0, 6]), np.zeros((2, 3)))
