"""Reading the samples of a dataset split in shard order: the one reader for everything but training batches.

    manifest = load_manifest(url)                        # once; every reader takes the Manifest
    for sample in iter_split_samples(manifest, "test"):  # decode_sample dicts: key, pos, z, props, bonds, smiles
        ...
    samples = read_shard(manifest, manifest.shards("test")[0])   # one shard (a Ray task's share)

Evaluation's data row, its reference statistics and property baselines read through here, and the
training loader (stream/loader.py) reads each shard with ``read_shard``. A shard is fetched once
(``storage.retry``: transient errors are retried with backoff), checked against the manifest's size, parsed
(datasets/shards/tario.py), checked against the manifest's sample and atom counts, and each sample against
what the builders write (``check_samples``: damaged bytes can decode into anything). A corrupt or missing
shard is logged and skipped while there are at most ``max_bad_shards`` of them, and stops the reading with
TooManyBadShardsError beyond.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np

from molscale.datasets.errors import RunError
from molscale.datasets.shards import storage
from molscale.datasets.shards.manifest import Manifest
from molscale.datasets.shards.samples import decode_sample
from molscale.datasets.shards.tario import CorruptShardError, read_shard_samples

log = logging.getLogger(__name__)

# What a shard that cannot be used raises from read_shard: bad bytes or samples, a missing object,
# storage that kept failing (storage.StorageError is an OSError).
BAD_SHARD_ERRORS = (CorruptShardError, OSError)


class TooManyBadShardsError(RunError):
    """More corrupt or missing shards than allowed: the dataset needs rebuilding (exit code 1)."""


def read_shard(manifest: Manifest, shard: dict, storage_options: dict | None = None, with_bonds: bool = False,
               fs=None, attempts: int = 6) -> list[dict]:
    """The decoded samples (``decode_sample`` dicts) of one shard entry of ``manifest``, in file order.

    ``fs``: the dataset's filesystem when the caller has one. Raises CorruptShardError when the bytes are
    not a shard, a sample does not decode or the count differs from the manifest's; FileNotFoundError when
    the shard is missing; storage.StorageError when storage kept failing for ``attempts`` tries.
    """
    url = manifest.shard_url(shard)
    shard_fs, path = storage.get_fs(url, storage_options)
    fs = fs or shard_fs
    data = storage.retry(lambda: fs.cat_file(path), f"reading {url}", attempts=attempts)
    try:
        if shard.get("bytes") is not None and len(data) != shard["bytes"]:
            raise CorruptShardError(f"{len(data)} bytes, manifest says {shard['bytes']} (truncated or damaged shard)")
        files = read_shard_samples(data)
        if len(files) != shard["count"]:
            raise CorruptShardError(f"{len(files)} samples, manifest says {shard['count']}")
        samples = [decode_sample(f, with_bonds) for f in files]
        check_samples(samples)
        if shard.get("num_atoms") is not None and [len(s["z"]) for s in samples] != list(shard["num_atoms"]):
            raise CorruptShardError("atom counts differ from the manifest's")
        return samples
    except CorruptShardError as err:
        raise CorruptShardError(f"{url}: {err}") from None
    except Exception as err:  # damaged bytes make the decoders raise anything: a member that is not what its
        # name says, a missing one, a header numpy or json cannot parse
        raise CorruptShardError(f"{url}: undecodable sample: {type(err).__name__}: {str(err)[:200]}") from None


def check_samples(samples: list[dict]) -> None:
    """``check_sample`` for every sample of a shard, in a few array operations (the training loader's pace)."""
    if not samples:
        return
    try:
        z = np.concatenate([s["z"] for s in samples])
        fine = (z.dtype.kind in "ui" and z.min() >= 1 and z.max() <= 255
                and bool(np.isfinite(np.concatenate([s["pos"] for s in samples])).all())
                and all(len(s["z"]) and s["pos"].ndim == 2 and isinstance(s["props"], dict) for s in samples))
        bonds = [s["bonds"] for s in samples if s["bonds"] is not None and len(s["bonds"])]
        if fine and bonds:
            sizes = [len(s["z"]) for s in samples if s["bonds"] is not None and len(s["bonds"])]
            ends = np.concatenate([b[:, :2] for b in bonds])
            fine = ends.min() >= 0 and (ends < np.repeat(sizes, [len(b) for b in bonds])[:, None]).all()
    except (ValueError, TypeError, IndexError):  # arrays of odd shapes or kinds: the slow path names the sample
        fine = False
    if not fine:
        for sample in samples:
            check_sample(sample)
        raise CorruptShardError("a sample is not what the builders write")


def check_sample(sample: dict) -> None:
    """CorruptShardError unless a decoded sample is what the builders write: finite coordinates [N, 3], N atomic
    numbers, bonds [E, 3] between its atoms, properties a JSON object (damaged bytes can decode into anything)."""
    pos, z, bonds = sample["pos"], sample["z"], sample["bonds"]
    key = sample["key"]
    if pos.ndim != 2 or pos.shape[1:] != (3,) or z.ndim != 1 or len(z) != len(pos) or not len(z):
        raise CorruptShardError(f"sample {key}: pos {pos.shape} and z {z.shape} are not N atoms")
    if z.dtype.kind not in "ui" or z.min() < 1 or z.max() > 255:
        raise CorruptShardError(f"sample {key}: atomic numbers {z.dtype} outside 1-255")
    if not np.isfinite(pos).all():
        raise CorruptShardError(f"sample {key}: non-finite coordinates")
    if not isinstance(sample["props"], dict):
        raise CorruptShardError(f"sample {key}: props.json is not an object")
    if bonds is not None and len(bonds):
        if bonds.ndim != 2 or bonds.shape[1] != 3 or bonds[:, :2].min() < 0 or bonds[:, :2].max() >= len(z):
            raise CorruptShardError(f"sample {key}: bonds {bonds.shape} do not join its {len(z)} atoms")


def iter_split_samples(manifest: Manifest, split: str, storage_options: dict | None = None,
                       with_bonds: bool = False, shards: Iterable[int] | None = None, limit: int | None = None,
                       max_bad_shards: int = 0) -> Iterator[dict]:
    """Decoded samples of a split of ``manifest`` in shard order (``decode_sample`` dicts).

    shards: indices into ``manifest.shards(split)`` to read, in that order (default: all of them);
    limit: stop after this many samples; max_bad_shards: corrupt or missing shards skipped (each logged)
    before TooManyBadShardsError; the default 0 makes every sample count (evaluation numbers must not
    silently come from part of a split). An unknown split raises ManifestError (an InputError).
    """
    entries = manifest.shards(split)
    order = range(len(entries)) if shards is None else [int(i) for i in shards]
    fs, _ = storage.get_fs(manifest.url, storage_options)
    bad: list[str] = []
    seen = 0
    for index in order:
        if limit is not None and seen >= limit:
            return
        shard = entries[index]
        try:
            samples = read_shard(manifest, shard, storage_options, with_bonds, fs=fs)
        except BAD_SHARD_ERRORS as err:
            bad.append(shard["name"])
            if len(bad) > max_bad_shards:
                raise TooManyBadShardsError(
                    f"{len(bad)} corrupt or missing shard(s) in {manifest.url} split {split!r}, more than the "
                    f"{max_bad_shards} allowed: {', '.join(bad)} (last: {err}). Rebuild the dataset.") from None
            log.error("skipping shard: %s", err)  # every BAD_SHARD_ERRORS message names the shard's URL or path
            continue
        for sample in samples:
            if limit is not None and seen >= limit:
                return
            yield sample
            seen += 1
