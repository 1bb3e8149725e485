"""Loss reductions (LossConfig): the released UniGEM code's 'reference' reduction, recomputed here from the network
outputs, and the per-molecule reduction with a nominal batch, under which a molecule weighs the same in any batch."""

import pytest
import torch
import torch.nn.functional as F

from molscale.trainer.model.diffusion import LossConfig, com_free_noise
from tests.trainer.helpers import make_batch, tiny_model

SIZES = [9, 4, 17, 12, 6, 15, 3, 11, 8, 14, 5, 13, 7, 16]  # 14 molecules, 3 to 17 atoms
T_N = 10


def times(n, seed=0):
    """Half growth phase (t <= t_n), half nucleation, interleaved, fixed by seed."""
    gen = torch.Generator().manual_seed(seed)
    growth = torch.randint(0, T_N + 1, (n,), generator=gen)
    nucleation = torch.randint(T_N + 1, 1001, (n,), generator=gen)
    return torch.where(torch.arange(n) % 2 == 0, growth, nucleation)


def with_loss(model, **loss):
    model.loss_cfg = LossConfig(**loss)
    model.loss_cfg.validate()
    return model


def sub_batch(batch, idx):
    """Molecules idx of a batch, padded to their own largest molecule (as the loader would batch them)."""
    n_max = int(batch["num_atoms"][idx].max())
    return {k: (v[idx][:, :n_max] if v.dim() >= 2 and k != "props" else v[idx]) for k, v in batch.items()}


def test_reference_reduction_is_the_released_formula():
    """The released code (en_diffusion.py compute_error / compute_loss, l2): per molecule 0.5 x sum of squared eps
    errors / (3 x the batch's padded size); atom-type L1 masked, averaged over the padded size and channels; property
    L1; both only for t <= t_n; then the mean over the whole batch."""
    model = with_loss(tiny_model(chunk_cost_pairs=None), reduction="reference").eval()
    batch = make_batch(SIZES, n_max=20)  # padded beyond the largest molecule (17): the reference uses 17
    t = times(len(SIZES))
    eps = com_free_noise(batch["pos"].shape, batch["node_mask"], torch.Generator().manual_seed(3), torch.float64)
    terms = model(batch, t=t, eps=eps)

    alpha, sigma = model.schedule.alpha_sigma(t, torch.float64)
    pos_t = alpha[:, None, None] * batch["pos"] + sigma[:, None, None] * eps
    growth = t <= T_N
    n_pad, k = 17, model.num_atom_types
    per_molecule = torch.zeros(len(SIZES), dtype=torch.float64)
    for i in range(len(SIZES)):
        one = slice(i, i + 1)
        out = model.denoise(pos_t[one], batch["node_mask"][one], t[one], "growth" if growth[i] else "nucleation",
                            heads=bool(growth[i]))
        per_molecule[i] = 0.5 * (out["eps"] - eps[one]).square().sum() / (3 * n_pad)
        if growth[i]:
            target = F.one_hot(batch["atom_type"][one], k).double() * 0.25
            type_err = (out["atom_type"] - target).abs() * batch["node_mask"][one, :, None]
            per_molecule[i] += type_err.sum() / (n_pad * k)
            prop_target = (batch["props"][one] - torch.tensor([1.0, 2.0])) / torch.tensor([3.0, 0.5])
            per_molecule[i] += (out["props"] - prop_target).abs().sum()
    torch.testing.assert_close(terms["loss"], per_molecule.mean(), rtol=1e-9, atol=1e-12)


def test_reference_reduction_takes_the_global_padded_size_when_given():
    model = with_loss(tiny_model(chunk_cost_pairs=None), reduction="reference").eval()
    batch = make_batch(SIZES[:4])
    t, eps = times(4), com_free_noise(batch["pos"].shape, batch["node_mask"], torch.Generator().manual_seed(1),
                                      torch.float64)
    local = model(batch, t=t, eps=eps)
    wider = model({**batch, "reference_atoms": torch.tensor(34.0)}, t=t, eps=eps)  # twice the local largest (17)
    torch.testing.assert_close(wider["eps"], local["eps"] / 2)


def test_nominal_batch_weighs_every_molecule_alike_in_batches_of_any_size():
    """With loss.nominal_batch the loss of a batch is the sum of its molecules' contributions, so splitting 14
    molecules into batches of 2 and 12 (very different sizes, as atom-pair budgets make them) changes nothing.
    A mean over each batch (no nominal batch) weighs the molecules of the small batch 6x more."""
    model = tiny_model(chunk_cost_pairs=None).eval()
    batch = make_batch(SIZES)
    t = times(len(SIZES))
    eps = com_free_noise(batch["pos"].shape, batch["node_mask"], torch.Generator().manual_seed(2), torch.float64)
    small, large, everything = torch.tensor([2, 3]), torch.tensor([0, 1] + list(range(4, 14))), torch.arange(14)

    def loss(idx):  # each batch keeps its molecules' times and noise, padded to its own largest molecule
        return model(sub_batch(batch, idx), t=t[idx], eps=eps[idx][:, : int(batch["num_atoms"][idx].max())])["loss"]

    with_loss(model, nominal_batch=16)
    torch.testing.assert_close(loss(small) + loss(large), loss(everything), rtol=1e-9, atol=1e-12)
    with_loss(model)  # a mean over each batch: the small batch's two molecules weigh 1/2 each, not 1/16
    assert abs((loss(small) + loss(large)) / loss(everything) - 1) > 0.2


def test_edm_nominal_batch_divides_by_the_fixed_count():
    model = tiny_model("edm", chunk_cost_pairs=None).eval()
    batch = make_batch(SIZES[:3])
    t = times(3)

    def loss(**kw):
        return with_loss(model, **kw)(batch, t=t, generator=torch.Generator().manual_seed(5))["loss"]

    torch.testing.assert_close(loss(nominal_batch=30), loss() * 3 / 30)


def test_loss_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="loss.reduction"):
        LossConfig(reduction="sum").validate()
    with pytest.raises(ValueError, match="loss.nominal_batch"):
        LossConfig(reduction="reference", nominal_batch=64).validate()
