"""Where the loop's rank, world size, reports and checkpoints come from.

The same ``train_loop_per_worker`` runs inside a Ray Train worker group and in the current
process (1 worker, no GPU: no worker-group start-up cost). ``current_session()`` returns
the in-process ``LocalSession`` when one is active (``with local_session(...)``) and a thin
wrapper over ``ray.train`` otherwise. Nothing here reads environment variables.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from hescape.train.checkpoint import list_checkpoints
from hescape.train.device import resolve_device

ReportCallback = Callable[[dict[str, Any], "Path | None"], None]


class Session(Protocol):
    world_rank: int
    world_size: int

    def device(self, use_gpu: bool) -> torch.device: ...
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def staging_dir(self) -> Path: ...
    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None: ...
    def resume_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def wait_reported(self, timeout_s: float = 120.0) -> None: ...


class RaySession:
    """``ray.train`` (Train V2) behind the Session protocol."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        import ray.train.torch

        return resolve_device(use_gpu, gpu=ray.train.torch.get_device() if use_gpu else None)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": True},
        )

    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="hescape-ckpt-"))

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
            return
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint))
        try:
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint.name)
        finally:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)

    def wait_reported(self, timeout_s: float = 120.0) -> None:
        """Block until the Train controller has registered every report of this worker.

        ``ray.train.report`` persists the checkpoint, then queues the report; the controller
        picks it up on its next poll (~2 s). A worker that dies in between loses the report
        (the driver never sees those metrics); its checkpoint stays in the run directory,
        where the restarted loop finds it (``loop.newest_checkpoint``).
        """
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s)

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as path:
            yield Path(path)


class LocalSession:
    """Rank 0 of a world of 1, in this process: records reports, keeps checkpoints.

    Checkpoints live directly in ``run_dir`` (as with Ray Train); the ``keep`` best by ``score`` (plus the
    latest) are kept, like Ray's ``CheckpointConfig(num_to_keep, checkpoint_score_attribute)``.
    """

    world_rank = 0
    world_size = 1

    def __init__(
        self, run_dir: Path, *, keep: int, score: str, mode: str,
        callback: ReportCallback | None = None,
    ) -> None:
        self.ckpt_root = Path(run_dir)
        self.keep, self.score, self.mode, self.callback = keep, score, mode, callback
        self.history: list[dict[str, Any]] = []
        self.scores: dict[Path, float] = {}
        self.best_checkpoint: Path | None = None
        for path in reversed(list_checkpoints(self.ckpt_root)):  # a previous run's
            self._rank(path, _saved_metrics(path))

    def device(self, use_gpu: bool) -> torch.device:
        return resolve_device(use_gpu)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def staging_dir(self) -> Path:
        return self.ckpt_root

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint is not None:
            self._register(checkpoint, metrics)
        if self.callback is not None:
            self.callback(dict(metrics), checkpoint)

    def wait_reported(self, timeout_s: float = 120.0) -> None:
        """Reports are handled synchronously here: nothing to wait for."""

    def _rank(self, checkpoint: Path, metrics: dict[str, Any]) -> list[Path]:
        value = float(metrics.get(self.score, math.nan))
        sign = 1.0 if self.mode == "max" else -1.0
        self.scores[checkpoint] = sign * value if math.isfinite(value) else -math.inf
        ranked = sorted(self.scores, key=lambda p: self.scores[p], reverse=True)
        self.best_checkpoint = ranked[0]
        return ranked

    def _register(self, checkpoint: Path, metrics: dict[str, Any]) -> None:
        ranked = self._rank(checkpoint, metrics)
        for path in ranked[self.keep:]:
            if path != checkpoint:
                shutil.rmtree(path, ignore_errors=True)
                del self.scores[path]

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        found = list_checkpoints(self.ckpt_root)
        yield found[0] if found else None


def _saved_metrics(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}


_LOCAL: LocalSession | None = None


@contextlib.contextmanager
def local_session(session: LocalSession) -> Iterator[LocalSession]:
    """Make ``session`` what ``current_session()`` returns inside the block."""
    global _LOCAL
    previous, _LOCAL = _LOCAL, session
    try:
        yield session
    finally:
        _LOCAL = previous


def current_session() -> Session:
    """The active in-process session, else the Ray Train worker's session."""
    return _LOCAL if _LOCAL is not None else RaySession()
