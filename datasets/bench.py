"""``python -m datasets bench URL``: streaming throughput of the training loader.

Streams one epoch of a split (or ``--max-batches``) through StreamingLoader exactly as training
does (fetch, untar, decode, shuffle, batch, pad, to torch) and reports molecules/s and MB/s.
"""

from __future__ import annotations

import json
import platform
import time

from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader


def run(url: str, split: str = "train", workers: int = 0, batch_size: int | None = 64,
        pair_budget: int | None = None, max_batches: int | None = None) -> dict:
    cfg = LoaderConfig(url=url, split=split, num_workers=workers,
                       batch_size=None if pair_budget else batch_size, pair_budget=pair_budget,
                       bucket_bounds=(10, 14, 17, 20, 24, 32, 48, 64, 96, 128, 192) if pair_budget else ())
    loader = StreamingLoader(cfg, rank=0, world_size=1)
    shards = loader.manifest.shards(split)
    mean_shard_bytes = sum(s["bytes"] for s in shards) / sum(s["count"] for s in shards)
    molecules = batches = atoms = 0
    start = time.perf_counter()
    for batch in loader:
        molecules += len(batch["keys"])
        atoms += int(batch["num_atoms"].sum())
        batches += 1
        if max_batches and batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {
        "url": url, "split": split, "workers": workers, "batch_size": cfg.batch_size,
        "pair_budget": pair_budget, "batches": batches, "molecules": molecules, "seconds": round(seconds, 3),
        "molecules_per_s": round(molecules / seconds, 1),
        "MB_per_s": round(molecules * mean_shard_bytes / seconds / 1e6, 2),
        "atoms_per_molecule": round(atoms / max(1, molecules), 2),
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip(),
    }


def main(args) -> int:
    result = run(args.url, args.split, args.workers, args.batch_size, args.pair_budget, args.max_batches)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['molecules']:,} molecules in {result['batches']} batches, {result['seconds']:.2f} s: "
              f"{result['molecules_per_s']:,.0f} molecules/s, {result['MB_per_s']:.1f} MB/s "
              f"({args.workers} worker(s), {args.url})")
    return 0
