"""The training step decides on the device and reads nothing on the host between records.

A real Trainer (DeepSpeed engine, world of one, CPU) against the loop as it was written before these decisions
moved to the device: skip on a non-finite loss, EDM's clipping threshold from a host history, torch's
clip_grad_norm_, AdamW, an EMA. With planted NaN losses and a gradient spike both take the same decisions and
end with the same weights.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import traceback
from collections import deque

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default}

pytestmark = pytest.mark.usefixtures("single_thread")

LR, HISTORY, EMA_DECAY, STEPS_PER_BATCH = 1e-3, 3, 0.9, 2


@pytest.fixture(scope="module")
def world_of_one():
    """One process group for the module: DeepSpeed keeps the first group it sees for the life of the process."""
    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    from molscale.trainer.train.distributed import init_distributed
    init_distributed()
    try:
        yield
    finally:
        from molscale.trainer.train.distributed import end_process_group
        end_process_group()
        os.environ.clear()
        os.environ.update(saved)


def make_trainer(qm9_small, run_dir, *overrides, resume=None):
    from molscale.datasets.shards.manifest import load_manifest
    from molscale.trainer.train.config import load_config
    from molscale.trainer.train.loop import Trainer
    cfg = load_config(None, [f"data.url={qm9_small}", "data.num_workers=0", "data.batch_size=8",
                             "data.shuffle_buffer=1", "model.layers=2", "model.hidden=16",
                             'model.properties=["lumo"]', "model.chunk_cost_pairs=null", f"optimizer.lr={LR}",
                             f"optimizer.clip_history={HISTORY}", f"optimizer.ema_decay={EMA_DECAY}",
                             f"optimizer.steps_per_batch={STEPS_PER_BATCH}", "train.max_nonfinite_in_row=3",
                             "logging.wandb.enabled=false", "logging.progress_bar=false", *overrides])
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(cfg, str(run_dir), load_manifest(qm9_small), resume=resume)


# engine: DeepSpeed's forward, backward and step; step: the whole step as step_graph.py captures it on a GPU (here
# the same body on the same static buffers, run eagerly)
@pytest.fixture(params=["engine", "step"])
def trainer(request, world_of_one, qm9_small, tmp_path):
    graphs = '"step"' if request.param == "step" else "false"
    return make_trainer(qm9_small, tmp_path / "run", f"train.cuda_graphs={graphs}")


def planted_batches(trainer, count=12):
    """Real batches; 2 and 6 have NaN coordinates (a NaN loss), 4 has coordinates x 40 (a gradient spike)."""
    batches = [dict(b) for b in itertools.islice(trainer._batches(), count)]
    for i in (2, 6):
        if i < count:
            batches[i]["pos"] = torch.full_like(batches[i]["pos"], float("nan"))
    if count > 4:
        batches[4]["pos"] = batches[4]["pos"] * 40.0
    return batches


def host_reference(model, batches):
    """The loop's decisions as the host made them: per step (skipped, clipped, threshold); the final model and EMA."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=1e-12, amsgrad=True, betas=(0.9, 0.999))
    shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = deque([3000.0], maxlen=HISTORY)
    decisions = []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)
        loss = model(dict(batch))["loss"]
        if not torch.isfinite(loss):
            decisions.append((True, None, None))
            continue
        loss.backward()
        threshold = float(1.5 * np.mean(norms) + 2.0 * np.std(norms))
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), threshold))
        for _ in range(STEPS_PER_BATCH):
            optimizer.step()
        optimizer.zero_grad()
        norms.append(min(norm, threshold))
        with torch.no_grad():
            for n, p in model.named_parameters():
                shadow[n].lerp_(p, 1.0 - EMA_DECAY)
        decisions.append((False, norm > threshold, threshold))
    return decisions, shadow


def test_device_decisions_match_the_host_loop(trainer):
    batches = planted_batches(trainer)
    batches = batches + [dict(b) for b in batches]  # every shape twice: the step path's second visit replays
    reference = copy.deepcopy(trainer.model)
    decisions, ref_shadow = host_reference(reference, batches)
    assert [d[0] for d in decisions].count(True) == 4 and any(d[1] for d in decisions), "nothing was planted"

    got = []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)
        trainer.train_step(iter([dict(batch)]))
        record = trainer.read_record()
        skipped = record["skipped_in_record"] == 1
        threshold = None if skipped else record["clip_threshold"]
        clipped = None if skipped else record["grad_norm"] > threshold
        got.append((skipped, clipped, threshold))
    assert [g[:2] for g in got] == [d[:2] for d in decisions]
    for (skipped, _, mine), (_, _, theirs) in zip(got, decisions):
        assert skipped or mine == pytest.approx(theirs, rel=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(trainer.ema.shadow[name], ref_shadow[name], rtol=1e-5, atol=1e-6, msg=name)
    assert trainer.step == len(batches) and record["nonfinite_skipped"] == 4
    if trainer.whole_step:
        assert trainer.step_graphs.summary() == {"shapes": len({trainer.step_graphs.key([b]) for b in batches}),
                                                 "graphs": 0, "capture_failed": None}


def test_the_limit_of_skips_in_a_row_freezes_the_weights_and_stops_at_the_next_read(trainer):
    from molscale.trainer.train.loop import NonFiniteLossError
    _, good, bad = planted_batches(trainer, 3)
    trainer.train_step(iter([good]))
    trainer.read_record()
    last_good = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for batch in (bad, bad, bad, good, good):  # the limit (3) is reached, then finite losses come back
        trainer.train_step(iter([dict(batch)]))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or gradients in a row by step 6"):
        trainer.read_record()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, last_good[name]), name


class SyncCounter(TorchDispatchMode):
    """Operators that would make the host wait for a GPU (a scalar read, nonzero), and all operator calls."""

    def __init__(self):
        super().__init__()
        self.syncs, self.calls = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if func in SYNC_OPS:  # with where it came from, for the failure message
            self.syncs.append(str(func) + "".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))


def test_a_steady_state_step_reads_nothing_on_the_host(trainer, monkeypatch):
    from molscale.trainer.train.distributed import accelerator
    synchronized = []
    monkeypatch.setattr(type(accelerator()), "synchronize", lambda self, *a: synchronized.append(1))
    batches = planted_batches(trainer, 6)
    del batches[2]  # no NaN and no spike here: a steady state
    del batches[3]
    for batch in batches[:2]:  # warm-up: lazy optimizer state
        trainer.train_step(iter([batch]))
    trainer.read_record()
    with SyncCounter() as counter:
        for batch in batches[2:]:
            trainer.train_step(iter([batch]))
    assert (counter.syncs, synchronized, trainer.host_reads) == ([], [], 0)
    record = trainer.read_record()
    assert trainer.host_reads == 0 and record["host_reads"] == 1 and record["steps_in_record"] == len(batches[2:])
    json.dumps(record, allow_nan=False)  # a record is plain JSON


def test_the_real_step_makes_about_as_many_operator_calls_as_the_model_alone(trainer):
    """Kernels per real step (DeepSpeed, clipping, the skip and stop logic, EMA) within 1.1x of the model's own
    forward, backward and fused AdamW on the same batch."""
    batch = planted_batches(trainer, 2)[1]
    for _ in range(2):
        trainer.train_step(iter([batch]))
    with SyncCounter() as real:
        trainer.train_step(iter([batch]))
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, amsgrad=True, fused=True)
    for _ in range(2):
        with SyncCounter() as alone:
            model(dict(batch))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
    assert real.calls <= 1.1 * alone.calls, (real.calls, alone.calls)


def persistent_tensors(trainer) -> dict:
    """Every tensor a CUDA graph of the whole step writes or reads across replays, by name: (the tensor, its
    address). Holding the tensors keeps a replaced one's memory from being handed out again at the same address."""
    t = trainer
    named = {f"param {n}": p for n, p in t.model.named_parameters()}
    named.update({f"optimizer {i} {k}": v for i, p in enumerate(t.trainable)
                  for k, v in t.optimizer.state[p].items()})
    named["lr"] = t.optimizer.param_groups[0]["lr"]
    named.update({f"ema {n}": v for n, v in t.ema.shadow.items()})
    named.update({f"clipper {k}": getattr(t.clipper, k) for k in ("norms", "filled", "next")})
    named.update({f"ledger {k}": getattr(t.ledger, k) for k in ("nonfinite_total", "nonfinite_in_row", "limit_reached",
                                                                "stop", "loss_sums", "good_steps", "last_norm",
                                                                "last_threshold")})
    named["stop flag"] = t._stop_flag
    named.update({f"static {i} {k}": v for i, static in enumerate(t.step_graphs.shapes.values())
                  for b in static for k, v in b.items()})
    return {name: (v, v.data_ptr()) for name, v in named.items()}


def test_the_whole_step_writes_every_persistent_tensor_in_place(world_of_one, qm9_small, tmp_path):
    """A graph replays the addresses it was captured with: nothing the step keeps may be reallocated by a later
    step, a read of the record, a validation-free checkpoint or the lr schedule; the schedule's rate reaches the
    optimizer through its tensor, and SIGTERM through the device flag."""
    trainer = make_trainer(qm9_small, tmp_path / "run", 'train.cuda_graphs="step"', "optimizer.warmup_steps=5")
    assert torch.is_tensor(trainer.optimizer.param_groups[0]["lr"]) and trainer.optimizer.param_groups[0]["capturable"]
    batches = planted_batches(trainer, 3)
    for batch in batches:  # first visits: every shape's warm-up step allocates what it needs
        trainer.train_step(iter([dict(batch)]))
    trainer.read_record()
    assert all(p.grad is None for p in trainer.trainable)  # made by each step's backward (in a graph: its pool)
    before = persistent_tensors(trainer)
    lrs = []
    for batch in batches:  # second visits: the path a replay takes
        trainer.train_step(iter([dict(batch)]))
        lrs.append(trainer._step_lr)
    record = trainer.read_record()
    trainer.save()
    after = persistent_tensors(trainer)
    assert sorted(after) == sorted(before)
    moved = [name for name, (v, ptr) in after.items() if v is not before[name][0] or ptr != before[name][1]]
    assert not moved, moved[:5]
    # the warmup schedule (5 steps): step k (from 0) uses LR * (k + 1) / 5; the optimizer holds the next rate
    assert lrs == pytest.approx([LR * 4 / 5, LR, LR]) and record["lr"] == pytest.approx(LR)
    assert float(trainer.optimizer.param_groups[0]["lr"]) == pytest.approx(LR)
    assert (trainer.engine.global_steps, trainer.engine.global_samples) == (6, 6 * 8)
    trainer._sigterm = True
    trainer.train_step(iter([dict(batches[0])]))
    assert trainer.stop_requested and float(trainer._stop_flag) == 1.0
    trainer.read_record()
    assert trainer.ledger.read_flags["stop"]


def test_the_whole_step_resumes_exactly(world_of_one, qm9_small, tmp_path):
    """Interrupted after 3 steps and resumed (the lr becomes a device tensor again after the optimizer's state
    is loaded), the run ends with the weights of the uninterrupted one."""
    settings = ('train.cuda_graphs="step"', "optimizer.warmup_steps=4")
    whole = make_trainer(qm9_small, tmp_path / "whole", *settings)
    batches = whole._batches()
    for _ in range(6):
        whole.train_step(batches)
    first = make_trainer(qm9_small, tmp_path / "cut", *settings)
    batches = first._batches()
    for _ in range(3):
        first.train_step(batches)
    first.save()
    resumed = make_trainer(qm9_small, tmp_path / "cut", *settings, resume="auto")
    assert resumed.step == 3 and torch.is_tensor(resumed.optimizer.param_groups[0]["lr"])
    batches = resumed._batches()
    for _ in range(3):
        resumed.train_step(batches)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for name, v in whole.ema.shadow.items():
        assert torch.equal(v, resumed.ema.shadow[name]), name


class WeightCasts(TorchDispatchMode):
    """bf16 casts of the given weights (by address), per weight."""

    def __init__(self, addresses):
        super().__init__()
        self.addresses, self.casts = addresses, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 and \
                args[0].data_ptr() in self.addresses:
            self.casts[args[0].data_ptr()] = self.casts.get(args[0].data_ptr(), 0) + 1
        return func(*args, **kwargs)


def test_the_whole_step_casts_each_weight_to_bf16_once(world_of_one, qm9_small, tmp_path):
    """Autocast's weight cache lives for the step's forward (inside the captured region on a GPU), so a weight
    that both UniGEM branches read, the shared block's, is cast once per step, not once per call."""
    trainer = make_trainer(qm9_small, tmp_path / "run", 'train.cuda_graphs="step"', "deepspeed.bf16=true")
    batch = planted_batches(trainer, 2)[1]
    trainer.train_step(iter([dict(batch)]))
    addresses = {p.data_ptr(): name for name, p in trainer.model.named_parameters()}
    with WeightCasts(set(addresses)) as counter:
        trainer.train_step(iter([dict(batch)]))
    shared = [a for a, name in addresses.items() if name.startswith("shared.")]
    assert counter.casts and max(counter.casts.values()) == 1, max(counter.casts.values())
    assert shared and any(a in counter.casts for a in shared), sorted(addresses.values())[:8]


@pytest.mark.parametrize("settings", [("model.kind=edm", "model.properties=[]", "optimizer.warmup_steps=3"),
                                      ("deepspeed.gradient_accumulation_steps=2",)],
                         ids=["edm-warmup", "accumulation"])
def test_the_whole_step_trains_as_deepspeeds_step_does(world_of_one, qm9_small, tmp_path, settings):
    """The step body with DeepSpeed's forward, backward and step written out, against the engine itself: the same
    weights, EMA and logged losses after the same batches (EDM with an lr warmup; UniGEM with 2 micro-batches)."""
    runs = {}
    for mode in ("false", '"step"'):
        trainer = make_trainer(qm9_small, tmp_path / mode.strip('"'), f"train.cuda_graphs={mode}", *settings)
        batches = trainer._batches()
        for _ in range(5):
            trainer.train_step(batches)
        runs[mode] = (trainer, trainer.read_record())
    (engine, engine_record), (whole, whole_record) = runs["false"], runs['"step"']
    assert whole.whole_step and not engine.whole_step
    for (name, p), q in zip(engine.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(whole.ema.shadow[name], engine.ema.shadow[name], rtol=1e-5, atol=1e-7, msg=name)
    assert whole_record["loss"] == pytest.approx(engine_record["loss"], rel=1e-5)
    assert whole_record["lr"] == pytest.approx(engine_record["lr"])
    assert (whole.engine.global_steps, whole.engine.micro_steps, whole.engine.global_samples) == \
        (engine.engine.global_steps, engine.engine.micro_steps, engine.engine.global_samples)


def test_a_replayed_whole_step_leaves_the_host_only_the_batch_copies_and_the_schedule(world_of_one, qm9_small,
                                                                                     tmp_path):
    """What the host still launches per step once a shape's graph exists: the step body runs inside the graph (a
    replay makes no operator call on the host), so only the copies into the graph's input buffers and the lr
    schedule's fill remain (a GPU adds the batch's host-to-device copies). Counted here with the body taken out."""
    trainer = make_trainer(qm9_small, tmp_path / "run", 'train.cuda_graphs="step"', "optimizer.warmup_steps=5")
    batch = planted_batches(trainer, 2)[1]
    for _ in range(2):  # the shape's warm-up step, then a step on its input buffers
        trainer.train_step(iter([dict(batch)]))
    trainer.step_graphs.body = lambda static: None
    with SyncCounter() as counter:
        trainer.train_step(iter([dict(batch)]))
    inputs = sum(torch.is_tensor(v) for v in batch.values())
    assert not counter.syncs and inputs <= counter.calls <= inputs + 3, (counter.calls, inputs)
