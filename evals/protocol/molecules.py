"""Molecules as the evaluation sees them: a list of (z, pos) pairs.

``z`` int [N] atomic numbers, ``pos`` float [N, 3] Angstrom. Generated batches arrive either in that
form or padded (``pos [B, N, 3]``, ``atom_z [B, N]``, ``node_mask [B, N]``); ``as_molecule_list``
turns both into the list form. ``iter_split_molecules`` reads the real molecules of a dataset split.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

Molecule = tuple[np.ndarray, np.ndarray]  # (z int [N], pos float32 [N, 3] Angstrom)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def from_padded(pos, atom_z, node_mask) -> list[Molecule]:
    """pos [B, N, 3] Angstrom, atom_z [B, N] atomic numbers, node_mask [B, N] (1 = real atom)."""
    pos, atom_z, node_mask = _numpy(pos), _numpy(atom_z), _numpy(node_mask)
    if node_mask.ndim == 3:  # [B, N, 1] as models often keep it
        node_mask = node_mask[..., 0]
    if pos.ndim != 3 or pos.shape[-1] != 3 or atom_z.shape != pos.shape[:2] or node_mask.shape != pos.shape[:2]:
        raise ValueError(f"padded molecules need pos [B, N, 3], atom_z [B, N] and node_mask [B, N]; got "
                         f"{pos.shape}, {atom_z.shape}, {node_mask.shape}")
    keep = node_mask > 0.5
    return [(atom_z[b][keep[b]].astype(np.int64), pos[b][keep[b]].astype(np.float32))
            for b in range(pos.shape[0])]


def as_molecule_list(molecules) -> list[Molecule]:
    """Accepts a list of (z, pos) pairs or of dicts with 'z' and 'pos', a (pos, atom_z, node_mask) tuple of
    padded arrays, or a dict with keys pos, atom_z (or z) and node_mask. Returns [(z int [N], pos [N, 3])]."""
    if isinstance(molecules, dict):
        atom_z = molecules.get("atom_z", molecules.get("z"))
        return from_padded(molecules["pos"], atom_z, molecules["node_mask"])
    if isinstance(molecules, tuple) and len(molecules) == 3 and _numpy(molecules[0]).ndim == 3:
        return from_padded(*molecules)
    out = []
    for i, item in enumerate(molecules):
        if isinstance(item, dict):
            z, pos = item["z"], item["pos"]
        else:
            z, pos = item[0], item[1]
        z, pos = _numpy(z).astype(np.int64).reshape(-1), _numpy(pos).astype(np.float32)
        if pos.shape != (len(z), 3):
            raise ValueError(f"molecule {i}: pos {pos.shape} does not match {len(z)} atomic numbers; "
                             f"expected (z [N], pos [N, 3])")
        out.append((z, pos))
    return out


def iter_split_molecules(dataset, split: str, storage_options: dict | None = None,
                         limit: int | None = None) -> Iterator[Molecule]:
    """(z, pos) of the molecules of one split of a dataset, in shard order.

    ``dataset``: its Manifest, or its URL (the manifest is then read once). Reads through the datasets
    package's split reader (molscale.datasets.stream.split_reader), which stops with TooManyBadShardsError
    (a RunError) at a corrupt or missing shard: evaluation numbers come from the whole split.
    """
    from molscale.datasets.shards.manifest import Manifest, load_manifest
    from molscale.datasets.stream.split_reader import iter_split_samples

    manifest = dataset if isinstance(dataset, Manifest) else load_manifest(dataset, storage_options)
    for sample in iter_split_samples(manifest, split, storage_options, limit=limit):
        yield sample["z"].astype(np.int64), sample["pos"]


def load_split_molecules(dataset, split: str, storage_options: dict | None = None,
                         limit: int | None = None) -> list[Molecule]:
    """``iter_split_molecules`` as a list; ``dataset`` is a Manifest or a URL."""
    return list(iter_split_molecules(dataset, split, storage_options, limit))
