"""The numbers that matter on one GPU, in one short run (`make gpu-check`).

    python -m trainer.gpu_check [--data data/qm9] [--out runs/gpu_check] [--train-seconds 30] [--samples 10000]
    python -m trainer.gpu_check --device cpu --quick --data DATASET --out DIR    # a rehearsal on the CPU

Each part runs as its own process with a time limit, so one failure does not lose the others; results go to
OUT/gpu_check.json as each part ends, and a table is printed at the end:

1. bench: `python -m trainer.bench` in bf16 and fp32 (TF32 matrix products), per kernel path (eager, compiled, fused):
   training and sampling molecules/s, kernels, host syncs, edge-shaped bytes and FLOPs per step, and (eager) the
   real trainer's step beside the model's;
2. equality: the compiled and the fused EGNN blocks against the eager ones on the GPU, in fp32 without TF32 (max abs
   difference of the loss and of the parameter gradients, relative to their largest value), and the whole training
   step captured as CUDA graphs against the same step run eagerly (weights and EMA after 9 steps of two Trainers);
   tune: the fused kernels' tiles (pairs per program, feature chunk, warps) and the two ways of reducing W_2's
   gradient, by GPU kernel time of one block's forward and backward at the recipe's size and of a forward alone
   at a sampling chunk's (set them with MOLSCALE_FUSED_TILES, MOLSCALE_FUSED_FORWARD_TILES, MOLSCALE_FUSED_WGRAD);
3. training: `trainer/main.py` with the paper's QM9 recipe (cluster/qm9_1gpu.json) for --train-seconds per path
   from its first logged step (by default: the network as CUDA graphs in bf16, the whole step as one graph per
   batch shape in bf16 and TF32 and with fused kernels, compiled blocks in bf16; also selectable: the network's
   graphs in TF32 and with fused kernels), stopped by SIGTERM (which saves a checkpoint); training molecules/s is
   the median of metrics.jsonl's lines after the first two (graph captures and compilation happen mostly there);
4. sampling: the network's sampling speed in this process (no Ray, no RDKit): --samples molecules drawn from the
   dataset's histogram, sampled with 20 denoising steps (21 network evaluations; 4 steps with --quick) by the
   first training path's checkpoint (a fresh recipe model if there is none), eager and fused, bf16 autocast as
   `generate --precision bf16`; the time scaled to the paper's 1,000 steps (x 1001 / 21); and how far the fused
   samples drawn in fp32 (TF32 off) land from the eager ones with the same seed (per molecule, the largest
   coordinate difference: median, 99th percentile, largest), beside the same for eager TF32 against eager fp32
   as the yardstick: a trajectory amplifies any rounding difference, so only the comparison of the two says
   something; and each denoising step as one CUDA graph (`generate --cuda-graphs step`) in bf16 (eager and fused)
   and fp32, the fp32 samples compared with the eager ones in the same way (a failed capture is listed under the
   path's "warnings"); and, in bf16, the same molecules cut into the chunks that generate.py's Ray samplers take
   at its default --batch 250 (one sample() call per chunk, "-chunks-250"), step by step and with whole-step
   graphs, where a step is short enough for the host's launches to matter;
5. generate: `evals/generate.py` end to end on that checkpoint (Ray, the EDM metrics), eager and fused.

`--parts` picks and orders the parts; `--bench-runs` and `--train-paths` pick the runs inside bench and train
(a short device lease runs the most important first).

On an H200 (BENCHMARKS.md, "One GPU: H200") `--train-seconds 30 --train-paths graphs-bf16,fused-bf16,graphs-tf32
--bench-runs bf16-eager,bf16-fused,fp32-eager,fp32-fused,bf16-compiled --parts equality,train,sampling,tune,bench`
took 323 s: equality 38 s, training 98 s, sampling 39 s, tune 28 s, bench 121 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (kernel, precision, each denoising step one CUDA graph, molecules per call) of the sampling part, in the order
# they run; molecules per call None: all in one sample() call (which cuts its own chunks), a number: the chunks
# that generate.py's Ray samplers get at that --batch (250 is its default)
SAMPLING_PATHS = [("eager", "bf16", False, None), ("fused", "bf16", False, None), ("eager", "fp32", False, None),
                  ("fused", "fp32", False, None), ("eager", "tf32", False, None),
                  ("eager", "bf16", True, None), ("fused", "bf16", True, None), ("eager", "fp32", True, None),
                  ("eager", "bf16", False, 250), ("eager", "bf16", True, 250), ("fused", "bf16", True, 250)]
# (name, run-config overrides) of the training paths, the first of which is sampled from
# (graphs-: the network as CUDA graphs; step-: the whole training step as one graph per batch shape)
TRAIN_PATHS = [("graphs-bf16", ["train.cuda_graphs=true", "deepspeed.bf16=true"]),
               ("step-bf16", ["train.cuda_graphs=\"step\"", "deepspeed.bf16=true"]),
               ("step-fused-bf16", ["model.kernel=\"fused\"", "train.cuda_graphs=\"step\"", "deepspeed.bf16=true"]),
               ("compiled-bf16", ["model.kernel=\"compiled\"", "train.cuda_graphs=false", "deepspeed.bf16=true"]),
               ("graphs-tf32", ["train.cuda_graphs=true", "deepspeed.bf16=false"]),
               ("step-tf32", ["train.cuda_graphs=\"step\"", "deepspeed.bf16=false"]),
               ("fused-bf16", ["model.kernel=\"fused\"", "train.cuda_graphs=true", "deepspeed.bf16=true"])]
# what `make gpu-check` trains unless told otherwise: the baseline, the whole-step paths and compiled blocks (the
# network's graphs in TF32 and with fused kernels were measured on the H200: BENCHMARKS.md); about 1 minute each
DEFAULT_TRAIN_PATHS = ["graphs-bf16", "step-bf16", "step-fused-bf16", "compiled-bf16", "step-tf32"]
# the fused kernels' GPU tiles tried by `tune`: (rows i, columns j, feature chunk, warps), the defaults first
# (model/fused_edges.py); each choice compiles its kernels (a few seconds each). Training tiles run a block's
# forward and backward at the recipe's batch; forward tiles a forward alone at a sampling chunk's size
TRAINING_TILE_CANDIDATES = [(4, 4, 32, 4), (4, 8, 32, 8), (8, 8, 32, 8), (2, 8, 32, 4)]
FORWARD_TILE_CANDIDATES = [(8, 16, 32, 8), (4, 8, 32, 8), (16, 8, 64, 8), (8, 16, 32, 16)]
# ...training tiles also with the on-chip reduction of W_2's gradient (MOLSCALE_FUSED_WGRAD)
ONCHIP_CANDIDATES = [(4, 4, 32, 4)]
SAMPLING_CHUNK = 10000  # molecules in tune's forward-alone measurement
SAMPLE_STEPS = 20
QUICK_SAMPLE_STEPS = 4  # the rehearsal: Triton's interpreter makes every fused evaluation cost seconds
PAPER_STEPS = 1000


def bench_runs() -> list[str]:
    """Every bench run, DTYPE-KERNEL, for the kernel paths the model has (egnn.KERNELS)."""
    from molscale.trainer.model.egnn import KERNELS
    return [f"{dtype}-{kernel}" for dtype in ("bf16", "fp32") for kernel in KERNELS]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a rehearsal of every part)")
    p.add_argument("--data", default="data/qm9", help="a built QM9 dataset (python -m datasets build qm9)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs and gpu_check.json")
    p.add_argument("--config", default="cluster/qm9_1gpu.json", help="the training recipe")
    p.add_argument("--train-seconds", type=float, default=30.0,
                   help="training time per path, from its first logged step, before SIGTERM")
    p.add_argument("--samples", type=int, default=10000, help="molecules to sample")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in the order given: {','.join(PARTS)} (sampling and "
                        f"generate read the first training path's checkpoint)")
    p.add_argument("--bench-runs", default=",".join(bench_runs()),
                   help=f"the bench's runs, DTYPE-KERNEL, in the order given (default: {','.join(bench_runs())})")
    p.add_argument("--train-paths", default=",".join(DEFAULT_TRAIN_PATHS),
                   help=f"the training paths to run, in the order given, of {','.join(n for n, _ in TRAIN_PATHS)} "
                        f"(default: {','.join(DEFAULT_TRAIN_PATHS)}; the first one trained is the one sampled from)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and few iterations (the CPU rehearsal; the numbers mean nothing)")
    return p.parse_args(argv)


def env_for(args) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run(cmd: list[str], args, timeout: float, log_name: str, stop_after: float | None = None,
        clock_starts_at: str | None = None) -> int:
    """Run ``cmd`` with output to OUT/<log_name>.log; SIGTERM after ``stop_after`` seconds (a graceful stop),
    counted from when the file ``clock_starts_at`` has content (a run's first metrics line: its SIGTERM handler is set
    by then, and start-up is not training time) if given; killed at ``timeout``. Returns the exit code (124 when
    killed)."""
    with open(os.path.join(args.out, f"{log_name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env_for(args), cwd=ROOT)
        if stop_after is not None and clock_starts_at is not None:
            began = time.monotonic()
            while not _has_content(clock_starts_at) and proc.poll() is None \
                    and time.monotonic() - began < timeout - stop_after:
                time.sleep(0.2)
            timeout -= time.monotonic() - began
        try:
            return proc.wait(timeout=stop_after if stop_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if stop_after is None:
                proc.kill()
                proc.wait()
                return 124
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=max(1.0, timeout - stop_after))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 124


def _has_content(path: str) -> bool:
    return os.path.exists(path) and os.path.getsize(path) > 0


def bench(args) -> dict:
    size = ["--layers", "2", "--hidden", "16", "--batch", "8", "--iters", "1", "--warmup", "1",
            "--sample-iters", "1"] if args.quick else ["--iters", "10", "--warmup", "3"]
    out = {}
    for run_name in args.bench_runs.split(","):
        dtype, kernel = run_name.split("-", 1)
        name = f"bench-{run_name}"
        cmd = [sys.executable, "-m", "trainer.bench", "--json", "--device", args.device, "--dtype", dtype,
               "--kernel", kernel, "--manifest", args.data, *size]
        if kernel == "eager":
            cmd.append("--engine")  # the real trainer's step beside the model's (once per dtype: time is short)
        code = run(cmd, args, 300, name)
        out[name] = _last_json_line(os.path.join(args.out, f"{name}.log")) if code == 0 else {"exit_code": code}
    return out


def equality(args) -> dict:
    """Compiled and fused against eager on this device (fp32, TF32 off): relative max differences of the loss
    and the gradients."""
    import torch

    from molscale.datasets.shards.manifest import load_manifest
    from molscale.trainer.bench import make_batch
    from molscale.trainer.model.egnn import KERNELS
    from molscale.trainer.model.networks import ModelConfig, build_model
    from molscale.trainer.model.sampling import sample_num_atoms
    torch.backends.cuda.matmul.allow_tf32 = False
    manifest = load_manifest(args.data)
    generator = torch.Generator().manual_seed(0)
    num_atoms = sample_num_atoms(manifest.atom_count_histogram("train"), 16 if args.quick else 64, generator)
    batch = make_batch(num_atoms, 1, len(manifest.atom_vocab), torch.device(args.device), generator)
    hidden, layers = (16, 2) if args.quick else (256, 9)
    models = {}
    for kernel in KERNELS:
        torch.manual_seed(0)
        cfg = ModelConfig(hidden=hidden, layers=layers, properties=["lumo"], atom_vocab=list(manifest.atom_vocab),
                          kernel=kernel, chunk_cost_pairs=None)
        models[kernel] = build_model(cfg).to(args.device)
    outputs = {}
    for kernel, model in models.items():
        loss = model(dict(batch), generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        outputs[kernel] = (loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None])
    loss_e, grads_e = outputs["eager"]
    results = {}
    for kernel in KERNELS[1:]:
        loss_k, grads_k = outputs[kernel]
        results[kernel] = {"loss_rel_diff": _max_rel_diff([loss_k], [loss_e]),
                           "grad_rel_diff": _max_rel_diff(grads_k, grads_e)}
    results["whole_step"] = whole_step_equality(args)
    return results


WHOLE_STEP_BATCHES, WHOLE_STEP_VISITS = 3, 3  # each shape: an eager warm-up, a capture and replay, a replay


def whole_step_equality(args) -> dict:
    """``train.cuda_graphs: "step"`` captured as CUDA graphs against the same step body run eagerly: two real
    Trainers (small model, fp32, TF32 off, the same seed) train on the same 3 batches visited 3 times; relative max
    difference of the weights and of the EMA, and the logged losses. The graphs draw the same noise (the default
    generator's offsets advance as in eager steps), so they should agree to float32 rounding. On the CPU both run
    eagerly (a rehearsal of the plumbing)."""
    import itertools
    import tempfile

    import torch

    from molscale.datasets.shards.manifest import load_manifest
    from molscale.trainer.bench import _environ_restored
    from molscale.trainer.train.config import load_config
    from molscale.trainer.train.distributed import end_process_group, init_distributed
    from molscale.trainer.train.loop import Trainer
    torch.backends.cuda.matmul.allow_tf32 = False
    manifest = load_manifest(args.data)
    cfg = load_config(None, [f"data.url={args.data}", "data.num_workers=0", "data.batch_size=16", "model.layers=3",
                             "model.hidden=32", 'model.properties=["lumo"]', 'train.cuda_graphs="step"',
                             "optimizer.ema_decay=0.99", "logging.wandb.enabled=false", "logging.progress_bar=false"])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp, _environ_restored():
        if args.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        init_distributed(cfg.train.collective_timeout_minutes)
        try:
            for name in ("graphs", "eager"):
                trainer = Trainer(cfg, os.path.join(tmp, name), manifest)
                trainer.step_graphs.capture = name == "graphs" and trainer.device.type == "cuda"
                batches = list(itertools.islice(trainer._batches(), WHOLE_STEP_BATCHES))
                for i in range(WHOLE_STEP_BATCHES * WHOLE_STEP_VISITS):
                    trainer.train_step(iter([dict(batches[i % WHOLE_STEP_BATCHES])]))
                record = trainer.read_record()
                runs[name] = ([p.detach().clone() for p in trainer.model.parameters()],
                              [v.clone() for v in trainer.ema.shadow.values()], record["loss"],
                              trainer.step_graphs.summary())
        finally:
            end_process_group()
    (weights_g, ema_g, loss_g, graphs), (weights_e, ema_e, loss_e, _) = runs["graphs"], runs["eager"]
    return {"steps": WHOLE_STEP_BATCHES * WHOLE_STEP_VISITS, "graphs": graphs,
            "weight_rel_diff": _max_rel_diff(weights_g, weights_e), "ema_rel_diff": _max_rel_diff(ema_g, ema_e),
            "loss_graphs_eager": [loss_g, loss_e]}


def _max_rel_diff(got, reference) -> float:
    """Over pairs of tensors: the largest absolute difference relative to the reference's largest value."""
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(got, reference))


def tune(args) -> dict:
    """GPU milliseconds (kernel time from torch's profiler: what a CUDA-graphed step costs, without the host's
    launches) of one EGNN block (H = 256, bf16 autocast) per fused tile choice, beside the eager block: forward
    and backward at the recipe's batch (64 molecules of 27 atoms), and a forward alone at a sampling chunk
    (10,000 molecules of 26 atoms). The fastest set MOLSCALE_FUSED_TILES and MOLSCALE_FUSED_FORWARD_TILES."""
    import torch

    from molscale.trainer.model import fused_edges
    from molscale.trainer.model.egnn import DenseGraph, EGNNBlock
    if args.device != "cuda":
        return {"skipped": "tiles are a GPU setting"}
    block = EGNNBlock(256).to(args.device)
    out = {}
    for use, batch, n, backward, candidates in (
            ("training", 64, 27, True, [(t, "matmul") for t in TRAINING_TILE_CANDIDATES]
             + [(t, "onchip") for t in ONCHIP_CANDIDATES]),
            ("forward", SAMPLING_CHUNK, 26, False, [(t, "matmul") for t in FORWARD_TILE_CANDIDATES])):
        generator = torch.Generator(device=args.device).manual_seed(0)
        pos = torch.randn(batch, n, 3, device=args.device, generator=generator)
        h = torch.randn(batch, n, 256, device=args.device, generator=generator, requires_grad=backward)
        graph = DenseGraph.build(pos, torch.ones(batch, n, dtype=torch.bool, device=args.device))

        def step():
            with torch.set_grad_enabled(backward), torch.autocast("cuda", dtype=torch.bfloat16):
                h_out, pos_out = block(h, pos, graph)
                if backward:
                    (h_out.float().square().mean() + pos_out.square().mean()).backward()
        timings = {}
        block.kernel = "eager"
        timings["eager"] = _gpu_ms(step)
        block.kernel = "fused"
        for tiles, weight_grad in candidates:
            fused_edges.GPU_TILES = tiles
            os.environ["MOLSCALE_FUSED_WGRAD"] = weight_grad
            name = ",".join(map(str, tiles)) + ("" if weight_grad == "matmul" else " onchip")
            try:
                timings[name] = _gpu_ms(step)
            except Exception as err:  # a tile that does not fit (registers, shared memory) is a result
                timings[name] = f"{type(err).__name__}: {str(err)[:200]}"
        fused_edges.GPU_TILES = None
        os.environ.pop("MOLSCALE_FUSED_WGRAD", None)
        fused = sorted((ms, name) for name, ms in timings.items() if name != "eager" and isinstance(ms, float))
        out[use] = {"gpu_ms_per_block": timings, "fastest": fused[0][1] if fused else None}
    return out


def _gpu_ms(step, repeats: int = 5) -> float:
    """Mean GPU kernel milliseconds of ``step()`` after two warm-up calls (which compile), by torch's profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    return round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / repeats, 3)


def train(args) -> dict:
    out = {}
    quick = ["model.layers=2", "model.hidden=16", "data.batch_size=8", "data.num_workers=0"] if args.quick else []
    for name, overrides in _train_paths(args):
        run_dir = os.path.join(args.out, f"train-{name}")
        shutil.rmtree(run_dir, ignore_errors=True)  # a measurement starts afresh (the trainer refuses old checkpoints)
        sets = [f"data.url={args.data}", "logging.every_steps=" + ("2" if args.quick else "20"),
                "logging.progress_bar=false", "logging.wandb.enabled=false", "checkpoint.every_steps=1000000",
                "evaluation.every_steps=0", *overrides, *quick]
        if args.device == "cpu":  # the whole-step path stays: on the CPU it runs its step body eagerly
            sets = [s for s in sets if not s.startswith(("train.cuda_graphs=true", "deepspeed.bf16"))]
        cmd = [sys.executable, "trainer/main.py", "--config", args.config, "--run-dir", run_dir]
        for s in sets:
            cmd += ["--set", s]
        began = time.perf_counter()
        code = run(cmd, args, args.train_seconds + 120, f"train-{name}", stop_after=args.train_seconds,
                   clock_starts_at=os.path.join(run_dir, "metrics.jsonl"))
        rows = _rows(os.path.join(run_dir, "metrics.jsonl"))
        speeds = [r["molecules_per_s"] for r in rows[2:]] or [r["molecules_per_s"] for r in rows]
        out[name] = {"exit_code": code, "wall_s": round(time.perf_counter() - began, 1),
                     "steps": rows[-1]["step"] if rows else 0,
                     "median_molecules_per_s": round(statistics.median(speeds), 1) if speeds else None,
                     "loss_first_last": [rows[0].get("loss"), rows[-1].get("loss")] if rows else None}
    return out


def _train_paths(args) -> list[tuple[str, list[str]]]:
    chosen = dict(TRAIN_PATHS)
    return [(name, chosen[name]) for name in args.train_paths.split(",")]


def _sampled_run(args) -> str:
    return os.path.join(args.out, f"train-{_train_paths(args)[0][0]}")


def sampling(args) -> dict:
    """Sampling seconds of --samples molecules in this process (see the module's docstring, part 4)."""
    import torch

    from molscale.datasets.shards.manifest import load_manifest
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.model.egnn import use_kernel
    from molscale.trainer.model.networks import ModelConfig, build_model
    from molscale.trainer.model.packing import budget_chunks, default_pair_budget
    from molscale.trainer.model.sampling import sample, sample_num_atoms
    manifest = load_manifest(args.data)
    histogram = manifest.atom_count_histogram("train")
    counts = sample_num_atoms(histogram, args.samples, torch.Generator().manual_seed(0))
    try:
        model, source = load_for_eval(_sampled_run(args), args.device).model, _sampled_run(args)
    except Exception as err:  # no checkpoint (training did not run or failed): speed does not depend on weights
        hidden, layers = (16, 2) if args.quick else (256, 9)
        model = build_model(ModelConfig(hidden=hidden, layers=layers, properties=["lumo"],
                                        atom_vocab=list(manifest.atom_vocab))).to(args.device)
        source = f"a fresh {layers} x {hidden} model ({type(err).__name__}: {str(err)[:120]})"
    model.eval()
    steps = sample_steps(args)
    out = {"model": source, "molecules": args.samples, "evaluations": steps + 1}
    samples = {}
    # --quick (the CPU rehearsal): not the fused kernels' whole-step paths, which Triton's interpreter makes cost
    # seconds each; the eager ones rehearse the same code
    paths = [p for p in SAMPLING_PATHS if not (args.quick and p[0] == "fused" and p[2])]
    for kernel, precision, whole_steps, per_call in paths:
        use_kernel(model, kernel)
        model.cfg.kernel = kernel
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        name = (f"{kernel}-{precision}" + ("-step-graphs" if whole_steps else "") +
                (f"-chunks-{per_call}" if per_call else ""))
        calls = [counts] if per_call is None else [counts[idx] for idx, _ in budget_chunks(
            counts.tolist(), default_pair_budget(histogram, per_call))]
        try:
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=precision == "bf16"), \
                    _warnings_of("trainer") as warnings:
                sample(model, counts[:64], steps=2, generator=torch.Generator(args.device).manual_seed(1))  # warm
                _synchronize(args.device)
                began = time.perf_counter()
                generator = torch.Generator(args.device).manual_seed(2)
                results = [sample(model, sizes, steps=steps, generator=generator, step_graphs=whole_steps)
                           for sizes in calls]
                _synchronize(args.device)
            seconds = time.perf_counter() - began
            if per_call is None:
                samples[name] = results[0]["pos"].float()
            out[name] = {"sampling_seconds": round(seconds, 3),
                         "seconds_at_1000_steps": round(seconds * (PAPER_STEPS + 1) / (steps + 1), 1),
                         "finite": all(bool(torch.isfinite(r["pos"]).all()) for r in results), "calls": len(calls),
                         **({"warnings": warnings} if warnings else {})}  # e.g. a capture that failed
        except Exception as err:  # one path failing is a result; the others still run
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    torch.backends.cuda.matmul.allow_tf32 = False
    for label, a, b in (("fused_fp32_vs_eager_fp32", "fused-fp32", "eager-fp32"),
                        ("step_graphs_fp32_vs_eager_fp32", "eager-fp32-step-graphs", "eager-fp32"),
                        ("eager_tf32_vs_eager_fp32 (yardstick)", "eager-tf32", "eager-fp32")):
        if a in samples and b in samples:
            out[label] = _per_molecule_difference(samples[a], samples[b])
    return out


@contextlib.contextmanager
def _warnings_of(logger: str):
    """The warning lines ``logger`` logs inside (a list, filled as they come)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger(logger).addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger(logger).removeHandler(handler)


def sample_steps(args) -> int:
    return QUICK_SAMPLE_STEPS if args.quick else SAMPLE_STEPS


def _per_molecule_difference(a, b) -> dict:
    """Quantiles over molecules of each molecule's largest coordinate difference (Angstrom)."""
    import torch
    largest = (a - b).abs().flatten(1).max(1).values
    q = torch.quantile(largest, torch.tensor([0.5, 0.99], device=largest.device))
    return {"median": float(q[0]), "p99": float(q[1]), "max": float(largest.max())}


def _synchronize(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def generate(args) -> dict:
    run_dir, steps = _sampled_run(args), sample_steps(args)
    out = {}
    for kernel in ("eager", "fused"):
        eval_dir = os.path.join(args.out, f"eval-{kernel}")
        cmd = [sys.executable, "evals/generate.py", "--checkpoint", run_dir, "--n-samples", str(args.samples),
               "--steps", str(steps), "--no-wandb", "--out", eval_dir, "--kernel", kernel]
        code = run(cmd, args, 900, f"sampling-{kernel}")
        if code != 0:
            out[kernel] = {"exit_code": code}
            continue
        metrics = json.load(open(os.path.join(eval_dir, "metrics.json")))
        seconds = metrics["source"]["sampling_seconds"]
        out[kernel] = {"molecules": args.samples, "evaluations": steps + 1, "sampling_seconds": seconds,
                       "seconds_at_1000_steps": round(seconds * (PAPER_STEPS + 1) / (steps + 1), 1),
                       "workers": metrics["source"].get("workers"),
                       "validity": metrics.get("validity"), "atom_stability": metrics.get("atom_stability")}
    return out


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _last_json_line(path: str) -> dict:
    for line in reversed(open(path).read().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"no JSON report in {path}"}


PARTS = {"bench": bench, "equality": equality, "tune": tune, "train": train, "sampling": sampling,
         "generate": generate}


def main(argv=None) -> int:
    args = parse_args(argv)
    for option, given, known in (("--parts", args.parts, list(PARTS)), ("--bench-runs", args.bench_runs, bench_runs()),
                                 ("--train-paths", args.train_paths, [name for name, _ in TRAIN_PATHS])):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            print(f"error: {option}: unknown {unknown}; choose from {','.join(known)}", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        print(f"error: no dataset at {args.data}: build it with `python -m datasets build qm9 --out {args.data}`",
              file=sys.stderr)
        return 2
    results_path = os.path.join(args.out, "gpu_check.json")
    results: dict = {"device": args.device, "quick": args.quick}
    failed = False
    for name in args.parts.split(","):
        part = PARTS[name]
        began = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            results[name] = part(args)
        except Exception as err:  # a report of every part: one failing part must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            failed = True
        results[name + "_seconds"] = round(time.perf_counter() - began, 1)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    print(f"gpu-check: results in {results_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
