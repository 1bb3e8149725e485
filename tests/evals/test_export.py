"""python -m trainer.export: one .safetensors file with a card, loaded by generate and predict without the run
directory; corrupt and mismatched files give one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch

from tests.support import ROOT, cpu_env


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)


def test_export_card_and_loading_without_the_run_directory(tiny_checkpoint, qm9_small, tmp_path):
    out = tmp_path / "export" / "model.safetensors"
    r = run("-m", "trainer.export", tiny_checkpoint, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "export" / "model.safetensors.json").read_text())
    from molscale.trainer.artifacts import load_for_eval, read_model_states
    _, _, state = read_model_states(tiny_checkpoint)
    assert card["atom_vocab"] == [1, 6, 7, 8, 9] and card["properties"] == ["lumo"]
    assert card["property_units"] == {"lumo": "meV"} and card["weights"] == "ema"
    assert card["step"] == state["step"] == 6
    assert card["atom_count_histogram"] == {str(k): v for k, v in state["atom_count_histogram"].items()}
    manifest = open(os.path.join(qm9_small, "manifest.json"), "rb").read()
    assert card["dataset"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()

    alone = tmp_path / "elsewhere" / "model.safetensors"  # the file without its run directory or card copy
    alone.parent.mkdir()
    shutil.copy(out, alone)
    from molscale.trainer.model.sampling import sample
    from_run, from_file = load_for_eval(tiny_checkpoint), load_for_eval(str(alone))
    assert from_file.used_ema and from_file.atom_count_histogram == from_run.atom_count_histogram
    a = sample(from_run.model, torch.tensor([5, 9, 12]), steps=8, generator=torch.Generator().manual_seed(3))
    b = sample(from_file.model, torch.tensor([5, 9, 12]), steps=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["pos"], b["pos"]) and torch.equal(a["z"], b["z"])

    smi = tmp_path / "m.smi"
    smi.write_text("CCO ethanol\nc1ccccc1 benzene\n")
    r_run = run("evals/predict.py", "--checkpoint", tiny_checkpoint, "--input", str(smi),
                "--out", str(tmp_path / "a.csv"))
    r_file = run("evals/predict.py", "--checkpoint", str(alone), "--input", str(smi),
                 "--out", str(tmp_path / "b.csv"))
    assert r_run.returncode == 0 and r_file.returncode == 0, r_file.stderr[-3000:]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    r = run("evals/generate.py", "--checkpoint", str(alone), "--n-samples", "6", "--batch", "3", "--steps", "5",
            "--num-cpus", "2", "--no-wandb", "--out", str(tmp_path / "gen"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert metrics["n_samples"] == 6 and metrics["source"]["checkpoint"] == str(alone)


def test_corrupt_and_mismatched_files_are_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    good = tmp_path / "model.safetensors"
    assert run("-m", "trainer.export", tiny_checkpoint, "--out", str(good)).returncode == 0

    def predict(path):
        src = tmp_path / "m.smi"
        src.write_text("CCO\n")
        return run("evals/predict.py", "--checkpoint", str(path), "--input", str(src), "--out", str(tmp_path / "p.csv"))

    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:len(data) // 2])
    r = predict(truncated)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr, r.stderr
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # the last tensor's bytes
    r = predict(flipped)
    assert r.returncode == 2 and "do not match the digest in its card: the file is corrupt" in r.stderr, r.stderr

    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(good))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    from molscale.trainer.artifacts import CARD_KEY, weights_digest
    card = json.loads(metadata[CARD_KEY])
    card["weights_sha256"] = weights_digest(tensors)  # a consistent file whose weights miss one tensor
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(mismatched), metadata={CARD_KEY: json.dumps(card)})
    r = predict(mismatched)
    assert r.returncode == 2 and "do not fit the model its card describes" in r.stderr and dropped in r.stderr
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    r = predict(plain)
    assert r.returncode == 2 and "has no molscale card" in r.stderr
    r = predict(tmp_path / "missing.safetensors")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run("-m", "trainer.export", tiny_checkpoint, "--out", str(tmp_path / "model.pt"))
    assert r.returncode == 2 and "name the file *.safetensors" in r.stderr
