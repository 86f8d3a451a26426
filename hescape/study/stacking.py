"""Vectorised head-only trials in a study: K Tune trials, one stacked model.

With ``train.stack_size: K > 1``, head-only trials whose configurations share a
``hescape.train.stack_key`` (same data and donor fold, expression variant, feature cache,
architecture, loss, batch size, device) are trained together by one ``StackService`` (a Ray
actor per stack key and driver run) as one ``hescape.train.stacked.StackedTrainer``. Each
trial stays its own Tune trial and MLflow child run: its process is a thin proxy that
joins the service, receives its member's reports one by one (MLflow + ``tune.report``,
exactly the unbatched trial's), acknowledges each, and gets its final evaluation back.

- Grouping: the service starts a stack when ``K`` members joined or ``train.stack_wait_s``
  passed since the first pending join; later arrivals start the next stack (Tune launches
  ``K`` times more trials at once, since each reserves ``1/K`` of a worker's resources).
- Lock-step reports: the engine waits for the proxy's acknowledgement of each report (the
  proxy has logged it and Tune has taken it), so ASHA's decision lands at the same report
  as for an unbatched trial: a stopped trial's proxy exits in ``tune.report``, tells the
  service, and its member leaves the stack at that boundary; the others continue unchanged.
- Evaluation: when a member's training ends (last step or early stop), the service
  evaluates its best checkpoint (``evaluation.evaluate_trial``: the same function an
  unbatched trial runs) on the dataset it loaded once for the whole stack key; the proxy
  logs the metrics and artifacts to its run. A member's failure (non-finite loss, a failed
  evaluation) fails its trial only.
- Resume: a restored proxy reports where its checkpoints stand (as every trial does) and
  joins again; the engine resumes each member from its own checkpoints (ragged), a member
  whose training is over is only evaluated.
- Resources: the service reserves nothing itself and is placed on the first proxy's node
  (soft affinity); the proxies' ``1/K`` shares are its budget. On a GPU it uses the device
  the node shows it (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for a zero-GPU actor).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig

log = logging.getLogger(__name__)

ACTOR_PREFIX = "hescape-stack-"
ACK_TIMEOUT_S = 600.0  # a proxy that never acknowledges is dropped (its trial is gone)
POLL_S = 0.2
IDLE_EXIT_S = 30.0  # a service with no open member exits after max(this, 3 x stack_wait_s)


def stacking(cfg: StudyConfig) -> bool:
    """True when a trial of ``cfg`` trains in a stack (``train.stack_size`` > 1 and the
    configuration can stack)."""
    from hescape.train.stack_key import stack_problem

    return cfg.train.stack_size > 1 and stack_problem(cfg) is None


def service_name(token: str, cfg: StudyConfig) -> str:
    """The named actor of ``cfg``'s stack key in this driver run (``token``)."""
    from hescape.train.stack_key import stack_key

    return f"{ACTOR_PREFIX}{token}-{str(stack_key(cfg))[:20]}"


@dataclass
class _Member:
    """One member as the service tracks it."""

    name: str
    cfg: StudyConfig
    trial_dir: Path
    train: bool
    events: queue.Queue = field(default_factory=queue.Queue)
    ack: threading.Event = field(default_factory=threading.Event)
    dropped: bool = False
    evaluating: bool = False
    closed: bool = False  # its final event was fetched, or it left


class StackService:
    """Ray actor (``max_concurrency`` > members): groups joining members into stacks,
    trains each stack in a thread, evaluates finished members, relays events."""

    def __init__(self, shared: Any, cfg_dict: dict[str, Any]) -> None:
        from hescape.study.trial import trial_inputs

        cfg = StudyConfig.model_validate(cfg_dict)
        self.shared, self.size, self.wait_s = shared, cfg.train.stack_size, cfg.train.stack_wait_s
        self.inputs = trial_inputs(cfg, shared)  # once for every member of this stack key
        self.lock = threading.Lock()
        self.members: dict[str, _Member] = {}
        self.pending: list[_Member] = []
        self.first_pending = 0.0
        self.evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stack-eval")
        self.closing = False
        self.idle_since = time.monotonic()
        self.idle_exit_s = max(IDLE_EXIT_S, 3 * self.wait_s)
        threading.Thread(target=self._launcher, daemon=True, name="stack-launcher").start()

    # ------------------------------------------------------------------ proxy API
    def facts(self) -> dict[str, Any]:
        """What the proxy's MLflow tags need: the prepared variant's facts and the split."""
        p = self.inputs.prepared
        return {"method": p.method, "cache_key": p.cache_key, "saw_heldout": p.saw_heldout,
                "info": p.info, "split": {k: list(v) for k, v in self.inputs.paired.split.items()}}

    def join(self, name: str, cfg_dict: dict[str, Any], trial_dir: str, *, train: bool) -> str:
        """Register a member (``train``: it has steps left; else it is only evaluated).
        A member already known (its trial restarted) is re-attached."""
        with self.lock:
            if self.closing:  # idle and exiting: the proxy asks for a new service
                return "closing"
            known = self.members.get(name)
            if known is not None and not known.dropped:
                known.closed = False
                return "attached"
            m = _Member(name, StudyConfig.model_validate(cfg_dict), Path(trial_dir), train)
            self.members[name] = m
            if train:
                if not self.pending:
                    self.first_pending = time.monotonic()
                self.pending.append(m)
        if not train:
            self._evaluate_later(m)
        return "joined"

    def next(self, name: str, timeout: float = 10.0) -> tuple | None:
        """The member's next event, or None after ``timeout``: ("report", metrics),
        ("evaluated", metrics, artifacts), ("failed", message)."""
        m = self.members[name]
        try:
            event = m.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if event[0] in ("evaluated", "failed"):
            m.closed = True
        return event

    def ack(self, name: str) -> None:
        """The proxy has logged the last report and Tune took it."""
        self.members[name].ack.set()

    def drop(self, name: str) -> None:
        """The trial was stopped (ASHA) or is gone: leave the stack at the next boundary."""
        m = self.members.get(name)
        if m is not None:
            m.dropped = m.closed = True
            m.ack.set()

    def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ stacks
    def _launcher(self) -> None:
        while True:
            time.sleep(POLL_S)
            if self._idle_exit():
                return
            with self.lock:
                due = self.pending and (len(self.pending) >= self.size or
                                        time.monotonic() - self.first_pending >= self.wait_s)
                if not due:
                    continue
                group, self.pending = self.pending[: self.size], self.pending[self.size:]
                self.first_pending = time.monotonic()
            threading.Thread(target=self._train, args=(group,), daemon=True,
                             name="stack-train").start()

    def _idle_exit(self) -> bool:
        """Exit once no member has been open for ``idle_exit_s``: a search moves on to other
        stack keys, and each service holds a dataset in memory. A proxy joining meanwhile
        is told "closing" and creates the next service (``join``)."""
        with self.lock:
            if self.pending or any(not m.closed for m in self.members.values()):
                self.idle_since = time.monotonic()
                return False
            if time.monotonic() - self.idle_since < self.idle_exit_s:
                return False
            self.closing = True
        log.info("stack service idle for %.0f s: exiting", self.idle_exit_s)
        self.evaluator.shutdown(wait=True)
        import ray

        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        return True

    def _train(self, group: list[_Member]) -> None:
        from hescape.train.inputs import train_inputs
        from hescape.train.stacked import Member, StackedTrainer

        members = [Member(cfg=m.cfg, run_dir=m.trial_dir / "train", name=m.name,
                          callback=self._callback(m, len(group))) for m in group]
        try:
            inp = self.inputs
            loaded = train_inputs(group[0].cfg, inp.paired, inp.prepared, inp.features_path)
            # validation in this process: worker pools would hold a process per core for
            # every service (one per stack key) a search has open at once
            outcomes = StackedTrainer(members, inputs=loaded, validation_workers=0,
                                      verbose=bool(self.shared.verbose)).run()
        except BaseException as exc:  # noqa: BLE001 - every member's trial must hear of it
            for m in group:
                m.events.put(("failed", f"the stack failed: {type(exc).__name__}: {exc}\n"
                                        f"{traceback.format_exc()[-3000:]}"))
            return
        for m, out in zip(group, outcomes, strict=True):
            if out.status == "failed":
                err = out.error
                m.events.put(("failed", f"{type(err).__name__}: {err}"))
            elif out.status != "stopped" and not m.evaluating:
                self._evaluate_later(m)  # (a member whose last report fired it already is)

    def _callback(self, m: _Member, size: int):
        from hescape.study.resume import read_progress
        from hescape.train.stacked import STOP

        def report(metrics: dict[str, Any], ckpt: Path | None) -> str | None:
            m.ack.clear()  # sys/stack_size: the members its stack started with
            m.events.put(("report", {**metrics, "sys/stack_size": float(size)}))
            if not m.ack.wait(ACK_TIMEOUT_S):
                m.dropped = True
                log.warning("stack member %s: no acknowledgement in %.0f s, dropped", m.name,
                            ACK_TIMEOUT_S)
            if m.dropped:
                return STOP
            if read_progress(m.trial_dir, m.cfg).training_done:  # its last report
                self._evaluate_later(m)
            return None

        return report

    def _evaluate_later(self, m: _Member) -> None:
        m.evaluating = True
        self.evaluator.submit(self._evaluate, m)

    def _evaluate(self, m: _Member) -> None:
        from hescape.study.evaluation import evaluate_trial
        from hescape.study.resume import read_progress

        try:
            fitted = read_progress(m.trial_dir, m.cfg).fit_result()
            inp = self.inputs
            metrics, arts = evaluate_trial(
                m.cfg, fitted, out_dir=m.trial_dir / "eval", paired=inp.paired,
                prepared=inp.prepared, features=inp.features_path,
                baselines=not self.shared.study_baselines)
            m.events.put(("evaluated", metrics, {k: str(v) for k, v in arts.items()},
                          None if fitted.best_checkpoint is None else str(fitted.best_checkpoint)))
        except BaseException as exc:  # noqa: BLE001 - the member's trial reports it
            m.events.put(("failed", f"evaluation failed: {type(exc).__name__}: {exc}\n"
                                    f"{traceback.format_exc()[-3000:]}"))


def service(shared: Any, cfg: StudyConfig) -> Any:
    """The stack service of ``cfg``'s stack key (created by the first proxy, on its node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_concurrency=4096, max_restarts=0)(StackService)
    handle = actor.options(
        name=service_name(shared.run_token, cfg), get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote(shared, cfg.model_dump())
    ray.get(handle.ping.remote())
    return handle


def join(shared: Any, cfg: StudyConfig, name: str, trial_dir: str, *, train: bool,
         attempts: int = 60) -> Any:
    """Join ``name`` to its stack key's service; returns the service's handle. A service
    that is exiting (idle) or gone is replaced by a new one."""
    import ray
    from ray.exceptions import RayActorError

    for _ in range(attempts):
        handle = service(shared, cfg)
        try:
            if ray.get(handle.join.remote(name, cfg.model_dump(), trial_dir,
                                          train=train)) != "closing":
                return handle
        except RayActorError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"stack service for {name}: still closing after {attempts} attempts")


def connect(shared: Any, cfg: StudyConfig, attempts: int = 60) -> tuple[Any, dict[str, Any]]:
    """(the service of ``cfg``'s stack key, its ``facts``), across a service's idle exit."""
    import ray
    from ray.exceptions import RayActorError

    for _ in range(attempts):
        handle = service(shared, cfg)
        try:
            return handle, ray.get(handle.facts.remote())
        except RayActorError:
            time.sleep(1.0)
    raise RuntimeError(f"stack service: unreachable after {attempts} attempts")


def run_token(study: str) -> str:
    """Names this driver run's stack services: the study, then a fresh id."""
    import uuid

    return f"{study}-{uuid.uuid4().hex[:8]}"


def stop_services(token: str) -> int:
    """Kill the stack services whose token starts with ``token``: this run's at the end of
    a phase, or (a study name) any a killed driver left on a cluster."""
    import ray
    from ray.util import list_named_actors

    n = 0
    for entry in list_named_actors(all_namespaces=False):
        name = entry if isinstance(entry, str) else entry.get("name", "")
        if name.startswith(f"{ACTOR_PREFIX}{token}-"):
            try:
                ray.kill(ray.get_actor(name))
                n += 1
            except ValueError:
                pass
    return n
