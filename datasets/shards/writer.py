"""Writes the samples of each split into ``{split}-{%06d}.tar`` shards with webdataset's TarWriter.

A shard is written to a local temporary file and moved into place only when complete (a rename on
a local disk, an atomic PUT on object storage), so a killed build never leaves a truncated shard
under a final name. The writer records what the manifest needs about every shard.
"""

from __future__ import annotations

import os
import tempfile

import webdataset as wds

from molscale.datasets.shards import storage


class SplitShardWriter:
    """Accumulates encoded samples of one split and closes a shard every ``shard_size`` samples."""

    def __init__(self, fs, out_path: str, split: str, shard_size: int, first_index: int = 0):
        self.fs, self.out_path, self.split, self.shard_size = fs, out_path, split, shard_size
        self.first_index = first_index  # number of the first shard (chunked builds: the chunk's)
        self.shards: list[dict] = []   # manifest entries of finished shards
        self._tar = None
        self._tmp_path = None
        self._current: dict | None = None

    def _open(self) -> None:
        name = f"{self.split}-{self.first_index + len(self.shards):06d}.tar"
        local_dir = os.path.dirname(storage.join(self.out_path, name)) if storage.is_local(self.fs) else None
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        fd, self._tmp_path = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=local_dir)
        self._file = os.fdopen(fd, "wb")
        # mtime fixed so that the same input gives byte-identical shards.
        # an int mtime: a float makes tarfile add a PAX header to every member
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._current = {"name": name, "count": 0, "num_atoms": []}

    def write(self, sample: dict, num_atoms: int) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._current["count"] += 1
        self._current["num_atoms"].append(int(num_atoms))
        if self._current["count"] >= self.shard_size:
            self._close()

    def _close(self) -> None:
        self._tar.close()
        self._file.close()
        self._current["bytes"] = os.path.getsize(self._tmp_path)
        storage.put_file(self.fs, self._tmp_path, storage.join(self.out_path, self._current["name"]))
        self.shards.append(self._current)
        self._tar = self._tmp_path = self._current = None

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            if os.path.exists(self._tmp_path):
                os.unlink(self._tmp_path)
            self._tar = None
