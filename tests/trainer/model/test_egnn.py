"""Symmetries and layout equivalence of the networks, in float64."""

import pytest
import torch

from molscale.trainer.model.egnn import DenseGraph, EGNNBlock
from molscale.trainer.model.networks import UniGEM
from tests.trainer.helpers import make_batch, random_orthogonal, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_ATOMS = [3, 7, 5, 9]
TIMES = torch.tensor([4, 600, 10, 999])


def run(model, pos, batch, t=TIMES):
    """Network outputs for noised coordinates pos; UniGEM through the growth branch with its heads."""
    if isinstance(model, UniGEM):
        return model.denoise(pos, batch["node_mask"], t, "growth", heads=True)
    h = model.atom_features(batch["atom_type"], batch["node_mask"], pos.dtype) + 0.1
    return model.denoise(pos, h * batch["node_mask"][..., None], batch["node_mask"], t)


@pytest.mark.parametrize("reflect", [False, True])
def test_e3_equivariance(kind, reflect):
    model = tiny_model(kind)
    batch = make_batch(NUM_ATOMS, seed=1)
    pos = batch["pos"]
    rot = random_orthogonal(seed=2, reflect=reflect)
    shift = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    moved = (pos @ rot.T + shift) * batch["node_mask"][..., None]
    out, out_moved = run(model, pos, batch), run(model, moved, batch)
    assert out["eps"].abs().max() > 1e-6  # not trivially zero
    torch.testing.assert_close(out_moved["eps"], out["eps"] @ rot.T, atol=1e-10, rtol=1e-9)
    for key in set(out) - {"eps"}:  # atom types, properties (UniGEM); eps_h (EDM): invariant
        torch.testing.assert_close(out_moved[key], out[key], atol=1e-10, rtol=1e-9)


def test_block_equivariance_of_coordinates():
    torch.manual_seed(0)
    block = EGNNBlock(8).double()
    torch.nn.init.normal_(block.coord_out.weight, std=0.5)  # a visible coordinate update
    batch = make_batch([4, 6], seed=3)
    pos, mask = batch["pos"], batch["node_mask"]
    h = torch.randn(2, 6, 8, dtype=torch.float64) * mask[..., None]
    rot = random_orthogonal(seed=4, reflect=True)
    h1, x1 = block(h, pos, DenseGraph.build(pos, mask))
    moved = pos @ rot.T + 3.0
    h2, x2 = block(h, moved, DenseGraph.build(moved, mask))
    assert (x1 - pos).abs().max() > 1e-3
    torch.testing.assert_close(h2, h1, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x2, (x1 @ rot.T + 3.0) * mask[..., None], atol=1e-10, rtol=1e-9)


def test_permutation_equivariance(kind):
    model = tiny_model(kind)
    batch = make_batch(NUM_ATOMS, seed=5)
    perm = torch.arange(9)
    perm[:7] = torch.randperm(7, generator=torch.Generator().manual_seed(0))  # molecule 1 has 7 real atoms
    permuted = dict(batch)  # only molecule 1's atoms are permuted; its padding stays at the end
    for key in ("pos", "atom_type"):
        permuted[key] = batch[key].clone()
        permuted[key][1] = batch[key][1, perm]
    out, out_perm = run(model, batch["pos"], batch), run(model, permuted["pos"], permuted)
    for key, value in out.items():
        if key == "props":
            torch.testing.assert_close(out_perm[key], value, atol=1e-10, rtol=1e-9)
            continue
        expected = value.clone()
        expected[1] = value[1, perm]
        torch.testing.assert_close(out_perm[key], expected, atol=1e-10, rtol=1e-9)


def test_padding_changes_nothing_for_real_atoms(kind):
    model = tiny_model(kind)
    batch = make_batch(NUM_ATOMS, seed=6)
    padded = make_batch(NUM_ATOMS, n_max=14, seed=6)  # same molecules, 5 more padding slots
    padded["pos"][:, :9] = batch["pos"]
    padded["atom_type"][:, :9] = batch["atom_type"]
    # garbage in the padding: padding is identified by node_mask only
    garbage = torch.randn(4, 14, 3, dtype=torch.float64) * 10
    padded["pos"] = torch.where(padded["node_mask"][..., None], padded["pos"], garbage)
    out, out_padded = run(model, batch["pos"], batch), run(model, padded["pos"], padded)
    for key, value in out.items():
        if key == "props":
            torch.testing.assert_close(out_padded[key], value, atol=1e-10, rtol=1e-9)
        else:
            torch.testing.assert_close(out_padded[key][:, :9], value, atol=1e-10, rtol=1e-9)
            assert out_padded[key][:, 9:].abs().max() == 0


def test_reference_layouts_compute_the_same_function(kind):
    model = tiny_model(kind)
    batch = make_batch(NUM_ATOMS, seed=7)
    dense = run(model, batch["pos"], batch)
    from molscale.trainer.reference_edgelist import GRAPH_LAYOUTS
    for layout in ("edge-list", "edge-list-real"):
        model.graph_builder = GRAPH_LAYOUTS[layout]  # as trainer.bench sets it
        other = run(model, batch["pos"], batch)
        for key in dense:
            torch.testing.assert_close(other[key], dense[key], atol=1e-10, rtol=1e-9)


def test_size_chunks_do_not_change_the_loss_or_gradients(kind):
    batch = make_batch([3, 9, 4, 8, 5, 9, 2, 6], seed=8)
    results = []
    for cost in (None, 0):  # one padded batch vs one chunk per distinct size
        model = tiny_model(kind, chunk_cost_pairs=cost)
        terms = model(batch, generator=torch.Generator().manual_seed(3))
        terms["loss"].backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (terms_a, grads_a), (terms_b, grads_b) = results
    for key in terms_a:
        torch.testing.assert_close(terms_b[key], terms_a[key], atol=1e-12, rtol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-12, rtol=1e-9)


def test_bf16_autocast_keeps_geometry_float32(kind):
    model = tiny_model(kind, dtype=torch.float32)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in make_batch(NUM_ATOMS, seed=9).items()}
    exact = run(model, batch["pos"], batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(model, batch["pos"], batch)
        loss = model(batch, generator=torch.Generator().manual_seed(0))["loss"]
    assert low["eps"].dtype == torch.float32 and loss.dtype == torch.float32
    scale = exact["eps"].abs().max()
    assert (low["eps"] - exact["eps"]).abs().max() < 0.05 * scale
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
