"""Export a trained run as one shareable file: python -m trainer.export RUN --out model.safetensors

The file holds the EMA weights (or the raw weights with --no-ema) and a JSON card (configs, atom vocabulary,
property names, units and normalisation, atom-count histogram, dataset manifest digest); a copy of the card is
written next to it as model.safetensors.json. evals/generate.py and evals/predict.py take the file as
--checkpoint, without the run directory.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export",
                                description="Write a run's weights and a JSON card to one .safetensors file that "
                                            "evals/generate.py and evals/predict.py load without the run directory.")
    p.add_argument("run", help="run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint whose states file pickles more than tensors and plain data (refused "
                        "by default: unpickling it runs code from the file). Only for files you trust, as GEOM's "
                        "--trust-pickle")
    args = p.parse_args(argv)
    if args.trust_pickle:
        os.environ["MOLSCALE_TRUST_PICKLE"] = "1"
    from molscale.datasets.errors import InputError, MolscaleError, report
    from molscale.trainer.artifacts import export_checkpoint
    try:
        if not args.out.endswith(".safetensors"):
            raise InputError(f"--out {args.out}: name the file *.safetensors")
        card = export_checkpoint(args.run, args.out, use_ema=not args.no_ema)
    except MolscaleError as err:
        return report(err)
    digest = card["dataset"]["manifest_sha256"]
    print(f"{args.out}: step {card['step']} ({card['weights']} weights), {len(card['atom_vocab'])} atom types, "
          f"properties {card['properties'] or 'none'}; dataset {card['dataset']['url'] or '?'} "
          f"(manifest {digest[:12] if digest else 'not readable here'}); card in {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
