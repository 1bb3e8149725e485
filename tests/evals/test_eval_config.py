"""The evaluation config (evals/eval_config.py) and the pipeline's stages taken one at a time, without Ray."""

from __future__ import annotations

import pytest

from molscale.datasets.errors import InputError
from molscale.datasets.shards.manifest import ManifestError
from molscale.evals.eval_config import (
    EvalConfig,
    FromFile,
    FromModel,
    FromSplit,
    GuideRequest,
    PredictConfig,
    SamplingSettings,
    parse_targets,
)
from molscale.evals.outputs.sdf import write_sdf
from molscale.evals.pipeline import obtain_molecules, resolve_inputs
from tests.evals.helpers import embedded

SAMPLING = SamplingSettings(n_samples=10, batch=5)


@pytest.mark.parametrize("fields, message", [
    ({"n_samples": 0}, "--n-samples must be at least 1 (got 0)"),
    ({"batch": -2}, "--batch must be at least 1 (got -2)"),
    ({"pair_budget": 0}, "--pair-budget must be at least 1"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"steps": (100, 0)}, "--steps must be at least 1 (got 0)"),
    ({"steps": (100, 100)}, "distinct step counts"),
    ({"steps": ()}, "distinct step counts"),
])
def test_sampling_settings_refuse_what_cannot_be_sampled(fields, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingSettings(**{"n_samples": 10, "batch": 5, **fields})


@pytest.mark.parametrize("fields, message", [
    ({"source": FromSplit("d", "test"), "sampling": SamplingSettings(10, 5, steps=(10, 5))}, "it needs --checkpoint"),
    ({"source": FromFile("m.sdf"), "guide": GuideRequest("lumo", 1.0, 1.0, None, "noisy")}, "--guide steers"),
    ({"source": FromSplit("d", "test"), "targets": {"lumo": 1.0}}, "--target sets"),
    ({"source": FromSplit("d", "test"), "scorer": "runs/x"}, "--scorer predicts"),
    ({"source": FromFile("m.sdf"), "property_mae": True}, "--molecules has neither"),
    ({"source": FromModel("runs/x"), "num_cpus": 0}, "--num-cpus must be at least 1"),
])
def test_eval_config_refuses_options_that_do_not_fit_the_source(fields, message):
    with pytest.raises(InputError, match=message):
        EvalConfig(**{"out": "o", "sampling": SAMPLING, **fields})


def test_eval_config_is_frozen_and_names_its_checkpoint():
    config = EvalConfig(source=FromModel("runs/x"), out="o", sampling=SamplingSettings(10, 5, steps=(100, 25)))
    assert config.checkpoint == "runs/x"
    assert EvalConfig(source=FromFile("m.sdf"), out="o", sampling=SAMPLING).checkpoint is None
    with pytest.raises(AttributeError):
        config.out = "elsewhere"


def test_guide_and_target_parsing():
    assert GuideRequest.parse("lumo=-500", 2.0, None, "clean") == GuideRequest("lumo", -500.0, 2.0, None, "clean")
    for text in ("lumo", "lumo=", "=3", "lumo=abc"):
        with pytest.raises(InputError, match="give PROPERTY=VALUE"):
            GuideRequest.parse(text, 1.0, None, "noisy")
    assert parse_targets("lumo=-0.05, homo=1") == {"lumo": -0.05, "homo": 1.0}
    with pytest.raises(InputError, match="PROPERTY=VALUE pairs"):
        parse_targets("lumo=1,homo")


@pytest.mark.parametrize("fields, message", [
    ({"conformers": 0}, "--conformers must be at least 1"),
    ({"chunk": 0}, "--chunk must be at least 1"),
    ({"properties": ()}, "--properties names no property"),
])
def test_predict_config_refuses_bad_values(fields, message):
    with pytest.raises(InputError, match=message):
        PredictConfig(**{"checkpoint": "c", "input": "i.smi", "out": "o.csv", **fields})


def test_stages_for_molecules_from_a_file_need_no_ray(tmp_path):
    """resolve_inputs reads and checks the file and the output folder; obtain_molecules hands back its molecules."""
    molecules = [embedded("CCO"), embedded("c1ccccc1")]
    path = tmp_path / "mine.sdf"
    write_sdf(molecules, str(path))
    config = EvalConfig(source=FromFile(str(path)), out=str(tmp_path / "out"), sampling=SAMPLING)
    inputs = resolve_inputs(config)
    assert inputs.source["evaluated"] == 2 and inputs.source["records"] == 2
    assert inputs.vocab == [1, 6, 8] and not inputs.all_single  # QM9 elements: QM9's bond-order protocol
    assert inputs.reference is None and inputs.loaded is None and inputs.local_out == str(tmp_path / "out")
    got = obtain_molecules(None, config, inputs)  # no Ray: nothing is sampled
    assert [z.tolist() for z, _ in got.molecules] == [z.tolist() for z, _ in molecules]
    assert got.swept == [] and got.condition is None


def test_stages_for_a_dataset_split(qm9_small, tmp_path):
    config = EvalConfig(source=FromSplit(qm9_small, "test"), out=str(tmp_path / "out"), sampling=SAMPLING,
                        property_mae=True)
    inputs = resolve_inputs(config)
    assert inputs.reference is inputs.dataset  # the dataset is its own reference, read once
    assert inputs.properties and set(inputs.properties) <= set(inputs.dataset.data["properties"])
    got = obtain_molecules(None, config, inputs)
    assert len(got.molecules) == inputs.dataset.split("test")["count"]
    with pytest.raises(ManifestError, match="no split 'tset'"):
        resolve_inputs(EvalConfig(source=FromSplit(qm9_small, "tset"), out=str(tmp_path / "o"), sampling=SAMPLING))
