"""CLIP and SigLIP losses with negatives gathered across workers (open_clip ``loss.py`` style).

Each worker computes the loss of its *local* rows against the *global* batch (local loss,
global negatives); ``all_gather`` keeps gradients flowing to every worker's embeddings.
With DDP averaging parameter gradients over workers, loss and gradients equal those of one
process on the concatenated batch (tested with 2 gloo processes). Rank and world size are
passed explicitly (the training loop reads them from ``ray.train.get_context()``); nothing
here reads environment variables. Local batches must have equal sizes (``drop_last=True``).

``logit_scale`` is log-space (as returned by ``TwoTower``): logits use ``logit_scale.exp()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hescape.losses.spec import LOSSES


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Backward uses ``all_reduce`` (supported by gloo and NCCL) and keeps this rank's rows.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, world_size: int) -> Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def check_equal_batches(x: Tensor, world_size: int) -> None:
    """Every rank must hold the same number of rows (one extra collective)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"local batch sizes differ across workers ({[int(s) for s in sizes]}); "
            "use drop_last=True so every worker sees the same batch size"
        )


def gather_with_grad(x: Tensor, world_size: int, *, check: bool = True) -> Tensor:
    """Concatenate ``x`` from all ranks (rank order) along dim 0; gradients flow back.

    ``check=False`` skips the batch-size check (the losses check once, on their first call).
    """
    if world_size <= 1:
        return x
    if check:
        check_equal_batches(x, world_size)
    return _AllGather.apply(x, world_size)


class _GatheredLoss(nn.Module):
    """Holds rank/world size; gathers across workers, checking batch sizes on first use.

    ``forward(img_emb, gene_emb, logit_scale, logit_bias=None)``: the loss of this worker's
    rows against the gathered batch; ``logit_scale`` is in log space.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self._sizes_checked = False

    def gather(self, x: Tensor) -> Tensor:
        out = gather_with_grad(x, self.world_size, check=not self._sizes_checked)
        self._sizes_checked = True
        return out

    def forward(self, img_emb: Tensor, gene_emb: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None) -> Tensor:  # fmt: skip
        return self.pair_loss(img_emb, gene_emb, logit_scale.exp(), logit_bias)

    def pair_loss(self, img_emb: Tensor, gene_emb: Tensor, scale: Tensor,
                  logit_bias: Tensor | None) -> Tensor:  # fmt: skip
        raise NotImplementedError


class ClipLoss(_GatheredLoss):
    """Symmetric InfoNCE; labels of local rows are offset by ``rank * local_batch``."""

    def pair_loss(self, img_emb: Tensor, gene_emb: Tensor, scale: Tensor,
                  logit_bias: Tensor | None) -> Tensor:  # fmt: skip
        all_img = self.gather(img_emb)
        all_gene = self.gather(gene_emb)
        logits_img = scale * img_emb @ all_gene.T
        logits_gene = scale * gene_emb @ all_img.T
        if logit_bias is not None:
            logits_img, logits_gene = logits_img + logit_bias, logits_gene + logit_bias
        n = img_emb.shape[0]
        labels = torch.arange(n, device=img_emb.device) + self.rank * n
        return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_gene, labels))


class SigLipLoss(_GatheredLoss):
    """Pairwise sigmoid loss: local images against all genes, summed over pairs / local batch."""

    def pair_loss(self, img_emb: Tensor, gene_emb: Tensor, scale: Tensor,
                  logit_bias: Tensor | None) -> Tensor:  # fmt: skip
        if logit_bias is None:
            raise ValueError("SigLIP needs logit_bias (build the model with loss.name: siglip)")
        all_gene = self.gather(gene_emb)
        logits = scale * img_emb @ all_gene.T + logit_bias
        n = img_emb.shape[0]
        targets = -torch.ones_like(logits)
        cols = torch.arange(n, device=img_emb.device) + self.rank * n
        targets[torch.arange(n, device=img_emb.device), cols] = 1.0
        return -F.logsigmoid(targets * logits).sum() / n


def create_loss(cfg: Any, *, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The loss ``cfg.name`` (a ``LossConfig``; ``hescape.losses.spec.LOSSES``) for worker
    ``rank`` of ``world_size``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return LOSSES.get(cfg.name).build.load()(rank=rank, world_size=world_size)
