"""Shards in the tar formats the fast ustar parser hands to ``tarfile``: PAX headers, GNU long names, links.

Each shard is a real archive written by Python's tarfile with the samples of a real QM9 shard, put into a
copy of the dataset (manifest bytes kept consistent) and streamed by StreamingLoader.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from molscale.datasets.shards.tario import CorruptShardError, read_shard_samples
from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader

SHARD = "train-000001.tar"
LONG = "-" + "g" * 100  # makes every member name longer than ustar's 100 bytes


def members(path):
    """(TarInfo, payload) of every member of a tar file."""
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read() if info.isfile() else b"") for info in tar.getmembers()]


def rewrite(src, dst, fmt, rename=lambda name: name, pax_headers=None, links=False):
    """Write the members of ``src`` to ``dst`` in tar format ``fmt``; optionally renamed, with a PAX
    header on every member, or with a directory and a symlink member next to the regular files."""
    with tarfile.open(dst, "w", format=fmt) as out:
        if links:
            folder = tarfile.TarInfo("extras")
            folder.type = tarfile.DIRTYPE
            out.addfile(folder)
        for info, data in members(src):
            new = tarfile.TarInfo(rename(info.name))
            new.size, new.mtime, new.mode = len(data), info.mtime, info.mode
            if pax_headers:
                new.pax_headers = dict(pax_headers)
            out.addfile(new, io.BytesIO(data))
            if links and info.name.endswith(".z.npy"):
                link = tarfile.TarInfo(info.name.replace(".z.npy", ".alias.npy"))
                link.type, link.linkname = tarfile.SYMTYPE, info.name
                out.addfile(link)


def dataset_with(qm9_small, tmp_path, name, **rewrite_kw):
    """A copy of qm9_small whose SHARD is rewritten; the manifest records the new size."""
    url = tmp_path / name
    shutil.copytree(qm9_small, url)
    rewrite(os.path.join(qm9_small, SHARD), url / "new.tar", **rewrite_kw)
    os.replace(url / "new.tar", url / SHARD)
    fix_manifest_bytes(url)
    return str(url)


def fix_manifest_bytes(url):
    manifest = json.loads((url / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        if shard["name"] == SHARD:
            shard["bytes"] = (url / SHARD).stat().st_size
    (url / "manifest.json").write_text(json.dumps(manifest))


def streamed(url) -> dict:
    """key -> (z, pos, props) of every molecule one epoch of the train split yields."""
    loader = StreamingLoader(LoaderConfig(url=url, batch_size=16), rank=0, world_size=1)
    out = {}
    for batch in loader:
        for b, key in enumerate(batch["keys"]):
            n = int(batch["num_atoms"][b])
            out[key] = (batch["z"][b, :n].numpy(), batch["pos"][b, :n].numpy(), batch["props"][b].numpy())
    out["__bad__"] = loader.bad_shards
    return out


@pytest.fixture(scope="module")
def original(qm9_small):
    return streamed(qm9_small)


def assert_same(got: dict, want: dict, key_of=lambda key: key):
    assert got.pop("__bad__") == []
    assert len(got) == len(want) - 1
    for key, (z, pos, props) in got.items():
        wz, wpos, wprops = want[key_of(key)]
        assert np.array_equal(z, wz) and np.array_equal(pos, wpos) and np.array_equal(props, wprops), key


def test_pax_shard_is_read(qm9_small, tmp_path, original):
    url = dataset_with(qm9_small, tmp_path, "pax", fmt=tarfile.PAX_FORMAT,
                       pax_headers={"comment": "molécule écrite en PAX"})
    raw = open(os.path.join(url, SHARD), "rb").read()
    assert raw[156:157] == b"x", "the shard should start with a PAX extended header"
    assert read_shard_samples(raw) == read_shard_samples(open(os.path.join(qm9_small, SHARD), "rb").read())
    assert_same(streamed(url), original)


def test_gnu_long_names_are_read(qm9_small, tmp_path, original):
    url = dataset_with(qm9_small, tmp_path, "gnu", fmt=tarfile.GNU_FORMAT,
                       rename=lambda name: name.replace(".", LONG + ".", 1))
    raw = open(os.path.join(url, SHARD), "rb").read()
    assert raw[156:157] == b"L", "the shard should use GNU long-name headers"
    samples = read_shard_samples(raw)
    assert samples and all(len(s["__key__"]) > 100 for s in samples)
    got = streamed(url)
    assert sum(key.endswith(LONG) for key in got) == len(samples)
    assert_same(got, original, key_of=lambda key: key.removesuffix(LONG))


def test_links_and_directories_are_skipped(qm9_small, tmp_path, original):
    url = dataset_with(qm9_small, tmp_path, "links", fmt=tarfile.USTAR_FORMAT, links=True)
    kinds = {info.type for info, _ in members(os.path.join(url, SHARD))}
    assert {tarfile.SYMTYPE, tarfile.DIRTYPE} <= kinds
    samples = read_shard_samples(open(os.path.join(url, SHARD), "rb").read())
    assert samples == read_shard_samples(open(os.path.join(qm9_small, SHARD), "rb").read())
    assert_same(streamed(url), original)


def test_truncated_pax_shard_raises_and_is_skipped_and_counted(qm9_small, tmp_path, original):
    url = dataset_with(qm9_small, tmp_path, "pax-cut", fmt=tarfile.PAX_FORMAT, pax_headers={"comment": "ü"})
    path = os.path.join(url, SHARD)
    data = open(path, "rb").read()
    end = len(data.rstrip(b"\0"))  # where the end-of-archive blocks begin (rounded up to a block below)
    # inside a header, inside member data, on a block boundary between members, just before the end marker
    for cut in (700, len(data) // 2 + 100, (len(data) // 2) // 512 * 512, (end + 511) // 512 * 512):
        with pytest.raises(CorruptShardError):
            read_shard_samples(data[:cut])
    open(path, "wb").write(data[:len(data) // 2])
    fix_manifest_bytes(tmp_path / "pax-cut")
    got = streamed(url)
    assert got.pop("__bad__") == [SHARD]
    lost = len(read_shard_samples(data))
    assert len(got) == len(original) - 1 - lost
    for key, (z, pos, props) in got.items():
        assert np.allclose(pos, original[key][1], atol=1e-5)
