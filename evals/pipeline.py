"""What ``evals/generate.py`` does, step by step: check inputs, get molecules (sampled over Ray, or a
real split), fan the metric work out as Ray tasks, write metrics.json / samples.sdf / plots /
report.html, log to W&B, publish to the output URL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.datasets.shards.manifest import ManifestError, load_manifest

log = logging.getLogger("evals.generate")
STATS_CHUNK = 500  # molecules per metric task


def _check_args(args) -> None:
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be at least 1 (got {args.n_samples})")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1 (got {args.batch})")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps})")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1 (got {args.workers})")


def _reference_manifest(url: str):
    """The reference dataset's manifest, or None (with a warning) when it cannot be read."""
    try:
        return load_manifest(url)
    except (ManifestError, OSError) as err:
        log.warning("reference dataset %s unavailable (%s): novelty, distribution metrics and property MAE "
                    "are skipped; pass --reference URL", url, err)
        return None


def _stats_over_ray(ray, molecules, all_single: bool) -> dict:
    from molscale.evals.protocol.metrics import merge_stats, molecule_stats
    task = ray.remote(molecule_stats)
    refs = [task.remote(molecules[i:i + STATS_CHUNK], all_single) for i in range(0, len(molecules), STATS_CHUNK)]
    return merge_stats(ray.get(refs))


def _property_mae(ray, checkpoint: str, names: list[str], url: str, split: str) -> dict:
    """Mean |prediction - truth| per property over a split, one Ray task per shard, dataset units."""
    manifest = load_manifest(url)

    @ray.remote(num_cpus=1)
    def shard_errors(shard: dict):
        import torch

        from molscale.datasets.shards import storage
        from molscale.datasets.shards.samples import decode_sample
        from molscale.datasets.shards.tario import read_shard_samples
        from molscale.datasets.stream.loader import collate, vocab_lookup
        from molscale.trainer.model.sampling import predict_properties
        from molscale.trainer.train.checkpoints import load_for_eval
        torch.set_num_threads(1)
        loaded = load_for_eval(checkpoint)
        props = tuple(loaded.model.cfg.properties)
        fs, path = storage.get_fs(manifest.shard_url(shard))
        samples = [decode_sample(s, with_bonds=False) for s in read_shard_samples(storage.read_bytes(fs, path))]
        vocab_index = vocab_lookup(manifest.atom_vocab)
        sums, n = np.zeros(len(props)), 0
        for i in range(0, len(samples), 128):
            batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                     for k, v in collate(samples[i:i + 128], vocab_index, props, False).items()}
            pred = predict_properties(loaded.model, batch)
            sums += (pred - batch["props"]).abs().sum(0).double().numpy()
            n += len(batch["keys"])
        return sums, n

    results = ray.get([shard_errors.remote(s) for s in manifest.shards(split)])
    total = sum(r[0] for r in results)
    count = sum(r[1] for r in results)
    units = manifest.data.get("properties", {})
    return {name: {"mae": float(total[i] / count), "unit": units.get(name, {}).get("unit", ""), "n": int(count)}
            for i, name in enumerate(names)}


def _log_wandb(out_dir: str, metrics: dict, molecules_sdf: str, project: str, config: dict) -> None:
    import wandb
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, job_type="eval", dir=out_dir, mode=mode, config=config)
    run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".png"):
            run.log({f"plots/{name[:-4]}": wandb.Image(os.path.join(out_dir, name))})
    table = wandb.Table(columns=["index", "smiles", "valid", "mol_stable", "molecule"])
    from rdkit import Chem
    for i, mol in enumerate(Chem.SDMolSupplier(molecules_sdf, sanitize=False, removeHs=False)):
        if i >= 32 or mol is None:
            break
        props = mol.GetPropsAsDict()
        try:
            view = wandb.Molecule.from_rdkit(mol, convert_to_3d_and_optimize=False)
        except Exception:  # a molecule RDKit cannot write as PDB still gets its row
            view = None
        table.add_data(i, props.get("smiles", ""), bool(props.get("valid", False)),
                       bool(props.get("mol_stable", False)), view)
    run.log({"molecules": table})
    from molscale.evals.outputs.wandb_report import publish_report
    url = publish_report(run, metrics)
    if url:
        print(f"W&B report: {url}")
    run.finish()


def _json_safe(value):
    """NaN (a metric undefined for this set, e.g. bond-type TV when no bonds were generated) -> null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def publish(local_dir: str, out_url: str) -> None:
    """Copy the finished output folder to ``out_url`` (a no-op when it is that local folder)."""
    from molscale.datasets.shards import storage
    fs, path = storage.get_fs(out_url)
    if storage.is_local(fs) and os.path.abspath(path) == os.path.abspath(local_dir):
        return
    for name in sorted(os.listdir(local_dir)):
        src = os.path.join(local_dir, name)
        if os.path.isfile(src):
            storage.retry(lambda: fs.put_file(src, storage.join(path, name)), f"uploading {name}")


def run(args) -> int:
    from molscale.evals.outputs.report import write_report
    from molscale.evals.outputs.sdf import write_sdf
    from molscale.evals.protocol.metrics import compute_metrics
    from molscale.evals.protocol.references import (
        reference_histograms,
        reference_smiles,
    )
    from molscale.evals.ray_sampling import connect_ray, generate
    _check_args(args)

    # Everything that can be wrong with the inputs fails here, before Ray starts.
    if args.checkpoint:
        from molscale.trainer.train.checkpoints import load_for_eval
        loaded = load_for_eval(args.checkpoint)
        vocab, histogram = loaded.model.cfg.atom_vocab, loaded.atom_count_histogram
        reference_url = args.reference or loaded.dataset_url
        source = {"checkpoint": loaded.checkpoint, "step": loaded.step, "ema": loaded.used_ema}
        if args.property and not loaded.model.cfg.properties:
            raise ValueError("--property: this checkpoint's model predicts no properties")
    else:
        manifest = load_manifest(args.dataset)
        manifest.split(args.split)
        vocab = manifest.atom_vocab
        reference_url = args.reference or args.dataset
        source = {"dataset": args.dataset, "split": args.split}
    reference = _reference_manifest(reference_url)
    if reference is not None:
        reference.split(args.reference_split)
    all_single = bool(set(vocab) - set(QM9_ATOM_VOCAB))  # GEOM protocol: all bonds single for validity

    from molscale.datasets.shards import storage
    fs, out_path = storage.get_fs(args.out)
    local_out = out_path if storage.is_local(fs) else tempfile.mkdtemp(prefix="molscale-eval-")
    os.makedirs(local_out, exist_ok=True)

    ray = connect_ray(args.num_cpus)
    started = time.perf_counter()
    if args.checkpoint:
        resources = ray.cluster_resources()
        workers = args.workers or int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))
        stride = args.steps or 1
        molecules = generate(ray, args.checkpoint, args.n_samples, args.batch, stride, args.seed, workers, histogram)
        sample_seconds = time.perf_counter() - started
        source.update(n_samples=args.n_samples, seed=args.seed, step_stride=stride, workers=workers,
                      sampling_seconds=round(sample_seconds, 2),
                      molecules_per_s=round(args.n_samples / sample_seconds, 2))
    else:
        from molscale.evals.protocol.molecules import load_split_molecules
        molecules = load_split_molecules(args.dataset, args.split)

    stats = _stats_over_ray(ray, molecules, all_single)
    train_smiles = ref_hist = None
    if reference is not None:
        ref_smiles_task = ray.remote(reference_smiles).remote(reference_url, "train", all_single)
        ref_hist = reference_histograms(reference_url, args.reference_split, all_single)
        train_smiles = ray.get(ref_smiles_task) if "train" in reference.splits else None
    metrics = compute_metrics(stats, train_smiles, ref_hist)
    if args.property and reference is not None:
        metrics["property_mae"] = _property_mae(ray, args.checkpoint, loaded.model.cfg.properties, reference_url,
                                                 args.reference_split)
        for name, row in metrics["property_mae"].items():
            metrics[f"mae_{name}"] = row["mae"]
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["source"] = source
    metrics["reference"] = {"dataset": reference_url if reference is not None else None,
                            "distribution_split": args.reference_split, "novelty_split": "train"}

    n_written = write_sdf(molecules, os.path.join(local_out, "samples.sdf"), all_single=all_single)
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    with open(os.path.join(local_out, "metrics.json"), "w") as f:
        json.dump(_json_safe(metrics), f, indent=1, allow_nan=False)
    write_report(flat, local_out, histograms=stats.get("histograms"), reference=ref_hist,
                 example_smiles=sorted(set(stats.get("valid_smiles", [])))[:20],
                 title="Generated molecules" if args.checkpoint else f"Real molecules: {args.split} split",
                 notes={**{k: str(v) for k, v in source.items()},
                        "reference": str(metrics["reference"]["dataset"])})
    if not args.no_wandb:
        try:
            _log_wandb(local_out, flat, os.path.join(local_out, "samples.sdf"), args.wandb_project,
                       {**source, "out": args.out})
        except Exception as err:  # the metrics are on disk already; W&B trouble must not lose them
            log.error("W&B logging failed: %s", err)
    if local_out != out_path:
        publish(local_out, args.out)
        shutil.rmtree(local_out, ignore_errors=True)

    keys = ("n_samples", "atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty",
            "atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1")
    print("\n".join(f"{k:>16}: {metrics.get(k)}" for k in keys if k in metrics))
    for name, row in metrics.get("property_mae", {}).items():
        print(f"{'MAE ' + name:>16}: {row['mae']:.4g} {row['unit']}")
    print(f"\n{n_written} molecules, metrics, plots and report.html in {args.out}")
    return 0
