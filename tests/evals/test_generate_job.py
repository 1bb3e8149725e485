"""evals/generate.py end to end: a tiny real checkpoint, local Ray, `ray job submit`, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import RAY_NODE_PORT_FLAGS, ROOT, cpu_env, free_ports, generate, port_args, read_sdf_coords


def test_bad_input_is_refused_before_ray_starts(tiny_checkpoint, qm9_small, tmp_path):
    r = generate("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = generate("--checkpoint", str(empty), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "holds no complete checkpoint" in r.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    states = corrupt / "step00000006" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    r = generate("--checkpoint", str(corrupt), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "corrupt checkpoint" in r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--n-samples", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--n-samples must be at least 1" in r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--pair-budget", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--pair-budget must be at least 1" in r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--steps", "1001", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--steps 1001: this model's diffusion has T = 1000 steps" in r.stderr
    for guide, message in (("lumo", "give PROPERTY=VALUE"), ("homo=1", "not 'homo'")):
        r = generate("--checkpoint", tiny_checkpoint, "--guide", guide, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--guide", "lumo=1", "--guide-scale", "-1",
                 "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "must be positive, or 0" in r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--scorer", tiny_checkpoint, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "it needs --guide" in r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--cuda-graphs", "all", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--cuda-graphs: invalid choice: 'all'" in r.stderr
    r = generate("--checkpoint", tiny_checkpoint, "--steps", "10,x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "'10,x' is not a list of integers" in r.stderr
    r = generate("--dataset", qm9_small, "--steps", "10,5", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "it needs --checkpoint" in r.stderr
    r = generate("--dataset", qm9_small, "--split", "tset", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no split 'tset'" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout


def test_generate_locally_writes_every_output_and_depends_only_on_the_seed(tiny_checkpoint, tmp_path):
    common = ["--checkpoint", tiny_checkpoint, "--n-samples", "24", "--batch", "6", "--steps", "10",
              "--seed", "7", "--num-cpus", "2"]
    r2 = generate(*common, "--workers", "2", "--out", str(tmp_path / "two"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    out = tmp_path / "two"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("n_samples", "atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty"):
        assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0 or key == "n_samples", key
    assert metrics["n_samples"] == 24 and metrics["source"]["workers"] == 2
    plan = metrics["source"]["sampling_chunks"]  # the molecules sorted and cut by the pair budget of --batch 6
    assert sum(metrics["source"]["chunks_per_node"].values()) == plan["chunks"] and plan["pair_budget"] > 0
    assert 0 < plan["fixed_count_real_pair_fraction"] <= 1 and 0 < plan["real_pair_fraction"] <= 1
    assert {"atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1"} <= metrics.keys()
    for name in ("samples.sdf", "report.html", "atom_counts.png", "bond_lengths.png", "bond_angles.png"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    mols = read_sdf_coords(out / "samples.sdf")
    assert len(mols) == 24
    # whole-step graphs: the same molecules (on a CPU the graphs' steps run eagerly, from their device tables)
    r1 = generate(*common, "--workers", "1", "--no-wandb", "--property", "--cuda-graphs", "step",
                  "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert read_sdf_coords(tmp_path / "one" / "samples.sdf") == mols
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["source"]["cuda_graphs"] == "step" and metrics["source"]["cuda_graphs"] == "off"
    lumo = one["property_mae"]["lumo"]
    assert lumo["unit"] == "meV" and lumo["mae"] > 0 and lumo["n"] > 0
    assert lumo["predictor"] == "model" and lumo["baseline_mae"] > 0  # the train-mean baseline, same split
    assert lumo["atom_count_mae"] > 0 and lumo["atom_count_fit"].endswith(" train")  # the model's own train split
    r3 = generate(*common[:-4], "--seed", "8", "--num-cpus", "2", "--no-wandb", "--precision", "bf16",
                  "--sampler", "dpm2m", "--steps", "10,3", "--guide", "lumo=-300", "--guide-from", "300",
                  "--scorer", tiny_checkpoint, "--out", str(tmp_path / "other"))
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert read_sdf_coords(tmp_path / "other" / "samples.sdf") != mols
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    source = other["source"]
    assert (source["precision"], source["cuda_graphs"], source["sampler"]) == ("bf16", "off", "dpm2m")
    assert (source["steps"], source["network_evaluations"]) == (10, 11)
    guidance = other["guidance"]
    assert (guidance["property"], guidance["target"], guidance["start"]) == ("lumo", -300.0, 300)
    assert guidance["self_mae"] > 0 and guidance["scorer_mae"] == pytest.approx(guidance["self_mae"])  # same model
    assert source["guide"] == ["lumo", -300.0, 100.0, 300, "clean"]  # the default scale and reading
    assert guidance["on"] == "clean" and 0 <= guidance["cap_fraction"] <= 1
    assert other["guidance_cap_fraction"] == guidance["cap_fraction"]
    # the same rows over the RDKit-valid molecules alone (null when none is valid)
    assert guidance["n_valid"] == round(other["validity"] * other["n_samples"])
    assert (guidance["scorer_mae_valid"] is None) == (guidance["n_valid"] == 0)
    # the sweep: a row per K, the first one the outputs' own
    curve = other["steps_curve"]
    assert [(row["steps"], row["network_evaluations"]) for row in curve] == [(10, 11), (3, 4)]
    assert curve[0]["atom_stability"] == other["atom_stability"] and curve[1]["seconds_per_1000"] > 0
    assert (tmp_path / "other" / "steps_curve.png").stat().st_size > 0
    assert "Quality against sampling steps" in (tmp_path / "other" / "report.html").read_text()
    assert json.loads((out / "metrics.json").read_text())["source"]["precision"] == "fp32"
    assert json.loads((out / "metrics.json").read_text())["source"]["sampler"] == "ancestral"


def test_data_row_of_a_real_split(qm9_small, tmp_path):
    r = generate("--dataset", qm9_small, "--split", "test", "--out", str(tmp_path / "data"), "--num-cpus", "2",
                 "--no-wandb")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "data" / "metrics.json").read_text())
    from molscale.datasets.shards.manifest import load_manifest
    assert metrics["n_samples"] == load_manifest(qm9_small).count("test")
    assert metrics["atom_stability"] > 0.95 and metrics["validity"] > 0.9
    assert metrics["atom_type_tv"] < 0.1  # the test split against itself

    # the same molecules from a file (as another model's samples arrive), plus one record that cannot be read:
    # the same metrics, and the bad record counted
    from molscale.datasets.chemistry.elements import Z_TO_SYMBOL
    from molscale.evals.protocol.molecules import load_split_molecules
    lines = []
    for i, (z, pos) in enumerate(load_split_molecules(load_manifest(qm9_small), "test")):
        lines += [str(len(z)), f"test {i}"] + [f"{Z_TO_SYMBOL[int(a)]} {x:.6f} {y:.6f} {w:.6f}"
                                                for a, (x, y, w) in zip(z, pos)]
        if i == 2:
            lines += ["2", "a frame with a bad atom", "C 0 0 0", "Xx 1 0 0"]
    xyz = tmp_path / "samples.xyz"
    xyz.write_text("\n".join(lines) + "\n")
    r = generate("--molecules", str(xyz), "--reference", qm9_small, "--out", str(tmp_path / "file"),
                 "--num-cpus", "2", "--no-wandb")
    assert r.returncode == 0, r.stderr[-3000:]
    from_file = json.loads((tmp_path / "file" / "metrics.json").read_text())
    for key in ("n_samples", "atom_stability", "mol_stability", "validity", "uniqueness", "novelty", "atom_type_tv",
                "bond_length_w1", "valency_w1"):
        assert from_file[key] == pytest.approx(metrics[key], abs=1e-6), key
    source = from_file["source"]
    assert (source["records"], source["evaluated"]) == (metrics["n_samples"] + 1, metrics["n_samples"])
    assert source["rejected"] == {"unknown element symbol": 1}
    assert source["rejected_records"][0]["index"] == 3 and "'Xx'" in source["rejected_records"][0]["reason"]
    assert (tmp_path / "file" / "report.html").stat().st_size > 0
    smi = tmp_path / "samples.smi"
    smi.write_text("CCO\n")
    r = generate("--molecules", str(smi), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "SMILES carry no 3D coordinates" in r.stderr


def test_ray_job_submit_against_a_local_cluster(tiny_checkpoint, tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    component_flags = (*RAY_NODE_PORT_FLAGS, "--ray-client-server-port")  # else the job agent may not start
    gcs, dash, *component_ports = free_ports(2 + len(component_flags))
    # a throwaway loopback cluster: no token auth between our own ray CLI calls
    env = cpu_env(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), RAY_AUTH_MODE="disabled")
    start = subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--port", str(gcs),
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                            *port_args(component_flags, component_ports),
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        out = tmp_path / "job-out"
        job = subprocess.run([ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ROOT,
                              "--", "python", "evals/generate.py", "--checkpoint", tiny_checkpoint,
                              "--n-samples", "12", "--batch", "6", "--steps", "5", "--no-wandb", "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n_samples"] == 12
        assert len(read_sdf_coords(out / "samples.sdf")) == 12
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_wandb_report_layout():
    """The Reports API object an online run saves (saving needs a W&B server, so only the build is tested)."""
    import wandb_workspaces.reports.v2 as wr

    from molscale.evals.outputs.wandb_report import build_report
    report = build_report("team", "molscale-evals", "eval-7", {"n_samples": 10, "validity": 0.5, "mol_stability": None,
                                                               "atom_type_tv": 0.25, "mae_lumo": 31.5})
    assert isinstance(report, wr.Report) and report.project == "molscale-evals" and report.entity == "team"
    table = report.blocks[1].text
    assert "| validity | 0.5000 |" in table and "| mol_stability | undefined |" in table
    assert "| mae_lumo | 31.5000 |" in table and "| atom_type_tv | 0.2500 |" in table
    grid = report.blocks[2]
    assert grid.runsets[0].query == "eval-7"
    assert grid.panels[0].metrics == ["atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique",
                                      "novelty"]
