"""The one embedding loop: rows of a dataset in, model outputs out, batch by batch.

Every forward pass outside the training step goes through ``forward_batches``: validation
(``train.validate``), a trained model's embeddings (``train.trained.TrainedModel``: checkpoint
evaluation, ``embed_split``) and the frozen-encoder feature cache (``features.encode_patches``). Rows are read batch by batch (a
memmapped store is never loaded whole), images are preprocessed as in training
(``images_to_input``), and the forward runs in eval mode without gradients on a
``Compute`` (device, ``train.precision`` autocast, channels_last: ``hescape.train.device``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from hescape.data.rowio import read_rows
from hescape.train.dataset import images_to_input
from hescape.train.device import Compute

CPU = Compute(torch.device("cpu"))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class RowInputs:
    """Row-aligned arrays -> the input tensors of one batch, on ``compute``'s device.

    ``gene_x`` (prepared expression, optional), and exactly one of ``images`` (uint8
    N x H x W x 3, preprocessed for ``encoder``) or ``features`` (cached backbone features).
    ``rows`` selects rows (all when None: then a memmapped store is read through its file).
    """

    def __init__(self, *, compute: Compute, gene_x: Any = None, images: Any = None,
                 features: Any = None, rows: np.ndarray | None = None, encoder: Any = None,
                 stain: Any = None) -> None:
        if (images is None) == (features is None):
            raise ValueError("embed from exactly one of images= or features=")
        self.compute, self.gene_x, self.images, self.features = compute, gene_x, images, features
        self.rows = None if rows is None else np.asarray(rows)
        self.encoder, self.stain = encoder, stain

    def __len__(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return len(self.features if self.features is not None else self.images)

    def _take(self, arr: Any, start: int, stop: int) -> np.ndarray:
        if self.rows is None:
            return read_rows(arr, start, stop)
        return np.asarray(arr[self.rows[start:stop]])

    def _floats(self, arr: Any, start: int, stop: int) -> torch.Tensor:
        block = np.asarray(self._take(arr, start, stop), dtype=np.float32)
        return torch.as_tensor(block, device=self.compute.device)

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """``gene`` (when given) and ``image`` or ``image_features`` of rows ``start:stop``."""
        out = {} if self.gene_x is None else {"gene": self._floats(self.gene_x, start, stop)}
        if self.features is not None:
            out["image_features"] = self._floats(self.features, start, stop)
        else:
            block = self._take(self.images, start, stop)
            out["image"] = self.compute.image(images_to_input(block, self.encoder,
                                                              stain=self.stain))
        return out


def forward_batches(forward: Callable[[dict[str, torch.Tensor]], Any], inputs: RowInputs, *,
                    batch_size: int = 256, progress: bool = False,
                    desc: str = "embed") -> Iterator[Any]:
    """``forward(batch)`` over ``inputs`` in batches: no grad, ``inputs.compute``'s autocast."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=not progress,
                      unit="batch"):
        batch = inputs.batch(start, start + batch_size)
        with torch.no_grad(), inputs.compute.autocast_context():
            out = forward(batch)
        yield out


def iter_outputs(model: torch.nn.Module, *, compute: Compute = CPU, gene_x: Any = None,
                 images: Any = None, features: Any = None, rows: np.ndarray | None = None,
                 batch_size: int = 256, stain: Any = None,
                 progress: bool = False) -> Iterator[dict[str, Any]]:
    """TwoTower outputs over aligned rows (eval mode); ``{"img_emb"}`` only without ``gene_x``."""
    net = compute.place(_unwrap(model).eval())

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if "gene" not in batch:
            return {"img_emb": net.encode_image(batch.get("image"),
                                                features=batch.get("image_features"))}
        return net(**batch)

    inputs = RowInputs(compute=compute, gene_x=gene_x, images=images, features=features,
                       rows=rows, encoder=net.image_encoder, stain=stain)
    yield from forward_batches(forward, inputs, batch_size=batch_size, progress=progress)


def compute_embeddings(model: torch.nn.Module, *, loss_fn: Any = None,
                       **source: Any) -> dict[str, Any]:
    """``dict(img, gene, loss)``: float32 unit-norm embeddings of the rows ``iter_outputs``
    reads from ``source`` (``gene`` None without ``gene_x``), and with ``loss_fn`` the
    batch-size-weighted mean contrastive loss over batches of >= 2 rows (else NaN)."""
    img, gene, losses, sizes = [], [], [], []
    for out in iter_outputs(model, **source):
        img.append(out["img_emb"].float().cpu().numpy())
        if "gene_emb" in out:
            gene.append(out["gene_emb"].float().cpu().numpy())
        if loss_fn is not None and len(out["img_emb"]) > 1:
            losses.append(float(loss_fn(out["img_emb"].float(), out["gene_emb"].float(),
                                        out["logit_scale"].float(), out["logit_bias"])))
            sizes.append(len(out["img_emb"]))
    return {"img": np.concatenate(img), "gene": np.concatenate(gene) if gene else None,
            "loss": float(np.average(losses, weights=sizes)) if losses else float("nan")}

