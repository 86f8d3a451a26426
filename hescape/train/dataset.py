"""Torch dataset over a PairedData part, and the collate that prepares images.

Items are ``dict(image=uint8 HWC | feature=float, gene=float, donor=long, index=long)``.
The collate stacks them and turns images into the encoder's input (optional Macenko stain
normalisation and HED jitter first, then the encoder's resize + normalisation). Donor
codes index the *training* donors (``-1`` for any other donor). Sharding is a
``DistributedSampler`` (what ``ray.train.torch.prepare_data_loader`` would add), here
subclassed so a resumed run skips the batches it already trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler


def donor_codes(donors: np.ndarray, train_donors: list[str]) -> np.ndarray:
    """Per-obs code of the donor among ``train_donors`` (sorted order), -1 elsewhere."""
    lookup = {d: i for i, d in enumerate(sorted(train_donors))}
    return np.array([lookup.get(str(d), -1) for d in donors], dtype=np.int64)


class PairedDataset(Dataset):
    """Rows ``indices`` of a PairedData: image patch (or cached feature) + expression."""

    def __init__(
        self, indices: np.ndarray, *, gene_x: np.ndarray, donors: np.ndarray,
        patches: np.ndarray | None = None, features: np.ndarray | None = None,
    ) -> None:
        if (patches is None) == (features is None):
            raise ValueError("PairedDataset needs exactly one of patches= or features=")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.gene_x, self.donors = gene_x, donors
        self.patches, self.features = patches, features

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        item: dict[str, Any] = {
            "gene": torch.from_numpy(np.array(self.gene_x[j], dtype=np.float32)),
            "donor": int(self.donors[j]),
            "index": j,
        }
        if self.features is not None:
            item["feature"] = torch.from_numpy(np.array(self.features[j], dtype=np.float32))
        else:
            item["image"] = np.asarray(self.patches[j])
        return item


@dataclass(frozen=True)
class ImageSpec:
    """What preprocessing needs of an encoder (CPU-only, picklable for loader workers)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, encoder: Any) -> ImageSpec:
        return cls(int(encoder.input_size), tuple(encoder.mean), tuple(encoder.std))


def images_to_input(
    images: np.ndarray | torch.Tensor, encoder: Any, *, stain: Any = None,
    augment: float = 0.0, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x S x S as the encoder expects it (on CPU).

    Order: Macenko (``stain``, a fitted normaliser) -> [0, 1] -> HED jitter (``augment`` > 0)
    -> resize (bilinear, antialias) + mean/std: the same as ``ImageEncoder.preprocess_images``
    (tested), from ``encoder``'s ``input_size``/``mean``/``std`` (an encoder or ImageSpec).
    """
    x = images_to_uint8(images, stain=stain)
    if augment > 0:
        from hescape.preprocess import hed_jitter

        return resize_normalize(hed_jitter(x.float().div_(255.0), augment, generator), encoder)
    return resize_normalize(x, encoder)


def images_to_uint8(images: np.ndarray | torch.Tensor, *, stain: Any = None) -> torch.Tensor:
    """uint8 B x H x W x 3 (Macenko-normalised when ``stain``) -> uint8 B x 3 x H x W."""
    if stain is not None:
        images = stain.transform(np.asarray(images))
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()


def resize_normalize(x: torch.Tensor, encoder: Any) -> torch.Tensor:
    """B x 3 x H x W (uint8, or float in [0, 1]) -> float32 resized + mean/std normalised,
    on ``x``'s device (the loop calls it on the GPU with uint8 batches: 4x fewer bytes to
    copy and no float work in the loader)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    size = int(encoder.input_size)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    mean = torch.tensor(encoder.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Collate:
    """Stack items; images go through ``images_to_input`` (picklable for loader workers).

    ``defer_normalize`` (no HED jitter): images stay uint8 B x 3 x H x W and the training
    loop resizes/normalises them on its device (``resize_normalize``). The HED-jitter
    generator is seeded from (seed, the batch's indices), so augmentation is deterministic
    whichever loader worker builds the batch, and after a resume.
    """

    def __init__(self, encoder: Any = None, *, stain: Any = None, augment: float = 0.0,
                 seed: int = 0, defer_normalize: bool = False) -> None:
        self.spec = None if encoder is None else ImageSpec.of(encoder)
        self.stain, self.augment, self.seed = stain, augment, seed
        self.defer = defer_normalize and augment <= 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)
        batch = {
            "gene": torch.stack([it["gene"] for it in items]),
            "donor": torch.tensor([it["donor"] for it in items], dtype=torch.long),
            "index": index,
        }
        if "feature" in items[0]:
            batch["feature"] = torch.stack([it["feature"] for it in items])
            return batch
        gen = None
        if self.augment > 0:
            digest = hashlib.sha256(index.numpy().tobytes()).digest()[:8]
            gen = torch.Generator().manual_seed(self.seed ^ int.from_bytes(digest, "little"))
        images = np.stack([it["image"] for it in items])
        if self.defer:
            batch["image"] = images_to_uint8(images, stain=self.stain)
            return batch
        batch["image"] = images_to_input(images, self.spec, stain=self.stain,
                                         augment=self.augment, generator=gen)
        return batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that can start mid-epoch.

    ``set_position(epoch, skip_batches)`` makes the next iteration yield the epoch's order
    without its first ``skip_batches * batch_size`` indices: a resumed run sees exactly
    the batches an uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.batch_size, self.skip = batch_size, 0

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self):
        order = list(super().__iter__())
        return iter(order[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size
