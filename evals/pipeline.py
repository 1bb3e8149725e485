"""What ``evals/generate.py`` does, in four stages that each take the frozen EvalConfig and the previous
stages' results:

1. ``resolve_inputs``: load the model (or read the file, or open the split), the reference dataset and the
   scorer, and check everything that can be wrong with them, before Ray starts;
2. ``obtain_molecules``: sample them over Ray (with a step sweep, guidance or conditional targets), or take
   the file's or the split's;
3. ``score``: the EDM-protocol and distribution metrics as Ray tasks, then guidance, conditional and
   property metrics;
4. ``write_and_publish``: metrics.json, samples.sdf, plots, report.html, W&B, the output URL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import ManifestError, load_manifest
from molscale.datasets.shards.storage import redact_text, redact_url, redact_urls
from molscale.evals.eval_config import EvalConfig, FromFile, FromModel, FromSplit, GuideRequest
from molscale.evals.outputs.wandb_log import log_eval as _log_wandb
from molscale.evals.ray_sampling import ray_get

log = logging.getLogger("evals.generate")
STATS_CHUNK = 500  # molecules per metric task


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


def _property_mae(ray, manifest, split: str, names: list[str], checkpoint: str | None = None,
                  fit=None) -> dict:
    """Mean |prediction - truth| per property over a split, in dataset units, one Ray task per shard.

    Two trivial predictors sit beside every row: "train mean" (manifest property_stats; ``baseline_mae``, the mean
    absolute deviation of the split's values from the train mean) and "atom count" (``atom_count_mae``: the mean
    train value of molecules with the same number of atoms, fitted on the train split of ``fit``, the model's own
    training data, else of ``manifest``). A sum-pooled head learns size first, so a model's MAE says something
    about chemistry only where it is below the atom-count row. Without ``checkpoint`` the row's ``mae`` is the
    train-mean baseline; with one it is the model's.
    """
    from molscale.evals.conditional import atom_count_predictions, split_pairs, split_predictions
    means = np.asarray([manifest.property_stats()[n]["mean"] for n in names], dtype=np.float64)
    predictions, truth, counts = split_predictions(ray, manifest, split, names, checkpoint)
    count = len(truth)
    if not count:
        raise InputError(f"--property: split {split!r} of {manifest.shown_url} holds no molecules")
    baseline = np.abs(truth - means).mean(0)
    fit = fit if fit is not None else manifest
    by_count = np.abs(atom_count_predictions(*split_pairs(ray, fit, "train", names), counts) - truth).mean(0)
    model = np.abs(predictions - truth).mean(0) if checkpoint is not None else None
    units = manifest.data.get("properties", {})
    half = fit.split("train").get("half")
    fitted_on = f"{fit.shown_url} train" + (f" ({half['which']} half)" if half else "")
    rows = {}
    for i, name in enumerate(names):
        row = {"unit": units.get(name, {}).get("unit", ""), "n": int(count),
               "atom_count_mae": float(by_count[i]), "atom_count_fit": fitted_on}
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




# --- 1. resolve inputs ---------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What resolve_inputs read and checked: the model, file or split, the reference and the output folder."""
    source: dict                 # metrics.json "source": what was evaluated
    vocab: list[int]             # the elements the metrics tabulate
    all_single: bool             # GEOM protocol: every bond single for validity
    local_out: str               # where the outputs are written (a temporary folder for a remote --out)
    out_path: str                # --out's path on its filesystem
    loaded: object = None        # FromModel: the LoadedModel (trainer.artifacts)
    dataset: object = None       # FromSplit: its Manifest
    file_molecules: list | None = None  # FromFile: the readable molecules [(z, pos)]
    reference: object = None     # the reference dataset's Manifest, or None
    reference_url: str | None = None
    guide: GuideRequest | None = None   # --guide with its start filled in from the model
    conditioned: list[str] = field(default_factory=list)  # a conditional model's properties
    properties: list[str] | None = None  # --property: the properties whose MAE is reported
    training_data: object = None  # --property with a model: the Manifest (its half) the model trained on, if readable


def _resolve_model(config: EvalConfig, inputs: Inputs) -> None:
    from molscale.evals.conditional import check_scorer
    from molscale.trainer.artifacts import load_for_eval
    from molscale.trainer.model.sampling import guidance_for
    loaded = inputs.loaded = load_for_eval(config.checkpoint)
    model = loaded.model
    if not model.generates_molecules:
        raise InputError(f"--checkpoint {config.checkpoint} is a property classifier (objective "
                         f"{loaded.objective!r}): it generates no molecules; pass it as --scorer")
    inputs.vocab = list(model.cfg.atom_vocab)
    inputs.source = {"checkpoint": loaded.checkpoint, "step": loaded.step, "ema": loaded.used_ema}
    for steps in config.sampling.steps or ():
        if steps > model.num_steps:
            raise InputError(f"--steps {steps}: this model's diffusion has T = {model.num_steps} steps; sample "
                             f"with at most that many")
    if config.property_mae and not model.cfg.properties:
        raise InputError("--property: this checkpoint's model predicts no properties")
    guide = config.guide
    if guide is not None:
        try:
            start = guidance_for(model, guide.property, guide.target, guide.scale, guide.start, guide.on).start
        except ValueError as err:
            raise InputError(f"--guide {guide.property}={guide.target:g}: {err}") from None
        inputs.guide = GuideRequest(guide.property, guide.target, guide.scale, start, guide.on)
    inputs.conditioned = conditioned = list(model.cfg.condition_on)
    if config.targets is not None:
        if not conditioned:
            raise InputError("--target: this checkpoint's model is not conditioned on any property "
                             "(model.condition_on is empty); steer it with --guide PROPERTY=VALUE instead")
        if sorted(config.targets) != sorted(conditioned):
            raise InputError(f"--target names {sorted(config.targets)}, but the model is conditioned on "
                             f"{conditioned}")
    if config.unconditional_baseline is not None:
        if not conditioned:
            raise InputError("--unconditional-baseline compares a conditional checkpoint (model.condition_on) with "
                             "an unconditional one; this checkpoint is not conditioned")
        baseline = load_for_eval(config.unconditional_baseline).model
        if not baseline.generates_molecules or baseline.num_context:
            raise InputError(f"--unconditional-baseline {config.unconditional_baseline} must be an unconditional "
                             f"generative model (model.condition_on empty)")
        if list(baseline.cfg.atom_vocab) != list(model.cfg.atom_vocab):
            raise InputError(f"--unconditional-baseline {config.unconditional_baseline} has the atom vocabulary "
                             f"{list(baseline.cfg.atom_vocab)}, not the checkpoint's {list(model.cfg.atom_vocab)}")
    if config.scorer is not None:
        if not (guide or conditioned):
            raise InputError("--scorer predicts the guided or conditioned property; it needs --guide or a "
                             "conditional checkpoint (model.condition_on)")
        check_scorer(load_for_eval(config.scorer), config.scorer, [guide.property] if guide else conditioned)


def _resolve_reference(config: EvalConfig, inputs: Inputs) -> None:
    if isinstance(config.source, FromModel):
        inputs.reference_url = config.reference or inputs.loaded.dataset_url
    elif isinstance(config.source, FromSplit):
        inputs.reference_url = config.reference or config.source.dataset
    else:
        inputs.reference_url = config.reference
    if inputs.dataset is not None and inputs.reference_url == config.source.dataset:
        inputs.reference = inputs.dataset
    elif config.reference:  # asked for by name: it must be there
        inputs.reference = load_manifest(config.reference)
    elif inputs.reference_url is None:
        log.info("no --reference: novelty and the distribution metrics are skipped")
    else:  # the checkpoint's own dataset may not be reachable from here: evaluate without it
        inputs.reference = _reference_manifest(inputs.reference_url)
    if inputs.reference is not None:
        inputs.reference.split(config.reference_split)
        if isinstance(config.source, FromFile):
            inputs.vocab = sorted(set(inputs.vocab) | set(inputs.reference.atom_vocab))
    if inputs.conditioned and config.targets is None and inputs.reference is None:
        raise InputError(f"this model is conditioned on {inputs.conditioned}: its targets are drawn from the train "
                         f"split of its dataset, which is not readable here; pass --reference URL or --target "
                         f"{inputs.conditioned[0]}=VALUE")


def _training_data(loaded, reference, reference_url: str):
    """The dataset a model trained on (its half of the train split when it trained on one), which the atom-count
    row is fitted on; the reference dataset, with a warning, when the model's is not readable from here."""
    manifest = reference if loaded.dataset_url == reference_url else None
    if manifest is None and loaded.dataset_url:
        try:
            manifest = load_manifest(loaded.dataset_url)
        except (ManifestError, OSError) as err:
            log.warning("the model's training data %s is not readable (%s): the atom-count row is fitted on the "
                        "train split of %s instead", loaded.dataset_url, err, reference.shown_url)
    if manifest is None:
        return reference
    return manifest.half("train", loaded.train_half) if loaded.train_half else manifest


def _open_output(out: str) -> tuple[str, str]:
    """(local folder to write into, --out's path); a temporary folder when --out is remote."""
    from molscale.datasets.shards import storage
    try:
        fs, out_path = storage.get_fs(out)
        local_out = out_path if storage.is_local(fs) else tempfile.mkdtemp(prefix="molscale-eval-")
        os.makedirs(local_out, exist_ok=True)
    except (ValueError, ImportError, OSError) as err:  # an unknown protocol, s3fs missing, a folder not writable
        raise InputError(f"--out {redact_url(out)} cannot be written: {redact_text(str(err))}") from None
    return local_out, out_path


def resolve_inputs(config: EvalConfig) -> Inputs:
    """Stage 1: everything that can be wrong with the inputs fails here, before Ray starts."""
    inputs = Inputs(source={}, vocab=[], all_single=False, local_out="", out_path="")
    if isinstance(config.source, FromModel):
        _resolve_model(config, inputs)
    elif isinstance(config.source, FromFile):
        _, inputs.file_molecules, inputs.source = file_molecules(config.source.path)
        inputs.vocab = sorted({int(a) for z, _ in inputs.file_molecules for a in z})
    else:
        inputs.dataset = load_manifest(config.source.dataset)
        inputs.dataset.split(config.source.split)
        inputs.vocab = list(inputs.dataset.atom_vocab)
        inputs.source = {"dataset": config.source.dataset, "split": config.source.split}
    _resolve_reference(config, inputs)
    # --property: with a checkpoint, its model's MAE on the reference split (and the train-mean baseline);
    # with --dataset there is no model, so the baseline alone, on the evaluated split.
    if config.property_mae and inputs.loaded is not None and inputs.reference is not None:
        inputs.properties = property_names(inputs.reference, inputs.loaded.model.cfg.properties)
        inputs.training_data = _training_data(inputs.loaded, inputs.reference, inputs.reference_url)
    elif config.property_mae and inputs.dataset is not None:
        inputs.properties = property_names(inputs.dataset)
    inputs.all_single = bool(set(inputs.vocab) - set(QM9_ATOM_VOCAB))
    inputs.local_out, inputs.out_path = _open_output(config.out)
    return inputs


# --- 2. obtain molecules -------------------------------------------------------------------------------------

@dataclass
class Molecules:
    """What obtain_molecules got: the molecules evaluated, and how they were sampled."""
    molecules: list                      # [(z, pos)]
    swept: list = field(default_factory=list)  # a step sweep's other counts: [(K, molecules, sampling seconds)]
    sample_seconds: float | None = None  # the first step count's sampling time
    condition: tuple | None = None       # a conditional model's (atom counts, targets [n, C], description)
    cap_fraction: float | None = None    # guidance: the fraction of guided pushes that were capped
    baseline: list | None = None         # --unconditional-baseline: its molecules for the same atom counts


def _sampling_workers(ray, requested: int | None) -> int:
    from molscale.evals.ray_sampling import sampler_capacity
    capacity, unit = sampler_capacity(ray)
    workers = requested or capacity
    if workers > capacity:  # the extra actors would wait for resources forever
        log.warning("--workers %d is more than the cluster's %d %s(s): sampling with %d", workers, capacity, unit,
                    capacity)
        workers = capacity
    return workers


def _sample(ray, config: EvalConfig, inputs: Inputs) -> Molecules:
    from molscale.evals.conditional import draw_conditions
    from molscale.evals.ray_sampling import plan_summary, sample_over_ray
    from molscale.trainer.model.packing import default_pair_budget
    settings, loaded = config.sampling, inputs.loaded
    histogram = loaded.atom_count_histogram
    condition = None
    if inputs.conditioned:
        targets_from = inputs.reference
        if config.targets is None and loaded.train_half:  # the half the conditional model was trained on
            targets_from = inputs.reference.half("train", loaded.train_half)
        condition = draw_conditions(ray, targets_from, inputs.conditioned, settings.n_samples, settings.seed,
                                    config.targets, histogram)
    workers = _sampling_workers(ray, settings.workers)
    sweep = list(settings.steps or [loaded.model.num_steps])
    budget = settings.pair_budget or default_pair_budget(histogram, settings.batch)
    result = Molecules(molecules=[], condition=condition)
    for steps in sweep:
        began = time.perf_counter()
        sampled = sample_over_ray(ray, config.checkpoint, settings, steps, budget, workers, histogram,
                                  inputs.guide, condition[:2] if condition else None)
        seconds = time.perf_counter() - began
        if steps != sweep[0]:
            result.swept.append((steps, sampled.molecules, seconds))
            continue
        result.molecules, result.sample_seconds, result.cap_fraction = sampled.molecules, seconds, \
            sampled.guidance_cap_fraction
        inputs.source.update(
            guide=list(dataclasses.astuple(inputs.guide)) if inputs.guide else None,
            condition_on=inputs.conditioned or None, n_samples=settings.n_samples, seed=settings.seed,
            sampler=settings.sampler, steps=steps, network_evaluations=steps + 1, workers=workers,
            precision=settings.precision, cuda_graphs=settings.cuda_graphs,
            kernel=",".join(sampled.kernels),  # as the samplers ran it (fused falls back to eager off GPUs)
            chunks_per_node=sampled.chunks_per_node, sampling_chunks=plan_summary(sampled.plan, budget, settings.batch),
            sampling_seconds=round(seconds, 2), molecules_per_s=round(settings.n_samples / seconds, 2))
    if config.unconditional_baseline is not None:  # the same atom counts, seed and sampler; no targets
        result.baseline = sample_over_ray(ray, config.unconditional_baseline, settings, sweep[0], budget, workers,
                                          histogram, None, (condition[0], None)).molecules
    return result


def obtain_molecules(ray, config: EvalConfig, inputs: Inputs) -> Molecules:
    """Stage 2: the molecules to evaluate, from wherever config.source says."""
    if isinstance(config.source, FromModel):
        return _sample(ray, config, inputs)
    if isinstance(config.source, FromFile):
        return Molecules(molecules=inputs.file_molecules)
    from molscale.evals.protocol.molecules import load_split_molecules
    return Molecules(molecules=load_split_molecules(inputs.dataset, config.source.split))


# --- 3. score ------------------------------------------------------------------------------------------------

@dataclass
class Scores:
    metrics: dict                # metrics.json
    stats: dict                  # the per-molecule tallies the plots read (histograms, valid SMILES)
    reference_histograms: dict | None
    steps_curve: list | None


def _guidance_metrics(ray, config: EvalConfig, guide: GuideRequest, molecules, valid, cap_fraction) -> dict:
    """How close the generated molecules come to the guidance target: by the guiding model's own head and, with
    --scorer, by an independent model (the guiding head grades its own samples and is biased toward them); each
    over all molecules and over the valid ones alone (``valid``: one bool per molecule; null when none is)."""
    from molscale.evals.conditional import predict_molecules
    checkpoints = {"self": config.checkpoint, **({"scorer": config.scorer} if config.scorer else {})}
    valid = np.asarray(valid, dtype=bool)
    row = {"property": guide.property, "target": guide.target, "scale": guide.scale, "start": guide.start,
           "on": guide.on, "cap_fraction": cap_fraction, "scorer": config.scorer, "n_valid": int(valid.sum())}
    for key, checkpoint in checkpoints.items():
        values = predict_molecules(ray, checkpoint, [guide.property], molecules)[:, 0]
        errors = np.abs(values - guide.target)
        row[f"{key}_mae"], row[f"{key}_mean"] = float(errors.mean()), float(values.mean())
        row[f"{key}_mae_valid"] = float(errors[valid].mean()) if valid.any() else None
    return row


def _curve_row(metrics: dict, steps: int, seconds: float, settings) -> dict:
    """One row of the quality-against-steps table (metrics.json "steps_curve")."""
    keys = ("atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty")
    return {"steps": steps, "network_evaluations": steps + 1, "sampler": settings.sampler,
            **{k: metrics.get(k) for k in keys}, "sampling_seconds": round(seconds, 2),
            "seconds_per_1000": round(1000 * seconds / settings.n_samples, 2)}


def score(ray, config: EvalConfig, inputs: Inputs, got: Molecules) -> Scores:
    """Stage 3: every metric of the molecules, as Ray tasks."""
    from molscale.evals.conditional import conditional_metrics
    from molscale.evals.protocol.metrics import compute_metrics
    from molscale.evals.protocol.references import reference_histograms, reference_smiles
    stats = _stats_over_ray(ray, got.molecules, inputs.all_single)
    train_smiles = ref_hist = None
    reference = inputs.reference
    if reference is not None:
        ref_smiles_task = ray.remote(reference_smiles).remote(inputs.reference_url, "train", inputs.all_single)
        ref_hist = reference_histograms(inputs.reference_url, config.reference_split, inputs.all_single)
        train_smiles = ray_get(ray, ref_smiles_task) if "train" in reference.splits else None
    metrics = compute_metrics(stats, train_smiles, ref_hist)
    if inputs.guide:
        metrics["guidance"] = _guidance_metrics(ray, config, inputs.guide, got.molecules, stats["valid"],
                                                got.cap_fraction)
        for key in ("self_mae", "scorer_mae", "scorer_mae_valid", "cap_fraction"):
            if metrics["guidance"].get(key) is not None:
                metrics[f"guidance_{key}"] = metrics["guidance"][key]
    if got.condition is not None:
        names = inputs.conditioned
        units = {n: reference.data.get("properties", {}).get(n, {}).get("unit", "") if reference else ""
                 for n in names}
        metrics["conditional"] = conditional_metrics(ray, names, got.condition[1], got.molecules, got.condition[2],
                                                     config.scorer, reference, config.reference_split, units,
                                                     valid=stats["valid"], baseline=got.baseline)
        for name, row in metrics["conditional"]["properties"].items():
            for key in ("mae", "mae_valid", "unconditional_mae", "real_molecules_mae", "shuffled_targets_mae",
                        "atom_count_mae"):
                if key in row:
                    metrics[f"conditional_{key}_{name}"] = row[key]
    steps_curve = None
    if got.swept:
        steps_curve = [_curve_row(metrics, config.sampling.steps[0], got.sample_seconds, config.sampling)]
        for k, sampled, seconds in got.swept:
            row_metrics = compute_metrics(_stats_over_ray(ray, sampled, inputs.all_single), train_smiles, ref_hist)
            steps_curve.append(_curve_row(row_metrics, k, seconds, config.sampling))
        metrics["steps_curve"] = steps_curve
    if inputs.properties:
        if inputs.loaded is not None:
            rows = _property_mae(ray, reference, config.reference_split, inputs.properties, config.checkpoint,
                                 fit=inputs.training_data)
        else:
            rows = _property_mae(ray, inputs.dataset, config.source.split, inputs.properties)
        metrics["property_mae"] = rows
        for name, row in rows.items():
            metrics[f"mae_{name}"] = row["mae"]
            if "baseline_mae" in row:
                metrics[f"baseline_mae_{name}"] = row["baseline_mae"]
            metrics[f"atom_count_mae_{name}"] = row["atom_count_mae"]
    metrics["source"] = inputs.source
    metrics["reference"] = {"dataset": inputs.reference_url if reference is not None else None,
                            "distribution_split": config.reference_split, "novelty_split": "train"}
    return Scores(metrics, stats, ref_hist, steps_curve)


# --- 4. write and publish -------------------------------------------------------------------------------------

def _title(config: EvalConfig) -> str:
    if isinstance(config.source, FromModel):
        return "Generated molecules"
    if isinstance(config.source, FromFile):
        return f"Molecules of {os.path.basename(config.source.path)}"
    return f"Real molecules: {config.source.split} split"


def write_and_publish(config: EvalConfig, inputs: Inputs, got: Molecules, scores: Scores) -> tuple[dict, int]:
    """Stage 4: the output files, the W&B run and the upload to --out; (metrics as written, molecules written)."""
    from molscale.evals.outputs.report import write_report
    from molscale.evals.outputs.sdf import write_sdf
    local_out = inputs.local_out
    # what is written and logged from here on names datasets, checkpoints and --out without their credentials
    metrics, flat = redact_urls(scores.metrics), redact_urls(flat_metrics(scores.metrics))
    source = metrics["source"]
    n_written = write_sdf(got.molecules, os.path.join(local_out, "samples.sdf"), all_single=inputs.all_single)
    with open(os.path.join(local_out, "metrics.json"), "w") as f:
        json.dump(_json_safe(metrics), f, indent=1, allow_nan=False)
    write_report(flat, local_out, histograms=scores.stats.get("histograms"), reference=scores.reference_histograms,
                 example_smiles=sorted(set(scores.stats.get("valid_smiles", [])))[:20], title=_title(config),
                 notes={**{k: str(v) for k, v in source.items() if k != "rejected_records"},
                        "reference": str(metrics["reference"]["dataset"])},
                 steps_curve=scores.steps_curve)
    if config.wandb:
        try:
            wandb_config = {**{k: v for k, v in source.items() if k != "rejected_records"},
                            "out": redact_url(config.out)}
            from molscale.trainer.train.wandb_run import redacted_argv
            with redacted_argv():  # W&B records the command line: --reference / --dataset URLs may hold credentials
                _log_wandb(local_out, flat, os.path.join(local_out, "samples.sdf"), config.wandb_project,
                           wandb_config, training=inputs.loaded.wandb if inputs.loaded is not None else None,
                           training_step=source.get("step"))
        except Exception as err:  # the metrics are on disk already; W&B trouble must not lose them
            log.error("W&B logging failed: %s", err)
    if local_out != inputs.out_path:
        publish(local_out, config.out)
        shutil.rmtree(local_out, ignore_errors=True)
    return metrics, n_written


def print_summary(metrics: dict, config: EvalConfig, n_written: int) -> None:
    keys = ("n_samples", "atom_stability", "mol_stability", "validity", "uniqueness", "valid_unique", "novelty",
            "atom_type_tv", "bond_type_tv", "valency_w1", "bond_length_w1", "bond_angle_w1")
    print("\n".join(f"{k:>16}: {metrics.get(k)}" for k in keys if k in metrics))
    for name, row in metrics.get("property_mae", {}).items():
        baseline = f", train-mean baseline {row['baseline_mae']:.4g}" if "baseline_mae" in row else ""
        baseline += f", from the atom count alone {row['atom_count_mae']:.4g}"
        print(f"{'MAE ' + name:>16}: {row['mae']:.4g} {row['unit']} ({row['predictor']}{baseline})")
    for name, row in metrics.get("conditional", {}).get("properties", {}).items():
        if "mae" in row:
            bounds = (f" (scorer on real {config.reference_split} molecules {row['real_molecules_mae']:.4g}, "
                      f"shuffled targets {row['shuffled_targets_mae']:.4g}, from the atom count alone "
                      f"{row.get('atom_count_mae', float('nan')):.4g})" if "real_molecules_mae" in row else "")
            print(f"{'cond. MAE ' + name:>16}: {row['mae']:.4g} {row['unit']}{bounds}")
    print(f"\n{n_written} molecules, metrics, plots and report.html in {redact_url(config.out)}")


def run(config: EvalConfig) -> int:
    from molscale.evals.ray_sampling import connect_ray
    inputs = resolve_inputs(config)
    ray = connect_ray(config.num_cpus)
    started = time.perf_counter()
    got = obtain_molecules(ray, config, inputs)
    scores = score(ray, config, inputs, got)
    scores.metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics, n_written = write_and_publish(config, inputs, got, scores)
    print_summary(metrics, config, n_written)
    return 0
