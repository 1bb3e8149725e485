import gc
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import psutil
import pytest
import torch

from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import load_manifest
from molscale.datasets.stream.loader import (
    LoaderConfig,
    StreamingLoader,
    TooManyBadShardsError,
)

BUDGET = dict(batch_size=None, pair_budget=24 * 18 * 18, bucket_bounds=(10, 14, 17, 20, 29))


def epoch_keys(loader):
    batches = [batch["keys"] for batch in loader]
    return batches, [k for b in batches for k in b]


@pytest.mark.parametrize("batching", [dict(batch_size=16), BUDGET], ids=["fixed", "pair-budget"])
def test_two_ranks_two_workers_see_every_sample_once(qm9_small, batching):
    manifest = load_manifest(qm9_small)
    expected = manifest.count("train")
    per_rank = []
    for rank in range(2):
        cfg = LoaderConfig(url=qm9_small, num_workers=2, **batching)
        loader = StreamingLoader(cfg, seed=3, rank=rank, world_size=2)
        batches, keys = epoch_keys(loader)
        assert len(batches) == len(loader)
        per_rank.append((batches, keys))
    assert len(per_rank[0][0]) == len(per_rank[1][0]), "ranks must yield the same number of batches"
    all_keys = per_rank[0][1] + per_rank[1][1]
    assert len(all_keys) == expected and len(set(all_keys)) == expected
    if batching.get("pair_budget"):
        for batch in StreamingLoader(LoaderConfig(url=qm9_small, **batching), rank=0, world_size=1):
            assert batch["pos"].shape[0] * batch["pos"].shape[1] ** 2 <= batching["pair_budget"]


def test_batches_are_padded_and_com_free(qm9_small):
    loader = StreamingLoader(LoaderConfig(url=qm9_small, batch_size=8), properties=("lumo", "mu"),
                             rank=0, world_size=1)
    batch = next(iter(loader))
    pos, mask = batch["pos"], batch["node_mask"]
    assert pos.dtype == torch.float32 and mask.dtype == torch.bool
    assert batch["props"].shape == (8, 2)
    assert torch.equal(mask.sum(1), batch["num_atoms"])
    assert (pos[~mask] == 0).all() and (batch["z"][~mask] == 0).all()
    com = (pos * mask[..., None]).sum(1) / batch["num_atoms"][:, None]
    assert com.abs().max() < 1e-5
    vocab = torch.tensor([1, 6, 7, 8, 9])
    assert torch.equal(vocab[batch["atom_type"]][mask], batch["z"][mask])


def test_epochs_reshuffle_and_are_reproducible(qm9_small):
    def two_epochs(seed):
        loader = StreamingLoader(LoaderConfig(url=qm9_small, batch_size=16), seed=seed, rank=0, world_size=1)
        return epoch_keys(loader)[1], epoch_keys(loader)[1]
    a1, a2 = two_epochs(0)
    b1, b2 = two_epochs(0)
    assert a1 == b1 and a2 == b2
    assert a1 != a2 and sorted(a1) == sorted(a2)


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_resume_mid_epoch_yields_exactly_the_rest(qm9_small, workers):
    cfg = dict(url=qm9_small, num_workers=workers, **BUDGET)
    full = StreamingLoader(LoaderConfig(**cfg), seed=1, rank=1, world_size=2)
    reference, _ = epoch_keys(full)
    second_epoch, _ = epoch_keys(full)
    # with workers, cuts where the next batch is not worker 0's, and past the end of a shorter worker stream
    cuts = [len(reference) // 2 + 1] if workers == 0 else [len(reference) // 2, len(reference) // 2 + 1,
                                                           len(reference) - 2]
    for cut in cuts:
        first = StreamingLoader(LoaderConfig(**cfg), seed=1, rank=1, world_size=2)
        it = iter(first)
        seen = [next(it)["keys"] for _ in range(cut)]
        state = first.state_dict()
        del it

        resumed = StreamingLoader(LoaderConfig(**cfg), seed=1, rank=1, world_size=2)
        resumed.load_state_dict(state)
        rest, _ = epoch_keys(resumed)
        assert seen + rest == reference, f"cut at {cut}, consumed per worker {state['consumed']}"
        assert resumed.epoch == 1
    assert epoch_keys(resumed)[0] == second_epoch


def test_workers_persist_across_epochs_and_each_epoch_equals_a_fresh_loaders(qm9_small):
    cfg = LoaderConfig(url=qm9_small, batch_size=16, num_workers=2)
    loader = StreamingLoader(cfg, seed=3, rank=0, world_size=1)
    first, _ = epoch_keys(loader)
    workers = [w.pid for w in loader._dataloader._iterator._workers]
    second, _ = epoch_keys(loader)
    assert [w.pid for w in loader._dataloader._iterator._workers] == workers  # the same processes
    assert all(psutil.pid_exists(pid) for pid in workers)
    loader.close()  # stops them now, not when the loader is garbage-collected
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in workers)
    fresh = StreamingLoader(cfg, seed=3, rank=0, world_size=1)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 1})
    assert second == epoch_keys(fresh)[0]  # the epoch the workers were told, not the one they started in
    assert sorted(first) != sorted(second) and sorted(sum(first, [])) == sorted(sum(second, []))


def test_worker_streams_rotate_to_continue_the_round_robin():
    from molscale.datasets.stream.loader import stream_of_worker
    assert [stream_of_worker(w, [0, 0, 0], [5, 5, 4]) for w in range(3)] == [0, 1, 2]
    assert [stream_of_worker(w, [3, 2, 2], [5, 5, 4]) for w in range(3)] == [1, 2, 0]
    assert [stream_of_worker(w, [5, 4, 4], [5, 5, 4]) for w in range(3)] == [1, 2, 0]  # 2 is done: 1 is next
    assert [stream_of_worker(w, [5, 5, 4], [5, 5, 4]) for w in range(3)] == [0, 1, 2]  # the epoch is over
    assert stream_of_worker(0, [7], [9]) == 0


def test_workers_leave_sigterm_and_sigint_to_their_rank(qm9_small):
    """A preemption signals every process, DataLoader workers included: they must keep serving their rank."""
    cfg = LoaderConfig(url=qm9_small, batch_size=16, num_workers=2)
    first = StreamingLoader(cfg, rank=0, world_size=1)
    reference, _ = epoch_keys(first)
    first.close()
    loader = StreamingLoader(cfg, rank=0, world_size=1)
    try:  # a failed assertion keeps this frame alive: close() keeps its workers from outliving the test
        it = iter(loader)
        seen = [next(it)["keys"]]
        workers = [psutil.Process(w.pid) for w in loader._dataloader._iterator._workers]
        assert len(workers) == 2
        for sig in ("TERM", "INT"):  # sent by another process, as by SLURM or a launcher
            subprocess.run(["kill", f"-{sig}", *(str(p.pid) for p in workers)], check=True)
        time.sleep(0.5)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
        assert seen + [batch["keys"] for batch in it] == reference
    finally:
        loader.close()


def test_a_rank_that_fails_mid_epoch_still_stops_its_workers_and_exits(qm9_small):
    """At exit the rank's multiprocessing SIGTERMs its live workers, then joins them: that must still work."""
    script = (f"from molscale.datasets.stream.loader import LoaderConfig, StreamingLoader\n"
              f"it = iter(StreamingLoader(LoaderConfig(url={qm9_small!r}, batch_size=16, num_workers=2), "
              f"rank=0, world_size=1))\n"
              f"next(it)\n"
              f"raise RuntimeError('failed with its workers alive')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "failed with its workers alive" in proc.stderr


def test_resume_refuses_a_different_world_size(qm9_small):
    a = StreamingLoader(LoaderConfig(url=qm9_small), rank=0, world_size=2)
    b = StreamingLoader(LoaderConfig(url=qm9_small), rank=0, world_size=1)
    with pytest.raises(InputError, match="world_size was 2, now 1"):
        b.load_state_dict(a.state_dict())


def corrupt_copy(src, dst, truncate=(), delete=()):
    shutil.copytree(src, dst)
    for name in truncate:
        path = os.path.join(dst, name)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    for name in delete:
        os.unlink(os.path.join(dst, name))
    return str(dst)


def test_truncated_shard_is_skipped_and_counted(qm9_small, tmp_path):
    url = corrupt_copy(qm9_small, tmp_path / "c", truncate=["train-000002.tar"])
    manifest = load_manifest(url)
    lost_count = manifest.shards("train")[2]["count"]
    loader = StreamingLoader(LoaderConfig(url=url, batch_size=16, max_bad_shards=1), rank=0, world_size=1)
    clean = StreamingLoader(LoaderConfig(url=qm9_small, batch_size=16), rank=0, world_size=1)
    batches, keys = epoch_keys(loader)
    clean_batches, clean_keys = epoch_keys(clean)
    assert loader.bad_shards == ["train-000002.tar"]
    assert len(set(keys)) == len(clean_keys) - lost_count
    assert len(batches) == len(clean_batches), "batch count per rank must not change"
    assert loader.state_dict()["bad_shards"] == ["train-000002.tar"]


def test_too_many_bad_shards_stop_with_a_clear_error(qm9_small, tmp_path):
    url = corrupt_copy(qm9_small, tmp_path / "c", truncate=["train-000001.tar"], delete=["train-000003.tar"])
    loader = StreamingLoader(LoaderConfig(url=url, batch_size=16, max_bad_shards=1), shuffle=False,
                             rank=0, world_size=1)
    with pytest.raises(TooManyBadShardsError, match=r"2 corrupt or missing shards .*max_bad_shards = 1"):
        epoch_keys(loader)


def test_unknown_split_and_property_are_clear_errors(qm9_small):
    from molscale.datasets.shards.manifest import ManifestError
    with pytest.raises(ManifestError, match="no split 'tset'"):
        StreamingLoader(LoaderConfig(url=qm9_small, split="tset"), rank=0, world_size=1)
    with pytest.raises(InputError, match="properties .*'lumo_ev'"):
        StreamingLoader(LoaderConfig(url=qm9_small), properties=("lumo_ev",), rank=0, world_size=1)


def test_s3_outage_mid_stream_loses_and_repeats_nothing(qm9_small, s3):
    from molscale.datasets.sources.qm9 import build_qm9
    gc.collect()  # earlier tests' unreachable loaders stop their forked workers, which hold the server's socket
    url = "s3://test-bucket/qm9-outage"
    build_qm9(url, limit=600, shard_size=40, workers=1, progress=False)
    cfg = LoaderConfig(url=url, batch_size=8, shuffle_buffer=1, retries=8)
    reference = epoch_keys(StreamingLoader(cfg, seed=5, rank=0, world_size=1))[1]

    loader = StreamingLoader(cfg, seed=5, rank=0, world_size=1)
    keys, outage_done = [], threading.Event()

    def outage():
        s3.stop()
        time.sleep(3)
        s3.start()
        outage_done.set()

    arrivals = []
    for i, batch in enumerate(loader):
        keys += batch["keys"]
        arrivals.append(time.monotonic())
        if i == 2:
            threading.Thread(target=outage).start()
            time.sleep(0.5)  # the next shard reads hit the stopped server
    assert outage_done.wait(30)
    assert max(np.diff(arrivals)) > 2.0, "no read waited for the server: the outage was not exercised"
    assert keys == reference
    assert Counter(keys).most_common(1)[0][1] == 1


def test_retry_backs_off_then_succeeds_and_gives_up_with_the_name():
    from molscale.datasets.shards.storage import retry
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return b"data"

    assert retry(flaky, "reading s3://b/x.tar", attempts=4, base_delay_s=0.01) == b"data"
    assert len(calls) == 3
    with pytest.raises(OSError, match=r"reading s3://b/y.tar: still failing after 2 attempts"):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("down")), "reading s3://b/y.tar", attempts=2,
              base_delay_s=0.01)
    with pytest.raises(FileNotFoundError):  # an answer, not a transient fault: no retries
        retry(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "x", attempts=5, base_delay_s=10)
