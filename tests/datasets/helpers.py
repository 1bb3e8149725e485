"""Reading built datasets back in the tests: every sample, what the loader yields, the shards' bytes."""

import numpy as np

from molscale.datasets.shards.manifest import load_manifest
from molscale.datasets.shards.samples import decode_sample
from molscale.datasets.shards.tario import read_shard_samples
from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader


def all_samples(url):
    manifest = load_manifest(url)
    out = {}
    for split in manifest.splits:
        for shard in manifest.shards(split):
            with open(manifest.shard_url(shard), "rb") as f:
                for s in read_shard_samples(f.read()):
                    out[s["__key__"]] = (split, decode_sample(s))
    return manifest, out


def loader_count(url, split="train"):
    loader = StreamingLoader(LoaderConfig(url=url, batch_size=4, split=split), rank=0, world_size=1)
    n = 0
    for batch in loader:
        n += int(np.asarray(batch["num_atoms"]).shape[0])
        assert np.asarray(batch["pos"]).shape[0] <= 4
    return n


def shard_bytes(url):
    manifest = load_manifest(url)
    return {sh["name"]: open(manifest.shard_url(sh), "rb").read() for sp in manifest.splits
            for sh in manifest.shards(sp)}
