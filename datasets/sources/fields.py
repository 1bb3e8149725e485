"""Fields of users' records (CSV columns, SD tags, extended-XYZ ``key=value`` comments) kept as properties:
``--properties name[:unit],...`` of ``build smiles``, ``build sdf`` and ``build xyz``."""

from __future__ import annotations

import math

from molscale.datasets.errors import InputError


def parse_properties(text: str | None) -> list[tuple[str, str]]:
    """``"gap:eV,logp"`` -> [("gap", "eV"), ("logp", "")]: field names to keep as properties, with units."""
    specs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, unit = item.partition(":")
        name = name.strip()
        if not name:
            raise InputError(f"--properties {text!r}: an entry has no field name (give name or name:unit)")
        if name in {n for n, _ in specs}:
            raise InputError(f"--properties {text!r}: {name!r} is named twice")
        specs.append((name, unit.strip()))
    return specs


def property_values(fields: dict, specs) -> tuple[dict, str | None]:
    """({name: float}, None), or ({}, reason) when a chosen field is missing or not a finite number."""
    values = {}
    for name, _ in specs:
        raw = fields.get(name)
        if raw is None or raw == "":
            return {}, f"missing property: {name}"
        try:
            value = float(raw)
        except ValueError:
            return {}, f"property not a number: {name} = {raw[:30]!r}"
        if not math.isfinite(value):
            return {}, f"property not a number: {name} = {raw[:30]!r}"
        values[name] = value
    return values, None
