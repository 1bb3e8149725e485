"""CUDA graphs of the network (trainer/model/cuda_graphs.py): the same loss, gradients and samples as eager
execution. The GPU tests run where a CUDA device is present (`pytest tests/trainer/model/test_cuda_graphs.py` on a GPU
machine); the CPU tests check what holds everywhere."""

import copy
import logging

import pytest
import torch

from molscale.trainer.bench import make_batch
from molscale.trainer.model.cuda_graphs import BodyGraphs
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.sampling import sample
from molscale.trainer.train.config import ConfigError, load_config

VOCAB = [1, 6, 7, 8, 9]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_model(kind, device):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, layers=3, hidden=32, properties=["lumo"] if kind == "unigem" else [],
                      atom_vocab=VOCAB, chunk_cost_pairs=None)
    return build_model(cfg).to(device)


def batch_of(sizes, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return make_batch(torch.tensor(sizes), 1, len(VOCAB), device, generator)


def loss_and_grads(model, batch, seed):
    model.zero_grad(set_to_none=True)
    generator = torch.Generator(device=batch["pos"].device).manual_seed(seed)
    terms = model(batch, generator=generator)
    terms["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in terms.items()}, grads


@needs_cuda
@pytest.mark.parametrize("kind", ["unigem", "edm"])
def test_graphed_training_step_equals_eager(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_model(kind, "cuda")
    batches = [batch_of([5, 9, 7, 9, 3, 8], "cuda", seed) for seed in (1, 2)]  # same shape, other molecules
    eager = [loss_and_grads(model, b, seed=10 + i) for i, b in enumerate(batches)]
    model.use_cuda_graphs()
    for _ in range(2):  # the first call captures, the second replays
        graphed = [loss_and_grads(model, b, seed=10 + i) for i, b in enumerate(batches)]
        for (loss_e, grads_e), (loss_g, grads_g) in zip(eager, graphed):
            assert loss_g == pytest.approx(loss_e, rel=1e-5, abs=1e-6)
            assert grads_g.keys() == grads_e.keys()
            for name in grads_e:
                torch.testing.assert_close(grads_g[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.cuda_graphs.graphs, "no graph was captured"


@needs_cuda
@pytest.mark.parametrize("kind", ["unigem", "edm"])
def test_graphed_sampling_equals_eager(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_model(kind, "cuda").eval()
    sizes = torch.tensor([4, 6, 6, 9])

    def draw():
        generator = torch.Generator(device="cuda").manual_seed(3)
        return sample(model, sizes, steps=20, generator=generator, device="cuda")
    eager = draw()
    model.use_cuda_graphs()
    for _ in range(2):
        graphed = draw()
        torch.testing.assert_close(graphed["pos"], eager["pos"], rtol=1e-4, atol=1e-5)
        assert torch.equal(graphed["z"], eager["z"])


def test_graphs_leave_cpu_tensors_eager_and_are_not_copied():
    model = small_model("unigem", "cpu")
    batch = batch_of([5, 9, 7, 9], "cpu", seed=1)
    before = loss_and_grads(model, batch, seed=4)
    model.use_cuda_graphs()
    after = loss_and_grads(model, batch, seed=4)
    assert after[0] == before[0]
    assert not model.cuda_graphs.graphs  # nothing captured for CPU tensors
    assert copy.deepcopy(model).cuda_graphs is None  # an EMA or export copy runs eagerly


def test_cuda_graphs_are_refused_for_pretraining():
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        load_config("cluster/cpu_pretrain_moses.json", ["train.cuda_graphs=true"])
    assert load_config("cluster/qm9_1gpu.json").train.cuda_graphs  # measured on an H100: BENCHMARKS.md
    assert not load_config("cluster/geom_64gpu.json").train.cuda_graphs  # many shapes: not measured yet


def test_a_body_whose_capture_fails_is_logged_once_and_runs_eagerly(monkeypatch, caplog):
    """BodyGraphs (the whole training step's and the whole denoising step's graphs): a capture that fails leaves
    the run going, every later run of every key eager. The CUDA parts are stood in for: CUDA is not here."""
    class RefusedCapture:
        def register_generator_state(self, generator):
            raise RuntimeError("this capture is refused\nwith a second line")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", RefusedCapture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "a pool")
    graphs = BodyGraphs(capture=True, what="a test body", generators=[torch.Generator()])
    monkeypatch.setattr(graphs, "_warm_up", lambda body: body())  # the side stream needs CUDA
    runs = []
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for key in ("a", "a", "a", "b", "b"):
            graphs.run(key, lambda: runs.append(key))
    assert runs == ["a", "a", "a", "b", "b"] and graphs.captured() == 0
    assert graphs.failed == "RuntimeError: this capture is refused"
    assert caplog.text.count("a test body: capturing it as a CUDA graph failed (RuntimeError: this capture is "
                             "refused); it continues, run eagerly") == 1
