"""Exporting a run as a shareable model: one ``.safetensors`` file with the weights and a JSON card that says how
to rebuild them (reading it back is checkpoints.load_exported, next to the other checkpoint readers).

The card travels inside the file (safetensors metadata, key ``molscale_card``), so the file alone is enough to
generate and predict: model and diffusion configs, atom vocabulary, property names, units and normalisation,
the train split's atom-count histogram (for sampling molecule sizes), the dataset's URL (without credentials)
and the SHA-256 of its manifest, the training step and which weights were exported (EMA when the run kept them).
A copy of the card is written next to the file as ``<file>.json`` for people and model registries; loading reads
the embedded one. ``weights_sha256`` (over the tensors in name order) makes a corrupted file fail on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from molscale.datasets.shards.storage import redact_url
from molscale.trainer.train.checkpoints import (
    CARD_FORMAT,
    CARD_KEY,
    CheckpointError,
    model_configs,
    model_weights,
    read_model_states,
    weights_digest,
)


def manifest_digest(dataset_url: str) -> str | None:
    """SHA-256 of the dataset's manifest.json, or None when it cannot be read from here."""
    from molscale.datasets.shards import storage
    try:
        fs, path = storage.get_fs(dataset_url)
        return hashlib.sha256(fs.cat_file(storage.join(path, "manifest.json"))).hexdigest()
    except Exception:  # an unreachable bucket, a moved folder: the card says "unknown" rather than failing
        return None


def property_units(dataset_url: str, names) -> dict[str, str]:
    """Units of ``names``: the dataset manifest's when it is readable here, else the QM9 table's, else ""."""
    from molscale.datasets.chemistry.properties import QM9_PROPERTIES
    from molscale.datasets.shards.manifest import ManifestError, load_manifest
    units = {p.name: p.unit for p in QM9_PROPERTIES}
    try:
        declared = load_manifest(dataset_url).data.get("properties", {}) if dataset_url else {}
        units.update({n: spec.get("unit", "") for n, spec in declared.items() if isinstance(spec, dict)})
    except (ManifestError, OSError, ValueError):
        pass
    return {n: units.get(n, "") for n in names}


def export_checkpoint(run: str, out: str, use_ema: bool = True) -> dict:
    """Write the weights of ``run`` (a run directory or checkpoint folder) to ``out``; returns the card."""
    from safetensors.torch import save_file
    folder, states, state = read_model_states(run)
    if state.get("objective", "diffusion") != "diffusion":
        raise CheckpointError(f"{folder} is a {state['objective']} pretraining checkpoint; export the run "
                              f"fine-tuned from it")
    cfg, diffusion = model_configs(state)
    weights, used_ema = model_weights(state, use_ema)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in weights.items()}
    stats = state.get("prop_stats") or {"mean": None, "mad": None}
    card = {
        "format": CARD_FORMAT,
        "model_config": dataclasses.asdict(cfg),
        "diffusion_config": dataclasses.asdict(diffusion),
        "atom_vocab": list(cfg.atom_vocab),
        "properties": list(cfg.properties),
        "condition_on": list(cfg.condition_on),
        "property_units": property_units(state.get("dataset_url", ""), cfg.property_columns),
        "property_stats": stats,
        "atom_count_histogram": {str(k): int(v) for k, v in state["atom_count_histogram"].items()},
        # the URL as a card may show it: credentials redacted (storage.redact_url); a reader with its own
        # credentials (environment, storage options) still reaches s3://***@bucket/x (storage.url_credentials)
        "dataset": {"url": redact_url(state.get("dataset_url", "")),
                    "manifest_sha256": manifest_digest(state.get("dataset_url", ""))},
        "step": int(state.get("step", 0)),
        "weights": "ema" if used_ema else "model",
        "exported_from": os.path.abspath(folder),
        "weights_sha256": weights_digest(tensors),
    }
    folder_out = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder_out, exist_ok=True)
    save_file(tensors, out, metadata={CARD_KEY: json.dumps(card, sort_keys=True)})
    with open(out + ".json", "w") as f:
        json.dump(card, f, indent=1, sort_keys=True)
    return card
