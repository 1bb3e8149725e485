"""Read the records of an offline W&B run file (``run-*.wandb``) so tests can check what was logged.

The file is a 7-byte header (":W&B", magic, version) followed by LevelDB-log-style records in
32 KiB blocks: 4-byte CRC, 2-byte length, 1-byte type (1 full, 2 first, 3 middle, 4 last), payload;
each payload (joined over first/middle/last) is one protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct

BLOCK = 32 * 1024
HEADER = 7


def payloads(path: str):
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0 or pos + HEADER + length > len(data):  # the end, or a record being written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def records(path: str):
    """Every protobuf ``Record`` of the run file, in order."""
    from wandb.proto import wandb_internal_pb2
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history(path: str, key: str = "_step") -> dict[int, dict]:
    """{row[key]: row} of every ``wandb.log`` call in the run file (rows without ``key`` are left out)."""
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = _items(record.history.item)
            if key in items:
                out[int(items[key])] = items
    return out


def run_info(path: str) -> dict:
    """The run record: id, entity, project, group, job_type, name, and the config (with later updates)."""
    info = None
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run" and info is None:
            r = record.run
            info = {"id": r.run_id, "entity": r.entity, "project": r.project, "group": r.run_group,
                    "job_type": r.job_type, "name": r.display_name, "config": _items(r.config.update)}
        elif kind == "config" and info is not None:
            info["config"].update(_items(record.config.update))
    return info


def artifacts(path: str) -> list[dict]:
    """Every logged artifact: name, type, aliases, metadata and the paths of its files."""
    return [{"name": a.name, "type": a.type, "aliases": list(a.aliases),
             "metadata": json.loads(a.metadata) if a.metadata else {},
             "files": sorted(entry.path for entry in a.manifest.contents)}
            for a in (r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact")]
