"""Benchmark: one training step (forward, backward, AdamW) and sampling steps on QM9-sized batches.

    python -m trainer.bench [--json] [--device cpu|cuda] [--model unigem|edm] [--layers 9] [--hidden 256]
                            [--batch 64] [--dtype fp32|bf16] [--layout dense|edge-list|edge-list-real|both|all]
                            [--kernel eager|compiled|fused] [--manifest DATASET [--engine [--graphs off|network|step]]]

Atom counts are drawn from the QM9 train histogram (or, with --manifest, from that dataset's train split and
atom vocabulary) with a fixed seed; timings are medians over timed
iterations after warm-up. `--layout both` also runs the edge-list reference layout of the research code
(`all` adds the edge list over real atom pairs only) with the same weights and batch in the same process,
alternating iterations between layouts, and reports the speed-ups. A training step is forward, backward and
AdamW; a sampling step is one network evaluation and ancestral update inside `sample()`. Sampling molecules/s
is for the full T-step trajectory: batch / (sample_step_s * (T + 1) network evaluations). The report also
counts the aten operator calls of one training step, one EMA update and one sampling step (each non-view call
is at least one kernel launch on a GPU), and what the host still calls per sampling step when each step is one
replayed CUDA graph (`--cuda-graphs step` of evals/generate.py: the step's body taken out).

`--engine` (with `--manifest`) also times the trainer's own step on the same batch, interleaved with the
model-only step: a real Trainer (trainer/train/loop.py) with its DeepSpeed engine, clipping, EMA and the loop's
reads of the device, built from the run-config defaults (the paper's recipe) and that dataset's manifest.
`--graphs` sets that Trainer's train.cuda_graphs: the network as CUDA graphs, or the whole step as one graph
(on a GPU the real step's operator counts are then what the host still launches per step: the batch copies and the
lr; on a CPU the step runs eagerly either way).
"""

import argparse
import contextlib
import ctypes
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.datasets.shards.manifest import load_manifest
from molscale.datasets.sources.qm9 import train_atom_count_histogram
from molscale.trainer.model import fused_edges
from molscale.trainer.model.denoising_graphs import DenoisingSteps
from molscale.trainer.model.diffusion import remove_mean
from molscale.trainer.model.egnn import KERNELS
from molscale.trainer.model.networks import MODEL_CLASSES, ModelConfig, build_model
from molscale.trainer.model.sampling import sample, sample_num_atoms, timestep_grid
from molscale.trainer.reference_edgelist import GRAPH_LAYOUTS
from molscale.trainer.train.ema import EMA

MALLOC_TUNED = False  # set when run as a program, see tune_glibc_malloc
LAYOUT_CHOICES = {"both": ["dense", "edge-list"], "all": ["dense", "edge-list", "edge-list-real"]}


def tune_glibc_malloc():
    """Keep freed large blocks in the heap instead of returning them to the OS (no page faults on reuse).

    Same effect as running under jemalloc/tcmalloc, as CPU tuning guides for PyTorch advise; applies to every
    layout in the process alike. Returns False where glibc is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 36))


def atom_counts_and_vocab(manifest):
    """(train atom-count histogram, atom vocabulary): a dataset's own (its Manifest), or QM9's from qm9pack."""
    if manifest is None:
        return train_atom_count_histogram(), list(QM9_ATOM_VOCAB)
    return manifest.atom_count_histogram("train"), list(manifest.atom_vocab)


def make_batch(num_atoms, num_props, num_types, device, generator):
    # random CoM-free coordinates with about QM9's spread; the cost does not depend on the geometry
    batch_size, n_max = len(num_atoms), int(num_atoms.max())
    node_mask = torch.arange(n_max)[None, :] < num_atoms[:, None]
    pos = remove_mean(1.5 * torch.randn(batch_size, n_max, 3, generator=generator), node_mask)
    atom_type = torch.randint(0, num_types, (batch_size, n_max), generator=generator) * node_mask
    props = torch.randn(batch_size, num_props, generator=generator)
    batch = {"pos": pos, "node_mask": node_mask, "atom_type": atom_type, "num_atoms": num_atoms, "props": props}
    return {k: v.to(device) for k, v in batch.items()}


def interleaved_medians(fns, device, warmup, iters):
    """{name: fn} -> {name: median seconds}; iterations alternate between the functions so that load from
    other processes on the machine hits all of them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# operators that make the host wait for a GPU: a scalar read (.item(), float(), bool()), a data-dependent shape
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


class _OperatorCounter(TorchDispatchMode):
    """Counts what the aten operators dispatched while active (backward's included) would cost on a GPU:
    ``calls`` all of them; ``kernels`` those that are not views (each at least one kernel launch, the count CUDA
    graphs would remove); ``syncs`` the host reads of device values; ``edge_bytes`` the bytes written in tensors of
    edge shape [B, N, N, ...] (N > 1), the memory traffic fused kernels would keep on chip."""

    def __init__(self):
        super().__init__()
        self.calls = self.kernels = self.syncs = self.edge_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if fused_edges.COUNTS.inside:  # around a Triton launch: the kernel's own counts (fused_edges.COUNTS)
            return out
        self.calls += 1
        if func in SYNC_OPS:
            self.syncs += 1
        if not func.is_view:
            self.kernels += 1
            for value in tree_leaves(out):
                if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[1] == value.shape[2] > 1:
                    self.edge_bytes += value.numel() * value.element_size()
        return out


def chunk_cost_pairs(text: str):
    return None if text == "none" else (text if text == "auto" else int(text))


def operator_calls(fn) -> int:
    return step_counts(fn)["calls"]


def step_counts(fn, repeats: int = 1) -> dict:
    """What one call of ``fn`` costs, averaged over ``repeats`` calls: operator calls, kernels (non-view calls),
    host syncs, bytes written in edge-shaped tensors, and GFLOP (torch's FLOP counter: matrix products)."""
    counter, flops = _OperatorCounter(), FlopCounterMode(display=False)
    fused = dataclasses.replace(fused_edges.COUNTS)  # model.kernel = 'fused': Triton launches, counted apart
    with flops, counter:
        for _ in range(repeats):
            fn()
    launches = fused_edges.COUNTS.kernels - fused.kernels
    edge_bytes = counter.edge_bytes + fused_edges.COUNTS.edge_bytes - fused.edge_bytes
    total_flops = flops.get_total_flops() + fused_edges.COUNTS.flops - fused.flops
    return {"calls": (counter.calls + launches) // repeats, "kernels": (counter.kernels + launches) // repeats,
            "syncs": counter.syncs / repeats, "edge_MB": edge_bytes / repeats / 1e6,
            "GFLOP": total_flops / repeats / 1e9}


def replayed_sampling_host_calls(model, num_atoms, steps: int, seed: int) -> float:
    """Operator calls the host makes per denoising step when each step is one replayed CUDA graph
    (sample(step_graphs=True), trainer/model/denoising_graphs.py): sampling with the graph's body taken out (what a
    replay leaves to the host), per step added to the grid (the call's own set-up and read-out cancel)."""
    def calls(k):
        return step_counts(lambda: sample(model, num_atoms, steps=k, generator=torch.Generator().manual_seed(seed),
                                          step_graphs=True))["calls"]

    body, DenoisingSteps._step = DenoisingSteps._step, lambda self, state, branch: None
    try:
        return (calls(2 * steps) - calls(steps)) / steps
    finally:
        DenoisingSteps._step = body


def step_functions(model, batch, layout, args):
    """(train_step, sample_run) closures for one layout."""
    autocast = (torch.autocast(model.embed.weight.device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    # fused: the trainer's optimizer (trainer/train/loop.py)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-12, amsgrad=True, fused=True)

    def train_step():
        model.graph_builder = GRAPH_LAYOUTS[layout]
        generator = torch.Generator().manual_seed(args.seed)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(batch, generator=generator)["loss"]
        loss.backward()
        optimizer.step()

    def sample_run():
        model.graph_builder = GRAPH_LAYOUTS[layout]
        generator = torch.Generator().manual_seed(args.seed)
        with autocast:
            sample(model, batch["num_atoms"].cpu(), steps=args.sample_steps, generator=generator)

    return train_step, sample_run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(MODEL_CLASSES), default="unigem")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--layout", choices=[*GRAPH_LAYOUTS, *LAYOUT_CHOICES], default="dense",
                        help="'both': dense and the research code's edge-list layout; 'all': also edge-list-real")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed training steps per layout")
    parser.add_argument("--sample-steps", type=int, default=4,
                        help="denoising steps (network evaluations, plus the read-out) per timed sampling run")
    parser.add_argument("--sample-iters", type=int, default=3, help="timed sampling runs per layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest", metavar="DATASET",
                        help="draw atom counts and vocabulary from this dataset's manifest (directory or URL) "
                             "instead of the QM9 package")
    parser.add_argument("--engine", action="store_true",
                        help="also time the trainer's real step (DeepSpeed engine, clipping, EMA, host reads); "
                             "needs --manifest")
    parser.add_argument("--graphs", choices=["off", "network", "step"], default="off",
                        help="with --engine: the Trainer's train.cuda_graphs (network: the network as CUDA graphs; "
                             "step: the whole training step as one graph; CUDA only)")
    parser.add_argument("--kernel", choices=list(KERNELS), default="eager",
                        help="the EGNN blocks eager, through torch.compile, or with the fused Triton edge kernels "
                             "(model.kernel; fused needs a CUDA device, or TRITON_INTERPRET=1 for counts on a CPU); "
                             "a compiled run's first iterations compile (use --warmup 2 or more)")
    parser.add_argument("--chunk-cost-pairs", default="auto",
                        help="size chunks (trainer/model/packing.py): 'auto' (CPU: on, GPU: off), 'none', or a cost")
    args = parser.parse_args(argv)
    if args.engine and not args.manifest:
        parser.error("--engine builds a real Trainer, which reads a dataset's manifest: give --manifest DATASET")

    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    manifest = load_manifest(args.manifest) if args.manifest else None  # read once, used by every part
    histogram, atom_vocab = atom_counts_and_vocab(manifest)
    properties = bench_properties(args.model, manifest)
    cfg = ModelConfig(kind=args.model, hidden=args.hidden, layers=args.layers, properties=properties,
                      atom_vocab=atom_vocab, chunk_cost_pairs=chunk_cost_pairs(args.chunk_cost_pairs),
                      kernel=args.kernel)
    try:
        cfg.validate()  # the one check of the model settings the command line gave
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    model = build_model(cfg).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    num_atoms = sample_num_atoms(histogram, args.batch, generator)
    batch = make_batch(num_atoms, len(cfg.properties), len(cfg.atom_vocab), device, generator)

    layouts = LAYOUT_CHOICES.get(args.layout, [args.layout])
    if args.kernel != "eager" and layouts != ["dense"]:
        raise SystemExit(f"error: --kernel {args.kernel} runs the dense layout only (the edge-list layouts are eager "
                         f"references); use --layout dense")
    steps = {layout: step_functions(model, batch, layout, args) for layout in layouts}
    train_s = interleaved_medians({k: v[0] for k, v in steps.items()}, device, args.warmup, args.iters)
    sample_s = interleaved_medians({k: v[1] for k, v in steps.items()}, device, 1, args.sample_iters)
    evaluations = len(timestep_grid(model.num_steps, args.sample_steps))  # K steps + the read-out at t = 0
    train_step, sample_run = steps[layouts[0]]
    ema = EMA(model, 0.9999)
    counts = {"train_step": step_counts(train_step), "ema_update": step_counts(lambda: ema.update(model)),
              "sample_step": {k: v / evaluations for k, v in step_counts(sample_run).items()}}
    calls = {"train_step (forward, backward, AdamW)": counts["train_step"]["calls"],
             "ema_update": counts["ema_update"]["calls"], "sample_step": round(counts["sample_step"]["calls"]),
             "sample_step replayed as one graph (host)": replayed_sampling_host_calls(model, num_atoms,
                                                                                      args.sample_steps, args.seed)}
    results = {}
    for layout in layouts:
        sample_step_s = sample_s[layout] / evaluations
        results[layout] = {
            "train_step_ms": 1e3 * train_s[layout],
            "train_molecules_per_s": args.batch / train_s[layout],
            "sample_step_ms": 1e3 * sample_step_s,
            "sample_molecules_per_s": args.batch / (sample_step_s * (model.num_steps + 1)),
        }
    report = {
        "model": args.model, "kernel": args.kernel, "layers": args.layers, "hidden": args.hidden, "batch": args.batch,
        "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
        "num_atoms_mean": float(num_atoms.float().mean()), "num_atoms_max": int(num_atoms.max()),
        "atom_pairs": int((num_atoms * (num_atoms - 1)).sum()), "malloc_tuned": MALLOC_TUNED,
        "loadavg_1min": [load_before, os.getloadavg()[0]],  # before / after: other work on the machine
        "layout": layouts[0], **results[layouts[0]], "operator_calls": calls, "counts": counts,
    }
    for ref in layouts[1:]:
        key = ref.replace("-", "_")
        report[key] = results[ref]
        report[f"train_speedup_vs_{key}"] = results[ref]["train_step_ms"] / report["train_step_ms"]
        report[f"sample_speedup_vs_{key}"] = results[ref]["sample_step_ms"] / report["sample_step_ms"]
    if args.engine:
        with tempfile.TemporaryDirectory() as run_dir, _environ_restored():
            engine_step, describe, trainer = engine_step_function(args, manifest, properties, batch, run_dir)
            times = interleaved_medians({"model": train_step, "engine": engine_step}, device, args.warmup, args.iters)
            engine_counts = step_counts(engine_step, repeats=3)
            report["engine"] = {"train_step_ms": 1e3 * times["engine"],
                                "train_molecules_per_s": args.batch / times["engine"],
                                "model_only_step_ms": 1e3 * times["model"],
                                "engine_over_model": times["engine"] / times["model"],
                                "operator_calls": engine_counts["calls"], "counts": engine_counts,
                                "kernels_over_model": engine_counts["kernels"] / counts["train_step"]["kernels"],
                                "parts": describe()}
            if trainer.step_graphs is not None:
                # a replay makes no operator call on the host: what remains is the step with its body taken out
                trainer.step_graphs.body = lambda static: None
                report["engine"]["host_calls_per_replayed_step"] = step_counts(engine_step, repeats=1)["calls"]
        from molscale.trainer.train.distributed import end_process_group
        end_process_group()  # the world of one the Trainer needed; leave the process as we found it
    print(json.dumps(report) if args.json else format_report(report, results))


@contextlib.contextmanager
def _environ_restored():
    """The Trainer's world of one sets RANK, MASTER_PORT and friends in os.environ; take them back afterwards, so
    that processes started later from this one (tests, notebooks) do not inherit a stale rendezvous."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bench_properties(model_kind: str, manifest) -> list[str]:
    """The property the UniGEM head regresses in the benchmark: QM9's gap, or the dataset's first property."""
    if not MODEL_CLASSES[model_kind].predicts_properties:
        return []
    if manifest is None:
        return ["gap"]
    names = list(manifest.data.get("properties", {}))
    return ["gap"] if "gap" in names else names[:1]


def engine_step_function(args, manifest, properties: list[str], batch: dict, run_dir: str):
    """(step, describe, trainer): ``step()`` runs Trainer.train_step on ``batch`` (the trainer copies it to its
    device, as it copies loader batches); ``describe()`` names what ran. A world of one rank; the engine's device is
    DeepSpeed's accelerator, so a CPU benchmark sets DS_ACCELERATOR=cpu."""
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from molscale.trainer.train.config import load_config
    from molscale.trainer.train.distributed import init_distributed
    from molscale.trainer.train.loop import Trainer
    overrides = [f"data.url={args.manifest}", "data.num_workers=0", f"data.batch_size={args.batch}",
                 f"model.kind={args.model}", f"model.layers={args.layers}", f"model.hidden={args.hidden}",
                 f"model.properties={json.dumps(properties)}",
                 f"model.chunk_cost_pairs={json.dumps(chunk_cost_pairs(args.chunk_cost_pairs))}",
                 f"model.kernel={json.dumps(args.kernel)}",
                 f"deepspeed.bf16={json.dumps(args.dtype == 'bf16')}", "logging.wandb.enabled=false",
                 "train.cuda_graphs=" + json.dumps({"off": False, "network": True}.get(args.graphs, args.graphs)),
                 "logging.progress_bar=false", f"train.seed={args.seed}"]
    cfg = load_config(None, overrides)
    init_distributed(cfg.train.collective_timeout_minutes)
    trainer = Trainer(cfg, run_dir, manifest)
    host_batch = {k: v.cpu() for k, v in batch.items()}

    def step():
        trainer.train_step(itertools.repeat(host_batch))

    def describe():
        ds, opt = cfg.deepspeed, cfg.optimizer
        fused = " fused" if getattr(trainer.engine.optimizer, "defaults", {}).get("fused") else ""
        return (f"Trainer.train_step: DeepSpeed {trainer.engine.__class__.__name__} ZeRO-{ds.zero_stage} on "
                f"{trainer.device}, {'bf16 autocast' if ds.bf16 else 'fp32'}, AdamW amsgrad="
                f"{opt.amsgrad}{fused}, clipping {opt.clip}, EMA {opt.ema_decay}, steps_per_batch "
                f"{opt.steps_per_batch}, {trainer.host_reads} host reads per step, train.cuda_graphs "
                f"{cfg.train.graph_scope}")
    return step, describe, trainer


def format_report(report, results):
    lines = [f"{report['model']} {report['layers']}x{report['hidden']} ({report['kernel']} blocks), "
             f"batch {report['batch']} "
             f"(mean {report['num_atoms_mean']:.1f} atoms, max {report['num_atoms_max']}), {report['dtype']} on "
             f"{report['device']} ({report['threads']} threads, load {report['loadavg_1min'][0]:.1f})"]
    for layout, r in results.items():
        lines.append(f"  {layout:14s} train step {r['train_step_ms']:9.1f} ms {r['train_molecules_per_s']:8.1f} mol/s"
                     f"   sample step {r['sample_step_ms']:8.1f} ms {r['sample_molecules_per_s']:8.4f} mol/s")
    for layout in list(results)[1:]:
        key = layout.replace("-", "_")
        lines.append(f"  speed-up of {report['layout']} over {layout}: train "
                     f"{report[f'train_speedup_vs_{key}']:.2f}x, sample {report[f'sample_speedup_vs_{key}']:.2f}x")
    lines.append(f"  operator calls ({report['layout']}): " +
                 ", ".join(f"{name} {n:,}" for name, n in report["operator_calls"].items()))
    if report["kernel"] == "compiled":
        lines.append("  (the counts below are the eager path's: torch.compile cannot trace under the counting mode)")
    if report["kernel"] == "fused":
        lines.append("  (each Triton launch counts as one kernel, with the edge-shaped bytes it writes and its "
                     "FLOPs; timings under TRITON_INTERPRET=1 mean nothing)")
    for name, c in report["counts"].items():
        lines.append(f"  {name:12s} {c['kernels']:8,.0f} kernels {c['syncs']:5.1f} host syncs "
                     f"{c['edge_MB']:9.1f} MB edge-shaped writes {c['GFLOP']:8.2f} GFLOP")
    if "engine" in report:
        e = report["engine"]
        lines.append(f"  real step {e['train_step_ms']:9.1f} ms {e['train_molecules_per_s']:8.1f} mol/s, "
                     f"{e['engine_over_model']:.2f}x the model-only step ({e['model_only_step_ms']:.1f} ms in the "
                     f"same run), {e['operator_calls']:,} operator calls")
        c = e["counts"]
        lines.append(f"  real step    {c['kernels']:8,.0f} kernels {c['syncs']:5.1f} host syncs "
                     f"{c['edge_MB']:9.1f} MB edge-shaped writes {c['GFLOP']:8.2f} GFLOP "
                     f"({e['kernels_over_model']:.2f}x the model-only step's kernels)")
        lines.append(f"  real step parts: {e['parts']}")
        if "host_calls_per_replayed_step" in e:
            lines.append(f"  operator calls left to the host once the step is a graph: "
                         f"{e['host_calls_per_replayed_step']:,} (plus the batch's copies to a GPU)")
    return "\n".join(lines)


if __name__ == "__main__":
    MALLOC_TUNED = tune_glibc_malloc()
    sys.exit(main())
