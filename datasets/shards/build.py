"""Builders: a molecule source -> WebDataset shards + manifest on any fsspec URL.

Every builder follows the same rules: validate arguments and the destination before any work;
count and report every rejected record by reason; write shards under temporary names; write the
manifest last; a rerun of a complete build with the same parameters is a no-op.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter

from molscale.datasets.errors import InputError
from molscale.datasets.shards import storage
from molscale.datasets.shards.manifest import (
    ManifestError,
    histogram,
    load_manifest,
)

log = logging.getLogger(__name__)


class Rejections:
    """Counts rejected records by reason and keeps the first few examples for the manifest."""

    def __init__(self, max_examples: int = 50):
        self.reasons: Counter = Counter()
        self.examples: list[dict] = []
        self.max_examples = max_examples

    def add(self, record_id: str, reason: str) -> None:
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"record": record_id, "reason": reason})

    def as_dict(self) -> dict:
        return {"total": sum(self.reasons.values()), "reasons": dict(self.reasons), "examples": self.examples}

    def merge(self, other: dict) -> None:
        """Add the counts and examples of another ``as_dict()`` (a chunk's), keeping the example limit."""
        self.reasons.update(other["reasons"])
        self.examples = (self.examples + list(other["examples"]))[:self.max_examples]


def existing_build(out_url: str, params: dict, storage_options: dict | None):
    """The manifest of a complete build with the same parameters, else None.

    A complete build with other parameters is an error: overwriting it silently would lose data.
    """
    try:
        manifest = load_manifest(out_url, storage_options)
    except ManifestError as err:
        if "not found" in str(err):
            return None
        raise InputError(f"{err}. Remove {out_url} or build into another --out.") from None
    if manifest.data.get("build") != params:
        raise InputError(f"{out_url} already holds a complete dataset built with {manifest.data.get('build')}, "
                         f"not {params}. Build into another --out, or delete it first.")
    return manifest


def start_build(out_url: str, params: dict, storage_options: dict | None):
    """(manifest, None, None) when this exact build is already complete (a no-op rerun), else
    (None, fs, path) of a destination checked to be writable."""
    done = existing_build(out_url, params, storage_options)
    if done is not None:
        print(f"{storage.redact_url(out_url)} is already complete (same parameters); nothing to do.")
        return done, None, None
    fs, out_path = storage.get_fs(out_url, storage_options)
    storage.check_writable(fs, out_path, out_url)
    return None, fs, out_path


def split_entry(shards: list[dict]) -> dict:
    """The manifest ``splits`` entry of a split's shard list: count, shards, atom-count histogram."""
    sizes = [n for s in shards for n in s["num_atoms"]]
    return {"count": len(sizes), "shards": shards, "atom_count_histogram": histogram(sizes)}


def finish_splits(writers: dict) -> dict:
    """Close every split writer; their manifest ``splits`` entries."""
    return {name: split_entry(writer.finish()) for name, writer in writers.items()}


def command_line() -> str:
    import shlex
    return "python -m datasets " + shlex.join(sys.argv[1:])
