"""6. Scaling: one trial on 1 vs 2 Ray Train workers (TorchTrainer, gloo on CPU).

Each worker runs the project's pieces (``load_train_inputs``, ``build_model``, DDP via
``ray.train.torch.prepare_model``, ``create_loss(rank, world_size)`` with negatives gathered
across workers, ``make_train_loader``) in a loop that times every step's parts: data,
forward (towers + gathered loss), backward (incl. DDP's gradient all-reduce), optimiser. The
gather's own cost is timed by an extra ``gather_with_grad`` of both embeddings per step
(the same collectives the loss issues). Per-worker batch is fixed, so 2 workers also double
the effective batch (gathered negatives). Each worker has 1 CPU thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, command, main_for
from benchmarks.raytools import ensure_ray
from benchmarks.studycfg import bench_config, quiet_eval, small_data

KEY = "scaling"


def trial_config(workdir: Path, smoke: bool) -> Any:
    """Tiny CNN fine-tuned at 96 px + MLP gene tower, per-worker batch 64 (smoke: 16 px, 16)."""
    return bench_config(workdir, {**small_data(smoke), **quiet_eval(),
                                  "model.image.name": "tiny_cnn", "model.image.mode": "finetune",
                                  "model.image.image_size": 16 if smoke else 96,
                                  "train.batch_size": 16 if smoke else 64})


def _worker(config: dict[str, Any]) -> None:
    """Timed training steps on one Ray Train worker; writes ``rank<r>.json``."""
    import ray.train
    import ray.train.torch
    import torch

    from hescape.config import StudyConfig
    from hescape.losses import create_loss, gather_with_grad
    from hescape.models import build_model
    from hescape.train.inputs import load_train_inputs, make_train_loader

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = StudyConfig.model_validate(config["cfg"])
    torch.manual_seed(0)
    data = load_train_inputs(config, cfg)
    model = build_model(cfg.model, cfg.loss, gene_in_dim=data.gene_in_dim, n_donors=data.n_donors)
    net = model if world == 1 else ray.train.torch.prepare_model(model, move_to_device=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = create_loss(cfg.loss, rank=rank, world_size=world)
    loader, sampler = make_train_loader(cfg, data, encoder=model.image_encoder, rank=rank,
                                        world_size=world, device=torch.device("cpu"))
    parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optim": 0.0, "gather": 0.0}
    steps, warmup, it, epoch = config["steps"], 2, iter(loader), 0
    for step in range(steps + warmup):
        if step == warmup:
            parts = dict.fromkeys(parts, 0.0)
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            sampler.set_position(epoch)
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        out = net(gene=batch["gene"], image=batch["image"])
        loss = loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"], out["logit_bias"])
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        gather_with_grad(out["img_emb"].detach(), world)
        gather_with_grad(out["gene_emb"].detach(), world)
        t5 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            parts[name] += dt
    wall = time.perf_counter() - t_start - parts["gather"]  # the extra gather is not training
    result = {"rank": rank, "world": world, "steps": steps, "batch": cfg.train.batch_size,
              "wall_s": wall, "samples_per_s": steps * cfg.train.batch_size / wall,
              "ms_per_step": {k: 1000 * v / steps for k, v in parts.items()}}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(result))


def measure(workdir: Path, paths: dict[str, Any], cfg: Any, workers: int, steps: int) -> dict:
    """Run ``_worker`` on ``workers`` Ray Train workers; return rank 0's timings."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = workdir / f"scaling{workers}"
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker, train_loop_config={"cfg": cfg.model_dump(mode="json"), **paths,
                                    "steps": steps, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"scaling{workers}", storage_path=str(workdir / "ray")))
    t0 = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {**ranks[0], "trainer_fit_s": total, "ranks": ranks}


def run(smoke: bool, workdir: Path) -> list[Row]:
    """Samples/s per worker with 1 and 2 workers, and the gather's share of a step."""
    from hescape.train.inputs import prepare_inputs

    cfg = trial_config(workdir, smoke)
    paths = prepare_inputs(cfg, progress=False)
    ensure_ray()
    steps = 5 if smoke else 60
    one = measure(workdir, paths, cfg, 1, steps)
    two = measure(workdir, paths, cfg, 2, steps)
    total1, total2 = one["samples_per_s"], sum(r["samples_per_s"] for r in two["ranks"])
    gather_ms = two["ms_per_step"]["gather"]
    step_ms = 1000.0 * two["wall_s"] / steps
    return [Row(
        key=KEY, title="Scaling 1 -> 2 workers (gloo, CPU)", unit="samples/s",
        baseline="1 worker", baseline_value=total1, ours="2 workers (total)", ours_value=total2,
        ratio=total2 / total1 if total1 else None, target="~2x on 2 free cores",
        command=command(KEY, smoke),
        notes=(f"per worker {total1:.0f} -> {total2 / 2:.0f} samples/s (efficiency "
               f"{total2 / (2 * total1):.0%}); gather of both embeddings {gather_ms:.2f} ms/step "
               f"({gather_ms / step_ms:.1%} of a {step_ms:.0f} ms step); per-worker batch "
               f"{cfg.train.batch_size}, effective {2 * cfg.train.batch_size} negatives; tiny CNN at "
               f"{cfg.model.image.image_size} px"),
        details={"one_worker": one, "two_workers": two, "steps": steps},
    )]


if __name__ == "__main__":
    main_for(run)
