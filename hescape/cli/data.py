"""``hescape data ...``: simulate, import, validate and describe canonical datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  hescape data simulate --out data/sim                      # the embedded default dataset
  hescape data simulate --preset hescape-lung-healthy --patch-size 64 --out data/lung
  hescape data presets                                      # named sizes (HESCAPE panels)
  hescape data describe data/sim                            # donors, spots, genes, split
  hescape data import-visium --sample-sheet samples.csv --out data/visium
  hescape data import-hest --root hest_data --ids TENX95 TENX99 --out data/hest
  hescape data import --h5ad x.h5ad --patches p.npy --donor-key patient --out data/mine
  hescape data validate data/mine                           # exit 0 = loads cleanly
"""


def _split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("donor split (whole donors, never spots)")
    g.add_argument("--split-file", help="CSV (donor,split) or YAML (train: [donors]...) split")
    g.add_argument("--val-fraction", type=float, default=0.17, help="fraction of donors (0.17)")
    g.add_argument("--test-fraction", type=float, default=0.33, help="fraction of donors (0.33)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the donor shuffle")
    g.add_argument("--min-spots-per-donor", type=int, default=10,
                   help="donors with fewer spots are an error (10)")


def _common_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _split_args(p)


def _split_cfg(args):
    from hescape.config import SplitConfig

    return SplitConfig(val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                       seed=args.split_seed, file=args.split_file,
                       min_spots_per_donor=args.min_spots_per_donor)


def _kw(args) -> dict:
    return {"progress": not args.no_progress, "overwrite": args.overwrite}


def _done(path: Path) -> int:
    from hescape.data import load_paired

    print(load_paired(path, require_expression=False).describe())
    return 0


def _simulate(args) -> int:
    from hescape.config import SimulateConfig
    from hescape.data import simulate
    from hescape.data.presets import preset_config

    fields = {k: getattr(args, k) for k in SimulateConfig.model_fields
              if getattr(args, k, None) is not None}  # explicit flags win over the preset
    cfg = preset_config(args.preset, **fields) if args.preset else SimulateConfig(**fields)
    return _done(simulate(args.out, cfg, split=_split_cfg(args), **_kw(args)))


def _presets(args) -> int:
    from hescape.data.presets import preset_table

    print(preset_table())
    return 0


def _import_visium(args) -> int:
    from hescape.data import VisiumSample, import_visium

    if bool(args.sample_sheet) == bool(args.spaceranger):
        raise ValueError("give either --sample-sheet CSV or --spaceranger DIR (with --donor)")
    if args.sample_sheet:
        samples = args.sample_sheet
    else:
        path = Path(args.spaceranger)
        samples = [VisiumSample(path=path, donor=args.donor or path.name,
                                slide=args.slide or path.name,
                                image=Path(args.image) if args.image else None)]
    return _done(import_visium(samples, args.out, patch_um=args.patch_um, patch_px=args.patch_px,
                               image_res=args.image_res, gene_policy=args.gene_policy,
                               var_names=args.var_names, split=_split_cfg(args), **_kw(args)))


def _import_hest(args) -> int:
    from hescape.data import import_hest

    return _done(import_hest(args.root, args.out, metadata=args.metadata, ids=args.ids,
                             gene_policy=args.gene_policy, patch_size=args.patch_size,
                             split=_split_cfg(args), **_kw(args)))


def _import_hescape(args) -> int:
    from hescape.data import import_hescape

    split = _split_cfg(args) if (args.split_file or not args.split_csv) else None
    return _done(import_hescape(args.sources, args.out, reference=args.reference,
                                split_csvs=args.split_csv, donor_column=args.donor_column,
                                patch_size=args.patch_size, split=split, **_kw(args)))


def _import_generic(args) -> int:
    from hescape.data import import_generic

    return _done(import_generic(
        args.h5ad, args.out, patches=args.patches, image=args.image, mpp=args.mpp,
        patch_um=args.patch_um, patch_px=args.patch_px, donor_key=args.donor_key,
        slide_key=args.slide_key, donor=args.donor, slide=args.slide,
        counts_layer=args.counts_layer, allow_non_integer=args.allow_non_integer,
        split=_split_cfg(args), **_kw(args)))


def _validate(args) -> int:
    from hescape.data import load_paired

    data = load_paired(args.path, require_expression=not args.image_only, verify=args.verify)
    print(f"ok: {data.path} ({data.adata.n_obs:,} spots, {data.adata.n_vars:,} genes, "
          f"{len(data.adata.obs['donor'].unique())} donors, fingerprint {data.fingerprint})")
    return 0


def _describe(args) -> int:
    from hescape.data import load_paired

    print(load_paired(args.path, require_expression=False).describe())
    return 0


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="write a simulated paired dataset (known truth)",
                       description="Simulate donors x spots of paired counts and H&E-like "
                       "patches with adjustable donor (batch) effects.")
    _common_out(p)
    p.add_argument("--preset", help="a named size (HESCAPE panels: hescape-breast, "
                   "hescape-5k, ...; benchmark sizes: scale-10k, ...); list them with "
                   "`hescape data presets`; the flags below override its fields")
    g = p.add_argument_group("simulator (defaults: SimulateConfig)")
    for name, typ, text in [
        ("n_donors", int, "donors (6)"), ("spots_per_donor", int, "spots per donor (400)"),
        ("slides_per_donor", int, "slides per donor (1)"), ("n_genes", int, "genes (120)"),
        ("n_states", int, "latent cell states (5)"), ("patch_size", int, "px, 16-224 (32)"),
        ("donor_effect", float, "expression batch-effect strength, 0 = none (1.0)"),
        ("stain_effect", float, "image batch-effect strength, 0 = none (1.0)"),
        ("mutation_fraction", float, "fraction of donors with the mutation (0.5)"),
        ("seed", int, "random seed (0)"),
    ]:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=text)
    p.set_defaults(func=_simulate)
    p = sub.add_parser("presets", help="list the simulator's named sizes (HESCAPE panels, "
                       "benchmark sizes) with their patch-store size")
    p.set_defaults(func=_presets)


def _add_imports(sub) -> None:
    p = sub.add_parser("import-visium", help="import 10x Space Ranger output(s)",
                       description="Cut patches around in-tissue spots of one or more Space "
                       "Ranger 'outs' directories; several samples become one multi-donor "
                       "dataset via a sample sheet (CSV: path,donor,slide[,image]).")
    p.add_argument("--sample-sheet", help="CSV with path,donor,slide[,image] per sample")
    p.add_argument("--spaceranger", help="one Space Ranger 'outs' directory")
    p.add_argument("--image", help="its full-resolution H&E (TIFF/SVS/JPEG/PNG)")
    p.add_argument("--donor", help="donor of --spaceranger (default: directory name)")
    p.add_argument("--slide", help="slide of --spaceranger (default: directory name)")
    p.add_argument("--image-res", choices=["full", "hires", "lowres"], default="full",
                   help="cut from the full-res image, or the output's hires/lowres PNG")
    p.add_argument("--patch-um", type=float, default=100.0, help="patch side in microns (100)")
    p.add_argument("--patch-px", type=int, default=224, help="patch side in pixels (224)")
    p.add_argument("--gene-policy", choices=["error", "intersection", "union"], default="error",
                   help="when slides' gene panels differ (error)")
    p.add_argument("--var-names", choices=["symbols", "ids"], default="symbols")
    _common_out(p)
    p.set_defaults(func=_import_visium)


def _add_hest_hescape(sub) -> None:
    p = sub.add_parser("import-hest", help="import HEST-1k samples (st/, patches/, metadata)")
    p.add_argument("--root", required=True, help="HEST directory with st/ and patches/")
    p.add_argument("--metadata", help="metadata CSV (id, patient, organ, oncotree_code)")
    p.add_argument("--ids", nargs="+", help="sample ids to import (default: all in metadata)")
    p.add_argument("--gene-policy", choices=["error", "intersection", "union"], default="error")
    p.add_argument("--patch-size", type=int, help="resize patches to this many px")
    _common_out(p)
    p.set_defaults(func=_import_hest)

    p = sub.add_parser("import-hescape", help="import HESCAPE parquet/arrow files",
                       description="Rows name/image/gexp/cell_coords/...; genes from the "
                       "panel's reference h5ad; donors (and split) from split CSVs id,patient.")
    p.add_argument("sources", nargs="+", help="parquet/arrow files or directories")
    p.add_argument("--reference", required=True, help="panel reference h5ad (gene names)")
    p.add_argument("--split-csv", nargs="*", default=[],
                   help="train.csv val.csv test.csv with id,patient (part from the file name)")
    p.add_argument("--donor-column", help="take donors from this column instead of the CSVs")
    p.add_argument("--patch-size", type=int, help="resize patches to this many px")
    _common_out(p)
    p.set_defaults(func=_import_hescape)


def _add_generic(sub) -> None:
    p = sub.add_parser("import", help="import an h5ad + patch array (or + an H&E image)")
    p.add_argument("--h5ad", required=True, help="AnnData with raw counts (X, or --counts-layer)")
    p.add_argument("--patches", help=".npy uint8 N x H x W x 3 in obs order")
    p.add_argument("--image", help="H&E image to cut patches from at obsm['spatial'] (x, y px)")
    p.add_argument("--mpp", type=float, help="microns per pixel of --image (default: from uns)")
    p.add_argument("--patch-um", type=float, default=100.0)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--donor-key", default="donor", help="obs column holding the donor")
    p.add_argument("--slide-key", default="slide", help="obs column holding the slide")
    p.add_argument("--donor", help="one donor for all rows (instead of --donor-key)")
    p.add_argument("--slide", help="one slide for all rows (instead of --slide-key)")
    p.add_argument("--counts-layer", help="layer with raw counts ('raw' = adata.raw)")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept normalised expression (marked in the manifest)")
    _common_out(p)
    p.set_defaults(func=_import_generic)


def add_parser(sub) -> None:
    """Add ``hescape data`` and its commands."""
    group = sub.add_parser("data", help="simulate, import, validate and describe datasets",
                           description="Every source becomes one canonical dataset: "
                           "expression.h5ad + patches.npy + manifest.json.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = group.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_simulate(cmds)
    _add_imports(cmds)
    _add_hest_hescape(cmds)
    _add_generic(cmds)
    p = cmds.add_parser("validate", help="load a dataset with every check; non-zero on error")
    p.add_argument("path", help="dataset directory")
    p.add_argument("--verify", action="store_true", help="also recompute the fingerprint")
    p.add_argument("--image-only", action="store_true", help="do not require expression")
    p.set_defaults(func=_validate)
    p = cmds.add_parser("describe", help="print donors, spots per donor, genes, labels, split")
    p.add_argument("path", help="dataset directory")
    p.set_defaults(func=_describe)
