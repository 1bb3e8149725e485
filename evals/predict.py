"""Predict a trained UniGEM's properties for your own molecules (SDF, XYZ or SMILES) -> one CSV row each.

    python evals/predict.py --checkpoint RUN_DIR --input molecules.sdf --out preds.csv
    python evals/predict.py --checkpoint RUN_DIR --input smiles.smi --conformers 5 --out preds.csv
        [--conformers-weighting lowest|boltzmann|equal]

Rows follow the input order and carry the record's name (SDF title, XYZ comment, SMILES name column) and
SMILES; a record that cannot be read, embedded or handled by the model stays in the file with status
"rejected" and the reason. Inputs larger than --chunk records fan out over Ray (RAY_ADDRESS, the job's cluster,
or a local one).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    del sys.path[0]  # evals/ holds molscale.evals' modules, not top-level ones
if importlib.util.find_spec("molscale") is None:  # a checkout without `pip install -e .`: serve it from here
    sys.modules["molscale"] = types.ModuleType("molscale")
    sys.modules["molscale"].__path__ = [os.path.dirname(_HERE)]


def parse_args(argv=None):
    from molscale.evals.eval_config import PredictConfig
    from molscale.evals.property_prediction import WEIGHTINGS
    p = argparse.ArgumentParser(
        prog="evals/predict.py",
        description="Predict the properties a trained UniGEM checkpoint predicts (its growth branch at t = 0, from "
                    "3D coordinates) for the molecules of an SDF, XYZ or SMILES file, and write them as CSV, one row "
                    "per input record in input order, with units in the header.")
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--input", required=True,
                   help="molecules: .sdf/.sd/.mol (3D records; implicit hydrogens are placed by RDKit), .xyz (one or "
                        "more frames), .smi/.txt (SMILES [name] per line) or .csv (a smiles column, optionally name "
                        "or id); .gz allowed")
    p.add_argument("--out", required=True, help="CSV file to write, local or a URL (s3://...)")
    p.add_argument("--properties", default=None,
                   help="comma-separated subset of the model's properties (default: all it predicts)")
    p.add_argument("--conformers", type=int, default=PredictConfig.conformers,
                   help="SMILES only: RDKit ETKDGv3 + MMFF conformers per molecule (default 5)")
    p.add_argument("--conformers-weighting", choices=WEIGHTINGS, default=PredictConfig.weighting,
                   help="SMILES only: the row's value from its conformers' predictions: 'lowest' (default) the "
                        "lowest-MMFF-energy conformer's, as a QM9 label belongs to one relaxed geometry; 'boltzmann' "
                        "weighted by MMFF energy at 298.15 K; 'equal' the plain mean. The _std column is the "
                        "spread over the conformers")
    p.add_argument("--embed-2d", action="store_true",
                   help="SDF records without 3D coordinates (2D drawings, as chemical databases hand them out) get "
                        "--conformers conformers embedded from their bond table, as a SMILES does; without it they "
                        "are rejected")
    p.add_argument("--seed", type=int, default=PredictConfig.seed,
                   help="seeds the SMILES conformers (with each record's index)")
    p.add_argument("--chunk", type=int, default=PredictConfig.chunk,
                   help="records per Ray task; inputs up to this size run in this process (default 256)")
    p.add_argument("--local", action="store_true", help="never use Ray: every record in this process")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint whose states file pickles more than tensors and plain data (refused "
                        "by default: unpickling it runs code from the file). Only for files you trust, as GEOM's "
                        "--trust-pickle")
    return p.parse_args(argv)


def predict_config(args):
    """The command line as the frozen, checked PredictConfig that everything below this entry point reads."""
    from molscale.evals.eval_config import PredictConfig
    properties = (tuple(n.strip() for n in args.properties.split(",") if n.strip())
                  if args.properties is not None else None)
    return PredictConfig(checkpoint=args.checkpoint, input=args.input, out=args.out, properties=properties,
                         conformers=args.conformers, weighting=args.conformers_weighting, embed_2d=args.embed_2d,
                         seed=args.seed, chunk=args.chunk, local=args.local, num_cpus=args.num_cpus)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trust_pickle:  # through the environment, so that the Ray tasks that load the checkpoint trust it too
        os.environ["MOLSCALE_TRUST_PICKLE"] = "1"
    from molscale.datasets.errors import MolscaleError, report
    from molscale.evals.property_prediction import run
    try:
        return run(predict_config(args))
    except MolscaleError as err:  # 2: bad arguments, input file or checkpoint; 1: failed while running
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
