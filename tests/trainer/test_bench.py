"""python -m trainer.bench: runs end to end and reports the documented fields."""

import json

import pytest

from molscale.trainer import bench

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ["--layers", "2", "--hidden", "16", "--batch", "6", "--warmup", "0", "--iters", "1",
         "--sample-iters", "1", "--sample-steps", "2"]


@pytest.fixture
def small_histogram(monkeypatch):
    monkeypatch.setattr(bench, "train_atom_count_histogram", lambda: {4: 2, 9: 5, 12: 1})


@pytest.mark.parametrize("model", ["unigem", "edm"])
def test_bench_json_reports_all_layouts(small_histogram, capsys, model):
    bench.main(["--json", "--device", "cpu", "--model", model, "--layout", "all", *SMALL])
    report = json.loads(capsys.readouterr().out)
    for key in ("train_step_ms", "train_molecules_per_s", "sample_step_ms", "sample_molecules_per_s"):
        assert report[key] > 0, key
        assert report["edge_list"][key] > 0 and report["edge_list_real"][key] > 0
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["model"] == model
    assert (report["batch"], report["layers"], report["hidden"]) == (6, 2, 16)
    assert report["num_atoms_max"] <= 12 and 4 <= report["num_atoms_mean"] <= 12
    assert report["train_speedup_vs_edge_list"] == pytest.approx(
        report["edge_list"]["train_step_ms"] / report["train_step_ms"])
    # sampling throughput is for whole T-step trajectories
    assert report["sample_molecules_per_s"] == pytest.approx(6 / (report["sample_step_ms"] / 1e3 * 1001))


def test_bench_draws_sizes_and_vocabulary_from_a_datasets_manifest(qm9_small, capsys, monkeypatch):
    monkeypatch.setattr(bench, "train_atom_count_histogram", lambda: pytest.fail("read qm9pack despite --manifest"))
    bench.main(["--json", "--device", "cpu", "--manifest", qm9_small, *SMALL])
    report = json.loads(capsys.readouterr().out)
    from molscale.datasets.shards.manifest import load_manifest
    sizes = load_manifest(qm9_small).atom_count_histogram("train")
    assert min(sizes) <= report["num_atoms_mean"] and report["num_atoms_max"] <= max(sizes)
    assert report["train_step_ms"] > 0


def test_bench_text_output_in_bf16(small_histogram, capsys):
    bench.main(["--dtype", "bf16", *SMALL])
    out = capsys.readouterr().out
    assert "bf16" in out and "train step" in out and "sample step" in out


def test_operator_counts_grow_with_size_chunks_and_match_the_parameter_count(small_histogram, capsys):
    """The launch-count proxy: one EMA update is one fused _foreach_lerp_ over a parameter list made once; splitting
    a batch into size chunks runs the network once per chunk, so it only adds calls."""
    def calls(*extra):
        bench.main(["--json", "--device", "cpu", *SMALL, *extra])
        return json.loads(capsys.readouterr().out)["operator_calls"]
    whole, chunked = calls("--chunk-cost-pairs", "none"), calls("--chunk-cost-pairs", "0")
    assert whole["ema_update"] == 1
    assert chunked["train_step (forward, backward, AdamW)"] > whole["train_step (forward, backward, AdamW)"] > 0
    assert chunked["sample_step"] > whole["sample_step"] > 0
    # a whole denoising step replayed as one graph: the host calls nothing per step (a call's set-up cancels)
    assert whole["sample_step replayed as one graph (host)"] == chunked["sample_step replayed as one graph (host)"] == 0


@pytest.mark.parametrize("graphs", ["off", "step"])  # step: on the CPU the whole-step body, run eagerly
def test_bench_times_the_trainers_real_step_and_names_its_parts(qm9_small, capsys, monkeypatch, graphs):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # the paper's 9 blocks (thin ones): the loop's own work is a fixed number of kernels, the network's grows with
    # the blocks; whole batches (size chunks read atom counts on the host, which on the CPU is not a device read)
    bench.main(["--json", "--device", "cpu", "--manifest", qm9_small, "--engine", *SMALL, "--layers", "9",
                "--chunk-cost-pairs", "none", "--graphs", graphs])
    report = json.loads(capsys.readouterr().out)
    engine = report["engine"]
    assert engine["train_step_ms"] > 0 and engine["model_only_step_ms"] > 0
    assert engine["engine_over_model"] == pytest.approx(engine["train_step_ms"] / engine["model_only_step_ms"])
    assert engine["train_molecules_per_s"] == pytest.approx(6 / (engine["train_step_ms"] / 1e3))
    # the real step does the model's work and a little more (clipping, the skip logic, EMA), and reads nothing
    model_only = report["counts"]["train_step"]
    assert model_only["kernels"] < engine["counts"]["kernels"] <= 1.1 * model_only["kernels"]
    assert engine["counts"]["syncs"] == 0 and model_only["GFLOP"] > 0
    assert engine["counts"]["GFLOP"] == pytest.approx(model_only["GFLOP"], rel=0.01)
    for part in ("DeepSpeed", "ZeRO-0", "clipping adaptive", "EMA 0.9999", "0 host reads per step",
                 f"train.cuda_graphs {graphs}"):
        assert part in engine["parts"], part
    # once the whole step is a graph the host copies the batch's 5 tensors into its buffers and replays
    assert engine.get("host_calls_per_replayed_step") == (5 if graphs == "step" else None)


def test_bench_engine_needs_a_dataset():
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--engine", *SMALL])
    assert exit_info.value.code == 2


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's sigmoid in Triton's interpreter
def test_the_fused_kernel_writes_no_hidden_wide_edge_tensors_when_sampling(small_histogram, capsys):
    """The counts of model.kernel = 'fused' (under Triton's interpreter): a sampling step writes only per-pair
    scalars and 3-vectors in edge shape (no [B, N, N, H]); a training step writes its backward's two H-wide
    tensors per edge MLP instead of the eager block's dozen, and does more arithmetic (the recomputation)."""
    def report(kernel):
        bench.main(["--json", "--device", "cpu", *SMALL, "--hidden", "32", "--chunk-cost-pairs", "none",
                    "--kernel", kernel])
        return json.loads(capsys.readouterr().out)
    eager, fused = report("eager")["counts"], report("fused")
    # one network evaluation writes less in edge shape than a single [B, N, N, H] float32 tensor per block would
    one_wide_tensor_per_block_mb = 6 * fused["num_atoms_max"] ** 2 * 32 * 4 * 2 / 1e6
    fused = fused["counts"]
    assert fused["sample_step"]["edge_MB"] < one_wide_tensor_per_block_mb < eager["sample_step"]["edge_MB"]
    assert fused["sample_step"]["kernels"] < eager["sample_step"]["kernels"]
    assert fused["train_step"]["edge_MB"] < eager["train_step"]["edge_MB"] / 2
    assert eager["train_step"]["GFLOP"] < fused["train_step"]["GFLOP"] < 2 * eager["train_step"]["GFLOP"]


def test_the_edge_list_layouts_are_eager_benchmark_references(small_histogram):
    """The research code's layout lives with the benchmark: the production model has no layout setting, and the
    bench refuses to combine the eager-only references with another kernel."""
    import dataclasses

    from molscale.trainer.model.networks import ModelConfig
    assert "layout" not in {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(SystemExit, match="--kernel compiled runs the dense layout only"):
        bench.main(["--device", "cpu", "--kernel", "compiled", "--layout", "both", *SMALL])
