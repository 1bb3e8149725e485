"""The model's device work reads nothing back to the host and makes no CPU tensors, proven without a GPU.

Everything runs on torch's ``meta`` device (shapes and dtypes, no data), under a dispatch mode that records
every operator that would synchronise with a GPU (a scalar read, ``nonzero``, a copy to the host) and every
operator that produces a CPU tensor. On a GPU each of those is a stall of the step or a host-to-device copy.
Allowed: nothing in the loss, backward, EMA, clipping or property prediction; nothing per sampling step. With size
chunks on, planning works on the host from the batch's host copy of the atom counts: CPU tensors are made there,
but nothing is read back from the device.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.packing import DEFAULT_CHUNK_COST_PAIRS
from molscale.trainer.model.pretraining import MoleculeJAE, PretrainConfig
from molscale.trainer.model.sampling import SAMPLERS, predict_properties, sample
from molscale.trainer.train.ema import EMA

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default}


class HostTraffic(TorchDispatchMode):
    """Records (operator, why) for every host sync and every CPU tensor made while active; ``reads`` holds the
    events that read device values back (a sync, or a CPU tensor made from device tensors)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from_device = any(isinstance(v, torch.Tensor) and v.device.type != "cpu"
                          for v in tree_leaves((args, kwargs)))
        if func in SYNC_OPS:
            self.events.append(f"{func}: reads a device value on the host")
            if from_device:
                self.reads.append(self.events[-1])
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                self.events.append(f"{func}: makes a CPU tensor of shape {tuple(value.shape)}")
                if from_device:
                    self.reads.append(self.events[-1])
        return out


def meta_batch(batch_size=6, n_max=9, num_props=1):
    meta = torch.device("meta")
    return {"pos": torch.zeros(batch_size, n_max, 3, device=meta),
            "node_mask": torch.ones(batch_size, n_max, dtype=torch.bool, device=meta),
            "atom_type": torch.zeros(batch_size, n_max, dtype=torch.long, device=meta),
            "props": torch.zeros(batch_size, num_props, device=meta)}


def meta_model(kind, conditioned=False):
    props = ["lumo"] if kind == "unigem" else []
    condition = ["gap"] if conditioned else []
    cfg = ModelConfig(kind=kind, hidden=8, layers=2, properties=props, condition_on=condition,
                      atom_vocab=list(QM9_ATOM_VOCAB))
    columns = len(props) + len(condition)
    model = build_model(cfg, prop_mean=[1.0] * columns or None, prop_mad=[2.0] * columns or None)
    return model.to("meta")


@pytest.mark.parametrize("kind,conditioned", [("unigem", False), ("edm", False), ("unigem", True), ("edm", True)])
def test_training_step_model_work_stays_on_the_device(kind, conditioned):
    model = meta_model(kind, conditioned)
    ema = EMA(model, 0.999)
    batch = meta_batch(num_props=len(model.cfg.property_columns))
    model(batch)  # warm-up: the schedule tables and property statistics are copied to the device once per run
    with HostTraffic() as traffic:
        loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        ema.update(model)
    assert traffic.events == []


def test_size_chunks_planned_from_host_counts_read_nothing_back(kind, monkeypatch):
    """'auto' size chunks on a device where planning would otherwise sync (the meta device standing in for a
    GPU): with the loader's host counts the loss is chunked and reads nothing back; without them it stays whole
    and touches the host not at all."""
    monkeypatch.setitem(DEFAULT_CHUNK_COST_PAIRS, "meta", 0)
    model = meta_model(kind)
    calls, network = [], model.denoise
    model.denoise = lambda *args, **kwargs: calls.append(args[0].shape[:2]) or network(*args, **kwargs)
    batch = meta_batch(num_props=len(model.cfg.property_columns))
    counted = {**batch, "num_atoms_host": [3, 9, 4, 8, 5, 9]}
    model(counted)  # warm-up: the schedule tables and property statistics are copied to the device once per run
    for given, whole in ((counted, False), (batch, True)):
        calls.clear()
        with HostTraffic() as traffic:
            model(given)["loss"].backward()
        assert traffic.reads == []
        assert (traffic.events == []) == whole and (len(calls) <= 2) == whole  # one call per branch when whole


def test_pretraining_step_model_work_stays_on_the_device():
    cfg = ModelConfig(kind="unigem", hidden=8, layers=2, atom_vocab=list(QM9_ATOM_VOCAB))
    model = MoleculeJAE(cfg, PretrainConfig(encoder_blocks=1, bond_blocks=1)).to("meta")
    batch = meta_batch(num_props=0)
    batch["bond_order"] = torch.zeros(6, 9, 9, dtype=torch.int8, device="meta")
    batch["has_bonds"] = torch.ones(6, dtype=torch.bool, device="meta")
    model(batch)  # warm-up: the schedule tables are copied to the device once per run
    with HostTraffic() as traffic:
        loss = model(batch)["loss"]
        loss.backward()
    assert traffic.events == []


def test_sampling_steps_stay_on_the_device():
    """Setting up a sampling run may touch the host; each further step may not: twice the steps, the same record."""
    model = meta_model("unigem")
    num_atoms = torch.tensor([5, 9, 7])

    def record(steps, sampler):
        with HostTraffic() as traffic:
            out = sample(model, num_atoms, steps=steps, device="meta", sampler=sampler)
        assert out["pos"].device.type == "meta"
        return traffic.events

    for sampler in SAMPLERS:  # 5 and 9 network evaluations; each crosses the branch switch
        few, more = record(4, sampler), record(8, sampler)
        assert few == more, sampler


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_whole_step_graphs_read_nothing_back_and_add_nothing_per_step(sampler):
    """The body a CUDA graph of the whole denoising step holds (run eagerly off CUDA): its time and coefficient
    tables are made on the host once per call, from host values (their shapes follow the steps), and nothing
    is read back."""
    model = meta_model("edm")
    num_atoms = torch.tensor([5, 9, 7])

    def record(steps):
        with HostTraffic() as traffic:
            sample(model, num_atoms, steps=steps, device="meta", sampler=sampler, step_graphs=True)
        assert traffic.reads == []
        return len(traffic.events)

    assert record(4) == record(8)


def test_conditional_sampling_steps_stay_on_the_device():
    model = meta_model("unigem", conditioned=True)
    num_atoms = torch.tensor([5, 9, 7])
    condition = [[1.0], [2.0], [3.0]]  # given on the host once, as the sampling actors give it

    def record(steps):
        with HostTraffic() as traffic:
            sample(model, num_atoms, steps=steps, device="meta", sampler="dpm2m", condition=condition)
        return traffic.events

    assert record(4) == record(8)


def test_property_prediction_stays_on_the_device():
    model = meta_model("unigem")
    batch = meta_batch()
    predict_properties(model, batch)  # warm-up (statistics copied once)
    with HostTraffic() as traffic:
        pred = predict_properties(model, batch)
    assert pred.shape == (6, 1) and traffic.events == []


def test_the_detector_sees_syncs_and_cpu_tensors():
    """A check that cannot fail proves nothing: the mode does record a host read and a CPU tensor."""
    x = torch.zeros(3, device="meta")
    with HostTraffic() as traffic:
        torch.arange(3)
        with pytest.raises(Exception):
            x.sum().item()
    assert any("CPU tensor" in e for e in traffic.events) and any("host" in e for e in traffic.events)
