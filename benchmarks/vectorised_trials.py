"""Vectorised head-only trials: K configurations in stacked processes vs one per process.

Both sides train the same K head-only configurations (demo-like: 8 donors x 300 spots,
100 genes, frozen pretrained EfficientNet-Lite0 at 64 px -> 1280-d cached features, MLP
gene tower, the demo's MLP projection, CLIP, batch 64, 200 steps, validation every 100
steps (ASHA's rungs); member i: seed i, lr / temperature / weight decay cycling through
a few values), in the same run, from the same prepared inputs (simulation, expression and
feature cache made once, untimed: a study's driver precomputes them):

* baseline: every trial is its own fresh Python process running ``hescape.train.fit``
  (what a Tune trial actor does: import, load the inputs, build, train, validate,
  checkpoint), ``--concurrency`` at a time (default: one per core, 1 torch thread each, as
  Ray gives a 1-CPU trial ``OMP_NUM_THREADS=1``);
* ours: the K members split over ``--stacks`` fresh processes running
  ``hescape.train.stacked.StackedTrainer`` (default on a CPU: one single-threaded stack
  per core, validation in the stack's process, i.e. the same resources as the baseline;
  with ``--use-gpu``: one stack on the GPU, validation's numpy part on all cores).

Trials/hour = trials / wall seconds of the processes (spawn to exit). The baseline runs
``--baseline-sample`` of the K configurations (evenly spaced; a trial's time does not
depend on K), the stacked side always all K. A row per K (the K=16 row carries the
issue's target, >= 5x); then K=16 with one validation at the end (the training's own
gain), K=16 with a linear projection head (1280 -> 64 instead of the demo's 1280 -> 1280
-> 64 MLP: little arithmetic per member) and the engine's forward+backward vs
``torch.func`` (``vmap(functional_call)``).

    python -m benchmarks.vectorised_trials [--smoke]
    python -m benchmarks.vectorised_trials --ks 1,4,16,64,256 --use-gpu --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Row, command, ratio, setup_env, workdir
from benchmarks.studycfg import bench_config

KEY = "vectorised"
LRS = (1e-3, 2e-3, 4e-3)
TEMPERATURES = (0.05, 0.07, 0.1)
DECAYS = (0.05, 0.1)


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"ks": [2], "steps": 4, "eval_every": 2, "batch": 16, "sample": 2,
                "smoke": True, "end_k": 0, "linear_k": 0, "engine_k": 2, "stacks": 1}
    return {"ks": [1, 4, 16, 64], "steps": 200, "eval_every": 100, "batch": 64, "sample": 8,
            "smoke": False, "end_k": 16, "linear_k": 16, "engine_k": 16}


def member_config(workdir: Path, s: dict[str, Any], i: int, *, eval_every: int,
                  projection: str = "mlp", use_gpu: bool = False) -> Any:
    """Configuration of member ``i`` (all members share one stack key)."""
    if s["smoke"]:
        data = {"data.simulate.n_donors": 4, "data.simulate.spots_per_donor": 60,
                "data.simulate.patch_size": 16, "data.simulate.n_genes": 40,
                "data.split.val_fraction": 0.25, "data.split.test_fraction": 0.25,
                "model.image.name": "tiny_cnn", "model.gene.hidden_dim": 32,
                "model.embed_dim": 16}
    else:  # experiments/demo.yaml's data and model
        data = {"data.simulate.n_donors": 8, "data.simulate.spots_per_donor": 300,
                "data.simulate.patch_size": 32, "data.simulate.n_genes": 100,
                "data.simulate.donor_effect": 1.5, "data.split.val_fraction": 0.17,
                "data.split.test_fraction": 0.33, "model.image.name": "efficientnet_lite0",
                "model.image.pretrained": True, "model.image.image_size": 64,
                "model.gene.hidden_dim": 128, "model.embed_dim": 64,
                "eval.probe_pca": 64, "eval.inbatch_repeats": 10}
    return bench_config(workdir, {
        **data, "model.image.mode": "frozen", "model.projection": projection,
        "train.max_steps": s["steps"], "train.eval_every": eval_every,
        "train.warmup_steps": min(10, s["steps"] - 1), "train.batch_size": s["batch"],
        "train.seed": i, "train.lr": LRS[i % 3], "loss.init_temperature": TEMPERATURES[i % 3],
        "train.weight_decay": DECAYS[i % 2], "train.keep_checkpoints": 1,
        "train.use_gpu": use_gpu,
        # on a GPU a head-only trial is a packed one (in-process loop, no worker group)
        "train.gpus_per_trial": 0.25 if use_gpu else None,
    })


def sample(k: int, n: int) -> list[int]:
    """``min(k, n)`` evenly spaced member indices of ``range(k)``."""
    if k <= n:
        return list(range(k))
    return sorted({round(j * (k - 1) / (n - 1)) for j in range(n)})


# ----------------------------------------------------------------------------- workers
def worker(spec_path: Path) -> None:
    """A timed process: ``fit`` one trial, or ``fit_stacked`` a group (``--worker``)."""
    spec = json.loads(spec_path.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from hescape.config import StudyConfig

    cfgs = [StudyConfig.model_validate(c) for c in spec["cfgs"]]
    out: dict[str, Any] = {}
    if spec["kind"] == "fit":
        from hescape.train import fit

        result = fit(cfgs[0], run_dir=Path(spec["dirs"][0]), verbose=False,
                     prepared_path=spec["prepared_path"], features_path=spec["features_path"])
        out["final"] = [result.metrics]
        out["status"] = ["finished"]
    else:
        from hescape.train.stacked import Member, StackedTrainer

        trainer = StackedTrainer([Member(c, Path(d)) for c, d in zip(cfgs, spec["dirs"],
                                                                      strict=True)],
                                 prepared_path=spec["prepared_path"],
                                 features_path=spec["features_path"],
                                 validation_workers=spec["validation_workers"])
        outcomes = trainer.run()
        out["final"] = [o.result.metrics for o in outcomes]
        out["status"] = [o.status for o in outcomes]
        out["errors"] = [str(o.error) for o in outcomes if o.error is not None]
        out["timings"] = trainer.timings
        out["validation_workers"] = trainer.validation_workers
    Path(spec["out"]).write_text(json.dumps(out, default=float))


def _spawn(spec: dict[str, Any], path: Path) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.vectorised_trials", "--worker",
                             str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, spec: dict[str, Any]) -> dict[str, Any]:
    output, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} worker failed (exit {proc.returncode}):\n"
                           f"{output[-3000:]}")
    return json.loads(Path(spec["out"]).read_text())


def run_processes(specs: list[dict[str, Any]], wd: Path, concurrency: int
                  ) -> tuple[float, list[dict[str, Any]]]:
    """Run the worker specs, ``concurrency`` at a time; (wall seconds, their results)."""
    results: list[dict[str, Any] | None] = [None] * len(specs)
    running: list[tuple[int, subprocess.Popen]] = []
    todo = list(enumerate(specs))
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < concurrency:
            i, spec = todo.pop(0)
            running.append((i, _spawn(spec, wd / f"spec-{i}-{time.monotonic_ns()}.json")))
        i, proc = running.pop(0)
        results[i] = _wait(proc, specs[i])
    return time.perf_counter() - t0, [r for r in results if r is not None]


# ----------------------------------------------------------------------------- one K
def measure_k(wd: Path, s: dict[str, Any], k: int, paths: dict[str, Any], args: Any, *,
              eval_every: int) -> dict[str, Any]:
    """Both sides for ``k`` members: trials/hour, per-side seconds and the stack's split."""
    cores = args.cores
    cfgs = [member_config(wd, s, i, eval_every=eval_every, projection=args.projection,
                          use_gpu=args.use_gpu).model_dump(mode="json") for i in range(k)]
    tag = f"k{k}-e{eval_every}"
    common = {"prepared_path": paths["prepared_path"], "features_path": paths["features_path"]}
    picked = sample(k, s["sample"])
    base_specs = [{"kind": "fit", "cfgs": [cfgs[i]], "dirs": [str(wd / tag / f"fit{i}")],
                   "threads": max(1, cores // args.concurrency),
                   "out": str(wd / tag / f"fit{i}.json"), **common} for i in picked]
    (wd / tag).mkdir(parents=True, exist_ok=True)
    base_s, base = run_processes(base_specs, wd / tag, args.concurrency)
    n_stacks = max(1, min(s.get("stacks") or args.stacks, k))
    if args.use_gpu:  # one stack, all cores: torch threads + validation's numpy part
        threads, workers = max(1, cores // n_stacks), max(1, cores // n_stacks)
    else:  # the baseline's resources: single-threaded processes, validation in-process
        threads, workers = max(1, cores // args.concurrency), 0
    groups = [list(range(k))[j::n_stacks] for j in range(n_stacks)]
    stack_specs = [{"kind": "stack", "cfgs": [cfgs[i] for i in g],
                    "dirs": [str(wd / tag / f"stk{i}") for i in g], "members": g,
                    "threads": threads, "validation_workers": workers,
                    "out": str(wd / tag / f"stack{j}.json"), **common}
                   for j, g in enumerate(groups)]
    stack_s, parts = run_processes(stack_specs, wd / tag, n_stacks)
    stacked: dict[str, Any] = {"final": [None] * k, "status": [None] * k, "errors": [],
                               "timings": {}, "validation_workers": 0}
    for spec, part in zip(stack_specs, parts, strict=True):
        for i, final, status in zip(spec["members"], part["final"], part["status"],
                                    strict=True):
            stacked["final"][i], stacked["status"][i] = final, status
        stacked["errors"] += part["errors"]
        for name, value in part["timings"].items():
            stacked["timings"][name] = stacked["timings"].get(name, 0.0) + value
        stacked["validation_workers"] = part["validation_workers"]
    if any(st != "finished" for st in stacked["status"]):
        raise RuntimeError(f"K={k}: stacked members ended {stacked['status']}: "
                           f"{stacked['errors']}")
    # the same configurations on both sides: their final validation loss agrees (thread
    # counts differ between the sides, so not necessarily to the last bit)
    diffs = [abs(stacked["final"][i]["val/loss"] - b["final"][0]["val/loss"])
             for i, b in zip(picked, base, strict=True)]
    return {"k": k, "eval_every": eval_every, "projection": args.projection,
            "stacks": n_stacks,
            "stack_threads": threads, "baseline_trials": len(picked),
            "baseline_wall_s": base_s, "baseline_trials_per_h": 3600.0 * len(picked) / base_s,
            "stack_wall_s": stack_s, "stack_trials_per_h": 3600.0 * k / stack_s,
            "stack_timings": stacked["timings"],
            "validation_workers": stacked["validation_workers"],
            "max_abs_diff_final_val_loss": max(diffs)}


# ----------------------------------------------------------------------------- engine
def engine_step_ms(wd: Path, s: dict[str, Any], k: int, paths: dict[str, Any],
                   args: Any) -> dict[str, float]:
    """ms per forward + backward of K stacked heads: the engine's batched modules vs
    ``torch.func`` (``stack_module_state`` + ``vmap(functional_call)``, dropout with
    ``randomness="different"``: not the unbatched runs' masks), same inputs."""
    import copy

    import torch
    from torch.func import functional_call, stack_module_state, vmap

    from hescape.train.inputs import load_train_inputs
    from hescape.train.loop import build_model_and_optimizer
    from hescape.train.stack_model import HeadStack, stacked_loss

    torch.set_num_threads(max(1, args.cores // args.stacks))
    cfg = member_config(wd, s, 0, eval_every=s["eval_every"], projection=args.projection,
                        use_gpu=args.use_gpu)
    data = load_train_inputs(paths, cfg)
    from hescape.train.device import resolve_device

    dev = resolve_device(args.use_gpu)
    models = [build_model_and_optimizer(member_config(wd, s, i, eval_every=s["eval_every"],
                                                      projection=args.projection,
                                                      use_gpu=args.use_gpu),
                                        data, dev, False)[0] for i in range(k)]
    stack = HeadStack(models[0])
    stack.append([stack.row_of(m) for m in models])
    rows = torch.stack([torch.randperm(len(data.train_idx))[:s["batch"]] for _ in range(k)])
    idx = data.train_idx[rows.numpy()]
    gene = torch.as_tensor(data.gene_x[idx.reshape(-1)]).view(k, s["batch"], -1).to(dev)
    feats = torch.as_tensor(data.features[idx.reshape(-1)].astype("float32")).view(
        k, s["batch"], -1).to(dev)
    donors = torch.as_tensor(data.donors[idx]).to(dev)
    gens = [torch.Generator(dev).manual_seed(i) for i in range(k)]

    def ours() -> None:
        stack.zero_grad()
        out = stack.forward(gene=gene, features=feats, neg_adv=torch.zeros(k, device=dev),
                            generators=gens)
        stacked_loss("clip", out, donors).total.sum().backward()

    base = copy.deepcopy(models[0]).train()
    heads = [torch.nn.ModuleDict({"image_proj": m.image_proj, "gene_encoder": m.gene_encoder,
                                  "gene_proj": m.gene_proj}) for m in models]
    params, _ = stack_module_state(heads)
    scale = torch.stack([m.logit_scale.detach() for m in models]).requires_grad_(True)
    shell = torch.nn.ModuleDict({"image_proj": base.image_proj,
                                 "gene_encoder": base.gene_encoder,
                                 "gene_proj": base.gene_proj})

    def sub(p: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {n[len(prefix) + 1:]: v for n, v in p.items() if n.startswith(prefix + ".")}

    def one(p: dict[str, Any], ls: Any, g: Any, f: Any) -> Any:
        normalize = torch.nn.functional.normalize
        img = normalize(functional_call(shell.image_proj, sub(p, "image_proj"), (f,)), dim=-1)
        h = functional_call(shell.gene_encoder, sub(p, "gene_encoder"), (g,))
        gen = normalize(functional_call(shell.gene_proj, sub(p, "gene_proj"), (h,)), dim=-1)
        logits = ls.exp() * img @ gen.T
        labels = torch.arange(len(g), device=g.device)
        return 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                      + torch.nn.functional.cross_entropy(logits.T, labels))

    batched = vmap(one, randomness="different")

    def func() -> None:
        for p in params.values():
            p.grad = None
        batched(params, scale, gene, feats).sum().backward()

    def timed(fn: Any, n: int) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return 1000.0 * (time.perf_counter() - t0) / n

    n = 2 if s["smoke"] else 10
    return {"k": k, "engine_ms": timed(ours, n), "torch_func_ms": timed(func, n)}


# ----------------------------------------------------------------------------- rows
def _split(t: dict[str, float], wall: float) -> str:
    parts = {"set-up": t["setup_s"], "training": t["train_s"],
             "validation forward": t["validate_forward_s"],
             "validation metrics+reports": t["validate_metrics_and_report_s"]}
    rest = wall - sum(parts.values())
    return ", ".join(f"{n} {v:.0f} s" for n, v in parts.items()) + \
        f", process start/load/exit {rest:.0f} s"


def row_of(m: dict[str, Any], smoke: bool, target: str, args: Any, title: str) -> Row:
    return Row(
        key=KEY, title=title, unit="trials/h",
        baseline=(f"one trial per process ({args.concurrency} at a time, "
                  f"{max(1, args.cores // args.concurrency)} thread each)"),
        baseline_value=m["baseline_trials_per_h"],
        ours=(f"{m['stacks']} stacked process{'es' if m['stacks'] > 1 else ''} "
              f"({m['stack_threads']} thread{'s' if m['stack_threads'] > 1 else ''} each)"),
        ours_value=m["stack_trials_per_h"],
        ratio=ratio(m["stack_trials_per_h"], m["baseline_trials_per_h"], higher_is_better=True),
        target=target, command=command(KEY, smoke),
        notes=(f"baseline {m['baseline_trials']} of the {m['k']} configs in "
               f"{m['baseline_wall_s']:.0f} s; {m['k']} stacked in {m['stack_wall_s']:.0f} s "
               f"(summed over the stacks: {_split(m['stack_timings'], m['stacks'] * m['stack_wall_s'])}; "
               f"{m['validation_workers']} validation workers); final val/loss agrees to "
               f"{m['max_abs_diff_final_val_loss']:.1e}"),
        details=m)


def run(smoke: bool, workdir: Path, argv: list[str] | None = None) -> list[Row]:
    """All K of both sides, the K=16 end-only validation, the engine comparison."""
    from hescape.train.inputs import prepare_inputs

    args = parse_args(argv or [])
    s = sizes(smoke)
    if args.ks:
        s["ks"] = [int(x) for x in args.ks.split(",")]
    if args.steps:
        s["steps"] = args.steps
    if args.baseline_sample:
        s["sample"] = args.baseline_sample
    # untimed, shared: simulate, prepare the expression, cache the frozen features
    paths = prepare_inputs(member_config(workdir, s, 0, eval_every=s["eval_every"],
                                         projection=args.projection, use_gpu=args.use_gpu),
                           progress=False)
    rows = []
    measured = []
    for k in s["ks"]:
        print(f"[vectorised] K={k} ...", file=sys.stderr, flush=True)
        m = measure_k(workdir, s, k, paths, args, eval_every=s["eval_every"])
        measured.append(m)
        rows.append(row_of(m, smoke, ">= 5x" if k == 16 else "", args,
                           f"Vectorised head-only trials, K={k}, {args.projection} "
                           "projection head"))
    if not args.no_extras and s["end_k"]:
        print("[vectorised] one validation at the end ...", file=sys.stderr, flush=True)
        m = measure_k(workdir, s, s["end_k"], paths, args, eval_every=s["steps"])
        rows.append(row_of(m, smoke, "", args, f"Vectorised trials, K={s['end_k']}, "
                                               "validation at the end only"))
    if not args.no_extras and s["linear_k"] and args.projection != "linear":
        print("[vectorised] linear projection ...", file=sys.stderr, flush=True)
        lin = argparse.Namespace(**{**vars(args), "projection": "linear"})
        m = measure_k(workdir, s, s["linear_k"], paths, lin, eval_every=s["eval_every"])
        measured.append(m)
        rows.append(row_of(m, smoke, ">= 5x", lin, f"Vectorised trials, K={s['linear_k']}, "
                                                   "linear projection head"))
    if not args.no_extras:
        e = engine_step_ms(workdir, s, s["engine_k"], paths, args)
        rows.append(Row(
            key=KEY, title=f"Stacked heads, K={e['k']}: forward + backward", unit="ms/step",
            baseline="torch.func vmap(functional_call)", baseline_value=e["torch_func_ms"],
            ours="batched modules (HeadStack)", ours_value=e["engine_ms"],
            ratio=ratio(e["engine_ms"], e["torch_func_ms"], higher_is_better=False),
            target="> 1 (pick the faster)", command=command(KEY, smoke),
            notes="same inputs; vmap's dropout (randomness='different') cannot reproduce the "
                  "unbatched runs' masks, the engine's can", details=e))
    print(ratio_table(measured), file=sys.stderr)
    return rows


def ratio_table(measured: list[dict[str, Any]]) -> str:
    lines = ["| K | head | one per process (trials/h) | stacked (trials/h) | ratio |",
             "|---:|---|---:|---:|---:|"]
    for m in measured:
        r = m["stack_trials_per_h"] / m["baseline_trials_per_h"]
        lines.append(f"| {m['k']} | {m['projection']} | {m['baseline_trials_per_h']:.0f} | "
                     f"{m['stack_trials_per_h']:.0f} | {r:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--ks", default="", help="comma list of K (default 1,4,16,64)")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--baseline-sample", type=int, default=0,
                        help="configurations the one-per-process side runs per K (default 8)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="baseline processes at a time (default: one per core)")
    parser.add_argument("--stacks", type=int, default=0,
                        help="stacked processes the K members are split over (default: one "
                             "per core on a CPU, one with --use-gpu)")
    parser.add_argument("--projection", default="mlp", choices=["mlp", "linear"])
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the end-only validation row and the engine comparison")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cores = os.cpu_count() or 1
    args.concurrency = args.concurrency or args.cores
    args.stacks = args.stacks or (1 if args.use_gpu else args.cores)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args.worker)
        return
    setup_env()
    with workdir() as wd:
        rows = run(args.smoke, wd, sys.argv[1:] if argv is None else argv)
    data = [r.to_dict() for r in rows]
    text = json.dumps(data, indent=1, default=str)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()

