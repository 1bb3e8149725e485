"""UniGEM's two networks after the shared trunk, by name: the one registry of these names.

Nucleation denoises coordinates while t > t_n; growth takes over for t <= t_n and carries the atom-type and
property heads (UniGEM, ICLR 2025, section 3.2; released code: `t_nucleation`). The names are also the
checkpoint's parameter prefixes (`nucleation.*`, `growth.*`) and the loss terms' suffixes (`eps_growth`), so
they are string values: a StrEnum compares, hashes and formats as its name.
"""

from enum import StrEnum


class Branch(StrEnum):
    NUCLEATION = "nucleation"
    GROWTH = "growth"
