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
from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import ManifestError, load_manifest
from molscale.datasets.shards.storage import redact_text, redact_url, redact_urls
from molscale.evals.outputs.wandb_log import log_eval as _log_wandb
from molscale.evals.ray_sampling import ray_get

log = logging.getLogger("evals.generate")
STATS_CHUNK = 500  # molecules per metric task


def _check_args(args) -> None:
    if args.n_samples < 1:
        raise InputError(f"--n-samples must be at least 1 (got {args.n_samples})")
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1 (got {args.batch})")
    if args.pair_budget is not None and args.pair_budget < 1:
        raise InputError(f"--pair-budget must be at least 1 (got {args.pair_budget})")
    for steps in args.steps or ():
        if steps < 1:
            raise InputError(f"--steps must be at least 1 (got {steps})")
    if args.steps and len(args.steps) > 1 and not args.checkpoint:
        raise InputError("--steps with several values sweeps a checkpoint's sampler; it needs --checkpoint")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1 (got {args.workers})")
    if args.guide is not None and not args.checkpoint:
        raise InputError("--guide steers a checkpoint's sampler; it needs --checkpoint")
    if args.target is not None and not args.checkpoint:
        raise InputError("--target sets a conditional checkpoint's targets; it needs --checkpoint")


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
    return merge_stats(ray_get(ray, refs))


def property_names(manifest, names=None) -> list[str]:
    """The properties of a dataset that have train-split statistics (manifest "properties" and
    "property_stats"); with ``names``, those names, and InputError for any the dataset lacks."""
    stats = manifest.property_stats()
    known = [n for n in manifest.data.get("properties", {}) if n in stats]
    if names is None:
        if not known:
            raise InputError(f"--property: {manifest.shown_url} has no properties with train-split statistics "
                             f"(manifest 'properties' and 'property_stats'); nothing to evaluate")
        return known
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"--property: the model predicts {missing}, which {manifest.shown_url} does not hold with "
                         f"train-split statistics (it has {known}); pass --reference with those properties")
    return list(names)


def _property_mae(ray, manifest, split: str, names: list[str], checkpoint: str | None = None) -> dict:
    """Mean |prediction - truth| per property over a split, in dataset units, one Ray task per shard.

    The baseline is the trivial predictor "train-split mean" (manifest property_stats): its MAE is the mean
    absolute deviation of the split's values from the train mean, the number any property model must beat.
    Without ``checkpoint`` the rows are that baseline; with one they are the model's MAE plus ``baseline_mae``.
    """
    from molscale.evals.conditional import split_predictions
    means = np.asarray([manifest.property_stats()[n]["mean"] for n in names], dtype=np.float64)
    predictions, truth = split_predictions(ray, manifest, split, names, checkpoint)
    count = len(truth)
    if not count:
        raise InputError(f"--property: split {split!r} of {manifest.shown_url} holds no molecules")
    baseline = np.abs(truth - means).mean(0)
    model = np.abs(predictions - truth).mean(0) if checkpoint is not None else None
    units = manifest.data.get("properties", {})
    rows = {}
    for i, name in enumerate(names):
        row = {"unit": units.get(name, {}).get("unit", ""), "n": int(count)}
        if model is None:
            row.update(mae=float(baseline[i]), predictor="train mean")
        else:
            row.update(mae=float(model[i]), predictor="model", baseline_mae=float(baseline[i]))
        rows[name] = row
    return rows


def file_molecules(path: str) -> tuple[list, list, dict]:
    """(records, molecules [(z, pos)] of the usable ones, source fields) of an SDF/XYZ file for --molecules.

    Molecules are evaluated as given: no hydrogens are added, nothing is re-embedded."""
    from molscale.datasets.sources.molecule_files import file_format, read_molecule_file, rejection_counts
    if file_format(path) == "smiles":
        raise InputError(f"--molecules {path}: SMILES carry no 3D coordinates to evaluate; give an SDF or XYZ file")
    records = read_molecule_file(path, add_hydrogens=False)
    if not records:
        raise InputError(f"--molecules {path} holds no molecules")
    molecules = [(r.z, r.conformers[0]) for r in records if r.ok]
    if not molecules:
        first = records[0]
        raise InputError(f"--molecules {path}: none of its {len(records)} records could be read (record "
                         f"{first.index}: {first.reason})")
    rejected = [{"index": r.index, "name": r.name, "reason": r.reason} for r in records if not r.ok]
    if rejected:
        log.warning("--molecules %s: %d of %d records rejected (%s); listed in metrics.json source.rejected_records",
                    path, len(rejected), len(records), rejection_counts(records))
    source = {"molecules": path, "records": len(records), "evaluated": len(molecules),
              "rejected": rejection_counts(records), "rejected_records": rejected}
    return records, molecules, source


def _guide(args, model) -> tuple | None:
    """(property, value, scale, start, on) of --guide, checked against the model; None without --guide."""
    if args.guide is None:
        return None
    name, sep, value = args.guide.partition("=")
    try:
        target = float(value) if sep else None
    except ValueError:
        target = None
    if target is None:
        raise InputError(f"--guide {args.guide}: give PROPERTY=VALUE, such as lumo=-500")
    from molscale.trainer.model.sampling import guidance_for
    try:
        start = guidance_for(model, name.strip(), target, args.guide_scale, args.guide_from,
                             args.guide_on).start  # the default filled in
    except ValueError as err:
        raise InputError(f"--guide {args.guide}: {err}") from None
    if args.scorer is not None:
        from molscale.trainer.artifacts import load_for_eval
        scorer = load_for_eval(args.scorer).model
        if name.strip() not in getattr(scorer.cfg, "properties", ()):
            raise InputError(f"--scorer {args.scorer} does not predict {name.strip()!r}")
    return name.strip(), target, args.guide_scale, start, args.guide_on


def _guidance_metrics(ray, args, guide, molecules, cap_fraction: float | None) -> dict:
    """How close the generated molecules come to the guidance target: by the guiding model's own head and, with
    --scorer, by an independent model (the guiding head grades its own samples and is biased toward them)."""
    from molscale.evals.conditional import predict_molecules
    name, target, scale, start, on = guide
    checkpoints = {"self": args.checkpoint, **({"scorer": args.scorer} if args.scorer else {})}
    row = {"property": name, "target": target, "scale": scale, "start": start, "on": on,
           "cap_fraction": cap_fraction, "scorer": args.scorer}
    for key, checkpoint in checkpoints.items():
        values = predict_molecules(ray, checkpoint, [name], molecules)[:, 0]
        row[f"{key}_mae"], row[f"{key}_mean"] = float(np.abs(values - target).mean()), float(values.mean())
    return row


def _curve_row(metrics: dict, steps: int, seconds: float, args) -> dict:
    """One row of the quality-against-steps table (metrics.json "steps_curve")."""
    keys = ("atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty")
    return {"steps": steps, "network_evaluations": steps + 1, "sampler": args.sampler,
            **{k: metrics.get(k) for k in keys}, "sampling_seconds": round(seconds, 2),
            "seconds_per_1000": round(1000 * seconds / args.n_samples, 2)}


def _json_safe(value):
    """NaN (a metric undefined for this set, e.g. bond-type TV when no bonds were generated) -> null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def flat_metrics(metrics: dict) -> dict:
    """The top-level scalar metrics (report.html's table, the W&B summary)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


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
    from molscale.evals.conditional import check_scorer, conditional_metrics, draw_conditions, parse_targets
    from molscale.evals.outputs.report import write_report
    from molscale.evals.outputs.sdf import write_sdf
    from molscale.evals.protocol.metrics import compute_metrics
    from molscale.evals.protocol.references import (
        reference_histograms,
        reference_smiles,
    )
    from molscale.evals.ray_sampling import (
        connect_ray,
        default_pair_budget,
        plan_summary,
        sample_over_ray,
        sampler_capacity,
    )
    from molscale.trainer.artifacts import load_for_eval
    _check_args(args)

    # Everything that can be wrong with the inputs fails here, before Ray starts.
    guide, conditioned = None, []
    if args.checkpoint:
        loaded = load_for_eval(args.checkpoint)
        vocab, histogram = loaded.model.cfg.atom_vocab, loaded.atom_count_histogram
        reference_url = args.reference or loaded.dataset_url
        source = {"checkpoint": loaded.checkpoint, "step": loaded.step, "ema": loaded.used_ema}
        for steps in args.steps or ():
            if steps > loaded.model.num_steps:
                raise InputError(f"--steps {steps}: this model's diffusion has T = {loaded.model.num_steps} "
                                 f"steps; sample with at most that many")
        if args.property and not loaded.model.cfg.properties:
            raise InputError("--property: this checkpoint's model predicts no properties")
        guide = _guide(args, loaded.model)
        conditioned = list(loaded.model.cfg.condition_on)
        if args.target is not None and not conditioned:
            raise InputError("--target: this checkpoint's model is not conditioned on any property "
                             "(model.condition_on is empty); steer it with --guide PROPERTY=VALUE instead")
        fixed_targets = parse_targets(args.target, conditioned) if conditioned else None
        if args.scorer is not None and not (guide or conditioned):
            raise InputError("--scorer predicts the guided or conditioned property; it needs --guide or a "
                             "conditional checkpoint (model.condition_on)")
        if args.scorer is not None and conditioned:
            check_scorer(args.scorer, conditioned)
    elif args.molecules:
        if args.property:
            raise InputError("--property needs a model (--checkpoint) or property labels (--dataset); "
                             "--molecules has neither")
        _, file_mols, source = file_molecules(args.molecules)
        reference_url = args.reference
        vocab = sorted({int(a) for z, _ in file_mols for a in z})
    else:
        manifest = load_manifest(args.dataset)
        manifest.split(args.split)
        vocab = manifest.atom_vocab
        reference_url = args.reference or args.dataset
        source = {"dataset": args.dataset, "split": args.split}
    if args.dataset and reference_url == args.dataset:
        reference = manifest
    elif args.reference:  # asked for by name: it must be there
        reference = load_manifest(args.reference)
    elif reference_url is None:
        log.info("no --reference: novelty and the distribution metrics are skipped")
        reference = None
    else:  # the checkpoint's own dataset may not be reachable from here: evaluate without it
        reference = _reference_manifest(reference_url)
    if args.molecules and reference is not None:
        vocab = sorted(set(vocab) | set(reference.atom_vocab))
    if reference is not None:
        reference.split(args.reference_split)
    if args.checkpoint and conditioned and fixed_targets is None and reference is None:
        raise InputError(f"this model is conditioned on {conditioned}: its targets are drawn from the train split "
                         f"of its dataset, which is not readable here; pass --reference URL or --target "
                         f"{conditioned[0]}=VALUE")
    # --property: with a checkpoint, its model's MAE on the reference split (and the train-mean baseline);
    # with --dataset there is no model, so the baseline alone, on the evaluated split.
    props_to_eval = None
    if args.property and args.checkpoint and reference is not None:
        props_to_eval = property_names(reference, loaded.model.cfg.properties)
    elif args.property and not args.checkpoint:
        props_to_eval = property_names(manifest)
    all_single = bool(set(vocab) - set(QM9_ATOM_VOCAB))  # GEOM protocol: all bonds single for validity

    from molscale.datasets.shards import storage
    try:
        fs, out_path = storage.get_fs(args.out)
        local_out = out_path if storage.is_local(fs) else tempfile.mkdtemp(prefix="molscale-eval-")
        os.makedirs(local_out, exist_ok=True)
    except (ValueError, ImportError, OSError) as err:  # an unknown protocol, s3fs missing, a folder not writable
        raise InputError(f"--out {redact_url(args.out)} cannot be written: {redact_text(str(err))}") from None

    ray = connect_ray(args.num_cpus)
    started = time.perf_counter()
    swept = []  # (K, molecules, sampling seconds) of a sweep's other step counts
    condition = None
    if args.checkpoint and conditioned:
        counts, targets, drawn = draw_conditions(ray, reference, conditioned, args.n_samples, args.seed,
                                                 fixed_targets, histogram)
        condition = (counts, targets)
    if args.checkpoint:
        capacity, unit = sampler_capacity(ray)
        workers = args.workers or capacity
        if workers > capacity:  # the extra actors would wait for resources forever
            log.warning("--workers %d is more than the cluster's %d %s(s): sampling with %d", workers, capacity,
                        unit, capacity)
            workers = capacity
        sweep = args.steps or [loaded.model.num_steps]
        budget = args.pair_budget or default_pair_budget(histogram, args.batch)
        for steps in sweep:
            began = time.perf_counter()
            sampled_run = sample_over_ray(
                ray, args.checkpoint, args.n_samples, budget, steps, args.seed, workers, histogram, args.cuda_graphs,
                args.precision, args.sampler, guide, condition, args.kernel)
            sampled, plan = sampled_run.molecules, sampled_run.plan
            if steps == sweep[0]:
                molecules, sample_seconds = sampled, time.perf_counter() - began
                chunks_per_node = sampled_run.chunks_per_node
                kernels_run, cap_fraction = sampled_run.kernels, sampled_run.guidance_cap_fraction
            else:
                swept.append((steps, sampled, time.perf_counter() - began))
        steps = sweep[0]
        source.update(guide=list(guide) if guide else None, condition_on=conditioned or None)
        source.update(n_samples=args.n_samples, seed=args.seed, sampler=args.sampler, steps=steps,
                      network_evaluations=steps + 1, workers=workers,
                      precision=args.precision, cuda_graphs=args.cuda_graphs,
                      kernel=",".join(kernels_run),  # as the samplers ran it (fused falls back to eager off GPUs)
                      chunks_per_node=chunks_per_node, sampling_chunks=plan_summary(plan, budget, args.batch),
                      sampling_seconds=round(sample_seconds, 2),
                      molecules_per_s=round(args.n_samples / sample_seconds, 2))
    elif args.molecules:
        molecules = file_mols
    else:
        from molscale.evals.protocol.molecules import load_split_molecules
        molecules = load_split_molecules(manifest, args.split)

    stats = _stats_over_ray(ray, molecules, all_single)
    train_smiles = ref_hist = None
    if reference is not None:
        ref_smiles_task = ray.remote(reference_smiles).remote(reference_url, "train", all_single)
        ref_hist = reference_histograms(reference_url, args.reference_split, all_single)
        train_smiles = ray_get(ray, ref_smiles_task) if "train" in reference.splits else None
    metrics = compute_metrics(stats, train_smiles, ref_hist)
    if guide:
        metrics["guidance"] = _guidance_metrics(ray, args, guide, molecules, cap_fraction)
        for key in ("self_mae", "scorer_mae", "cap_fraction"):
            if metrics["guidance"].get(key) is not None:
                metrics[f"guidance_{key}"] = metrics["guidance"][key]
    if condition is not None:
        units = {n: reference.data.get("properties", {}).get(n, {}).get("unit", "") if reference else ""
                 for n in conditioned}
        metrics["conditional"] = conditional_metrics(ray, conditioned, condition[1], molecules, drawn, args.scorer,
                                                     reference, args.reference_split, units)
        for name, row in metrics["conditional"]["properties"].items():
            for key in ("mae", "real_molecules_mae", "shuffled_targets_mae", "atom_count_mae"):
                if key in row:
                    metrics[f"conditional_{key}_{name}"] = row[key]
    steps_curve = None
    if swept:
        steps_curve = [_curve_row(metrics, steps, sample_seconds, args)]
        for k, sampled, seconds in swept:
            row_metrics = compute_metrics(_stats_over_ray(ray, sampled, all_single), train_smiles, ref_hist)
            steps_curve.append(_curve_row(row_metrics, k, seconds, args))
        metrics["steps_curve"] = steps_curve
    if props_to_eval:
        if args.checkpoint:
            rows = _property_mae(ray, reference, args.reference_split, props_to_eval, args.checkpoint)
        else:
            rows = _property_mae(ray, manifest, args.split, props_to_eval)
        metrics["property_mae"] = rows
        for name, row in rows.items():
            metrics[f"mae_{name}"] = row["mae"]
            if "baseline_mae" in row:
                metrics[f"baseline_mae_{name}"] = row["baseline_mae"]
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["source"] = source
    metrics["reference"] = {"dataset": reference_url if reference is not None else None,
                            "distribution_split": args.reference_split, "novelty_split": "train"}
    # what is written and logged from here on names datasets, checkpoints and --out without their credentials
    metrics, source, flat = redact_urls(metrics), redact_urls(source), redact_urls(flat_metrics(metrics))

    n_written = write_sdf(molecules, os.path.join(local_out, "samples.sdf"), all_single=all_single)
    with open(os.path.join(local_out, "metrics.json"), "w") as f:
        json.dump(_json_safe(metrics), f, indent=1, allow_nan=False)
    write_report(flat, local_out, histograms=stats.get("histograms"), reference=ref_hist,
                 example_smiles=sorted(set(stats.get("valid_smiles", [])))[:20],
                 title="Generated molecules" if args.checkpoint else
                 f"Molecules of {os.path.basename(args.molecules)}" if args.molecules else
                 f"Real molecules: {args.split} split",
                 notes={**{k: str(v) for k, v in source.items() if k != "rejected_records"},
                        "reference": str(metrics["reference"]["dataset"])},
                 steps_curve=steps_curve)
    if not args.no_wandb:
        try:
            config = {**{k: v for k, v in source.items() if k != "rejected_records"}, "out": redact_url(args.out)}
            from molscale.trainer.train.wandb_run import redacted_argv
            with redacted_argv():  # W&B records the command line: --reference / --dataset URLs may hold credentials
                _log_wandb(local_out, flat, os.path.join(local_out, "samples.sdf"), args.wandb_project, config,
                           training=loaded.wandb if args.checkpoint else None,
                           training_step=source.get("step"))
        except Exception as err:  # the metrics are on disk already; W&B trouble must not lose them
            log.error("W&B logging failed: %s", err)
    if local_out != out_path:
        publish(local_out, args.out)
        shutil.rmtree(local_out, ignore_errors=True)

    keys = ("n_samples", "atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty",
            "atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1")
    print("\n".join(f"{k:>16}: {metrics.get(k)}" for k in keys if k in metrics))
    for name, row in metrics.get("property_mae", {}).items():
        baseline = f", train-mean baseline {row['baseline_mae']:.4g}" if "baseline_mae" in row else ""
        print(f"{'MAE ' + name:>16}: {row['mae']:.4g} {row['unit']} ({row['predictor']}{baseline})")
    for name, row in metrics.get("conditional", {}).get("properties", {}).items():
        if "mae" in row:
            bounds = (f" (scorer on real {args.reference_split} molecules {row['real_molecules_mae']:.4g}, "
                      f"shuffled targets {row['shuffled_targets_mae']:.4g}, from the atom count alone "
                      f"{row.get('atom_count_mae', float('nan')):.4g})" if "real_molecules_mae" in row else "")
            print(f"{'cond. MAE ' + name:>16}: {row['mae']:.4g} {row['unit']}{bounds}")
    print(f"\n{n_written} molecules, metrics, plots and report.html in {redact_url(args.out)}")
    return 0
