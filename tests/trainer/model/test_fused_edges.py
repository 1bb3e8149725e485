"""model.kernel = 'fused': the Triton edge kernels compute what the eager block computes, forward and backward.

They run on the CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton). The interpreter's default tiling is one tile per molecule; `gpu_tiles` forces the GPU's many-tile path
(row blocks, column loops, feature chunks, cross-program partial sums) on small molecules.
"""

import copy
import logging

import pytest
import torch

from molscale.trainer.model import egnn, fused_edges
from molscale.trainer.model.egnn import DenseGraph, EGNNBlock, use_kernel
from molscale.trainer.model.networks import ModelConfig
from tests.trainer.helpers import make_batch, outputs, outputs_and_grads, random_orthogonal, tiny_model

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(fused_edges.triton is None, reason="triton is not installed"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp")]  # numpy's sigmoid, interpreter


@pytest.fixture(params=["matmul", "onchip"])
def weight_grad(request, monkeypatch):
    """Both ways of reducing W_2's gradient (MOLSCALE_FUSED_WGRAD)."""
    monkeypatch.setenv("MOLSCALE_FUSED_WGRAD", request.param)
    return request.param


@pytest.fixture
def gpu_tiles(monkeypatch):
    """2 x 4 pairs and 16 features per tile: several row blocks, column blocks and feature chunks."""
    monkeypatch.setattr(fused_edges, "tile_sizes", lambda n, hp, device, differentiated=True: (2, 4, 16, 1))


def block_and_inputs(hidden, num_atoms, n_max=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    block = EGNNBlock(hidden).to(dtype)
    with torch.no_grad():  # larger than the default init, so that every nonlinearity is exercised
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    n = n_max or max(num_atoms)
    node_mask = torch.arange(n)[None, :] < torch.tensor(num_atoms)[:, None]
    pos = torch.randn(len(num_atoms), n, 3, dtype=dtype) * node_mask[..., None]
    h = torch.randn(len(num_atoms), n, hidden, dtype=dtype) * node_mask[..., None]
    return block, h, pos, DenseGraph.build(pos, node_mask)


def run_block(block, kernel, h, pos, graph, seed=1):
    """The block's outputs and the gradients of a random weighting of them (inputs and parameters)."""
    block.kernel = kernel
    block.zero_grad(set_to_none=True)
    h, pos = h.clone().requires_grad_(), pos.clone().requires_grad_()
    h_out, pos_out = block(h, pos, graph)
    gen = torch.Generator().manual_seed(seed)
    loss = (h_out * torch.randn(h_out.shape, generator=gen, dtype=h_out.dtype)).sum() \
        + (pos_out * torch.randn(pos_out.shape, generator=gen, dtype=pos_out.dtype)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return {"h": h_out.detach(), "pos": pos_out.detach()}, {**grads, "d_h": h.grad, "d_pos": pos.grad}


def assert_relative_close(got: dict, expected: dict, rtol: float):
    assert set(got) == set(expected)
    for key in expected:
        scale = float(expected[key].abs().max()) or 1.0
        error = float((got[key] - expected[key]).abs().max())
        assert error <= rtol * scale, f"{key}: differs by {error:.2e} (scale {scale:.2e})"


@pytest.mark.parametrize("hidden", [16, 12])  # 12: features padded to the next power of two inside the kernel
@pytest.mark.parametrize("tiles", ["one tile per molecule", "gpu tiles"])
def test_fused_block_matches_eager_in_float64(hidden, tiles, weight_grad, request):
    if tiles == "gpu tiles":
        request.getfixturevalue("gpu_tiles")
    # padded molecules, a 1-atom molecule, a molecule padded beyond its size
    block, h, pos, graph = block_and_inputs(hidden, [5, 1, 3, 7], n_max=9)
    out_e, grads_e = run_block(block, "eager", h, pos, graph)
    out_f, grads_f = run_block(block, "fused", h, pos, graph)
    assert min(float(g.abs().max()) for name, g in grads_e.items()) > 0  # every gradient is exercised
    assert_relative_close(out_f, out_e, 1e-12)
    assert_relative_close(grads_f, grads_e, 1e-12)
    # padding stays zero, as the eager block keeps it
    assert float(out_f["h"][1, 1:].abs().max()) == 0 and float(out_f["pos"][0, 5:].abs().max()) == 0


def test_fused_edge_mlp_gradcheck(weight_grad):
    """torch.autograd.gradcheck of both kernels (message and coordinate MLP) in float64, against finite
    differences of the kernels themselves."""
    torch.manual_seed(3)
    batch, n, hidden = 2, 5, 6
    for mode in (fused_edges.MESSAGE, fused_edges.COORDINATE):
        args = [torch.randn(batch, n, hidden, dtype=torch.float64, requires_grad=True),  # A
                torch.randn(batch, n, hidden, dtype=torch.float64, requires_grad=True),  # C
                torch.rand(batch, n, n, 2, dtype=torch.float64, requires_grad=True),  # e_ij
                torch.randn(hidden, 2, dtype=torch.float64, requires_grad=True),  # W_e
                (torch.randn(hidden, hidden, dtype=torch.float64) / 2).requires_grad_(),  # W_2
                torch.randn(hidden, dtype=torch.float64, requires_grad=True),  # b_2
                torch.randn(hidden, dtype=torch.float64, requires_grad=True)]  # w
        if mode == fused_edges.MESSAGE:
            mask = (torch.rand(batch, n, n, dtype=torch.float64) > 0.3).to(torch.float64)
            args += [torch.randn(1, dtype=torch.float64, requires_grad=True), mask]
        else:
            args += [None, None]
        assert torch.autograd.gradcheck(lambda *x: fused_edges.FusedEdgeMLP.apply(mode, True, *x), args,
                                        eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_fused_and_eager_agree_in_float32_on_every_qm9_size(weight_grad):
    """Every padded size of a QM9 batch (1 to 29 atoms), forward and backward, default initialisation."""
    for n in range(1, 30):
        torch.manual_seed(n)
        block = EGNNBlock(16)
        num_atoms = [n, max(1, n - 3)]
        node_mask = torch.arange(n)[None, :] < torch.tensor(num_atoms)[:, None]
        pos = torch.randn(2, n, 3) * 1.5 * node_mask[..., None]
        h = torch.randn(2, n, 16) * node_mask[..., None]
        graph = DenseGraph.build(pos, node_mask)
        out_e, grads_e = run_block(block, "eager", h, pos, graph)
        out_f, grads_f = run_block(block, "fused", h, pos, graph)
        assert_relative_close(out_f, out_e, 2e-5)
        assert_relative_close(grads_f, grads_e, 2e-4)


def test_the_fused_block_is_equivariant(gpu_tiles):
    """Rotating, reflecting and translating the input rotates, reflects and translates the coordinates it
    returns and leaves the node features unchanged."""
    block, h, pos, graph = block_and_inputs(16, [6, 4], dtype=torch.float64)
    block.kernel = "fused"
    rotation = random_orthogonal(seed=5, reflect=True)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    node_mask = graph.node_mask
    with torch.no_grad():
        h1, pos1 = block(h, pos, graph)
        moved = (pos @ rotation.T + shift) * node_mask
        h2, pos2 = block(h, moved, DenseGraph.build(moved, node_mask[..., 0].bool()))
    torch.testing.assert_close(h2, h1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pos2, (pos1 @ rotation.T + shift) * node_mask, rtol=1e-10, atol=1e-10)


def test_fused_weight_gradients_are_deterministic(gpu_tiles, weight_grad):
    block, h, pos, graph = block_and_inputs(16, [7, 5, 6], dtype=torch.float32, seed=2)
    _, first = run_block(block, "fused", h, pos, graph)
    _, second = run_block(block, "fused", h, pos, graph)
    for name in first:
        assert torch.equal(first[name], second[name]), name  # bit for bit


def test_fused_models_match_eager_outputs_and_gradients(kind, gpu_tiles):
    """UniGEM (growth branch with its property head) and EDM, whole networks, with input-coordinate gradients
    (as guidance takes them)."""
    fused = tiny_model(kind, hidden=16, layers=2, kernel="fused")
    eager = use_kernel(copy.deepcopy(fused), "eager")
    assert all(b.kernel == "fused" for b in fused.modules() if isinstance(b, EGNNBlock))
    batch = make_batch([4, 1, 6], n_max=7, seed=11)
    out_f, grads_f = outputs_and_grads(fused, batch, seed=0, pos_grad=True)
    out_e, grads_e = outputs_and_grads(eager, batch, seed=0, pos_grad=True)
    torch.testing.assert_close(out_f, out_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads_f, grads_e, rtol=1e-10, atol=1e-12)


def test_fused_blocks_under_bf16_autocast(kind):
    """The H x H products in bf16 (as the eager Linear's under autocast), everything else float32."""
    fused = tiny_model(kind, hidden=16, layers=2, dtype=torch.float32, kernel="fused")
    eager = use_kernel(copy.deepcopy(fused), "eager")
    batch = make_batch([4, 5, 3], dtype=torch.float32, seed=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = outputs(fused, batch, seed=0), outputs(eager, batch, seed=0)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype == torch.float32
        torch.testing.assert_close(got[key], value, rtol=0, atol=2e-2 * float(value.abs().max()))


def test_without_triton_or_a_gpu_the_blocks_run_eagerly_with_one_line(monkeypatch, caplog):
    block, h, pos, graph = block_and_inputs(16, [4, 3])
    block.kernel = "fused"
    expected, _ = run_block(block, "eager", h, pos, graph)
    fused_edges._warn_fallback.cache_clear()
    monkeypatch.setattr(fused_edges, "INTERPRETED", False)  # a CPU without the interpreter
    calls = []
    monkeypatch.setattr(fused_edges, "fused_edge_mlp", lambda *a, **k: calls.append(a))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        got, _ = run_block(block, "fused", h, pos, graph)
        run_block(block, "fused", h, pos, graph)
    assert not calls
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if "model.kernel=fused" in r.getMessage()]
    assert lines == ["model.kernel=fused: Triton kernels need a CUDA device (cpu tensors; TRITON_INTERPRET=1 "
                     "runs them on the CPU, slowly); EGNN blocks run eagerly"]
    monkeypatch.setattr(fused_edges, "triton", None)
    assert fused_edges.unavailable_reason(torch.device("cuda")) == \
        "triton is not installed (pip install 'molscale[gpu]')"


def test_the_fused_kernel_is_a_config_choice():
    ModelConfig(kernel="fused", atom_vocab=[1, 6]).validate()
    assert "fused" in egnn.KERNELS


def test_gpu_tiles_come_from_the_environment(monkeypatch):
    cuda = torch.device("cuda")
    fused_edges._gpu_tiles_from_env.cache_clear()
    # the defaults: small tiles where a recomputing backward follows, large ones for a forward alone
    assert fused_edges.tile_sizes(29, 256, cuda) == fused_edges.TRAINING_TILES
    assert fused_edges.tile_sizes(29, 256, cuda, differentiated=False) == fused_edges.FORWARD_TILES
    assert fused_edges.TRAINING_TILES != fused_edges.FORWARD_TILES
    monkeypatch.setenv("MOLSCALE_FUSED_TILES", "16,8,32,8")
    monkeypatch.setenv("MOLSCALE_FUSED_FORWARD_TILES", "8,8,64,4")
    fused_edges._gpu_tiles_from_env.cache_clear()
    assert fused_edges.tile_sizes(29, 256, cuda) == (16, 8, 32, 8)
    assert fused_edges.tile_sizes(29, 16, cuda) == (16, 8, 16, 8)  # never wider than H
    assert fused_edges.tile_sizes(29, 256, cuda, differentiated=False) == (8, 8, 64, 4)
    for name, differentiated in (("MOLSCALE_FUSED_TILES", True), ("MOLSCALE_FUSED_FORWARD_TILES", False)):
        for bad in ("8,8,64", "8,8,60,4", "2,4,64,4", "a,b,c,d"):
            fused_edges._gpu_tiles_from_env.cache_clear()
            monkeypatch.setenv(name, bad)
            with pytest.raises(ValueError, match=f"{name}="):
                fused_edges.tile_sizes(29, 256, cuda, differentiated)
        monkeypatch.delenv(name)
    fused_edges._gpu_tiles_from_env.cache_clear()


def test_a_forward_alone_takes_the_forward_tiles_and_a_differentiated_one_the_training_tiles(monkeypatch):
    asked = []

    def record(n, hp, device, differentiated=True):
        asked.append(differentiated)
        return 2, 4, 16, 1
    monkeypatch.setattr(fused_edges, "tile_sizes", record)
    block, h, pos, graph = block_and_inputs(16, [5, 3])
    block.kernel = "fused"
    with torch.no_grad():  # sampling, validation, prediction
        block(h, pos, graph)
    assert asked == [False, False]  # the message and the coordinate MLP
    asked.clear()
    h_out, pos_out = block(h.clone().requires_grad_(), pos, graph)
    (h_out.sum() + pos_out.sum()).backward()
    assert asked == [True, True]


def test_a_bad_weight_gradient_mode_is_refused(monkeypatch):
    monkeypatch.setenv("MOLSCALE_FUSED_WGRAD", "atomics")
    with pytest.raises(ValueError, match="MOLSCALE_FUSED_WGRAD='atomics': choose matmul or onchip"):
        fused_edges.weight_grad_mode()


def test_onchip_weight_gradients_over_row_blocks_and_molecule_groups(gpu_tiles, monkeypatch):
    """The on-chip reduction as a GPU runs it: several blocks of W_2's rows (16 each, H = 40) and molecule groups
    of two, the last one short (5 molecules in 3 groups)."""
    monkeypatch.setenv("MOLSCALE_FUSED_WGRAD", "onchip")
    monkeypatch.setattr(fused_edges, "WEIGHT_GRAD_GROUPS", 3)
    block, h, pos, graph = block_and_inputs(40, [5, 1, 3, 6, 2])
    out_e, grads_e = run_block(block, "eager", h, pos, graph)
    out_f, grads_f = run_block(block, "fused", h, pos, graph)
    assert_relative_close(out_f, out_e, 1e-12)
    assert_relative_close(grads_f, grads_e, 1e-12)


def test_a_forward_alone_falls_back_to_the_training_tiles_where_its_own_do_not_fit(monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources
    real, launched = fused_edges._edge_mlp_forward, []

    class SmallSharedMemory:  # a GPU whose programs get too little shared memory for row blocks of 4
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(args[13])  # BI
                if args[13] > 2:
                    raise OutOfResources(131584, 101376, "shared memory")
                return real[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(fused_edges, "_edge_mlp_forward", SmallSharedMemory())
    monkeypatch.setattr(fused_edges, "tile_sizes",
                        lambda n, hp, device, differentiated=True: (2, 4, 16, 1) if differentiated else (4, 4, 16, 1))
    block, h, pos, graph = block_and_inputs(16, [5, 3])
    expected, _ = run_block(block, "eager", h, pos, graph)
    block.kernel = "fused"
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="trainer"):
        h_out, pos_out = block(h, pos, graph)
    assert launched == [4, 2, 4, 2]  # each edge MLP: refused, then the training tiles
    assert "forward-alone tiles do not fit this GPU" in caplog.text
    torch.testing.assert_close(h_out, expected["h"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pos_out, expected["pos"], rtol=1e-10, atol=1e-10)
    # a differentiated forward has no smaller tiles to fall back to: the error is the user's to see
    monkeypatch.setattr(fused_edges, "tile_sizes", lambda n, hp, device, differentiated=True: (4, 4, 16, 1))
    with pytest.raises(OutOfResources):
        block(h.clone().requires_grad_(), pos, graph)
