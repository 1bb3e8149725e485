"""Command line: ``python -m datasets {build,inspect,bench} ...`` (see --help of each).

Exit codes (datasets/errors.py): 0 done; 2 bad input (arguments, unknown source, a destination that
cannot be written, a missing or malformed source file or dataset), printed as one ``error:`` line;
1 a failure while running (storage that kept failing, too many corrupt shards) and ``inspect`` finding
missing or wrong-size shards.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets",
                                description="Molecule sources -> WebDataset shards on a folder or any fsspec URL "
                                            "(s3://bucket/prefix), and tools to look at them.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{build,inspect,bench}")

    b = sub.add_parser("build", help="build a dataset from a source",
                       description="Build WebDataset shards and manifest.json from a molecule source. "
                                   "Rerunning a complete build with the same parameters does nothing.")
    b.add_argument("source", help="molecule source: qm9, geom, pcqm4mv2, smiles, or your own sdf / xyz file")
    b.add_argument("--out", required=True, help="destination folder or URL, e.g. data/qm9 or s3://bucket/qm9")
    b.add_argument("--limit", type=int, default=None,
                   help="keep only the first N molecules in source order (each in the split the full build gives it)")
    b.add_argument("--sample", type=int, default=None, metavar="N",
                   help="qm9: keep N molecules drawn at random (seeded by --sample-seed) instead of the first N: "
                        "their sizes follow the whole dataset's, as a few-label training set whose test split "
                        "looks like the full one should (each stays in its standard split)")
    b.add_argument("--sample-seed", type=int, default=0, help="qm9 --sample: the draw's seed (default 0)")
    b.add_argument("--shard-size", type=int, default=None,
                   help="qm9: molecules per shard (default 1000). geom, pcqm4mv2, smiles: source molecules per "
                        "chunk; each chunk is built by one worker into one shard per split (defaults: geom 100 "
                        "molecules = up to 3000 conformers, pcqm4mv2 5000, smiles 200)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel workers: processes, or Ray CPUs for smiles (default: all cores)")
    b.add_argument("--backend", choices=("process", "ray"), default=None,
                   help="geom, pcqm4mv2, smiles: run chunks in worker processes or as Ray tasks on a local Ray "
                        "($RAY_ADDRESS: that cluster); default ray for smiles, process otherwise. An interrupted "
                        "build resumes where it stopped when rerun with the same command")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = b.add_argument_group("geom", "GEOM-Drugs options")
    g.add_argument("--source", dest="source_path", default=None,
                   help="drugs_crude.msgpack or an rdkit_folder (holding summary_drugs.json)")
    g.add_argument("--conformers", type=int, default=None,
                   help="geom: lowest-energy conformers kept per molecule (default 30); smiles: conformers "
                        "embedded per molecule (default 5)")
    g.add_argument("--split-by", choices=("molecule", "conformer"), default="molecule",
                   help="80/10/10 split by molecule (default, no leakage) or by conformer (EDM protocol)")
    g.add_argument("--edm-permutation", default=None, metavar="NPY",
                   help="with --split-by conformer: EDM's geom_permutation.npy, to split exactly as the published "
                        "GEOM tables (checked against the source's conformer count before anything is built)")
    g.add_argument("--interleave", type=int, default=None, metavar="G",
                   help="spread each molecule's conformers over G shards per chunk (rank r to shard r mod G), so "
                        "that batches rarely hold two conformers of one molecule (default: --conformers; 1: off)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow loading the rdkit_folder's pickles (unpickling can execute code)")
    pc = b.add_argument_group("pcqm4mv2", "PCQM4Mv2 options")
    pc.add_argument("--sdf", default=None, help="pcqm4m-v2-train.sdf (plain or .gz)")
    pc.add_argument("--csv", default=None, help="data.csv.gz (idx, smiles, homolumogap in eV)")
    sm = b.add_argument_group("smiles, sdf, xyz", "SMILES -> RDKit conformers (ETKDGv3 + MMFF94); your own 3D files")
    sm.add_argument("--input", default=None,
                    help="smiles: a file of SMILES (one per line, or a CSV with a smiles column; .gz allowed), or "
                         "moses / moses:test / moses:test_scaffolds (needs `pip install --no-deps molsets`); "
                         "--conformers K sets conformers per molecule (default 5). sdf: an SDF file of 3D records. "
                         "xyz: a (multi-frame) XYZ file, extended-XYZ key=value comments allowed")
    sm.add_argument("--properties", default=None, metavar="NAME[:UNIT],...",
                    help="fields to keep as properties, with their units: CSV columns (smiles), SD tags (sdf) or "
                         "key=value comment fields (xyz); a record without a number in one is rejected and counted. "
                         "Train on them with model.properties")
    b.add_argument("--seed", type=int, default=0,
                   help="split seed for geom, pcqm4mv2 and smiles; also the ETKDG seed of smiles (default 0)")

    i = sub.add_parser("inspect", help="print a dataset's manifest summary",
                       description="Print splits, counts, atom types, size histogram, property statistics "
                                   "and rejections, and check that every shard is present.")
    i.add_argument("url", help="dataset folder or URL")
    i.add_argument("--no-check", action="store_true", help="do not list storage to check the shards")

    bench = sub.add_parser("bench", help="measure streaming throughput (molecules/s, MB/s)",
                           description="Stream a split through the training data loader and report molecules/s "
                                       "and MB/s.")
    bench.add_argument("url", help="dataset folder or URL")
    bench.add_argument("--split", default="train")
    bench.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: in-process)")
    bench.add_argument("--batch-size", type=int, default=64, help="molecules per batch (fixed-size batching)")
    bench.add_argument("--pair-budget", type=int, default=None,
                       help="batch by atom-pair budget instead of a fixed molecule count")
    bench.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from molscale.datasets.errors import InputError, MolscaleError, report
    try:
        if args.cmd == "build":
            from molscale.datasets.shards.build import command_line
            from molscale.datasets.sources.geom import build_geom
            from molscale.datasets.sources.pcqm4mv2 import build_pcqm4mv2
            from molscale.datasets.sources.qm9 import build_qm9
            from molscale.datasets.sources.smiles import (
                DEFAULT_CONFORMERS as SMILES_CONFORMERS,
            )
            from molscale.datasets.sources.smiles import build_smiles
            from molscale.datasets.sources.user_files import build_molecule_file
            from molscale.datasets.summary import summary
            backend = {"backend": args.backend or "process"}
            builders = {
                "qm9": lambda out, shard_size, **kw: build_qm9(out, shard_size=shard_size or 1000, sample=args.sample,
                                                               sample_seed=args.sample_seed, **kw),
                "geom": lambda out, **kw: build_geom(out, args.source_path, conformers=args.conformers or 30,
                                                     split_by=args.split_by, trust_pickle=args.trust_pickle,
                                                     seed=args.seed, edm_permutation=args.edm_permutation,
                                                     interleave=args.interleave, **backend, **kw),
                "pcqm4mv2": lambda out, **kw: build_pcqm4mv2(out, args.sdf, args.csv, seed=args.seed, **backend,
                                                             **kw),
                "smiles": lambda out, **kw: build_smiles(out, args.input,
                                                         conformers=args.conformers or SMILES_CONFORMERS,
                                                         seed=args.seed, backend=args.backend or "ray",
                                                         properties=args.properties, **kw),
                **{fmt: (lambda out, fmt=fmt, **kw: build_molecule_file(out, fmt, args.input, args.properties,
                                                                       seed=args.seed, **backend, **kw))
                   for fmt in ("sdf", "xyz")},
            }
            if args.sample is not None and args.source != "qm9":
                raise InputError(f"--sample draws QM9 molecules at random; {args.source} builds have --limit")
            if args.properties and args.source not in ("smiles", "sdf", "xyz"):
                raise InputError(f"--properties is for smiles, sdf and xyz builds; {args.source} has its own")
            if args.source not in builders:
                raise InputError(f"unknown source {args.source!r}; choose one of: {', '.join(builders)}")
            manifest = builders[args.source](args.out, limit=args.limit, shard_size=args.shard_size,
                                             workers=args.workers, command=command_line(),
                                             progress=not args.no_progress)
            print(summary(manifest, check_shards=False))
        elif args.cmd == "inspect":
            from molscale.datasets.shards.manifest import load_manifest, verify_shards
            from molscale.datasets.summary import summary
            manifest = load_manifest(args.url)
            print(summary(manifest, check_shards=not args.no_check))
            if not args.no_check and verify_shards(manifest):
                return 1  # the summary printed the problems: a check that failed, not bad input
        elif args.cmd == "bench":
            from molscale.datasets.bench import main as bench_main
            return bench_main(args)
    except MolscaleError as err:  # 2: bad input (arguments, source, destination, dataset); 1: failed while running
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
