"""Typed errors (datasets/errors.py), delivered once with documented exit codes, and the split reader."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molscale.datasets.errors import EXIT_BAD_INPUT, EXIT_FAILED, InputError, MolscaleError, RunError, report
from molscale.datasets.shards import storage
from molscale.datasets.shards.manifest import ManifestError, load_manifest
from molscale.datasets.shards.samples import decode_sample
from molscale.datasets.shards.tario import read_shard_samples
from molscale.datasets.stream.loader import TooManyBadShardsError as LoaderTooManyBadShardsError
from molscale.datasets.stream.split_reader import TooManyBadShardsError, iter_split_samples, read_shard
from tests.support import ROOT


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "datasets", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def assert_one_error_line(stderr: str) -> str:
    """Exactly one ``error:`` line and no traceback; that line."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --- the types -----------------------------------------------------------------------------------

def test_exception_classes_and_exit_codes():
    assert issubclass(ManifestError, InputError) and issubclass(ManifestError, ValueError)
    assert TooManyBadShardsError is LoaderTooManyBadShardsError and issubclass(TooManyBadShardsError, RunError)
    assert issubclass(storage.StorageError, RunError) and issubclass(storage.StorageError, OSError)
    assert issubclass(storage.StorageAccessError, InputError) and issubclass(storage.StorageAccessError, OSError)
    assert InputError("x").exit_code == EXIT_BAD_INPUT == 2 and RunError("x").exit_code == EXIT_FAILED == 1


def test_report_prints_one_line(capsys):
    assert report(InputError("--limit must be at least 1")) == 2
    assert capsys.readouterr().err == "error: --limit must be at least 1\n"


def test_report_keeps_one_line_for_errors_from_worker_processes(capsys):
    from molscale.datasets.errors import one_line
    wrapped = RunError("Caught RunError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       "last):\n  File \"x.py\", line 1, in f\n    raise RunError(...)\n"
                       "molscale.datasets.errors.RunError: 3 corrupt shards: a, b, c. Rebuild the dataset.\n")
    assert report(wrapped) == 1
    assert capsys.readouterr().err == "error: 3 corrupt shards: a, b, c. Rebuild the dataset.\n"
    assert one_line(InputError("first part\nsecond part")) == "first part second part"

    class RayTaskErrorLike(RunError):  # what ray.get raises: Ray's traceback as message, the original as cause
        pass
    from_ray = RayTaskErrorLike("ray::task() (pid=1, ip=127.0.0.1)\n  File \"x.py\", line 1\nsomething")
    from_ray.cause = InputError("--property: no properties")
    assert one_line(from_ray) == "--property: no properties"


def test_retry_gives_typed_storage_errors():
    def flaky():
        raise ConnectionError("connection reset")
    with pytest.raises(storage.StorageError, match="reading x: still failing after 2 attempts") as info:
        storage.retry(flaky, "reading x", attempts=2, base_delay_s=0.0)
    assert info.value.exit_code == 1

    class NoSuchBucket(Exception):  # botocore's answer, matched by name
        pass

    def final():
        raise NoSuchBucket("the bucket does not exist")
    with pytest.raises(storage.StorageAccessError, match="the bucket does not exist") as info:
        storage.retry(final, "reading y", attempts=5, base_delay_s=0.0)
    assert info.value.exit_code == 2
    with pytest.raises(FileNotFoundError):  # an answer, not a fault: raised as it is
        storage.retry(lambda: open("/nonexistent/file"), "reading z")


def test_check_writable_failure_is_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fs, path = storage.get_fs(str(blocker / "sub"))
    with pytest.raises(InputError, match="cannot write to .*Check the path") as info:
        storage.check_writable(fs, path, str(blocker / "sub"))
    assert not str(info.value).startswith("error:")


def test_library_code_never_ends_the_process():
    """No SystemExit and no "error: " prefix in datasets/ library code: entry points report errors."""
    found = []
    for path in sorted((ROOT / "datasets").rglob("*.py")):
        if path.name == "__main__.py":  # the entry point itself
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Raise) and node.exc is not None and "'error: " in ast.dump(node.exc):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} (message starts with 'error: ')")
    assert not found, found


# --- python -m datasets exit codes ---------------------------------------------------------------

def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = run_cli("build", "qm9", "--out", str(tmp_path / "x"), "--limit", "0")
    assert r.returncode == 2
    assert assert_one_error_line(r.stderr) == ("error: --limit must be at least 1 (got 0); leave it out for all "
                                               "130831 molecules.")
    r = run_cli("inspect", "/nonexistent")
    assert r.returncode == 2 and "not a complete dataset" in assert_one_error_line(r.stderr)
    r = run_cli("build", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown source 'nope'" in assert_one_error_line(r.stderr)
    r = run_cli("inspect", "/nonexistent", "--bogus-flag")  # argparse: usage error, 2 as well
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr


def test_cli_inspect_with_missing_shards_exits_1(qm9_small, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qm9_small, broken)
    os.unlink(broken / "test-000000.tar")
    r = run_cli("inspect", str(broken))
    assert r.returncode == 1 and "test-000000.tar: missing" in r.stdout


def test_cli_failure_while_running_exits_1(qm9_small, tmp_path):
    """bench streams a train split whose shards are all corrupt: TooManyBadShardsError, a RunError."""
    broken = tmp_path / "broken"
    shutil.copytree(qm9_small, broken)
    for shard in load_manifest(str(broken)).shards("train"):
        path = broken / shard["name"]
        path.write_bytes(path.read_bytes()[:1000])
    for workers in ("0", "1"):  # in-process, and raised in a DataLoader worker process (torch re-raises it)
        r = run_cli("bench", str(broken), "--batch-size", "16", "--workers", workers)
        assert r.returncode == 1, r.stderr[-3000:]
        line = assert_one_error_line(r.stderr)
        assert line.startswith("error: 2 corrupt or missing shards in") and "Rebuild the dataset" in line


# --- the split reader ----------------------------------------------------------------------------

def shards_by_hand(url, split):
    """Decoded samples of a split, read straight from the tar files in manifest order."""
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    return [decode_sample(files, with_bonds=True) for shard in manifest["splits"][split]["shards"]
            for files in read_shard_samples((Path(url) / shard["name"]).read_bytes())]


def same(a, b):
    return (a["key"] == b["key"] and np.array_equal(a["pos"], b["pos"]) and np.array_equal(a["z"], b["z"])
            and a["props"] == b["props"] and a["smiles"] == b["smiles"])


def test_iter_split_samples_reads_every_sample_in_shard_order(qm9_small):
    manifest = load_manifest(qm9_small)
    want = shards_by_hand(qm9_small, "valid")
    got = list(iter_split_samples(manifest, "valid"))
    assert len(got) == manifest.count("valid") == len(want)
    assert all(same(a, b) for a, b in zip(got, want))
    assert all(s["bonds"] is None for s in got)  # bonds only when asked for
    with_bonds = list(iter_split_samples(manifest, "valid", with_bonds=True))
    assert all(np.array_equal(a["bonds"], b["bonds"]) for a, b in zip(with_bonds, want) if b["bonds"] is not None)
    assert [s["key"] for s in iter_split_samples(manifest, "valid", limit=7)] == [s["key"] for s in want[:7]]
    second = manifest.shards("valid")[1]
    assert [s["key"] for s in iter_split_samples(manifest, "valid", shards=[1])] == \
        [s["key"] for s in read_shard(manifest, second)]
    with pytest.raises(ManifestError, match="no split 'tset'"):
        list(iter_split_samples(manifest, "tset"))


def test_iter_split_samples_stops_at_a_bad_shard(qm9_small, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qm9_small, broken)
    manifest = load_manifest(str(broken))
    first, second = manifest.shards("valid")[:2]
    path = broken / first["name"]
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(TooManyBadShardsError, match=f"1 corrupt or missing shard.*{first['name']}.*truncated"):
        list(iter_split_samples(manifest, "valid"))
    # with one bad shard allowed it is skipped (and logged), the rest is read
    got = list(iter_split_samples(manifest, "valid", max_bad_shards=1))
    assert len(got) == manifest.count("valid") - first["count"]
    os.unlink(broken / second["name"])
    with pytest.raises(TooManyBadShardsError, match=f"2 corrupt or missing .*{second['name']}"):
        list(iter_split_samples(manifest, "valid", max_bad_shards=1))


def test_library_errors_are_molscale_errors(qm9_small, tmp_path):
    from molscale.datasets.sources.qm9 import build_qm9
    with pytest.raises(MolscaleError) as info:
        build_qm9(str(tmp_path / "x"), limit=0)
    assert info.value.exit_code == 2 and not str(info.value).startswith("error:")
    with pytest.raises(InputError, match="already holds a complete dataset"):
        build_qm9(qm9_small, limit=601, shard_size=40, workers=1, progress=False)
