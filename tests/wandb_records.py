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
        if kind == 0 and length == 0:
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


def history(path: str) -> dict[int, dict]:
    """{step: {key: value}} of every ``wandb.log`` call in the run file."""
    from wandb.proto import wandb_internal_pb2
    out = {}
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            out[int(items.get("_step", len(out)))] = items
    return out
