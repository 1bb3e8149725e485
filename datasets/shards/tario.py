"""Reading a whole shard (bytes in memory) into samples.

The fast path parses plain ustar members directly (512-byte headers), which is several times
faster than ``tarfile`` for the small members molecules have; an archive with any other member kind
(PAX headers, GNU long names, links, directories) is read with Python's ``tarfile`` instead, keeping
regular files only (links and directories carry no sample data). Both paths group members into
samples the same way. A truncated or malformed shard raises CorruptShardError.
"""

from __future__ import annotations

import io
import tarfile


class CorruptShardError(ValueError):
    pass


def _fast_members(data: bytes):
    """(name, payload) of each regular member; None when the archive needs the full parser."""
    members = []
    offset, end = 0, len(data)
    while offset + 512 <= end:
        if data[offset] == 0:  # end-of-archive blocks
            return members
        # typeflag '0' or NUL is a regular file; a non-empty ustar prefix (offset 345) means a long name.
        if data[offset + 156] not in (48, 0) or data[offset + 345] != 0:
            return None
        try:
            name = data[offset:offset + 100].split(b"\0", 1)[0].decode()
            size = int(data[offset + 124:offset + 135], 8)
        except ValueError:  # also UnicodeDecodeError
            raise CorruptShardError(f"bad tar header at byte {offset}") from None
        start = offset + 512
        if start + size > end:
            raise CorruptShardError(f"member {name} runs past the end of the file (truncated shard)")
        members.append((name, data[start:start + size]))
        offset = start + (size + 511) // 512 * 512
    if offset < end or not members and end:
        raise CorruptShardError("the file ends inside a tar header (truncated shard)")
    raise CorruptShardError("no end-of-archive marker (truncated shard)")


def _group(members):
    sample: dict = {}
    for name, payload in members:
        key, _, ext = name.partition(".")
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[ext] = payload
    if sample:
        yield sample


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, payload) of each regular member, parsed by ``tarfile`` (any format it reads)."""
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile() or info.issparse():  # links, directories, devices: no sample data
                    continue
                payload = tar.extractfile(info).read()
                if len(payload) != info.size:
                    raise CorruptShardError(f"member {info.name} runs past the end of the file (truncated shard)")
                members.append((info.name, payload))
            end = tar.offset  # tarfile stops quietly at a header it cannot read; a complete shard has a zero block
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise CorruptShardError(f"unreadable tar archive: {err}") from None
    if data[end:end + 512] != bytes(512):
        raise CorruptShardError(f"no end-of-archive marker at byte {end} (truncated or damaged shard)")
    return members


def read_shard_samples(data: bytes) -> list[dict]:
    """Samples (``__key__`` plus extension -> bytes) of one shard, in file order."""
    members = _fast_members(data)
    if members is None:
        members = _tarfile_members(data)
    return list(_group(members))
