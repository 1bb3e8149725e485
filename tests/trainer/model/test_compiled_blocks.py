"""model.kernel = 'compiled': the EGNN blocks through torch.compile compute what the eager blocks compute.

Compiling is slow on a CPU (a fresh on-disk cache: about 15 s per shape, forward and backward), so the shapes are
few and the model tiny; a second run loads the compiled code from the cache in well under a second per shape.
"""

import copy

import pytest
import torch

from molscale.trainer.model import egnn
from molscale.trainer.model.egnn import use_kernel
from molscale.trainer.model.networks import ModelConfig
from tests.trainer.helpers import make_batch, outputs, outputs_and_grads, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

# size buckets of a small QM9-like batch, each padded to its largest molecule: a 1-atom molecule padded to 2
# slots, molecules of several sizes with padding, one bucket padded beyond its largest molecule. The later
# buckets also take the gradient with respect to the input coordinates (as guidance does); that gives every
# block the same inputs, so each of them compiles once (a training step compiles twice: the first block's pos
# has no gradient).
BUCKETS = [([1, 2], None, False), ([4, 5, 3], None, True), ([6, 9, 7, 9], 10, True)]
HIDDEN = 16


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def was_compiled(batch_shape) -> bool:
    """A compiled call of this [B, N, H] input succeeded (no eager fallback)."""
    return any(key[0] == (*batch_shape, HIDDEN) for key in egnn._compiled_shapes)


@pytest.mark.slow  # compiles 3 shapes (forward and backward): about a minute on a cold cache
def test_compiled_blocks_match_eager_outputs_and_gradients(kind):
    compiled = tiny_model(kind, hidden=HIDDEN, layers=2, kernel="compiled")
    eager = use_kernel(copy.deepcopy(compiled), "eager")
    assert all(b.kernel == "compiled" for b in compiled.modules() if isinstance(b, egnn.EGNNBlock))
    for i, (num_atoms, n_max, pos_grad) in enumerate(BUCKETS):
        batch = make_batch(num_atoms, n_max=n_max, seed=10 + i)
        out_c, grads_c = outputs_and_grads(compiled, batch, seed=i, pos_grad=pos_grad)
        out_e, grads_e = outputs_and_grads(eager, batch, seed=i, pos_grad=pos_grad)
        assert was_compiled(batch["pos"].shape[:2])
        assert set(out_c) == set(out_e) and set(grads_c) == set(grads_e)
        assert min(float(g.abs().max()) for g in grads_e.values()) > 0  # every parameter gets a gradient
        torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads_c, grads_e, rtol=1e-10, atol=1e-12)
        print(f"{kind} {list(batch['pos'].shape[:2])}: outputs differ by at most {max_difference(out_c, out_e):.1e}, "
              f"gradients by {max_difference(grads_c, grads_e):.1e}")


@pytest.mark.slow  # compiles one shape when run alone
def test_a_copy_of_a_compiled_model_runs_compiled_on_its_own_weights():
    model = tiny_model(hidden=HIDDEN, layers=2, kernel="compiled")
    copied = copy.deepcopy(model)  # as the EMA and the export do
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    num_atoms, n_max, _ = BUCKETS[0]  # with gradients, as above: the compiled code is reused when run after it
    batch = make_batch(num_atoms, n_max=n_max, seed=3)
    expected = outputs(use_kernel(copy.deepcopy(copied), "eager"), batch, seed=0)
    got, original = outputs(copied, batch, seed=0), outputs(model, batch, seed=0)
    assert all(b.kernel == "compiled" for b in copied.modules() if isinstance(b, egnn.EGNNBlock))
    assert was_compiled(batch["pos"].shape[:2])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got["eps"] - original["eps"]).abs().max() > 1e-6  # the copy's weights, not the original's


@pytest.mark.slow  # compiles one float32 shape under autocast
def test_compiled_blocks_under_bf16_autocast(kind):
    """Linear layers in bf16, geometry and the residual stream in float32: the compiled blocks agree with the
    eager ones to bf16 rounding (Inductor keeps fused intermediates in float32, so they round less often)."""
    compiled = tiny_model(kind, hidden=HIDDEN, layers=2, dtype=torch.float32, kernel="compiled")
    eager = use_kernel(copy.deepcopy(compiled), "eager")
    batch = make_batch([4, 5, 3], dtype=torch.float32, seed=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = outputs(compiled, batch, seed=0), outputs(eager, batch, seed=0)
    assert was_compiled(batch["pos"].shape[:2])
    for key, value in expected.items():
        assert got[key].dtype == value.dtype == torch.float32
        torch.testing.assert_close(got[key], value, rtol=0, atol=2e-2 * float(value.abs().max()))


def test_the_compiled_kernel_keeps_the_parameter_names():
    eager, compiled = tiny_model(hidden=HIDDEN), tiny_model(hidden=HIDDEN, kernel="compiled")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())


def test_a_bad_kernel_is_refused():
    with pytest.raises(ValueError, match="model.kernel must be one of"):
        ModelConfig(kernel="inductor", atom_vocab=[1, 6]).validate()
