"""Device and precision: the one home for "which device" and "bf16 or not".

- ``resolve_device(use_gpu)``: a GPU when asked for and present, else the CPU.
- ``autocast_dtype(precision, device)``: ``train.precision``'s rule — ``auto``: bf16
  autocast on a GPU, fp32 (no autocast) elsewhere; ``bf16``: autocast on any device;
  ``fp32``: never.
- ``Compute``: a device with its autocast dtype and memory format, built by the same rule
  for training, validation and checkpoint evaluation (``Compute.of(cfg.train, device)``)
  and the feature cache (``Compute.as_trained``: the training's autocast, wherever it runs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from hescape.config import TrainConfig

__all__ = ["Compute", "autocast_dtype", "resolve_device", "use_channels_last"]


def resolve_device(use_gpu: bool, *, gpu: torch.device | str | None = None) -> torch.device:
    """``gpu`` (default ``cuda``) when ``use_gpu`` and CUDA is available, else the CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.device(gpu if gpu is not None else "cuda")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: plain fp32)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision={precision!r}: use auto, bf16 or fp32")
    on_gpu = torch.device(device).type == "cuda"
    if precision == "bf16" or (precision == "auto" and on_gpu):
        return torch.bfloat16
    return None


def use_channels_last(channels_last: bool, device: torch.device | str) -> bool:
    """``train.channels_last`` applies on a GPU only (NHWC convolutions)."""
    return channels_last and torch.device(device).type == "cuda"


@dataclass(frozen=True)
class Compute:
    """Where and how a forward pass runs: device, autocast dtype (None: fp32), NHWC images."""

    device: torch.device
    autocast: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def of(cls, train: TrainConfig, device: torch.device | str) -> Compute:
        """``train.precision`` / ``train.channels_last`` on ``device``, by the rules above."""
        device = torch.device(device)
        return cls(device, autocast_dtype(train.precision, device),
                   use_channels_last(train.channels_last, device))

    @classmethod
    def as_trained(cls, train: TrainConfig, device: torch.device | str) -> Compute:
        """On ``device``, with the autocast the training of ``train`` runs under on its own
        device (a GPU when ``train.use_gpu``), whichever device this process has."""
        planned = autocast_dtype(train.precision, "cuda" if train.use_gpu else "cpu")
        device = torch.device(device)
        return cls(device, planned, use_channels_last(train.channels_last, device))

    @property
    def precision(self) -> str:
        """``float32`` or the autocast dtype's name (``bfloat16``): what a cache key records."""
        return "float32" if self.autocast is None else str(self.autocast).removeprefix("torch.")

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` with this dtype, or a no-op when fp32."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` to the device (NHWC weights when ``channels_last``)."""
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the device, in the memory format the model expects."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
