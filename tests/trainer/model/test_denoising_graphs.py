"""The whole denoising step as one CUDA graph per chunk shape and network (trainer/model/denoising_graphs.py).

On the CPU the graphs' body runs eagerly on the same buffers and tables a capture reads: it must sample exactly
what the step-by-step sampler samples, leave nothing per step to the host, and keep one key per chunk shape and
network. The GPU test (skipped without CUDA) replays real graphs against eager sampling."""

import logging

import pytest
import torch

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.trainer.bench import operator_calls
from molscale.trainer.model.branches import Branch
from molscale.trainer.model.denoising_graphs import DenoisingSteps
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.sampling import SAMPLERS, guidance_for, sample
from tests.trainer.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# two chunk shapes under the CPU's chunk cost (packing.DEFAULT_CHUNK_COST_PAIRS); a 1-atom molecule among them
NUM_ATOMS = torch.tensor([2] * 12 + [1, 14, 11, 9])


def both_ways(model, sampler, steps, seed=3, **kwargs):
    runs = [sample(model, NUM_ATOMS, steps=steps, generator=torch.Generator().manual_seed(seed), sampler=sampler,
                   step_graphs=graphs, **kwargs) for graphs in (False, True)]
    return runs


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_steps_sample_exactly_what_the_step_by_step_sampler_samples(kind, sampler, dtype):
    model = tiny_model(kind, dtype=dtype).eval()
    # a respaced grid, and (the default sampler in float32, where coefficients are rounded) every integer time;
    # both cross UniGEM's switch
    for steps in (30, 1000) if (dtype, sampler) == (torch.float32, "ancestral") else (30,):
        eager, graphed = both_ways(model, sampler, steps)
        for key in eager:
            assert torch.equal(eager[key], graphed[key]), (key, steps)
    assert eager["pos"][eager["node_mask"]].abs().max() > 0.1  # real molecules, not zeros compared with zeros


def test_whole_steps_under_bf16_autocast_and_with_a_condition():
    torch.manual_seed(0)
    cfg = ModelConfig(kind="unigem", hidden=16, layers=3, properties=["mu"], condition_on=["gap"],
                      atom_vocab=list(QM9_ATOM_VOCAB))
    model = build_model(cfg, prop_mean=[2.0, 250.0], prop_mad=[1.0, 40.0]).eval()
    condition = torch.linspace(200.0, 300.0, len(NUM_ATOMS))[:, None]  # gap in dataset units
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, graphed = both_ways(model, "ancestral", 20, condition=condition)
    assert torch.equal(eager["pos"], graphed["pos"]) and torch.equal(eager["z"], graphed["z"])
    other = sample(model, NUM_ATOMS, steps=20, generator=torch.Generator().manual_seed(3), step_graphs=True,
                   condition=condition + 40.0)
    assert not torch.equal(other["pos"], graphed["pos"])  # the graphs read the chunk's own condition


@pytest.fixture
def steps_made(monkeypatch):
    """The DenoisingSteps that sample() makes while the test runs, in order."""
    made = []
    original = DenoisingSteps.__init__
    monkeypatch.setattr(DenoisingSteps, "__init__",
                        lambda self, *a, **k: made.append(self) or original(self, *a, **k))
    return made


def test_one_graph_key_per_chunk_shape_and_network(kind, steps_made):
    model = tiny_model(kind).eval()
    sample(model, NUM_ATOMS, steps=12, generator=torch.Generator().manual_seed(0), step_graphs=True)
    (steps,) = steps_made
    chunks = {chunk for chunk, _ in steps.graphs.graphs}
    assert chunks == set(steps.chunks) and len(chunks) == 2  # the CPU's chunk cost cut the batch by size
    branches = {branch for _, branch in steps.graphs.graphs}
    assert branches == ({Branch.NUCLEATION, Branch.GROWTH} if kind == "unigem" else {None})
    assert not steps.graphs.capture and steps.graphs.captured() == 0  # no CUDA: every step ran eagerly


def test_a_replayed_step_leaves_nothing_to_the_host(monkeypatch):
    """With the body taken out (what a replay leaves to the host), more steps cost no more operator calls: the
    step's time and coefficients are read on the device, and the counter advances there."""
    model = tiny_model("unigem", dtype=torch.float32).eval()

    def calls(steps, graphs):
        return operator_calls(lambda: sample(model, NUM_ATOMS, steps=steps, generator=torch.Generator().manual_seed(0),
                                             step_graphs=graphs))

    eager_per_step = (calls(16, False) - calls(8, False)) / 8
    monkeypatch.setattr(DenoisingSteps, "_step", lambda self, state, branch: None)
    assert calls(16, True) == calls(8, True)
    assert eager_per_step > 100  # what the same steps cost the host without whole-step graphs


def test_guided_sampling_runs_step_by_step_and_says_so(caplog, monkeypatch):
    monkeypatch.setattr(DenoisingSteps, "run", lambda *a: pytest.fail("guidance cannot be a graph of the step"))
    model = tiny_model("unigem", dtype=torch.float32).eval()
    guide = guidance_for(model, "gap", 2.0, scale=10.0, start=500)
    with caplog.at_level(logging.INFO, logger="trainer"):
        eager, graphed = both_ways(model, "ancestral", 12, guidance=guide)
    assert torch.equal(eager["pos"], graphed["pos"])
    assert "whole-step CUDA graphs are off for this call (guidance differentiates the property head)" in caplog.text


def test_dpm_solver_restarts_at_the_branch_switch_in_its_coefficient_rows():
    """DPM-Solver++(2M) in a graph: a first-order row (the previous estimate weighed 0) at the first step and at
    UniGEM's switch, second order elsewhere; the rows are what the eager solver computes step by step."""
    model = tiny_model("unigem").eval()
    solver = SAMPLERS["dpm2m"](model.schedule)
    steps = [(1000, 500), (500, 10), (10, 5), (5, 0)]
    rows = solver.coefficient_rows(steps, [model.branch_of(t) for t, _ in steps])
    assert [row[2:4] for row in rows][0] == (1.0, 0.0) and rows[2][2:4] == (1.0, 0.0)
    assert rows[1][3] > 0 and rows[3][3] > 0
    assert rows[1] == solver.coefficients(500, 10, solver._lambda(1000))


@needs_cuda
@pytest.mark.parametrize("kind", ["unigem", "edm"])
def test_replayed_whole_steps_equal_eager_sampling_on_a_gpu(kind, steps_made):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(kind, dtype=torch.float32).cuda().eval()
    runs = [sample(model, NUM_ATOMS, steps=50, generator=torch.Generator("cuda").manual_seed(5), step_graphs=g)
            for g in (False, True)]
    (steps,) = steps_made
    assert steps.graphs.captured() >= 1 and steps.graphs.failed is None
    torch.testing.assert_close(runs[1]["pos"], runs[0]["pos"], rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[1]["z"], runs[0]["z"])
