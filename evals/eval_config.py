"""What an evaluation is asked to do, typed and checked once when it is built.

``evals/generate.py`` and ``evals/predict.py`` turn their command lines into these objects; everything below
them reads fields of a frozen config, never the command line. Checks that need nothing but the values
themselves run here, in ``__post_init__``; checks that need the model or the dataset (a step count above the
model's T, a property the model does not predict) run where those are read, in ``pipeline.resolve_inputs``.
Messages name the command-line option, as that is what a user changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from molscale.datasets.errors import InputError

# --- where the molecules come from ------------------------------------------------------------------------

@dataclass(frozen=True)
class FromModel:
    """Sampled from a trained model: a run directory, a checkpoint folder or an exported file."""
    checkpoint: str


@dataclass(frozen=True)
class FromFile:
    """Read as given from an SDF or XYZ file (another model's samples, say)."""
    path: str


@dataclass(frozen=True)
class FromSplit:
    """The real molecules of one split of a dataset (the "data" row)."""
    dataset: str
    split: str


MoleculeSource = FromModel | FromFile | FromSplit


# What --cuda-graphs replays on GPU samplers: nothing, the network per chunk shape, or each whole denoising step
# (network, update and noise; trainer/model/denoising_graphs.py), the network's graphs serving the rest.
SAMPLING_GRAPHS = ("off", "network", "step")


def _at_least_one(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"{option} must be at least 1 (got {value})")


# --- evals/generate.py -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuideRequest:
    """--guide PROPERTY=VALUE and its options; ``start`` None: the sampler's default for ``on``."""
    property: str
    target: float
    scale: float
    start: int | None
    on: str

    @classmethod
    def parse(cls, text: str, scale: float, start: int | None, on: str) -> GuideRequest:
        pair = _name_value(text)
        if pair is None:
            raise InputError(f"--guide {text}: give PROPERTY=VALUE, such as lumo=-500")
        return cls(*pair, scale, start, on)


def _name_value(text: str) -> tuple[str, float] | None:
    """'lumo=-500' -> ('lumo', -500.0); None for anything else."""
    name, sep, value = text.partition("=")
    try:
        return (name.strip(), float(value)) if sep and name.strip() else None
    except ValueError:
        return None


def parse_targets(text: str) -> dict[str, float]:
    """``--target p=V[,q=W]`` -> {p: V, ...}; whether the names are the model's is checked with the model."""
    pairs = [_name_value(part) for part in text.split(",")]
    if None in pairs:
        raise InputError(f"--target {text!r}: give PROPERTY=VALUE pairs such as lumo=-0.05")
    return dict(pairs)


@dataclass(frozen=True)
class SamplingSettings:
    """How a model's molecules are sampled (unused for molecules from a file or a split)."""
    n_samples: int = 10_000  # EDM's evaluation draws 10,000 molecules
    batch: int = 250
    pair_budget: int | None = None
    steps: tuple[int, ...] | None = None  # several: the quality-against-steps sweep; the first is the output's
    sampler: str = "ancestral"
    seed: int = 0
    workers: int | None = None
    cuda_graphs: str = "off"  # one of SAMPLING_GRAPHS
    precision: str = "fp32"
    kernel: str | None = None

    def __post_init__(self):
        _at_least_one("--n-samples", self.n_samples)
        _at_least_one("--batch", self.batch)
        _at_least_one("--pair-budget", self.pair_budget)
        _at_least_one("--workers", self.workers)
        for steps in self.steps or ():
            _at_least_one("--steps", steps)
        if self.steps is not None and (not self.steps or len(set(self.steps)) != len(self.steps)):
            raise InputError(f"--steps {self.steps}: give one or more distinct step counts")
        if self.cuda_graphs not in SAMPLING_GRAPHS:
            raise InputError(f"--cuda-graphs {self.cuda_graphs!r}: choose one of {list(SAMPLING_GRAPHS)}")


@dataclass(frozen=True)
class EvalConfig:
    """evals/generate.py: where the molecules come from, how they are sampled and scored, where results go."""
    source: MoleculeSource
    out: str
    sampling: SamplingSettings
    guide: GuideRequest | None = None
    targets: dict[str, float] | None = None  # --target: a conditional model's fixed targets
    scorer: str | None = None
    unconditional_baseline: str | None = None  # an unconditional model sampled for the same atom counts
    reference: str | None = None
    reference_split: str = "test"
    property_mae: bool = False  # --property
    num_cpus: int | None = None
    wandb: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        sampled = isinstance(self.source, FromModel)
        if self.sampling.steps and len(self.sampling.steps) > 1 and not sampled:
            raise InputError("--steps with several values sweeps a checkpoint's sampler; it needs --checkpoint")
        if self.guide is not None and not sampled:
            raise InputError("--guide steers a checkpoint's sampler; it needs --checkpoint")
        if self.targets is not None and not sampled:
            raise InputError("--target sets a conditional checkpoint's targets; it needs --checkpoint")
        if self.scorer is not None and not sampled:
            raise InputError("--scorer predicts the guided or conditioned property of sampled molecules; it needs "
                             "--checkpoint")
        if self.unconditional_baseline is not None and (not sampled or self.scorer is None):
            raise InputError("--unconditional-baseline is scored by --scorer against a conditional checkpoint's "
                             "targets; it needs --checkpoint and --scorer")
        if self.property_mae and isinstance(self.source, FromFile):
            raise InputError("--property needs a model (--checkpoint) or property labels (--dataset); "
                             "--molecules has neither")
        _at_least_one("--num-cpus", self.num_cpus)

    @property
    def checkpoint(self) -> str | None:
        return self.source.checkpoint if isinstance(self.source, FromModel) else None


# --- evals/predict.py --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictConfig:
    """evals/predict.py: a model's properties for the molecules of one file."""
    checkpoint: str
    input: str
    out: str
    properties: tuple[str, ...] | None = None  # None: every property the model predicts
    conformers: int = 5
    weighting: str = "lowest"
    embed_2d: bool = False
    seed: int = 0
    chunk: int = 256
    local: bool = False
    num_cpus: int | None = None

    def __post_init__(self):
        _at_least_one("--conformers", self.conformers)
        _at_least_one("--chunk", self.chunk)
        _at_least_one("--num-cpus", self.num_cpus)
        if self.properties is not None and not self.properties:
            raise InputError("--properties names no property; leave it out to predict every property")
