"""The Python API (molscale.evals.api) on a real checkpoint: what the README's example does, and that it agrees
with the command lines' own functions."""

import numpy as np
import pytest

from molscale.evals.api import Molecule, load_model, predict_properties, sample_molecules


def test_sample_and_predict_as_the_readme_shows(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    assert not model.training and model.cfg.properties == ["lumo"]
    molecules = sample_molecules(model, 3, steps=4, seed=0, atom_counts=[5, 9, 3])
    assert [len(m.atomic_numbers) for m in molecules] == [5, 9, 3]
    assert all(m.positions.shape == (len(m.atomic_numbers), 3) and np.isfinite(m.positions).all()
               for m in molecules)
    assert set(np.concatenate([m.atomic_numbers for m in molecules]).tolist()) <= set(model.cfg.atom_vocab)
    again = sample_molecules(model, 3, steps=4, seed=0, atom_counts=[5, 9, 3])
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(molecules, again))  # seeded
    graphed = sample_molecules(model, 3, steps=4, seed=0, atom_counts=[5, 9, 3], step_graphs=True)
    assert all(np.array_equal(a.positions, b.positions) and np.array_equal(a.atomic_numbers, b.atomic_numbers)
               for a, b in zip(molecules, graphed))  # (on the CPU the graphs' steps run eagerly)

    rows = predict_properties(model, ["CCO", "not a smiles", molecules[1],
                                      Molecule(np.array([6, 92]), np.zeros((2, 3), np.float32))], conformers=2)
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok", "rejected"]
    assert set(rows[0]["values"]) == {"lumo"} and rows[0]["values"]["lumo"][1] >= 0
    assert "unknown to the model" in rows[3]["reason"]
    # a Molecule is predicted as evals/predict.py predicts a conformer: same number, translation ignored
    from molscale.evals.property_prediction import predict_conformers
    pos = molecules[1].positions
    (expected,) = predict_conformers(model, [(molecules[1].atomic_numbers, pos)], 1)
    shifted = Molecule(molecules[1].atomic_numbers, pos + 3.0)
    assert predict_properties(model, [shifted])[0]["values"]["lumo"][0] == pytest.approx(float(expected[0]), rel=1e-5)


def test_sizes_from_a_histogram_and_bad_requests(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    molecules = sample_molecules(model, 4, steps=2, seed=1, histogram={4: 1, 6: 3})
    assert {len(m.atomic_numbers) for m in molecules} <= {4, 6}
    with pytest.raises(ValueError, match="give atom_counts"):
        sample_molecules(model, 2, steps=2)
    with pytest.raises(ValueError, match="must be 2 positive integers"):
        sample_molecules(model, 2, steps=2, atom_counts=[3, 0])


def test_the_readme_example_runs_on_an_exported_model(tiny_checkpoint, tmp_path, capsys):
    import re
    import subprocess
    import sys

    from tests.support import ROOT, cpu_env
    exported = tmp_path / "model.safetensors"
    r = subprocess.run([sys.executable, "-m", "trainer.export", tiny_checkpoint, "--out", str(exported)],
                       capture_output=True, text=True, timeout=300, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    readme = open(f"{ROOT}/README.md").read()
    example = re.search(r"```python\n(from molscale\.evals\.api .*?)```", readme, re.S).group(1)
    assert '"runs/cpu_demo/model.safetensors"' in example
    exec(example.replace("runs/cpu_demo/model.safetensors", str(exported)).replace("steps=100", "steps=3"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and printed[4].startswith("CCO ok {'lumo': (")
