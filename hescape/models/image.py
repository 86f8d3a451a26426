"""Image encoders: named presets or any timm architecture, with weights from local files only.

``create_image_encoder(cfg)`` returns an :class:`ImageEncoder` (``out_dim``, ``input_size``,
``mean``, ``std``, ``feature_key()``, ``preprocess_images()``). Modes: ``frozen`` (no grad,
always eval), ``finetune`` (everything trains), ``last_n`` (the last n timm block groups train;
frozen BatchNorm layers stay in eval).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models._manipulate import group_with_matcher
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from hescape.config import ImageEncoderConfig
from hescape.lazy import Ref
from hescape.models.presets import (
    IMAGE_PRESETS,
    LOCAL_BACKBONES,
    ImagePreset,
    check_image_encoder_name,
)
from hescape.models.weights import (
    cached_hub_file,
    file_fingerprint,
    hf_cache_dir,
    read_state_dict,
    state_fingerprint,
)


class TinyCNN(nn.Module):
    """A 3-stage CNN (~20k params) for tests and smoke runs."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 3, 2, 1),
                    nn.BatchNorm2d(width * 2 ** (i + 1)),
                    nn.ReLU(),
                )
                for i in range(2)
            ]
        )
        self.num_features = width * 4

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


def _timm_preset(name: str) -> ImagePreset:
    """Describe a plain timm architecture with its own pretrained_cfg metadata."""
    pcfg = timm.get_pretrained_cfg(name)
    info = pcfg.to_dict() if pcfg is not None else {}
    size = int(info.get("input_size", (3, 224, 224))[-1])
    hub = info.get("hf_hub_id") or None
    hint = f"timm {name}: weights of hf.co/{hub}" if hub else f"timm {name}: a local weights file"
    return ImagePreset(
        name=name,
        arch=name,
        input_size=size,
        mean=tuple(info.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(info.get("std", (0.229, 0.224, 0.225))),
        weights_hint=hint,
        hf_hub_id=hub,
    )


def resolve_preset(name: str) -> ImagePreset:
    """The preset of ``name`` (a named preset, or any timm architecture)."""
    if name in IMAGE_PRESETS:
        return IMAGE_PRESETS.get(name)
    msg = check_image_encoder_name(name)
    if msg:
        raise KeyError(msg)
    return _timm_preset(name)


def _build_backbone(preset: ImagePreset, image_size: int) -> nn.Module:
    if preset.arch in LOCAL_BACKBONES:
        return LOCAL_BACKBONES[preset.arch].load()()
    kwargs = {k: v.load() if isinstance(v, Ref) else v for k, v in preset.timm_kwargs.items()}
    pcfg = timm.get_pretrained_cfg(preset.arch)
    if (pcfg is not None and pcfg.fixed_input_size) or "img_size" in kwargs:
        kwargs["img_size"] = image_size
    return timm.create_model(preset.arch, pretrained=False, num_classes=0, **kwargs)


def _weights_file(preset: ImagePreset, cfg: ImageEncoderConfig) -> Path | None:
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.image.weights: {path} does not exist (encoder {cfg.name!r})"
            )
        return path
    if not cfg.pretrained:
        return None
    if preset.builtin_weights is not None:
        return preset.builtin_weights()
    if preset.hf_hub_id and (found := cached_hub_file(preset.hf_hub_id)) is not None:
        return found
    hub = (
        (
            f", or populate the HF cache ({hf_cache_dir()}) with {preset.hf_hub_id} on a machine with "
            "network (huggingface-cli download ...)"
        )
        if preset.hf_hub_id
        else ""
    )
    raise FileNotFoundError(
        f"image encoder {cfg.name!r} has pretrained: true but no weights are available offline. "
        f"Expected: {preset.weights_hint}. Put the file on this machine and set "
        f"model.image.weights: /path/to/pytorch_model.bin (safetensors preferred){hub}; "
        "or set model.image.pretrained: false for random init."
    )


def load_backbone_weights(model: nn.Module, path: Path, preset: ImagePreset) -> None:
    """Load a tensor-only state dict into ``model``; every backbone key must match."""
    state = read_state_dict(path)
    if preset.key_map is not None:
        state = preset.key_map(state)
    own = model.state_dict()
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier", "head"))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(head + ".")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path}: weights do not fit {preset.name!r} ({preset.arch}): missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatch "
            f"{shapes[:5]}. Check the file belongs to this preset and image_size={preset.input_size}."
        )
    model.load_state_dict(state, strict=True)


class ImageEncoder(nn.Module):
    """A backbone returning pooled features, plus the metadata needed to feed and cache it."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        preset = resolve_preset(cfg.name)
        self.name, self.mode, self.preset = cfg.name, cfg.mode, preset
        self.input_size = int(cfg.image_size or preset.input_size)
        self.mean, self.std = tuple(preset.mean), tuple(preset.std)
        self.weights_path = _weights_file(preset, cfg)  # fail fast, before building a giant ViT
        self.backbone = _build_backbone(preset, self.input_size)
        self.out_dim = int(
            getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        )
        if self.weights_path is not None:
            load_backbone_weights(self.backbone, self.weights_path, preset)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._apply_mode(cfg.mode, cfg.last_n)

    def _apply_mode(self, mode: str, last_n: int) -> None:
        trainable = mode == "finetune"
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        if mode == "last_n":
            groups = list(
                group_with_matcher(
                    self.backbone.named_parameters(), self.backbone.group_matcher(coarse=True)
                ).values()
            )
            if last_n > len(groups) - 1:
                raise ValueError(
                    f"image encoder {self.name!r}: last_n={last_n} but it has only "
                    f"{len(groups) - 1} blocks after the stem; use mode: finetune"
                )
            names = {n for group in groups[-last_n:] for n in group}
            for n, p in self.backbone.named_parameters():
                p.requires_grad_(n in names)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.mode == "frozen":
            self.backbone.eval()
        elif self.mode == "last_n":
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features of already-normalised ``B x 3 x S x S`` images."""
        if self.mode == "frozen":
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def preprocess_images(
        self, images: np.ndarray | Tensor, device: torch.device | str | None = None
    ) -> Tensor:
        """uint8 ``N x H x W x 3`` -> float ``N x 3 x S x S``: resize (antialias), scale, normalise."""
        x = images if isinstance(images, Tensor) else torch.from_numpy(np.array(images))
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 N x H x W x 3 patches, got {tuple(x.shape)} {x.dtype}"
            )
        x = x.to(device or self._mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def feature_key(self) -> str:
        """Stable identity of (encoder, weights, input size, normalisation): the feature-cache key."""
        weights = (
            file_fingerprint(self.weights_path)
            if self.weights_path is not None
            else "random:" + state_fingerprint(self.backbone.state_dict())
        )
        spec = {
            "name": self.name,
            "arch": self.preset.arch,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": weights,
            "timm": timm.__version__,
        }
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.name}-{self.input_size}-{digest}"


def create_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """Build the image encoder described by ``cfg`` (offline; see module docstring)."""
    return ImageEncoder(cfg)

