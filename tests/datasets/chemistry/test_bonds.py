"""Bond perception from QM9 coordinates: RDKit's default connectivity, then the extended-Hueckel fallback."""

import pytest
from rdkit import Chem

from molscale.datasets.chemistry.bonds import perceive_bonds
from molscale.datasets.sources.qm9 import iter_rows, row_to_record

# QM9 molecules (position in gdb-id order -> gdb id) where the default connectivity fails: bicyclo[1.1.1]pentane
# (gdb 105), 2-oxabicyclo[1.1.1]pentane (106), methyl- and hydroxy-bicyclopentanes (316, 319), an
# oxabicyclo[2.1.1]hexene (647), 2-oxabicyclo[2.1.1]hexane (650) and a tricyclic cage (695)
FALLBACK = [101, 102, 306, 309, 637, 640, 685]


@pytest.fixture(scope="module")
def records():
    rows = list(iter_rows(max(FALLBACK) + 1))
    return {i: row_to_record(rows[i]) for i in FALLBACK + [0, 5]}


def smiles_of(rec, bonds):
    mol = Chem.RWMol()
    for z in rec["z"]:
        mol.AddAtom(Chem.Atom(int(z)))
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE, 4: Chem.BondType.AROMATIC}
    for i, j, order in bonds.tolist():
        mol.AddBond(i, j, kinds[order])
    Chem.SanitizeMol(mol)
    return Chem.CanonSmiles(Chem.MolToSmiles(Chem.RemoveHs(mol)), useChiral=False)


def test_strained_polycyclics_fall_back_to_hueckel_and_match_qm9(records):
    for i in FALLBACK:
        bonds, method = perceive_bonds(records[i]["z"], records[i]["pos"])
        assert method == "hueckel", (i, records[i]["smiles"])
        assert smiles_of(records[i], bonds) == Chem.CanonSmiles(records[i]["smiles"], useChiral=False)


def test_ordinary_molecules_keep_the_default_method(records):
    for i in (0, 5):  # methane, and a small chain molecule
        bonds, method = perceive_bonds(records[i]["z"], records[i]["pos"])
        assert method == "default"
        assert smiles_of(records[i], bonds) == Chem.CanonSmiles(records[i]["smiles"], useChiral=False)


def test_what_neither_method_reads_is_an_error_naming_both():
    with pytest.raises(ValueError, match="bond perception failed: default: .*; hueckel: .*charge"):
        perceive_bonds([6, 1], [[0.0, 0.0, 0.0], [1.09, 0.0, 0.0]])  # a CH radical: no neutral bond ordering
