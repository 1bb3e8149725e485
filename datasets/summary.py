"""``python -m datasets inspect URL``: a readable summary of a dataset's manifest."""

from __future__ import annotations

from molscale.datasets.shards.manifest import Manifest, verify_shards


def _bar(count: int, peak: int, width: int = 40) -> str:
    return "#" * max(1 if count else 0, round(width * count / peak)) if peak else ""


def summary(manifest: Manifest, check_shards: bool = True, storage_options: dict | None = None) -> str:
    d = manifest.data
    lines = [f"dataset   {manifest.shown_url}",
             f"source    {d['source'].get('name')} {d['source'].get('version', '')}".rstrip(),
             f"built     {d.get('created', '?')} by: {d.get('command', '?')}",
             f"atoms     vocabulary (Z) {manifest.atom_vocab}, up to {manifest.max_atoms} atoms per molecule",
             "", "split      molecules  shards  atoms min/mean/max"]
    for name in manifest.splits:
        hist = manifest.atom_count_histogram(name)
        n = manifest.count(name)
        mean = sum(k * v for k, v in hist.items()) / n if n else 0.0
        rng = f"{min(hist)}/{mean:.1f}/{max(hist)}" if hist else "-"
        lines.append(f"{name:<9} {n:>10,}  {len(manifest.shards(name)):>6}  {rng}")
    train = "train" if "train" in manifest.splits else manifest.splits[0]
    hist = manifest.atom_count_histogram(train)
    if hist:
        lines += ["", f"atom-count histogram ({train})"]
        peak = max(hist.values())
        for k in range(min(hist), max(hist) + 1):
            lines.append(f"  {k:>4} {hist.get(k, 0):>8,} {_bar(hist.get(k, 0), peak)}")
    stats = manifest.property_stats()
    if stats:
        units = {k: v.get("unit", "") for k, v in d.get("properties", {}).items()}
        lines += ["", "property  unit            mean (train)      MAD (train)"]
        for name, s in stats.items():
            lines.append(f"  {name:<7} {units.get(name, ''):<14} {s['mean']:>14.6g} {s['mad']:>14.6g}")
    rej = d["rejected"]
    lines += ["", f"rejected  {rej['total']} record(s)"]
    lines += [f"  {reason}: {n}" for reason, n in rej.get("reasons", {}).items()]
    for key, note in d.get("notes", {}).items():
        lines.append(f"note      {key}: {note.get('total', 0)} ({note.get('meaning', '')})")
        lines += [f"  {reason}: {n}" for reason, n in note.get("reasons", {}).items()]
    if check_shards:
        problems = verify_shards(manifest, storage_options)
        lines += ["", "shards    all present with the sizes the manifest records" if not problems else
                  f"shards    {len(problems)} problem(s): " + "; ".join(problems[:10])]
    return "\n".join(lines)
