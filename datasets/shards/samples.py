"""One molecule <-> the files of one WebDataset sample (the data contract of docs/data.md).

``__key__`` stable id; ``pos.npy`` float32 [N, 3] Angstrom; ``z.npy`` uint8 [N];
``props.json`` named properties; optional ``bonds.npy`` int32 [E, 3] (i, j, order; aromatic = 4)
and ``smiles.txt``.
"""

from __future__ import annotations

import ast
import io
import json

import numpy as np


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, pos: np.ndarray, z: np.ndarray, props: dict,
                  bonds: np.ndarray | None = None, smiles: str | None = None) -> dict:
    """Dict of file extension -> bytes, ready for webdataset's TarWriter."""
    pos = np.ascontiguousarray(pos, dtype=np.float32)
    z = np.ascontiguousarray(z, dtype=np.uint8)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] != z.shape[0]:
        raise ValueError(f"{key}: pos {pos.shape} and z {z.shape} do not describe the same atoms")
    sample = {
        "__key__": key,
        "pos.npy": _npy_bytes(pos),
        "z.npy": _npy_bytes(z),
        "props.json": json.dumps(props, sort_keys=True).encode(),
    }
    if bonds is not None:
        sample["bonds.npy"] = _npy_bytes(np.ascontiguousarray(bonds, dtype=np.int32).reshape(-1, 3))
    if smiles is not None:
        sample["smiles.txt"] = smiles.encode()
    return sample


_HEADER_CACHE: dict[bytes, np.dtype | None] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """np.load for small arrays, about 10x faster: no BytesIO, the header parsed once per kind.

    Only 'shape' varies between samples of one kind, so the rest of the header is a cache key.
    Falls back to np.load for anything unusual (Fortran order, version 2 headers).
    """
    if data[:6] != b"\x93NUMPY" or data[6] != 1:
        return np.load(io.BytesIO(data), allow_pickle=False)
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10:10 + header_len]
    cut = header.find(b"'shape': (")
    close = header.find(b")", cut)
    if cut < 0 or close < 0:
        return np.load(io.BytesIO(data), allow_pickle=False)
    prefix = header[:cut]
    if prefix not in _HEADER_CACHE:
        meta = ast.literal_eval(header.decode("latin1"))
        _HEADER_CACHE[prefix] = None if meta.get("fortran_order") else np.dtype(meta["descr"])
    dtype = _HEADER_CACHE[prefix]
    if dtype is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape = tuple(int(s) for s in header[cut + 10:close].split(b",") if s.strip())
    return np.frombuffer(data, dtype=dtype, offset=10 + header_len).reshape(shape)


def decode_sample(files: dict, with_bonds: bool = True) -> dict:
    """Inverse of encode_sample; missing optional files (or bonds not asked for) come back as None."""
    out = {
        "key": files["__key__"],
        "pos": decode_npy(files["pos.npy"]),
        "z": decode_npy(files["z.npy"]),
        "props": json.loads(files["props.json"]),
        "bonds": decode_npy(files["bonds.npy"]) if with_bonds and "bonds.npy" in files else None,
        "smiles": files["smiles.txt"].decode() if "smiles.txt" in files else None,
    }
    if out["pos"].shape != (len(out["z"]), 3):
        raise ValueError(f"sample {out['key']}: pos {out['pos'].shape} does not match z {out['z'].shape}")
    return out
