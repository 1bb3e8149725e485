"""``manifest.json``: what a dataset holds. Written last by a build, so its presence means complete.

Layout (all counts are molecules/conformers):
    format, source {name, version}, command, build {params that decide the content}, created,
    atom_vocab [Z...], properties {name: {unit}}, property_stats {name: {mean, mad}} (train split),
    splits {name: {count, shards [{name, count, bytes, num_atoms [...]}], atom_count_histogram}},
    rejected {total, reasons {reason: count}, examples [...]}, notes {counter: count}
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np

from molscale.datasets.errors import InputError
from molscale.datasets.shards import storage

FORMAT = "molscale-shards/1"
MANIFEST_NAME = "manifest.json"
HALVES = ("first", "second")  # Manifest.half


class ManifestError(InputError, ValueError):
    """A dataset that is missing, incomplete or inconsistent, or a split it lacks: bad input (exit code 2).
    Still a ValueError for callers that caught it as one."""


@dataclass
class Manifest:
    url: str      # the real URL, credentials included (s3://KEY:SECRET@bucket/x): to reach storage, never to print
    data: dict

    @property
    def shown_url(self) -> str:
        """The URL as messages, logs and written files show it: credentials redacted (storage.redact_url)."""
        return storage.redact_url(self.url)

    # --- reading ---------------------------------------------------------------------------
    @property
    def atom_vocab(self) -> list[int]:
        return list(self.data["atom_vocab"])

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> dict:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.shown_url}: no split {name!r}; the dataset has {', '.join(self.splits)}")
        return self.data["splits"][name]

    def shards(self, split: str) -> list[dict]:
        return self.split(split)["shards"]

    def shard_url(self, shard: dict) -> str:
        return storage.join(self.url, shard["name"])

    def count(self, split: str) -> int:
        return int(self.split(split)["count"])

    def atom_count_histogram(self, split: str = "train") -> dict[int, int]:
        return {int(k): int(v) for k, v in self.split(split)["atom_count_histogram"].items()}

    def property_stats(self) -> dict[str, dict[str, float]]:
        return dict(self.data.get("property_stats", {}))

    @property
    def max_atoms(self) -> int:
        return max(max(self.atom_count_histogram(s)) for s in self.splits if self.count(s))

    # --- views ----------------------------------------------------------------------------
    def half(self, split: str, which: str) -> "Manifest":
        """This dataset with ``split`` cut to its first or second half (which: 'first' | 'second'), at the shard
        boundary nearest the middle of its molecules; the other splits as they are.

        EDM's protocol for conditional generation (Hoogeboom et al. 2022, section 4.2; its released code's
        qm9_first_half / qm9_second_half datasets) trains the property predictor on one half of the train split
        and the conditional model on the other, so that the predictor never saw the molecules whose properties
        the conditional model learnt."""
        if which not in HALVES:
            raise ManifestError(f"data.half must be one of {list(HALVES)} or null, got {which!r}")
        done = self.split(split).get("half")
        if done:  # a view already: the same half again is itself, the other half of a half is a mistake
            if done["which"] != which:
                raise ManifestError(f"{self.shown_url}: split {split!r} is already its {done['which']} half")
            return self
        shards = self.shards(split)
        if len(shards) < 2:
            raise ManifestError(f"{self.shown_url}: split {split!r} has {len(shards)} shard(s); halves are cut "
                                f"at shard boundaries, so rebuild it with a smaller --shard-size")
        ends = np.cumsum([s["count"] for s in shards])
        cut = int(np.clip(np.argmin(np.abs(ends - ends[-1] / 2)) + 1, 1, len(shards) - 1))
        kept = shards[:cut] if which == "first" else shards[cut:]
        data = copy.deepcopy(self.data)
        data["splits"][split] = {
            "count": int(sum(s["count"] for s in kept)),
            "shards": kept,
            "atom_count_histogram": histogram([n for s in kept for n in s["num_atoms"]]),
            "half": {"which": which, "of_count": int(ends[-1]), "shards": [kept[0]["name"], kept[-1]["name"]]},
        }
        return Manifest(self.url, data)


def validate(data: dict, where: str) -> None:
    """Raise ManifestError naming the first missing or inconsistent field."""
    if data.get("format") != FORMAT:
        raise ManifestError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
    for field in ("source", "atom_vocab", "splits", "rejected"):
        if field not in data:
            raise ManifestError(f"{where}: missing field {field!r}")
    for name, split in data["splits"].items():
        total = sum(int(s["count"]) for s in split["shards"])
        if total != split["count"]:
            raise ManifestError(f"{where}: split {name!r} says {split['count']} samples but its shards "
                                f"hold {total}")
        for shard in split["shards"]:
            if len(shard.get("num_atoms", ())) != shard["count"]:
                raise ManifestError(f"{where}: shard {shard['name']} lists {len(shard.get('num_atoms', ()))} "
                                    f"atom counts for {shard['count']} samples")


def load_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    fs, path = storage.get_fs(url, storage_options)
    manifest_path = storage.join(path, MANIFEST_NAME)
    where = storage.redact_url(storage.join(url, MANIFEST_NAME))
    try:
        raw = storage.read_bytes(fs, manifest_path)
    except (FileNotFoundError, NotADirectoryError):
        raise ManifestError(f"{where} not found: {storage.redact_url(url)} is not a complete dataset (a build that was "
                            f"interrupted writes no manifest). Build it with `python -m datasets build ...`; "
                            f"rerunning an "
                            f"interrupted geom, pcqm4mv2 or smiles build resumes it.") \
            from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} is not valid JSON: {err}") from None
    validate(data, where)
    return Manifest(url=url.rstrip("/"), data=data)


def save_manifest(fs, path: str, data: dict) -> None:
    """Write ``data`` as the manifest; URLs in it (``command`` holds the build's --out) lose their credentials.
    ``build`` is kept as given: a rerun compares it with its own parameters (sources are local files)."""
    validate(data, storage.redact_url(path))
    written = {k: (v if k == "build" else storage.redact_urls(v)) for k, v in data.items()}
    storage.write_bytes(fs, storage.join(path, MANIFEST_NAME), json.dumps(written, indent=1).encode())


def verify_shards(manifest: Manifest, storage_options: dict | None = None) -> list[str]:
    """Problems with the shards on storage versus the manifest: missing files or wrong sizes."""
    fs, path = storage.get_fs(manifest.url, storage_options)
    fs.invalidate_cache(path)  # s3fs caches listings; a check must see the store as it is now
    try:
        by_basename = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size")
                       for entry in fs.ls(path, detail=True)}
    except FileNotFoundError:
        by_basename = {}
    problems = []
    for split in manifest.splits:
        for shard in manifest.shards(split):
            size = by_basename.get(shard["name"])
            if size is None:
                problems.append(f"{shard['name']}: missing")
            elif shard.get("bytes") is not None and int(size) != int(shard["bytes"]):
                problems.append(f"{shard['name']}: {size} bytes on storage, manifest says {shard['bytes']}")
    return problems


def histogram(num_atoms) -> dict[str, int]:
    values, counts = np.unique(np.asarray(list(num_atoms), dtype=np.int64), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def mean_mad(values) -> dict[str, float]:
    """Mean and mean absolute deviation (the property normalisation, docs/numerics.md)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    return {"mean": mean, "mad": float(np.abs(values - mean).mean())}
