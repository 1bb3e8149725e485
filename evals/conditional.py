"""Property-conditioned generation, evaluated as EDM evaluates it (Hoogeboom et al. 2022, section 4.2 and Table 3;
its released eval_conditional_qm9.py).

A model trained with ``model.condition_on: [p]`` on one half of the train split (``data.half``) samples molecules
for target values of p; a property predictor trained on the other half (``--scorer``: EDM's separate EGNN
classifier, a run of ``objective: property`` that reads atom types and positions; or a UniGEM run with
``model.properties: [p]``, whose growth-branch head reads positions only) predicts p for every generated
molecule, and the score is the MAE between targets and predictions. The reference rows, as EDM's Table 3 names
them: "QM9" (``real_molecules_mae``: the scorer on the real test molecules against their true values; EDM calls
it a lower bound, but it is the scorer's own error on real molecules, not a bound on what a generator can score),
"Naive" (``shuffled_targets_mae``: the same predictions against true values shuffled across molecules, what
molecules that ignore their target would score) and "#Atoms" (``atom_count_mae``: the train mean per atom count
against the true test values, computed without the scorer, so it cannot be compared with the generated row,
which carries the scorer's error). ``--unconditional-baseline`` adds the row that can be compared: an
unconditional model's molecules for the same atom counts, scored by the same scorer against the same targets
(``unconditional_mae``).

Targets: EDM draws (atom count, property value) pairs from the conditional model's training data (its
DistributionProperty, a histogram of the property per atom count); drawing whole pairs of real train molecules
samples the same joint distribution without the binning. A model trained on one half (the checkpoint records
``data.half``) draws from that half, as EDM's does, so the scorer's half never supplies targets.
``--target p=V`` gives every molecule the value V.
"""

from __future__ import annotations

import logging

import numpy as np

from molscale.datasets.errors import InputError
from molscale.evals.ray_sampling import draw_atom_counts, ray_get

log = logging.getLogger("molscale.evals")
PREDICT_BATCH = 128
SHUFFLE_SEED = 0  # the permutation of the shuffled-targets row (fixed: the row describes the data, not a run)


def draw_conditions(ray, manifest, names: list[str], n_samples: int, seed: int, fixed=None, histogram=None):
    """(atom counts [n], targets [n, C] in dataset units, description) for a conditional model's samples.

    fixed ({name: value}): every molecule gets those values, with atom counts drawn from ``histogram`` (the
    checkpoint's); otherwise n whole (atom count, values) pairs of real train molecules of ``manifest``, drawn
    with replacement with --seed (one Ray task reads each shard)."""
    if fixed is not None:
        counts = draw_atom_counts(n_samples, histogram, seed)
        targets = np.tile(np.asarray([fixed[n] for n in names], dtype=np.float64), (n_samples, 1))
        return counts, targets, f"fixed {fixed}"
    counts, values = split_pairs(ray, manifest, "train", names)
    if not len(counts):
        raise InputError(f"the train split of {manifest.url} holds no molecules to draw targets from")
    pick = np.random.default_rng(seed).integers(0, len(counts), size=n_samples)
    half = manifest.split("train").get("half")  # a Manifest.half view: the conditional model's own half
    where = f"the {half['which']} half of the train split" if half else "the train split"
    return counts[pick], values[pick], f"(atom count, value) pairs of {len(counts)} molecules of {where}"


def split_pairs(ray, manifest, split: str, names: list[str]):
    """(atom counts [n], values [n, C]) of every molecule of a split, one Ray task per shard."""

    @ray.remote(num_cpus=1)
    def shard_pairs(index: int):
        from molscale.datasets.stream.split_reader import iter_split_samples
        samples = list(iter_split_samples(manifest, split, shards=[index]))
        return (np.asarray([len(s["z"]) for s in samples], dtype=np.int64),
                np.asarray([[s["props"][n] for n in names] for s in samples], dtype=np.float64).reshape(-1, len(names)))

    parts = ray_get(ray, [shard_pairs.remote(i) for i in range(len(manifest.shards(split)))])
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(names)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def atom_count_predictions(train_counts, train_values, counts) -> np.ndarray:
    """EDM's "#Atoms" baseline: the mean train value of molecules with the same atom count (the overall train
    mean for a count the train split lacks) -> [n, C]."""
    out = np.tile(train_values.mean(0), (len(counts), 1))
    for n in np.unique(counts):
        same = train_counts == n
        if same.any():
            out[counts == n] = train_values[same].mean(0)
    return out


def predict_molecules(ray, checkpoint: str, names: list[str], molecules) -> np.ndarray:
    """[n, len(names)] predictions (dataset units) of ``checkpoint``'s property predictor for molecules [(z, pos)]
    (UniGEM's head reads the coordinates only; a property classifier, objective 'property', the atom types too),
    in one Ray task."""

    @ray.remote(num_cpus=1)
    def predictions(molecules):
        import torch

        from molscale.evals.property_prediction import predict_conformers
        from molscale.trainer.artifacts import load_for_eval
        torch.set_num_threads(1)
        model = load_for_eval(checkpoint).model
        values = predict_conformers(model, molecules, PREDICT_BATCH)
        return values[:, [list(model.cfg.properties).index(n) for n in names]]

    return np.asarray(ray_get(ray, predictions.remote(list(molecules))), dtype=np.float64)


def split_predictions(ray, manifest, split: str, names: list[str], checkpoint: str | None = None):
    """(predictions [n, P] or None without ``checkpoint``, true values [n, P], atom counts [n]) over a split, in
    dataset units; one Ray task per shard, each loading the checkpoint once."""

    @ray.remote(num_cpus=1)
    def shard_predictions(index: int):
        from molscale.datasets.stream.split_reader import iter_split_samples
        samples = list(iter_split_samples(manifest, split, shards=[index]))
        truth = np.asarray([[s["props"][n] for n in names] for s in samples], dtype=np.float64).reshape(-1, len(names))
        counts = np.asarray([len(s["z"]) for s in samples], dtype=np.int64)
        if checkpoint is None:
            return None, truth, counts
        import torch

        from molscale.datasets.stream.loader import collate, vocab_lookup
        from molscale.trainer.artifacts import load_for_eval
        from molscale.trainer.model.sampling import predict_properties
        torch.set_num_threads(1)
        model = load_for_eval(checkpoint).model
        columns = [list(model.cfg.properties).index(n) for n in names]
        vocab_index = vocab_lookup(manifest.atom_vocab)
        read = tuple(model.cfg.property_columns)  # a model conditioned on other properties reads them too
        out = []
        for i in range(0, len(samples), PREDICT_BATCH):
            batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                     for k, v in collate(samples[i:i + PREDICT_BATCH], vocab_index, read, False).items()}
            out.append(predict_properties(model, batch)[:, columns].double().numpy())
        return (np.concatenate(out) if out else np.zeros((0, len(names)))), truth, counts

    parts = ray_get(ray, [shard_predictions.remote(i) for i in range(len(manifest.shards(split)))])
    truth = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, len(names)))
    counts = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    if checkpoint is None:
        return None, truth, counts
    return np.concatenate([p[0] for p in parts]), truth, counts


def check_scorer(scorer, path: str, names: list[str]) -> None:
    """A clear error, before any sampling, for a --scorer (``scorer``: its LoadedModel, read from ``path``) that
    cannot predict the guided or conditioned properties ``names``."""
    model = scorer.model
    predicted = list(model.cfg.properties) if model.predicts_properties else []
    missing = [n for n in names if n not in predicted]
    if missing:
        raise InputError(f"--scorer {path} predicts {predicted}, not {missing}: train a property classifier "
                         f"(objective property) with model.properties {missing} on the other half of the train split "
                         f"(data.half)")
    if model.num_context:
        raise InputError(f"--scorer {path} is itself conditioned on {model.cfg.condition_on}; the scorer must be "
                         f"an unconditional property predictor")


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two columns; None where either is constant (undefined there)."""
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None


def conditional_metrics(ray, names: list[str], targets: np.ndarray, molecules, drawn: str, scorer: str | None,
                        reference, test_split: str, units: dict, valid=None, baseline=None) -> dict:
    """metrics.json "conditional": per conditioning property, the MAE between targets and the scorer's
    predictions for the generated molecules, and the reference rows on the real ``test_split`` molecules: the
    scorer against their true values and against those shuffled, and EDM's "#Atoms" baseline (the values
    predicted from the atom count alone, without the scorer, so not comparable with the generated MAE); with
    ``baseline`` (an unconditional model's molecules for the same atom counts) the comparable row,
    ``unconditional_mae``; ``valid`` (one bool per molecule) adds ``mae_valid``."""
    valid = np.ones(len(molecules), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    block = {"targets": drawn, "n": len(molecules), "n_valid": int(valid.sum()), "scorer": scorer, "properties": {}}
    if scorer is None:
        log.warning("no --scorer: the conditional MAE needs a property predictor trained on the other half of the "
                    "train split; metrics.json 'conditional' lists the targets only")
    predicted = predict_molecules(ray, scorer, names, molecules) if scorer else None
    # an unconditional model's molecules for the same atom counts, scored against the same targets: the #Atoms
    # row passed through the same scorer, so that it carries the scorer's error as the generated row does
    unconditional = predict_molecules(ray, scorer, names, baseline) if scorer and baseline is not None else None
    real_pred, real_truth, _ = (split_predictions(ray, reference, test_split, names, scorer)
                                if scorer and reference is not None else (None, None, None))
    shuffled = np.random.default_rng(SHUFFLE_SEED).permutation(len(real_truth)) if real_truth is not None else None
    by_count = None
    if reference is not None:
        test_counts, test_values = split_pairs(ray, reference, test_split, names)
        by_count = (atom_count_predictions(*split_pairs(ray, reference, "train", names), test_counts), test_values)
    for j, name in enumerate(names):
        row = {"unit": units.get(name, ""), "target_mean": float(targets[:, j].mean()),
               "target_std": float(targets[:, j].std())}
        if predicted is not None:
            errors = np.abs(predicted[:, j] - targets[:, j])
            row["mae"] = float(errors.mean())
            row["mae_valid"] = float(errors[valid].mean()) if valid.any() else None  # the RDKit-valid ones
            row["prediction_mean"] = float(predicted[:, j].mean())
            row["target_prediction_corr"] = correlation(predicted[:, j], targets[:, j])
        if unconditional is not None:
            row["unconditional_mae"] = float(np.abs(unconditional[:, j] - targets[:, j]).mean())
            # the atom counts alone tie what is generated to the targets: the level against which the conditional
            # model's target_prediction_corr reads
            row["unconditional_target_prediction_corr"] = correlation(unconditional[:, j], targets[:, j])
        if by_count is not None and len(by_count[1]):
            row["atom_count_mae"] = float(np.abs(by_count[0][:, j] - by_count[1][:, j]).mean())
        if real_pred is not None:
            row["real_molecules_mae"] = float(np.abs(real_pred[:, j] - real_truth[:, j]).mean())
            row["shuffled_targets_mae"] = float(np.abs(real_pred[:, j] - real_truth[shuffled, j]).mean())
            row["real_molecules_n"] = int(len(real_truth))
        block["properties"][name] = row
    return block
