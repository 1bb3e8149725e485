"""Atom vocabularies: the one place that maps element symbols to atomic numbers.

A dataset's vocabulary is an ordered list of atomic numbers; a model's one-hot channel i means
``vocab[i]``. The vocabularies below are those of the EDM/UniGEM protocol (docs/data.md).
"""

SYMBOL_TO_Z = {
    "H": 1, "He": 2, "Li": 3, "Be": 4, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Ne": 10,
    "Na": 11, "Mg": 12, "Al": 13, "Si": 14, "P": 15, "S": 16, "Cl": 17, "Ar": 18,
    "K": 19, "Ca": 20, "Ga": 31, "Ge": 32, "As": 33, "Se": 34, "Br": 35,
    "Sn": 50, "Sb": 51, "Te": 52, "I": 53, "Hg": 80, "Tl": 81, "Pb": 82, "Bi": 83,
}
Z_TO_SYMBOL = {z: s for s, z in SYMBOL_TO_Z.items()}

# QM9: hydrogens included, elements H C N O F.
QM9_ATOM_VOCAB = (1, 6, 7, 8, 9)
# GEOM-Drugs (EDM/UniGEM protocol): H B C N O F Al Si P S Cl As Br I Hg Bi.
GEOM_ATOM_VOCAB = (1, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 33, 35, 53, 80, 83)


def symbols_to_z(symbols, where=""):
    """Atomic numbers of element symbols; an unknown symbol raises with ``where`` in the message."""
    try:
        return [SYMBOL_TO_Z[s] for s in symbols]
    except KeyError as err:
        raise ValueError(f"unknown element symbol {err.args[0]!r}{' in ' + where if where else ''}") from None
