"""What a run trains, by name (the run config's `objective`, recorded in every checkpoint): the one registry of
these names."""

from enum import StrEnum


class Objective(StrEnum):
    DIFFUSION = "diffusion"        # UniGEM or EDM denoising (model.kind): generates molecules
    MOLECULEJAE = "moleculejae"    # MoleculeJAE-style pretraining of the trunk: generates nothing
    PROPERTY = "property"          # EDM's property classifier (model/classifier.py): the conditional scorer
