"""A raw record of a user's file that cannot even be handed to a parser, shared by the molecule-file readers
(molecule_files.py) and the SMILES/CSV reader (smiles.py)."""

from typing import NamedTuple


class Unreadable(NamedTuple):
    """A raw record that cannot even be handed to a parser (bytes that are not UTF-8 text, a broken layout,
    the damaged end of a compressed file): ``parse_record`` turns it into a rejected record with this reason."""
    name: str
    kind: str
    detail: str


NOT_UTF8 = "not UTF-8 text"
