"""Molecular properties: names, source columns and units (as the EDM/UniGEM papers report them; docs/data.md).

Energies are stored in meV (Hartree x 27211.4), as the papers report HOMO/LUMO/gap; the other
properties keep their natural units. ``props.json`` of every QM9 sample holds all twelve.
"""

from dataclasses import dataclass

HARTREE_TO_MEV = 27211.4


@dataclass(frozen=True)
class PropertySpec:
    name: str          # key in props.json
    column: str        # qm9pack CSV column
    unit: str          # unit of the stored value
    scale: float = 1.0  # stored = column value x scale


QM9_PROPERTIES = (
    PropertySpec("mu", "Dipole_debye", "D"),
    PropertySpec("alpha", "Polarizability_bohr3", "Bohr^3"),
    PropertySpec("homo", "HOMO_au", "meV", HARTREE_TO_MEV),
    PropertySpec("lumo", "LUMO_au", "meV", HARTREE_TO_MEV),
    PropertySpec("gap", "HOMO_LUMO_gap_au", "meV", HARTREE_TO_MEV),
    PropertySpec("r2", "R2_bohr2", "Bohr^2"),
    PropertySpec("zpve", "ZPVE_au", "meV", HARTREE_TO_MEV),
    PropertySpec("U0", "InternalEnergy_0K_au", "meV", HARTREE_TO_MEV),
    PropertySpec("U", "InternalEnergy_298K_au", "meV", HARTREE_TO_MEV),
    PropertySpec("H", "Enthalphy_298K_au", "meV", HARTREE_TO_MEV),
    PropertySpec("G", "GibbsFreeEnergy_298K_au", "meV", HARTREE_TO_MEV),
    PropertySpec("Cv", "Heatcapacity_Cv_cal_mol_K", "cal/(mol K)"),
)
