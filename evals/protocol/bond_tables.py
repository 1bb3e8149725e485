"""EDM-protocol bond tables and allowed valences: the one source of truth for the evaluation.

Numbers from EDM's released code (qm9/bond_analyze.py): typical bond lengths in picometres for single (b1),
double (b2) and triple (b3) bonds per element pair, the margins added to them, and the valences an atom
may have to count as stable. Everything else in ``evals`` looks bonds and valences up here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from molscale.datasets.chemistry.elements import SYMBOL_TO_Z, Z_TO_SYMBOL

# Typical single-bond lengths (pm); pairs are unordered.
SINGLE_BOND_PM = {
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92, ("H", "B"): 119,
    ("H", "Si"): 148, ("H", "P"): 144, ("H", "As"): 152, ("H", "S"): 134, ("H", "Cl"): 127, ("H", "Br"): 141,
    ("H", "I"): 161,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135, ("C", "Si"): 185, ("C", "P"): 184,
    ("C", "S"): 182, ("C", "Cl"): 177, ("C", "Br"): 194, ("C", "I"): 214,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136, ("N", "Cl"): 175, ("N", "Br"): 214, ("N", "S"): 168,
    ("N", "I"): 222, ("N", "P"): 177,
    ("O", "O"): 148, ("O", "F"): 142, ("O", "Br"): 172, ("O", "S"): 151, ("O", "P"): 163, ("O", "Si"): 163,
    ("O", "Cl"): 164, ("O", "I"): 194,
    ("F", "F"): 142, ("F", "S"): 158, ("F", "Si"): 160, ("F", "Cl"): 166, ("F", "Br"): 178, ("F", "P"): 156,
    ("F", "I"): 187,
    ("B", "Cl"): 175,
    ("Si", "Si"): 233, ("Si", "S"): 200, ("Si", "Cl"): 202, ("Si", "Br"): 215, ("Si", "I"): 243,
    ("Cl", "Cl"): 199, ("Cl", "P"): 203, ("Cl", "S"): 207, ("Cl", "Br"): 214,
    ("S", "S"): 204, ("S", "Br"): 225, ("S", "P"): 210, ("S", "I"): 234,
    ("Br", "Br"): 228, ("Br", "P"): 222,
    ("P", "P"): 221,
    ("I", "I"): 266,
}
DOUBLE_BOND_PM = {
    ("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("C", "S"): 160, ("N", "N"): 125, ("N", "O"): 121,
    ("O", "O"): 121, ("O", "P"): 150, ("P", "S"): 186,
}
TRIPLE_BOND_PM = {
    ("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110,
}
BOND_PM = {1: SINGLE_BOND_PM, 2: DOUBLE_BOND_PM, 3: TRIPLE_BOND_PM}
# A pair is bonded with order k when its distance is below the typical length plus this margin.
MARGIN_PM = {1: 10, 2: 5, 3: 3}

# Valences (sum of bond orders) that make an atom stable.
ALLOWED_VALENCES = {
    "H": (1,), "C": (4,), "N": (3,), "O": (2,), "F": (1,), "B": (3,), "Al": (3,), "Si": (4,), "P": (3, 5),
    "S": (4,), "Cl": (1,), "As": (3,), "Br": (1,), "I": (1,), "Hg": (1, 2), "Bi": (3, 5),
}

# Lookup tables are indexed by atomic number 0..MAX_Z; valence sums are clipped at MAX_VALENCE.
MAX_Z = max(Z_TO_SYMBOL)
MAX_VALENCE = 31


def _symbol(atom) -> str:
    if isinstance(atom, str):
        if atom not in SYMBOL_TO_Z:
            raise ValueError(f"unknown element symbol {atom!r}")
        return atom
    z = int(atom)
    if z not in Z_TO_SYMBOL:
        raise ValueError(f"unknown atomic number {z}")
    return Z_TO_SYMBOL[z]


def bond_length_pm(a, b, order: int) -> float | None:
    """Typical length (pm) of an order-``order`` bond between elements ``a`` and ``b`` (symbols or
    atomic numbers, either order); None when the table has no such bond."""
    table = BOND_PM[order]
    sa, sb = _symbol(a), _symbol(b)
    value = table.get((sa, sb), table.get((sb, sa)))
    return None if value is None else float(value)


def allowed_valences(atom) -> tuple[int, ...]:
    """Valences that make an atom of this element stable; () for elements outside the protocol."""
    return ALLOWED_VALENCES.get(_symbol(atom), ())


@lru_cache(maxsize=1)
def bond_thresholds_angstrom() -> np.ndarray:
    """[3, MAX_Z + 1, MAX_Z + 1] float64: row k-1 holds (b_k + margin_k) / 100 in Angstrom for each pair
    of atomic numbers, -inf where the pair has no order-k bond (so ``d < threshold`` is never true)."""
    table = np.full((3, MAX_Z + 1, MAX_Z + 1), -np.inf)
    for order, lengths in BOND_PM.items():
        for (sa, sb), length_pm in lengths.items():
            za, zb = SYMBOL_TO_Z[sa], SYMBOL_TO_Z[sb]
            value = (length_pm + MARGIN_PM[order]) / 100.0
            table[order - 1, za, zb] = table[order - 1, zb, za] = value
    table.setflags(write=False)
    return table


@lru_cache(maxsize=1)
def allowed_valence_table() -> np.ndarray:
    """[MAX_Z + 1, MAX_VALENCE + 1] bool: entry [z, v] is True when valence v is allowed for element z."""
    table = np.zeros((MAX_Z + 1, MAX_VALENCE + 1), dtype=bool)
    for symbol, valences in ALLOWED_VALENCES.items():
        table[SYMBOL_TO_Z[symbol], list(valences)] = True
    table.setflags(write=False)
    return table
