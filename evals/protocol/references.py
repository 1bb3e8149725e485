"""Reference data of a dataset split, computed once with the evaluation protocol and cached next to it.

``{dataset_url}/smiles-{split}-{version}.json``  SMILES of the valid molecules (novelty reference)
``{dataset_url}/stats-{split}-{version}.json``   histograms (distribution-metric reference)
(``-{version}-single`` with ``all_single``). Both are written by one pass over the split, on the dataset's
own storage (a local folder or any fsspec URL). The protocol version is part of the file name, so caches
written by older code are never opened, and it is checked again in the file's header. A dataset that
cannot be written to is not an error: the result is returned uncached.
"""

from __future__ import annotations

import json
import logging

from molscale.datasets.shards import storage
from molscale.evals.protocol.distribution import (
    histograms_from_json,
    histograms_to_json,
)
from molscale.evals.protocol.metrics import merge_stats, molecule_stats
from molscale.evals.protocol.molecules import iter_split_molecules

log = logging.getLogger(__name__)

# Bumped whenever a change alters the SMILES or histograms of a molecule. edm-2: SMILES keep explicit
# hydrogens (edm-1 removed them).
PROTOCOL_VERSION = "edm-2"
CHUNK_MOLECULES = 2000


def cache_names(split: str, all_single: bool = False) -> tuple[str, str]:
    suffix = PROTOCOL_VERSION + ("-single" if all_single else "")
    return f"smiles-{split}-{suffix}.json", f"stats-{split}-{suffix}.json"


def _read_cache(fs, path: str):
    try:
        data = json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError:
        return None
    except ValueError as err:
        log.warning("ignoring unreadable cache %s: %s", path, err)
        return None
    if data.get("protocol") != PROTOCOL_VERSION:
        log.info("%s was made with protocol %s, not %s; recomputing", path, data.get("protocol"), PROTOCOL_VERSION)
        return None
    return data


def _write_cache(fs, path: str, payload: dict) -> None:
    try:
        storage.write_bytes(fs, path, json.dumps(payload).encode())
    except OSError as err:
        log.warning("could not cache %s: %s", path, err)


def split_statistics(dataset_url: str, split: str, all_single: bool = False,
                     storage_options: dict | None = None, limit: int | None = None) -> dict:
    """Merged ``molecule_stats`` of the molecules of a split (one process, chunk by chunk)."""
    parts, chunk = [], []
    for molecule in iter_split_molecules(dataset_url, split, storage_options, limit):
        chunk.append(molecule)
        if len(chunk) == CHUNK_MOLECULES:
            parts.append(molecule_stats(chunk, all_single=all_single))
            chunk = []
    if chunk or not parts:
        parts.append(molecule_stats(chunk, all_single=all_single))
    return merge_stats(parts)


def _compute_and_cache(dataset_url, split, all_single, storage_options, use_cache):
    stats = split_statistics(dataset_url, split, all_single, storage_options)
    smiles = set(stats["valid_smiles"])
    if use_cache:
        fs, path = storage.get_fs(dataset_url, storage_options)
        smiles_name, stats_name = cache_names(split, all_single)
        header = {"protocol": PROTOCOL_VERSION, "split": split, "all_single": all_single,
                  "n_molecules": stats["n_samples"], "n_valid": stats["n_valid"]}
        _write_cache(fs, storage.join(path, smiles_name), {**header, "smiles": sorted(smiles)})
        _write_cache(fs, storage.join(path, stats_name),
                     {**header, "histograms": histograms_to_json(stats["histograms"])})
    return smiles, stats["histograms"]


def _cached_or_computed(dataset_url, split, all_single, storage_options, use_cache, which: int):
    """Item ``which`` (0 SMILES, 1 histograms) of a split's references: from the cache, else computed (and cached)."""
    if use_cache:
        fs, path = storage.get_fs(dataset_url, storage_options)
        cached = _read_cache(fs, storage.join(path, cache_names(split, all_single)[which]))
        if cached is not None:
            return set(cached["smiles"]) if which == 0 else histograms_from_json(cached["histograms"])
    return _compute_and_cache(dataset_url, split, all_single, storage_options, use_cache)[which]


def reference_smiles(dataset_url: str, split: str = "train", all_single: bool = False,
                     storage_options: dict | None = None, use_cache: bool = True) -> set[str]:
    """SMILES of the valid molecules of a split, inferred with the same protocol as generated molecules."""
    return _cached_or_computed(dataset_url, split, all_single, storage_options, use_cache, 0)


def reference_histograms(dataset_url: str, split: str = "train", all_single: bool = False,
                         storage_options: dict | None = None, use_cache: bool = True) -> dict:
    """Histograms of a split (the ``reference_stats`` argument of ``metrics.compute_metrics``)."""
    return _cached_or_computed(dataset_url, split, all_single, storage_options, use_cache, 1)
