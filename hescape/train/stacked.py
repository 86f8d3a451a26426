"""Vectorised head-only trials: K configurations trained in one process as one stacked model.

Head-only configurations (frozen image trunk, cached features) that share a ``stack_key``
(``hescape.train.stack_key``: same data, expression variant, feature cache, architecture,
loss, batch size, device) train together: their heads are one K-stacked model
(``stack_model.HeadStack``: batched modules over one K x P parameter buffer, not
``torch.func.vmap``: vmap cannot give each member the dropout masks its unbatched run
draws; speed of both: ``benchmarks/vectorised_trials.py``),
one vectorised AdamW with per-member learning-rate / weight-decay schedules and per-member
gradient clipping (``stack_optim``). Each member still is its own run:

* its own seed: initialisation (the model is built by the loop's own
  ``build_model_and_optimizer``), data order (its own ``ResumableSampler``: rows gathered
  from the shared in-memory expression matrix and feature cache) and dropout masks (its own
  ``torch.Generator``, drawn exactly as ``nn.Dropout`` draws them from the global RNG);
* its own schedule (``train.lr``, ``warmup_steps``, ``max_steps`` - a member leaves the
  stack at its last step -, ``weight_decay``, ``grad_clip``, temperature, adversary weight
  and warm-up, dropout rate; see ``stack_key.PER_MEMBER``);
* per evaluation (its own ``eval_every``): the loop's exact report (``train/*`` means since
  its last report, ``train.validate`` on the validation donors - its forward passes here,
  one member after the other, its numpy / scikit-learn part in ``validation_workers``
  spawned processes, default one per core up to K -, ``best``/``is_best``/
  ``early_stopped``, memory), a checkpoint in the loop's format under its own ``run_dir``
  (``model.pt`` of the whole TwoTower, ``optim.pt`` with a real AdamW state dict and its
  RNG states, ``config.json``, ``meta.json``: ``checkpoint.load_model``, the evaluation and
  the unbatched loop read it unchanged), pruned like ``fit``'s (``LocalSession``), then its
  callback ``callback(metrics, checkpoint_dir)``, in the engine's thread;
* its own early stop, and its own fate: a callback that raises ``StopMember`` or returns
  ``STOP``, or ``StackedTrainer.drop(name)`` from any thread (ASHA stopped the trial),
  removes it from the stack at the next step boundary; an error of its own (non-finite
  loss, a failing callback or checkpoint write) fails it alone. The others' trajectories
  do not change (each row of the stack only ever sees its own member's numbers).

Resume: a member whose ``run_dir`` holds checkpoints resumes from the newest (else from
``Member.resume_from``), weights, optimiser moments, RNG and early-stop state, as the loop
does. Members resuming at different steps run ragged: the stack starts at the lowest step
and a member joins when the stack reaches its step (AdamW's step count is the stack's).

Equivalence (``tests/train/test_stacked.py``): every member's per-report metrics, final
weights and optimiser state equal an unbatched ``hescape.train.fit`` of the same config on
the CPU (float32; bit for bit in our runs, asserted within 1e-5 relative). On a GPU or
under bf16 autocast: within float tolerance, and dropout masks differ (see
``stack_model``).

Performance: the stack removes each trial's process start, input loading and per-step
Python overhead; it does not reduce the arithmetic of K heads (on a CPU the heads' matmuls
and AdamW's passes over the parameters cost what they cost one by one) nor validation
(per member, exact). Timings per phase: ``StackedTrainer.timings``.

Integration (a Tune trial per member): ``plan_groups`` groups the trials' configs; one
process runs ``StackedTrainer(members).run()`` per group, each member's callback forwards
its reports (MLflow, ``tune.report``) and ``drop`` stops a member ASHA stopped; the final
evaluation runs from each member's best checkpoint (``MemberOutcome.result``).
``fit_many`` does the grouping and runs a config that cannot stack with ``fit``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hescape.config import StudyConfig
from hescape.models import adversary_weight
from hescape.paths import absolute
from hescape.train.checkpoint import (
    checkpoint_step,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from hescape.train.dataset import ResumableSampler
from hescape.train.device import Compute, resolve_device
from hescape.train.faults import maybe_fail_stack_member
from hescape.train.inputs import TrainInputs, load_train_inputs, prepare_inputs
from hescape.train.loop import (
    TrainingError,
    TrainState,
    build_model_and_optimizer,
    check_finite,
    checkpoint_meta,
    format_progress,
    newest_checkpoint,
    peak_memory,
    record_evaluation,
    reset_peak_memory,
)
from hescape.train.runner import FitResult
from hescape.train.schedule import get_lr
from hescape.train.session import LocalSession
from hescape.train.stack_key import key_difference, plan_groups, stack_key, stack_problem
from hescape.train.stack_model import HeadStack, stacked_loss
from hescape.train.stack_optim import StackedAdamW, make_adamw
from hescape.train.validate import (
    CURVE_KEY,
    curve_every,
    validation_inputs,
    validation_metrics,
)

log = logging.getLogger(__name__)

STOP = "stop"
Status = Literal["finished", "early_stopped", "stopped", "failed"]
MemberCallback = Callable[[dict[str, Any], "Path | None"], Any]


class StopMember(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a member's callback to drop it from the stack (the scheduler stopped it)."""


@dataclass
class Member:
    """One configuration of a stack: its config, run directory and report callback.

    ``callback(metrics, checkpoint_dir)`` is called after each of its evaluations, in the
    engine's thread; raising ``StopMember`` or returning ``STOP`` stops the member.
    ``name`` (default: the run directory's name) identifies it for ``drop`` and logs.
    """

    cfg: StudyConfig
    run_dir: Path
    callback: MemberCallback | None = None
    name: str = ""
    resume_from: Path | None = None

    def __post_init__(self) -> None:
        self.run_dir = absolute(self.run_dir)
        self.name = self.name or self.run_dir.name


@dataclass
class MemberOutcome:
    """How a member ended: ``result`` as ``fit`` returns it (reports so far, best checkpoint)."""

    name: str
    status: Status
    result: FitResult
    step: int
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


# --------------------------------------------------------------------------- metrics
class StackedRunning:
    """``validate.RunningMeans`` for K members at once (same sums, same float32 adds)."""

    NAMES = {"loss": "train/loss", "contrastive": "train/contrastive", "adv": "train/adv_loss",
             "temperature": "train/temperature"}

    def __init__(self, towers: list[str]) -> None:
        self.towers = towers
        self.sums = torch.zeros(0, len(self.NAMES))
        self.count = np.zeros(0, dtype=np.int64)
        self.hits = np.zeros((0, len(towers)))
        self.rows = np.zeros(0, dtype=np.int64)

    def append(self, n: int) -> None:
        self.sums = torch.cat([self.sums, torch.zeros(n, len(self.NAMES))])
        self.count = np.concatenate([self.count, np.zeros(n, dtype=np.int64)])
        self.hits = np.concatenate([self.hits, np.zeros((n, len(self.towers)))])
        self.rows = np.concatenate([self.rows, np.zeros(n, dtype=np.int64)])

    def select(self, keep: list[int]) -> None:
        self.sums, self.count = self.sums[keep], self.count[keep]
        self.hits, self.rows = self.hits[keep], self.rows[keep]

    def add(self, out: dict[str, Any], donors: torch.Tensor, loss: torch.Tensor,
            contrastive: torch.Tensor, adv: torch.Tensor) -> None:
        temperature = 1.0 / out["logit_scale"].detach().float().exp()
        values = torch.stack([loss.detach().float(), contrastive.detach().float(),
                              adv.detach().float(), temperature], dim=1).cpu()
        self.sums += values
        self.count += 1
        for j, tower in enumerate(self.towers):
            logits = out["donor_logits"][tower]
            self.hits[:, j] += (logits.argmax(2) == donors).sum(1).cpu().numpy()
        if self.towers:
            self.rows += donors.shape[1]

    def means(self, k: int) -> dict[str, float]:
        n = max(int(self.count[k]), 1)
        out = {name: float(self.sums[k, j]) / n for j, name in enumerate(self.NAMES.values())}
        for j, tower in enumerate(self.towers):
            out[f"train/adv_acc_{tower}"] = float(self.hits[k, j]) / max(int(self.rows[k]), 1)
        return out

    def reset(self, k: int) -> None:
        self.sums[k] = 0.0
        self.count[k], self.hits[k], self.rows[k] = 0, 0.0, 0


# --------------------------------------------------------------------------- one member
def _numpy_state(seed: int) -> dict[str, Any]:
    """``checkpoint.get_rng_state()["numpy"]`` after ``np.random.seed(seed)``."""
    _, keys, pos, has_gauss, cached = np.random.RandomState(seed % 2**32).get_state()
    return {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _python_state(seed: int) -> dict[str, Any]:
    """``checkpoint.get_rng_state()["python"]`` after ``random.seed(seed)``."""
    version, state, gauss = random.Random(seed).getstate()
    return {"version": int(version), "state": list(state), "gauss": gauss}


@dataclass
class _Slot:
    """A member's state outside the stacked tensors."""

    member: Member
    session: LocalSession
    sampler: ResumableSampler
    generator: torch.Generator
    rng: dict[str, Any]  # the numpy / python states its checkpoints carry
    state: TrainState = field(default_factory=TrainState)
    start: int = 0
    row: Any = None  # (flat row, fixed params, dropout rates), until it joins the stack
    moments: Any = None
    lr: float = 0.0
    adv: float = 0.0
    train_s: float = 0.0
    curve: list = field(default_factory=list)  # learning-curve points since its last report
    status: Status | None = None
    error: BaseException | None = None
    _epoch: int = -1
    _order: np.ndarray | None = None

    @property
    def cfg(self) -> StudyConfig:
        return self.member.cfg

    @property
    def name(self) -> str:
        return self.member.name

    def rows(self, step: int, train_idx: np.ndarray) -> np.ndarray:
        """Dataset rows of this member's batch at ``step`` (what its DataLoader yields)."""
        bs = self.cfg.train.batch_size
        epoch, j = divmod(step, self.sampler.batches_per_epoch())
        if epoch != self._epoch:
            self.sampler.set_position(epoch, 0)
            self._order = np.fromiter(iter(self.sampler), dtype=np.int64)
            self._epoch = epoch
        return train_idx[self._order[j * bs:(j + 1) * bs]]

    @contextlib.contextmanager
    def global_rng(self, device: torch.device) -> Iterator[None]:
        """Run the block with this member's RNG states as the process's global ones (as in
        its unbatched run: validation draws from python's ``random``), then keep what the
        block left in them and put the process's states back."""
        saved = get_rng_state()
        mine = self.rng_state(device)
        set_rng_state(mine)
        try:
            yield
        finally:
            after = get_rng_state()
            if device.type == "cuda":
                self.generator.set_state(after["cuda"][device.index or 0])
            else:
                self.generator.set_state(after["torch"])
            self.rng = {"numpy": after["numpy"], "python": after["python"]}
            set_rng_state(saved)

    def rng_state(self, device: torch.device) -> dict[str, Any]:
        """The ``rng`` entry of ``optim.pt``: this member's dropout generator where the loop
        keeps the global one (CPU: ``torch``; CUDA: ``cuda``), numpy / python as seeded."""
        state = get_rng_state()
        if device.type == "cuda":
            state["cuda"][device.index or 0] = self.generator.get_state()
        else:
            state["torch"] = self.generator.get_state()
        state.update(self.rng)
        return state


# --------------------------------------------------------------------------- the engine
class StackedTrainer:
    """Train ``members`` (all with one ``stack_key``) as one stacked model; ``run()`` once.

    ``inputs``: the shared ``TrainInputs`` already loaded (else loaded from
    ``prepared_path`` / ``features_path``, prepared from the first member's config when
    missing). ``drop(name)`` may be called from any thread.
    """

    def __init__(self, members: Sequence[Member], *, inputs: TrainInputs | None = None,
                 prepared_path: str | Path | None = None,
                 features_path: str | Path | None = None, verbose: bool = False,
                 validation_workers: int | None = None) -> None:
        members = list(members)
        if not members:
            raise ValueError("StackedTrainer needs at least one member")
        check_stackable(members)
        self.members = members
        self.verbose = verbose
        self._inputs = inputs
        self._paths = (prepared_path, features_path)
        self._lock = threading.Lock()
        self._drops: dict[str, str] = {}
        self._ran = False
        if validation_workers is not None and validation_workers < 0:
            raise ValueError(f"validation_workers={validation_workers}: use 0 (this process) "
                             "or more")
        auto = min(os.cpu_count() or 1, len(members)) if len(members) > 1 else 0
        self.validation_workers = auto if validation_workers is None else validation_workers
        self._pool: ProcessPoolExecutor | None = None
        self.timings = {"setup_s": 0.0, "train_s": 0.0, "validate_forward_s": 0.0,
                        "validate_metrics_and_report_s": 0.0}

    # ------------------------------------------------------------------ public
    def drop(self, name: str, reason: str = "stopped by the scheduler") -> None:
        """Stop member ``name`` at the next step boundary (thread-safe; unknown names and
        members that already ended are ignored)."""
        with self._lock:
            self._drops[name] = reason

    def run(self) -> list[MemberOutcome]:
        """Train until every member finished, stopped early, was dropped or failed; one
        outcome per member, in the members' order."""
        if self._ran:
            raise RuntimeError("StackedTrainer.run() runs once; build a new one to continue")
        self._ran = True
        cfg0 = self.members[0].cfg
        self.data = self._inputs or _load_inputs(cfg0, *self._paths, verbose=self.verbose)
        if self.data.features is None:
            raise ValueError("stacked training reads cached image features, and these inputs "
                             "have none (train.feature_cache off, or a features_path missing)")
        self.device = resolve_device(cfg0.train.use_gpu)
        self.compute = Compute.of(cfg0.train, self.device)
        reset_peak_memory(self.device)
        self.loss_name = cfg0.loss.name
        t0 = time.perf_counter()
        if self.validation_workers:  # start them now: they import while the stack trains
            pool = self._validation_pool()
            for _ in range(self.validation_workers):
                pool.submit(_warm_worker)
        self.slots = [self._open(m) for m in self.members]
        self.timings["setup_s"] = time.perf_counter() - t0
        started = [s for s in self.slots if s.status is None]
        try:
            if started:
                self._train(started)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        return [self._outcome(s) for s in self.slots]

    # ------------------------------------------------------------------ set-up
    def _open(self, member: Member) -> _Slot:
        """Build (and maybe resume) one member; its failure fails it alone."""
        cfg, tc = member.cfg, member.cfg.train
        member.run_dir.mkdir(parents=True, exist_ok=True)
        session = LocalSession(member.run_dir, keep=tc.keep_checkpoints, score=tc.best_metric,
                               mode=tc.best_mode)
        sampler = ResumableSampler(self.data.train_idx, batch_size=tc.batch_size, rank=0,
                                   world_size=1, seed=tc.seed)
        gen = torch.Generator(self.device).manual_seed(tc.seed)  # seed_everything(seed + 0)
        slot = _Slot(member, session, sampler, gen,
                     {"numpy": _numpy_state(tc.seed), "python": _python_state(tc.seed)})
        try:
            if sampler.batches_per_epoch() == 0:
                raise ValueError(f"train.batch_size={tc.batch_size} exceeds the "
                                 f"{len(self.data.train_idx)} training spots; lower it")
            model, _ = build_model_and_optimizer(cfg, self.data, self.device,
                                                 self.compute.channels_last)
            if not hasattr(self, "stack"):
                self.stack = HeadStack(model)
                self.optim = StackedAdamW(self.stack)
                self.template_opt = make_adamw(model, 1.0, tc.lr)
                self.running = StackedRunning(list(model.adversaries.keys()))
                self.window = StackedRunning(list(model.adversaries.keys()))  # curve points
                self.active: list[_Slot] = []
            found = session.resume_checkpoint()
            with found as path:
                ckpt = newest_checkpoint(path, str(member.run_dir)) or member.resume_from
            slot.moments = self.optim.fresh()
            if ckpt is not None:
                self._restore(slot, model, ckpt)
            slot.row = self.stack.row_of(model)
        except Exception as exc:  # noqa: BLE001 - this member fails, the others go on
            self._fail(slot, exc)
            return slot
        if slot.start >= tc.max_steps:
            slot.status = "finished"  # nothing left to train (the loop reports nothing)
        return slot

    def _restore(self, slot: _Slot, model: torch.nn.Module, ckpt: Path) -> None:
        loaded = load_checkpoint(ckpt)
        model.load_state_dict(loaded.model_state)
        ts = loaded.train_state or {}
        if "optimizer" not in ts:
            raise TrainingError(f"{loaded.path}: no optimiser state; cannot resume from it")
        avg, sq, steps = self.optim.moments_from(ts["optimizer"], self.template_opt)
        step = int(ts["step"])
        if steps != step:
            raise TrainingError(f"{loaded.path}: optimiser at step {steps}, checkpoint at "
                                f"step {step}")
        slot.moments = (avg, sq)
        rng = ts["rng"]
        gen_state = rng.get("cuda", [None])[self.device.index or 0] \
            if self.device.type == "cuda" else rng["torch"]
        if gen_state is not None:
            slot.generator.set_state(gen_state)
        slot.rng = {"numpy": rng["numpy"], "python": rng["python"]}
        slot.state = TrainState(step=step, best=ts.get("best"), bad_evals=int(ts["bad_evals"]))
        slot.start = step
        if self.verbose:
            print(f"[stack {slot.name}] resumed from {loaded.path} at step {step}", flush=True)

    # ------------------------------------------------------------------ training
    def _train(self, slots: list[_Slot]) -> None:
        pending = sorted(slots, key=lambda s: s.start)
        step = pending[0].start
        while True:
            self._apply_drops()
            pending = [s for s in pending if s.status is None]
            joining = [s for s in pending if s.start == step]
            if joining:
                self._join(joining)
                pending = [s for s in pending if s.start != step]
            if not self.active:
                if not pending:
                    return
                step = min(s.start for s in pending)
                self.optim.steps = step
                continue
            self._step(step)
            step += 1
            self._evaluate(step)

    def _join(self, slots: list[_Slot]) -> None:
        if not self.active:
            self.optim.steps = slots[0].start
        if any(s.start != self.optim.steps for s in slots):  # AdamW's step is the stack's
            raise RuntimeError(f"members joining at steps {[s.start for s in slots]} into a "
                               f"stack at step {self.optim.steps}")
        self.stack.append([s.row for s in slots])
        self.optim.append([s.moments for s in slots])
        self.running.append(len(slots))
        self.window.append(len(slots))
        for s in slots:
            s.row = s.moments = None
        self.active += slots

    def _step(self, step: int) -> None:
        """One optimisation step of every member in the stack."""
        self._member_faults(step)
        if not self.active:
            return
        t0 = time.perf_counter()
        data, active, dev = self.data, self.active, self.device
        k = len(active)
        for s in active:
            tc = s.cfg.train
            s.lr = get_lr(step, base_lr=tc.lr, warmup_steps=tc.warmup_steps,
                          max_steps=tc.max_steps)
            s.adv = adversary_weight(step, s.cfg.model.adversary)
        rows = np.stack([s.rows(step, data.train_idx) for s in active])
        flat_rows = rows.reshape(-1)
        gene = torch.from_numpy(np.asarray(data.gene_x[flat_rows], dtype=np.float32))
        feats = torch.from_numpy(np.asarray(data.features[flat_rows], dtype=np.float32))
        gene = gene.view(k, rows.shape[1], -1).to(dev, non_blocking=True)
        feats = feats.view(k, rows.shape[1], -1).to(dev, non_blocking=True)
        donors = torch.from_numpy(data.donors[rows]).to(dev, non_blocking=True)
        neg_adv = torch.tensor([-s.adv for s in active], dtype=torch.float32, device=dev)
        with self.compute.autocast_context():
            out = self.stack.forward(gene=gene, features=feats, neg_adv=neg_adv,
                                     generators=[s.generator for s in active])
            losses = stacked_loss(self.loss_name, out, donors)
        finite = torch.isfinite(losses.loss)
        failed = [] if bool(finite.all()) else [i for i in range(k) if not bool(finite[i])]
        for i in failed:
            try:
                check_finite(losses.loss[i], step, losses.contrastive[i], losses.adv[i],
                             active[i].lr)
            except TrainingError as exc:
                self._fail(active[i], exc)
        self.stack.zero_grad()
        with warnings.catch_warnings():  # strided leaf views of one buffer, on purpose
            warnings.filterwarnings("ignore", message="grad and param do not obey")
            losses.total.sum().backward()
        self.optim.clip_grad_norm([s.cfg.train.grad_clip for s in active])
        self.optim.step([s.lr for s in active], [s.cfg.train.weight_decay for s in active])
        self.stack.clamp_logit_scale_()
        self.running.add(out, donors, losses.loss, losses.contrastive, losses.adv)
        self.window.add(out, donors, losses.loss, losses.contrastive, losses.adv)
        for k, s in enumerate(active):  # the loop's learning-curve points, per member
            if (step + 1) % curve_every(s.cfg.train) == 0:
                s.curve.append([step + 1, {**self.window.means(k), "train/lr": s.lr}])
                self.window.reset(k)
        seconds = time.perf_counter() - t0
        self.timings["train_s"] += seconds
        for s in active:
            s.train_s += seconds
        if failed:
            self._remove([active[i] for i in failed])

    def _member_faults(self, step: int) -> None:
        """Tests only (``faults.maybe_fail_stack_member``): a member whose step raises (an
        injected ``torch.OutOfMemoryError`` or error) fails alone, before the stack's step."""
        failed = []
        for slot in self.active:
            try:
                maybe_fail_stack_member("step", slot.cfg, step + 1)
            except Exception as exc:  # noqa: BLE001 - this member fails, the others go on
                self._fail(slot, exc)
                failed.append(slot)
        self._remove(failed)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, step: int) -> None:
        """Report every member whose evaluation falls on ``step`` (or whose run ends).

        The forward passes of validation run here, one member after the other; the
        numpy / scikit-learn part (``validate.validation_metrics``: retrieval, donor probe)
        goes to the worker processes, then each member reports in stack order."""
        t0 = time.perf_counter()
        due = [(k, s) for k, s in enumerate(self.active)
               if step % s.cfg.train.eval_every == 0 or step == s.cfg.train.max_steps]
        if not due:
            return
        pending = []
        for k, slot in due:
            try:
                pending.append((k, slot, self._validation(k, slot, step)))
            except Exception as exc:  # noqa: BLE001 - this member fails, the others go on
                self._fail(slot, exc)
        t1 = time.perf_counter()
        ended = [s for _, s in due if s.status is not None]
        for k, slot, (metrics, future) in pending:
            done = step == slot.cfg.train.max_steps
            try:
                metrics.update(future.result() if isinstance(future, Future) else future)
                metrics.update(peak_memory(self.device))
                stop = self._report(k, slot, metrics, done)
            except StopMember:
                slot.status = "stopped"
            except Exception as exc:  # noqa: BLE001 - this member fails, the others go on
                self._fail(slot, exc)
            else:
                if stop == "early":
                    slot.status = "early_stopped"
                elif stop == "stop":
                    slot.status = "stopped"
                elif done:
                    slot.status = "finished"
            if slot.status is not None:
                ended.append(slot)
        self.timings["validate_forward_s"] += t1 - t0
        self.timings["validate_metrics_and_report_s"] += time.perf_counter() - t1
        self._apply_drops()
        self._remove(ended)

    def _validation(self, k: int, slot: _Slot, step: int) -> tuple[dict[str, Any], Any]:
        """Member ``k``'s report so far and its validation metrics (a Future from the
        workers, or the metrics themselves when validation runs in this process)."""
        cfg = slot.cfg
        maybe_fail_stack_member("validation", cfg, step)  # tests only
        model = self.stack.load_member(k)
        metrics = {"step": step, "epoch": step / slot.sampler.batches_per_epoch(),
                   "train/lr": slot.lr, "train/adv_weight": slot.adv,
                   "train/steps_per_s": int(self.running.count[k]) / max(slot.train_s, 1e-9),
                   **self.running.means(k), CURVE_KEY: slot.curve}
        self.running.reset(k)
        slot.curve = []
        slot.train_s = 0.0
        pool = self._validation_pool()
        with slot.global_rng(self.device):
            inputs = validation_inputs(model, self.data, cfg, compute=self.compute)
            if pool is None:
                return metrics, validation_metrics(inputs, cfg.eval)
        return metrics, pool.submit(validation_metrics, inputs, cfg.eval)

    def _validation_pool(self) -> ProcessPoolExecutor | None:
        if self.validation_workers == 0:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.validation_workers, mp_context=mp.get_context("spawn"),
                initializer=_validation_worker)
        return self._pool

    def _report(self, k: int, slot: _Slot, metrics: dict[str, Any], done: bool) -> str | None:
        cfg, data = slot.cfg, self.data
        model = self.stack.load_member(k)
        early = record_evaluation(slot.state, metrics, cfg, done=done)
        train_state = {
            "optimizer": self.optim.member_state_dict(k, self.template_opt, lr=slot.lr,
                                                      weight_decay=cfg.train.weight_decay),
            "scheduler": {"name": "warmup_cosine", "step": slot.state.step},
            "step": slot.state.step, "rng": slot.rng_state(self.device),
            "best": slot.state.best, "bad_evals": slot.state.bad_evals}
        ckpt = save_checkpoint(slot.member.run_dir / f"checkpoint_{slot.state.step:07d}",
                               model=model, cfg=cfg,
                               meta=checkpoint_meta(data, slot.state.step, metrics),
                               train_state=train_state)
        if self.verbose:
            print(f"[stack {slot.name}] " + format_progress(metrics, cfg.train.best_metric),
                  flush=True)
        slot.session.report(metrics, ckpt)
        said = None
        if slot.member.callback is not None:
            said = slot.member.callback(dict(metrics), ckpt)
        if said == STOP:
            return "stop"
        if early and self.verbose:
            print(f"[stack {slot.name}] early stop: no {cfg.train.best_metric} improvement "
                  f"in {slot.state.bad_evals} evaluations", flush=True)
        return "early" if early else None

    # ------------------------------------------------------------------ membership
    def _apply_drops(self) -> None:
        with self._lock:
            drops, self._drops = self._drops, {}
        if not drops:
            return
        gone = []
        for slot in self.slots:
            if slot.name in drops and slot.status is None:
                slot.status = "stopped"
                log.info("stack member %s dropped: %s", slot.name, drops[slot.name])
                gone.append(slot)
        self._remove([s for s in gone if s in self.active])

    def _remove(self, slots: list[_Slot]) -> None:
        if not slots:
            return
        ids = {id(s) for s in slots}
        keep = [i for i, s in enumerate(self.active) if id(s) not in ids]
        self.stack.select(keep)
        self.optim.select(keep)
        self.running.select(keep)
        self.window.select(keep)
        self.active = [self.active[i] for i in keep]

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        slot.status, slot.error = "failed", exc
        log.warning("stack member %s failed: %s", slot.name, exc)
        if self.verbose:
            print(f"[stack {slot.name}] failed: {type(exc).__name__}: {exc}", flush=True)

    def _outcome(self, slot: _Slot) -> MemberOutcome:
        return MemberOutcome(name=slot.name, status=slot.status or "stopped",
                             result=_fit_result(slot.session, slot.member.run_dir),
                             step=slot.state.step, error=slot.error)


# --------------------------------------------------------------------------- helpers
def _validation_worker() -> None:
    """A validation worker process: single-threaded BLAS (the workers run side by side,
    as one-CPU Tune trials do: Ray sets OMP_NUM_THREADS=1 for them)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _warm_worker() -> None:
    """Import what validation needs (a worker's first task, submitted at start-up)."""
    import sklearn.linear_model  # noqa: F401

    import hescape.metrics.retrieval  # noqa: F401


def check_stackable(members: Sequence[Member]) -> None:
    """Raise ValueError unless every member can stack and all share one key (the message
    names the member and the fields that differ)."""
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be unique: {names}")
    dirs = [m.run_dir for m in members]
    if len(set(dirs)) != len(dirs):
        raise ValueError("each member needs its own run_dir")
    first = members[0]
    for m in members:
        problem = stack_problem(m.cfg)
        if problem:
            raise ValueError(f"member {m.name} cannot be stacked: {problem}; train it with "
                             "hescape.train.fit (fit_many does the grouping)")
        if stack_key(m.cfg) != stack_key(first.cfg):
            diff = ", ".join(key_difference(first.cfg, m.cfg)[:8])
            raise ValueError(f"member {m.name} cannot stack with {first.name}: they differ in "
                             f"{diff} (group configs with hescape.train.stack_key.plan_groups)")


def _load_inputs(cfg: StudyConfig, prepared_path: str | Path | None,
                 features_path: str | Path | None, *, verbose: bool) -> TrainInputs:
    paths = prepare_inputs(cfg, prepared_path=prepared_path, features_path=features_path,
                           progress=verbose)
    return load_train_inputs(paths, cfg)


def _fit_result(session: LocalSession, run_dir: Path) -> FitResult:
    """``FitResult`` as ``runner.fit`` builds it from a session."""
    history = session.history
    best = session.best_checkpoint
    if best is None or not best.exists():
        found = list_checkpoints(run_dir)
        best = found[0] if found else None
    step = None if best is None else checkpoint_step(best)
    best_metrics = next((h for h in reversed(history) if h.get("step") == step), {})
    return FitResult(metrics=dict(history[-1]) if history else {}, best_checkpoint=best,
                     history=list(history), best_metrics=dict(best_metrics))


def fit_stacked(members: Sequence[Member], *, inputs: TrainInputs | None = None,
                prepared_path: str | Path | None = None,
                features_path: str | Path | None = None, verbose: bool = False,
                validation_workers: int | None = None) -> list[MemberOutcome]:
    """Train ``members`` (one ``stack_key``) as one stacked model: ``StackedTrainer.run``."""
    return StackedTrainer(members, inputs=inputs, prepared_path=prepared_path,
                          features_path=features_path, verbose=verbose,
                          validation_workers=validation_workers).run()


def fit_many(members: Sequence[Member], *, inputs: TrainInputs | None = None,
             prepared_path: str | Path | None = None, features_path: str | Path | None = None,
             max_stack: int | None = None, verbose: bool = False,
             validation_workers: int | None = None) -> list[MemberOutcome]:
    """Group ``members`` by ``stack_key`` (``plan_groups``), train each group stacked and
    each configuration that cannot stack alone with ``fit``; outcomes in the members' order.

    ``inputs`` / paths apply to groups whose data they are (the first group's key); other
    groups prepare their own.
    """
    from hescape.train.runner import fit

    members = list(members)
    outcomes: dict[int, MemberOutcome] = {}
    key0 = stack_key(members[0].cfg) if members else None
    for group in plan_groups([m.cfg for m in members], max_size=max_stack):
        same_data = stack_key(members[group[0]].cfg) == key0 and key0 is not None
        kwargs = ({"inputs": inputs, "prepared_path": prepared_path,
                   "features_path": features_path} if same_data else {})
        if stack_key(members[group[0]].cfg) is not None:
            got = fit_stacked([members[i] for i in group], verbose=verbose,
                              validation_workers=validation_workers, **kwargs)
            outcomes.update(zip(group, got, strict=True))
            continue
        m = members[group[0]]
        outcomes[group[0]] = _fit_alone(m, fit, verbose)
    return [outcomes[i] for i in range(len(members))]


def _fit_alone(m: Member, fit: Callable[..., FitResult], verbose: bool) -> MemberOutcome:
    stopped = False

    def callback(metrics: dict[str, Any], ckpt: Path | None) -> None:
        nonlocal stopped
        if m.callback is not None and m.callback(metrics, ckpt) == STOP:
            stopped = True
            raise StopMember

    try:
        result = fit(m.cfg, run_dir=m.run_dir, report_callback=callback,
                     resume_from=m.resume_from, verbose=verbose)
    except StopMember:
        stopped = True
    except Exception as exc:  # noqa: BLE001 - reported as this member's failure
        return MemberOutcome(m.name, "failed", _fit_result(_session_of(m), m.run_dir),
                             _last_step(m), exc)
    if stopped:
        return MemberOutcome(m.name, "stopped", _fit_result(_session_of(m), m.run_dir),
                             _last_step(m))
    last = result.metrics
    status: Status = "early_stopped" if last.get("early_stopped") else "finished"
    return MemberOutcome(m.name, status, result, int(last.get("step", 0)))


def _session_of(m: Member) -> LocalSession:
    tc = m.cfg.train
    return LocalSession(m.run_dir, keep=tc.keep_checkpoints, score=tc.best_metric,
                        mode=tc.best_mode)


def _last_step(m: Member) -> int:
    found = list_checkpoints(m.run_dir)
    return checkpoint_step(found[0]) if found else 0


__all__ = ["STOP", "Member", "MemberOutcome", "StackedTrainer", "StopMember", "fit_many",
           "fit_stacked"]
