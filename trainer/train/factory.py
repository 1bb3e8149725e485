"""What a run trains and how it reads its data, decided from its config in one place.

The training loop, ``--dry-run`` and the tests all go through these, so they agree on the model, the
atom vocabulary, the property normalisation and the loader settings of a run.
"""

from __future__ import annotations

import dataclasses

import torch

from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import Manifest
from molscale.datasets.stream.loader import StreamingLoader
from molscale.trainer.model.classifier import PropertyClassifier
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.model.objectives import Objective
from molscale.trainer.model.pretraining import MoleculeJAE
from molscale.trainer.train.config import RunConfig


def resolved_model_config(cfg: RunConfig, dataset_vocab: list[int]) -> ModelConfig:
    """The model section with the atom vocabulary filled in: the dataset's unless the config names one,
    which must then be the dataset's (a model's type channels mean the dataset's atomic numbers)."""
    vocab = list(cfg.model.atom_vocab or dataset_vocab)
    if vocab != list(dataset_vocab):
        raise InputError(f"model.atom_vocab {vocab} differs from the dataset's {list(dataset_vocab)} "
                         f"({cfg.data.url}); leave model.atom_vocab null to use the dataset's")
    return dataclasses.replace(cfg.model, atom_vocab=vocab, properties=list(cfg.model.properties),
                               condition_on=list(cfg.model.condition_on))


def property_normalisation(cfg: RunConfig, manifest: Manifest) -> dict:
    """{'mean': [...], 'mad': [...]} on the train split of the properties the model reads (regressed, then
    conditioning: ModelConfig.property_columns; empty lists: none)."""
    stats = manifest.property_stats()
    for key in ("properties", "condition_on"):
        missing = [p for p in getattr(cfg.model, key) if p not in stats]
        if missing:
            raise InputError(f"model.{key} {missing} have no statistics in {cfg.data.url} (it has "
                             f"{sorted(stats)})")
    columns = cfg.model.property_columns
    return {"mean": [stats[p]["mean"] for p in columns], "mad": [stats[p]["mad"] for p in columns]}


def build_run_model(cfg: RunConfig, model_cfg: ModelConfig, prop_stats: dict | None = None) -> torch.nn.Module:
    """The model the run's objective trains: UniGEM/EDM diffusion, the MoleculeJAE pretraining model or the
    property classifier."""
    if cfg.objective == Objective.MOLECULEJAE:
        return MoleculeJAE(model_cfg, cfg.pretrain, cfg.diffusion, cfg.loss)
    stats = prop_stats or {}
    if cfg.objective == Objective.PROPERTY:
        return PropertyClassifier(model_cfg, stats.get("mean") or None, stats.get("mad") or None)
    return build_model(model_cfg, cfg.diffusion, stats.get("mean") or None, stats.get("mad") or None, cfg.loss)


def make_loader(cfg: RunConfig, manifest: Manifest, split: str, shuffle: bool, rank: int,
                world_size: int) -> StreamingLoader:
    """The loader of ``split`` for this run (training: shuffled; validation: in order)."""
    return StreamingLoader(cfg.data, split=split, seed=cfg.train.seed, shuffle=shuffle,
                           properties=cfg.model.property_columns,
                           with_bonds=cfg.objective == Objective.MOLECULEJAE,  # the 2D channels of pretraining
                           storage=cfg.storage, rank=rank, world_size=world_size, manifest=manifest)
