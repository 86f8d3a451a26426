"""The per-worker training loop (Ray Train worker or in-process), readable top to bottom.

``train_loop_per_worker(config)`` gets plain data: ``config["cfg"]`` (StudyConfig dump) and
the paths the driver prepared (``data_path``, ``prepared_path``, ``features_path``); it
never recomputes preprocessing. In the caller's process (``fit`` without a worker group)
``config["inputs"]`` may hold those inputs already loaded (``TrainInputs``). Rank and world
size come from the session (``ray.train.get_context()`` or the in-process shim). ``train.batch_size`` is per worker
(the contrastive batch is ``batch_size * num_workers``: negatives are gathered across
workers). Every rank validates on the whole validation set (identical weights, identical
metrics, so early-stop decisions agree without a collective).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hescape.config import StudyConfig
from hescape.losses import create_loss
from hescape.models import adversary_weight, build_model, donor_loss, param_groups
from hescape.train.checkpoint import (
    checkpoint_step,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from hescape.train.dataset import resize_normalize
from hescape.train.device import Compute
from hescape.train.faults import maybe_fill_disk, maybe_kill_after_report
from hescape.train.features import frozen_image_encoder
from hescape.train.inputs import TrainInputs, load_train_inputs, make_train_loader
from hescape.train.schedule import get_lr
from hescape.train.session import current_session
from hescape.train.validate import CURVE_KEY, RunningMeans, curve_every, validate


class TrainingError(ValueError):
    """Training cannot continue (non-finite loss, empty training set, ...)."""


@dataclass
class TrainState:
    """What besides weights and optimiser a resumed run needs."""

    step: int = 0
    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float, mode: str) -> bool:
        """Record an evaluation; True if it is the best so far."""
        better = math.isfinite(value) and (
            self.best is None or (value > self.best if mode == "max" else value < self.best))
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return better


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train a TwoTower: AdamW + warmup/cosine, eval every k steps, checkpoint, report."""
    cfg = StudyConfig.model_validate(config["cfg"])
    tc = cfg.train
    session = current_session()
    rank, world = session.world_rank, session.world_size
    compute = Compute.of(tc, session.device(tc.use_gpu))  # train.precision, channels_last
    device = compute.device
    verbose = bool(config.get("verbose", True)) and rank == 0
    reset_peak_memory(device)

    # ---- inputs prepared by the driver (paths only), model, optimiser, resume
    data = config.get("inputs") or load_train_inputs(config, cfg)  # loaded by an in-process caller
    model, optimizer = build_model_and_optimizer(cfg, data, device, compute.channels_last)
    seed_everything(tc.seed + rank)  # same init on every rank, then per-rank dropout
    state = TrainState()
    with session.resume_checkpoint() as found:  # a restart's latest, else an explicit dir
        resume_dir = newest_checkpoint(found, config.get("run_dir")) or config.get("resume_from")
        if resume_dir is not None:
            state = restore(resume_dir, model, optimizer)
            if verbose:
                print(f"[train] resumed from {resume_dir} at step {state.step}", flush=True)
    net = session.prepare_model(model)  # DDP when world > 1
    if tc.compile:
        net = torch.compile(net)
    loss_fn = create_loss(cfg.loss, rank=rank, world_size=world)
    loader, sampler = make_train_loader(cfg, data, encoder=model.image_encoder, rank=rank,
                                        world_size=world, device=device)
    batches = iterate_batches(loader, sampler, start_step=state.step)

    running, t_last = RunningMeans(), time.perf_counter()
    window, curve, every = RunningMeans(), [], curve_every(tc)  # learning-curve points
    net.train()  # once here and after each validation (train() walks every module)
    for step in range(state.step, tc.max_steps):
        # ---- one optimisation step
        lr = set_lr(optimizer, step, cfg)
        adv = adversary_weight(step, cfg.model.adversary)
        batch = to_device(next(batches), device, compute.channels_last, model.image_encoder)
        with compute.autocast_context():
            out = net(gene=batch["gene"], image=batch.get("image"),
                      image_features=batch.get("feature"), adv_weight=adv)
            contrastive = loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"],
                                  out["logit_bias"])
            adv_loss = donor_loss(out["donor_logits"], batch["donor"])
            loss = contrastive + adv_loss
        check_finite(loss, step, contrastive, adv_loss, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        model.clamp_logit_scale_()  # keep the temperature learnable (see TwoTower)
        running.add(out, batch["donor"], loss=loss, contrastive=contrastive, adv=adv_loss)
        window.add(out, batch["donor"], loss=loss, contrastive=contrastive, adv=adv_loss)
        if (step + 1) % every == 0:  # no device sync here: means are read at the report
            curve.append((step + 1, lr, window))
            window = RunningMeans()

        # ---- every eval_every steps: validate, checkpoint (rank 0 writes), report (all)
        done = step + 1 == tc.max_steps
        if (step + 1) % tc.eval_every != 0 and not done:
            continue
        train_time = time.perf_counter() - t_last
        metrics = {"step": step + 1, "epoch": (step + 1) / sampler.batches_per_epoch(),
                   "train/lr": lr, "train/adv_weight": adv,
                   "train/steps_per_s": running.count / max(train_time, 1e-9),
                   **running.means(), **validate(model, data, cfg, compute=compute),
                   **peak_memory(device),
                   CURVE_KEY: [[s, {**w.means(), "train/lr": r}] for s, r, w in curve]}
        running, curve = RunningMeans(), []
        net.train()  # validate() left the model in eval mode
        stop = record_evaluation(state, metrics, cfg, done=done)
        ckpt = None
        if rank == 0:
            maybe_fill_disk("checkpoint", step=state.step)  # tests only (HESCAPE_FAULT_*)
            ckpt = save_checkpoint(
                session.staging_dir() / f"checkpoint_{state.step:07d}", model=model, cfg=cfg,
                meta=checkpoint_meta(data, state.step, metrics),
                train_state=train_state(optimizer, state))
        if verbose:
            print(format_progress(metrics, tc.best_metric), flush=True)
        session.report(metrics, ckpt)
        maybe_kill_after_report(state.step, session)  # tests only (HESCAPE_FAULT_*)
        t_last = time.perf_counter()  # steps/s counts training time only
        if stop:
            if verbose:
                print(f"[train] early stop: no {tc.best_metric} improvement in "
                      f"{state.bad_evals} evaluations", flush=True)
            break


def build_model_and_optimizer(
    cfg: StudyConfig, data: TrainInputs, device: torch.device, channels_last: bool,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """TwoTower (seeded: identical on every rank) on ``device`` and AdamW over its groups."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.loss, gene_in_dim=data.gene_in_dim,
                        n_donors=data.n_donors, feature_names=data.feature_names)
    if model.image_frozen and model.image_encoder.weights_path is None:
        # random-init frozen encoder: the exact weights the feature cache used
        model.image_encoder.load_state_dict(frozen_image_encoder(cfg).state_dict())
    Compute(torch.device(device), channels_last=channels_last).place(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    return model, optimizer


def record_evaluation(state: TrainState, metrics: dict[str, Any], cfg: StudyConfig, *,
                      done: bool) -> bool:
    """Update best metric / early-stop counter and add best, is_best, early_stopped to
    ``metrics``; True when training should stop early."""
    tc = cfg.train
    is_best = state.update(float(metrics.get(tc.best_metric, math.nan)), tc.best_mode)
    state.step = int(metrics["step"])
    stop = tc.early_stop_patience is not None and state.bad_evals >= tc.early_stop_patience
    metrics.update({"best": math.nan if state.best is None else state.best,
                    "is_best": float(is_best), "early_stopped": float(stop and not done)})
    return stop


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: StudyConfig) -> float:
    """Apply the warmup + cosine learning rate of ``step`` to every group."""
    tc = cfg.train
    lr = get_lr(step, base_lr=tc.lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def iterate_batches(loader, sampler, *, start_step: int):
    """Endless batches, epoch after epoch; starts where ``start_step`` left off."""
    per_epoch = sampler.batches_per_epoch()
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_position(epoch, skip)
        yield from loader
        epoch, skip = epoch + 1, 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              channels_last: bool, encoder: Any) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device``; uint8 images (GPU loaders) are resized/normalised there."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "image" in out and out["image"].dtype == torch.uint8:
        out["image"] = resize_normalize(out["image"], encoder)
    if channels_last and "image" in out:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory count (a Tune actor reused across trials keeps its
    process): Linux resets the RSS high-water mark with ``5 > /proc/self/clear_refs``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux (or not allowed): the figure is the process's peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """This run's peak memory so far, in MiB: process RSS (VmHWM since
    ``reset_peak_memory``, else ``ru_maxrss``; includes the pages of memmapped patches it
    touched) and, on a GPU, the allocator's peak."""
    try:
        status = Path("/proc/self/status").read_text()
        rss_kib = float(next(ln.split()[1] for ln in status.splitlines()
                             if ln.startswith("VmHWM:")))
    except (OSError, StopIteration):
        import resource
        import sys

        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_kib /= 1024.0 if sys.platform == "darwin" else 1.0
    out = {"sys/peak_rss_mib": rss_kib / 1024.0}
    if device.type == "cuda":
        out["sys/peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def check_finite(loss: torch.Tensor, step: int, contrastive: torch.Tensor,
                 adv: torch.Tensor, lr: float) -> None:
    """Stop with a clear error on a NaN/inf loss (before it poisons the weights)."""
    if not torch.isfinite(loss.detach()).item():
        raise TrainingError(
            f"non-finite loss at step {step} (contrastive={contrastive.item():.4g}, "
            f"adversary={adv.item():.4g}, lr={lr:.3g}); lower train.lr, enable train.grad_clip, "
            "use precision: fp32, or check the inputs for NaN (preprocessed expression)")


def train_state(optimizer: torch.optim.Optimizer, state: TrainState) -> dict[str, Any]:
    """The optim.pt payload (weights_only-loadable)."""
    return {"optimizer": optimizer.state_dict(),
            "scheduler": {"name": "warmup_cosine", "step": state.step},
            "step": state.step, "rng": get_rng_state(),
            "best": state.best, "bad_evals": state.bad_evals}


def newest_checkpoint(found: Path | None, run_dir: str | None) -> Path | None:
    """The highest-step checkpoint among the session's (``found``) and those in ``run_dir``.

    A Ray Train worker persists its checkpoint into the run directory before the controller
    registers the report (~2 s later): a worker that dies in between leaves a checkpoint Ray
    does not know, and the restart would redo those steps. A truncated one is skipped by
    ``restore`` (``load_checkpoint`` falls back to the previous good one).
    """
    candidates = [Path(found)] if found is not None else []
    if run_dir:
        candidates += list_checkpoints(run_dir)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (checkpoint_step(p), p == found))


def restore(ckpt_dir, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load weights, optimiser, RNG and counters from a checkpoint directory."""
    loaded = load_checkpoint(ckpt_dir)
    model.load_state_dict(loaded.model_state)
    ts = loaded.train_state or {}
    if "optimizer" not in ts:
        raise TrainingError(f"{loaded.path}: no optimiser state; cannot resume training from it")
    optimizer.load_state_dict(ts["optimizer"])
    set_rng_state(ts["rng"])
    return TrainState(step=int(ts["step"]), best=ts.get("best"), bad_evals=int(ts["bad_evals"]))


def checkpoint_meta(data: TrainInputs, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """meta.json: what rebuilding and evaluating the model needs."""
    return {"step": step, "gene_in_dim": data.gene_in_dim, "n_donors": data.n_donors,
            "donor_names": data.train_donors, "feature_names": data.feature_names,
            "preprocess_cache_key": data.prep_key, "data_path": str(data.paired.path),
            "fingerprint": data.paired.fingerprint, "features_path": data.features_path,
            "metrics": {k: float(v) for k, v in metrics.items() if k != CURVE_KEY}}


def format_progress(metrics: dict[str, Any], best_metric: str) -> str:
    """One progress line: step, losses, the best-metric value, lr."""
    keys = ["train/loss", "val/loss", "val/r5_img2gene", best_metric, "val/donor_acc_gene"]
    parts = [f"step {metrics['step']}"]
    for key in dict.fromkeys(keys):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    parts.append(f"lr {metrics['train/lr']:.2e}")
    return "[train] " + " | ".join(parts)
