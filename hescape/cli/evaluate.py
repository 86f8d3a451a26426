"""``hescape evaluate <checkpoint-dir-or-mlflow-run-id> <dataset>``: evaluate a trained model."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained checkpoint on a dataset (retrieval, probes, mixing, baselines)",
        description="Embed a dataset's train + held-out rows with a trained model and write "
        "test/... metrics, embeddings.h5ad, tables and plots. The dataset's own split decides "
        "which rows fit the probes and which are scored.",
    )
    p.add_argument("checkpoint", help="checkpoint directory, or an MLflow run id (32 hex)")
    p.add_argument("dataset", help="canonical dataset directory (see `hescape data`)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/evaluate/<checkpoint>__<dataset>)")  # fmt: skip
    p.add_argument("--part", default="test", help="split part to score (default: test)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval setting, e.g. --set ks=[1,5] --set baselines=false")  # fmt: skip
    p.add_argument("--label-key", default=None, help="spot-level label column (default: config)")
    p.add_argument(
        "--mutation-key", default=None, help="donor-level label column (default: config)"
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow URI for a run id (default: env/sqlite)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hescape.evaluate.checkpoint_eval import evaluate_checkpoint, resolve_checkpoint
    from hescape.evaluate.probe_spec import headline_keys

    ckpt = resolve_checkpoint(args.checkpoint, tracking_uri=args.tracking_uri)
    out = args.out or Path("runs") / "evaluate" / f"{ckpt.name}__{Path(args.dataset).name}"
    metrics, artifacts = evaluate_checkpoint(
        ckpt, args.dataset, out_dir=out, test_part=args.part, eval_overrides=args.overrides,
        label_key=args.label_key, mutation_key=args.mutation_key, device=args.device,
        batch_size=args.batch_size, progress=not args.quiet,
    )  # fmt: skip
    print(f"evaluated {ckpt} on {args.dataset} ({args.part} rows)")
    for key in headline_keys(args.part):  # the probe registry's headline figures
        value = metrics.get(key)
        if value is not None and not math.isnan(value):
            print(f"  {key.removeprefix(args.part + '/'):<36} {value:.4f}")
    notes = json.loads(artifacts["probe_notes"].read_text())
    if notes:
        print("notes:")
        for probe, reason in notes.items():
            print(f"  {probe}: {reason}")
    print(f"{len(metrics)} metrics -> {artifacts['metrics']}")
    print(f"artifacts in {out}")
    return 0
