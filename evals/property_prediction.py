"""What ``evals/predict.py`` does: read a file of users' molecules, predict the model's properties for each,
write one CSV row per input record, in input order.

UniGEM predicts properties from coordinates alone (the growth branch at t = 0, ``predict_properties``); a
SMILES gets K RDKit conformers (MMFF-optimised) and its row holds one value from their predictions, by
``--conformers-weighting`` (WEIGHTINGS), and their spread (standard deviation, ddof 0, under the same weights;
for ``lowest`` the unweighted spread of all K, as a measure of how much the geometry matters).
Large inputs fan out as Ray tasks, one per chunk of records, each loading the checkpoint once; the rows
come back in input order whatever the number of workers.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter

import numpy as np

from molscale.datasets.errors import InputError
from molscale.datasets.sources.molecule_files import parse_record, split_records

PREDICT_BATCH = 128  # conformers per network call
# How a SMILES row's K conformer predictions become one value. A QM9 label is computed at one relaxed geometry
# (B3LYP/6-31G(2df,p), Ramakrishnan et al., Scientific Data 1, 140022, 2014), not averaged over conformers, so
# the default reads the lowest-energy MMFF conformer, this tool's best guess at such a geometry; `boltzmann`
# weights by MMFF energies at 298.15 K; `equal` is the plain mean (the only choice before this option).
WEIGHTINGS = ("lowest", "boltzmann", "equal")
KT_KCAL_PER_MOL = 0.0019872043 * 298.15  # R T at 298.15 K (kcal/mol)


def csv_columns(names, units) -> list[str]:
    props = []
    for n in names:
        unit = f" ({units[n]})" if units.get(n) else ""
        props += [f"{n}{unit}", f"{n}_std{unit}"]
    return ["index", "name", "smiles", "status", "atoms", "conformers", *props, "reason", "note"]


def predict_conformers(model, molecules: list[tuple[np.ndarray, np.ndarray]], batch: int) -> np.ndarray:
    """[C, P] predictions (dataset units) for C molecules or conformers (atomic numbers [N_i], positions float32
    [N_i, 3]); positions are centred here. UniGEM's head reads the positions only; a property classifier
    (objective 'property') reads the atom types too."""
    import torch

    from molscale.datasets.stream.loader import vocab_lookup
    from molscale.trainer.model.sampling import predict_properties
    vocab_index = vocab_lookup(model.cfg.atom_vocab)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(molecules), batch):
        part = molecules[start:start + batch]
        n_max = max(len(z) for z, _ in part)
        pos = np.zeros((len(part), n_max, 3), dtype=np.float32)
        types = np.zeros((len(part), n_max), dtype=np.int64)
        mask = np.zeros((len(part), n_max), dtype=bool)
        for i, (z, p) in enumerate(part):
            p = np.asarray(p, dtype=np.float32)
            pos[i, :len(p)], types[i, :len(p)], mask[i, :len(p)] = p - p.mean(0), vocab_index[np.asarray(z)], True
        with torch.no_grad():
            pred = predict_properties(model, {"pos": torch.from_numpy(pos).to(device),
                                              "atom_type": torch.from_numpy(types).to(device),
                                              "node_mask": torch.from_numpy(mask).to(device)})
        out.append(pred.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.cfg.properties)))


def conformer_weights(energies: list[float], count: int, weighting: str) -> np.ndarray:
    """Weights (summing to 1) of ``count`` conformer predictions; ``energies`` (kcal/mol, sorted ascending as
    the conformers are) may be empty (an SDF or XYZ record: one geometry, taken as given)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"conformer weighting must be one of {WEIGHTINGS} (got {weighting!r})")
    if count == 1 or not energies or weighting == "equal":
        return np.full(count, 1.0 / count)
    e = np.asarray(energies, dtype=np.float64)
    if weighting == "lowest":
        return (e == e.min()).astype(np.float64) / (e == e.min()).sum()
    w = np.exp(-(e - e.min()) / KT_KCAL_PER_MOL)
    return w / w.sum()


def summarise(values: np.ndarray, weights: np.ndarray, weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """(value, spread) [P] of a record's [K, P] conformer predictions under ``weights``."""
    mean = weights @ values
    if weighting == "lowest":  # one conformer read; the spread says how much the geometry matters
        return mean, values.std(0)
    return mean, np.sqrt(weights @ np.square(values - mean))


def predict_chunk(checkpoint: str, first: int, raw: list, names: list[str], conformers: int, seed: int,
                  model=None, batch: int = PREDICT_BATCH, weighting: str = "lowest",
                  max_atoms: int | None = None, embed_2d: bool = False) -> list[dict]:
    """Rows for the raw records ``raw`` (``split_records`` items) whose first has input index ``first``;
    ``max_atoms``: the training set's largest molecule (larger ones get a note); ``embed_2d``: SDF records
    without 3D coordinates get conformers embedded from their bonds."""
    if model is None:
        import torch

        from molscale.trainer.artifacts import load_for_eval
        torch.set_num_threads(1)  # one task per core
        loaded = load_for_eval(checkpoint)
        model, max_atoms = loaded.model, training_max_atoms(loaded)
    vocab = tuple(model.cfg.atom_vocab)
    records = [parse_record(first + i, fmt, payload, conformers, seed, vocab, embed_2d=embed_2d)
               for i, (fmt, payload) in enumerate(raw)]
    usable = [r for r in records if r.ok]
    flat = [(r.z, c) for r in usable for c in r.conformers]
    pred = predict_conformers(model, flat, batch)
    columns = [list(model.cfg.properties).index(n) for n in names]
    rows, at = [], 0
    for r in records:
        if r.ok and max_atoms and len(r.z) > max_atoms:
            r.add_note(f"{len(r.z)} atoms, more than the training set's largest ({max_atoms}): the head sums over "
                       f"atoms and extrapolates")
        row = {"index": r.index, "name": r.name, "smiles": r.smiles, "status": "ok" if r.ok else "rejected",
               "atoms": len(r.z) if r.z is not None else "", "conformers": len(r.conformers),
               "reason": r.reason or "", "kind": r.kind, "note": r.note, "values": None}
        if r.ok:
            values = pred[at:at + len(r.conformers)][:, columns]
            at += len(r.conformers)
            row["values"] = summarise(values, conformer_weights(r.energies, len(values), weighting), weighting)
        rows.append(row)
    return rows


def write_rows(rows: list[dict], names, units) -> str:
    """The CSV text: one row per input record; a rejected record's value cells are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_columns(names, units))
    for row in rows:
        cells = []
        for j in range(len(names)):
            if row["values"] is None:
                cells += ["", ""]
            else:
                cells += [f"{row['values'][0][j]:.6g}", f"{row['values'][1][j]:.6g}"]
        writer.writerow([row["index"], row["name"], row["smiles"], row["status"], row["atoms"], row["conformers"],
                         *cells, row["reason"], row["note"]])
    return buffer.getvalue()


def training_max_atoms(loaded) -> int | None:
    """The largest molecule (atoms) of the model's training split, from the checkpoint's histogram."""
    return max(loaded.atom_count_histogram) if loaded.atom_count_histogram else None


def _rows_over_ray(config, raw, names) -> list[dict]:
    from tqdm import tqdm

    from molscale.evals.ray_sampling import connect_ray, ray_get
    ray = connect_ray(config.num_cpus)
    task = ray.remote(num_cpus=1)(predict_chunk)
    refs = [task.remote(config.checkpoint, start, raw[start:start + config.chunk], names, config.conformers,
                        config.seed, weighting=config.weighting, embed_2d=config.embed_2d)
            for start in range(0, len(raw), config.chunk)]
    rows: list[dict] = []
    for ref in tqdm(refs, desc="predicting", unit="chunk"):  # in order: rows come back in input order
        rows += ray_get(ray, ref)
    return rows


def run(config) -> int:
    """evals/predict.py with its PredictConfig (eval_config): one CSV row per input record."""
    from molscale.datasets.shards import storage
    from molscale.trainer.artifacts import load_for_eval, property_units
    # Everything that can be wrong with the inputs fails here, before any molecule is embedded.
    loaded = load_for_eval(config.checkpoint)
    predicted = list(loaded.model.cfg.properties) if loaded.model.predicts_properties else []
    if not predicted:
        raise InputError(f"--checkpoint {config.checkpoint}: this model predicts no properties (train UniGEM with "
                         f"model.properties set)")
    if loaded.model.num_context:
        raise InputError(f"--checkpoint {config.checkpoint}: this model is conditioned on "
                         f"{loaded.model.cfg.condition_on}, so its predictions depend on values the input does not "
                         f"have; predict with an unconditional model")
    names = list(config.properties or predicted)
    unknown = [n for n in names if n not in predicted]
    if unknown:
        raise InputError(f"--properties: the model does not predict {', '.join(unknown)} (it predicts "
                         f"{', '.join(predicted)})")
    raw = split_records(config.input)
    if not raw:
        raise InputError(f"--input {config.input} holds no molecules")
    try:
        fs, out_path = storage.get_fs(config.out)
        if storage.is_local(fs):
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    except (ValueError, ImportError, OSError) as err:
        raise InputError(f"--out {config.out} cannot be written: {err}") from None
    units = loaded.property_units or property_units(loaded.dataset_url, names)

    use_ray = not config.local and (len(raw) > config.chunk or bool(os.environ.get("RAY_ADDRESS")))
    if use_ray:
        rows = _rows_over_ray(config, raw, names)
    else:
        rows = predict_chunk(config.checkpoint, 0, raw, names, config.conformers, config.seed, model=loaded.model,
                             weighting=config.weighting, max_atoms=training_max_atoms(loaded),
                             embed_2d=config.embed_2d)
    storage.write_bytes(fs, out_path, write_rows(rows, names, units).encode())

    ok = sum(r["status"] == "ok" for r in rows)
    counts = Counter(r["kind"] for r in rows if r["status"] != "ok")
    summary = f"{ok} of {len(rows)} molecules predicted ({', '.join(names)}) -> {config.out}"
    if counts:
        summary += "; rejected, listed in the CSV with the reason: " + ", ".join(
            f"{n} {kind}" for kind, n in counts.most_common())
    print(summary)
    if not ok:
        raise InputError(f"--input {config.input}: none of its {len(rows)} records could be used; the reasons are "
                         f"in {config.out}")
    return 0
