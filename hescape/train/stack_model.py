"""K TwoTower heads as one stacked model: the parameters, the forward pass and the losses.

``HeadStack`` holds the trainable head parameters (image projection, gene encoder, gene
projection, temperature, SigLIP bias, donor adversaries) of K members in ONE tensor
``flat`` of shape K x P (member k's parameters are row k, one segment per parameter, the
weight-decayed ones first) and their gradients in one K x P buffer (each segment a leaf
view of ``flat``: the optimiser updates all members in a few whole-buffer ops); the frozen image trunk is not part of it (members read the
cached features). The forward pass walks the template's modules and runs each on all K
members at once:

* ``nn.Linear``: ``torch.baddbmm(bias, x, W^T)`` over K (on CPU bit-identical to each
  member's ``F.linear``: the same gemm per member);
* ``nn.LayerNorm``: ``addcmul(beta, layer_norm(x), gamma)`` (bit-identical to the affine
  kernel);
* ``nn.GELU``: elementwise;
* ``nn.Dropout``: each member's mask drawn from ITS OWN ``torch.Generator``, with the shape,
  dtype and call (``empty(B, H).bernoulli_(1 - p).div_(1 - p)``) of the unbatched
  ``nn.Dropout`` on the CPU, in module order, so a member seeded like the unbatched loop
  (``seed_everything(seed)``) draws exactly that run's masks; p may differ per member;
* the donor adversary's gradient reversal with a per-member weight.

Losses (``stacked_loss``) are CLIP or SigLIP per member (batched matmuls, per-member
reductions) and the donor cross-entropy, returned as K-vectors: their sum back-propagates
each member's gradient into its own row only (members never mix).

Exactness (CPU, float32, measured by ``tests/train/test_stacked.py``): forward, losses,
gradients, clipping and AdamW reproduce an unbatched run bit for bit in our tests; the
tests still compare with a small tolerance because nothing in torch promises that batched
and unbatched kernels round alike (other BLAS builds, thread counts, GPUs). On a GPU the
dropout masks come from per-member CUDA generators and do NOT equal the unbatched run's
(its fused dropout kernel draws differently); with dropout 0 a GPU stack matches within
float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hescape.models.gene import LatentMLPEncoder, MLPEncoder
from hescape.models.two_tower import MAX_LOGIT_SCALE, TwoTower, param_groups


class NotStackable(ValueError):
    """A model part without a stacked implementation (the message names it)."""


@dataclass(frozen=True)
class Segment:
    """One trainable parameter's place in a row of ``HeadStack.flat``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    decay: bool  # in the weight-decay group of ``param_groups``

    @property
    def stop(self) -> int:
        return self.offset + self.numel


def head_parameters(model: TwoTower) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every head parameter (not the image trunk), in module order."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("image_encoder.")]


class _StackedGradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies member k's gradient by ``neg_weight[k]``
    (``-weight`` as float32: what ``adversary._GradReverse`` does with its python float)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, neg_weight: Tensor) -> Tensor:
        ctx.save_for_backward(neg_weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (neg_weight,) = ctx.saved_tensors
        return grad * neg_weight.view(-1, *([1] * (grad.ndim - 1))).to(grad.dtype), None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    An embedding feeds two batched matmuls of the loss; autograd sums their gradients in
    the layout of the first (a transposed ``bmm`` result in the stack, contiguous in the
    unbatched loss), and the reductions of ``F.normalize``'s backward then add in another
    order. Same values, laid out as the unbatched run has them: same rounding."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _StackedLayerNorm(torch.autograd.Function):
    """``nn.LayerNorm`` over the last dim for K members with per-member ``gamma``/``beta``
    (K x H). Forward: ATen's normalisation of all members at once, then
    ``addcmul(beta, y, gamma)`` (bit-identical to the affine kernel on the CPU). Backward
    on the CPU in float32: ATen's own ``native_layer_norm_backward`` per member, so dX,
    dgamma and dbeta round exactly as the unbatched ``nn.LayerNorm``'s (the kernel's
    reduction order and fused multiply-adds are not reproducible with batched ops: K small
    kernel calls per layer). Elsewhere: the same formulas batched (within float tolerance).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor | None,
                shape: list[int], eps: float) -> Tensor:
        y, mean, rstd = torch.native_layer_norm(x, shape, None, None, eps)
        ctx.save_for_backward(x, y, mean, rstd, gamma, beta)
        ctx.shape, ctx.has_beta = shape, beta is not None
        if beta is None:
            return y * gamma.unsqueeze(1)
        return torch.addcmul(beta.unsqueeze(1), y, gamma.unsqueeze(1))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, mean, rstd, gamma, beta = ctx.saved_tensors
        if grad.device.type == "cpu" and grad.dtype == x.dtype == torch.float32:
            parts = [torch.ops.aten.native_layer_norm_backward(
                grad[k], x[k], ctx.shape, mean[k], rstd[k], gamma[k],
                beta[k] if beta is not None else None, [True, True, ctx.has_beta])
                for k in range(x.shape[0])]
            dx = torch.stack([p[0] for p in parts])
            dgamma = torch.stack([p[1] for p in parts])
            dbeta = torch.stack([p[2] for p in parts]) if ctx.has_beta else None
        else:
            g = grad * gamma.unsqueeze(1)
            dx = rstd * (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True))
            dgamma = (grad * y).sum(1)
            dbeta = grad.sum(1) if ctx.has_beta else None
        return dx, dgamma, dbeta, None, None


class HeadStack:
    """The trainable heads of K members (see the module docstring).

    ``template`` supplies the module structure (and, for checkpoints and validation, a
    whole TwoTower into which one member's parameters are copied: ``load_member``).
    """

    def __init__(self, template: TwoTower) -> None:
        self.template = template
        self.device = template.logit_scale.device
        decay_ids = {id(p) for g in param_groups(template, 1.0) if g["weight_decay"] > 0
                     for p in g["params"]}
        trainable = [(n, p) for n, p in head_parameters(template) if p.requires_grad]
        # head parameters that do not train (logit_scale when loss.learn_temperature is off)
        self.fixed: list[str] = [n for n, p in head_parameters(template) if not p.requires_grad]
        # layout of a row: the weight-decayed parameters first (one multiply decays them
        # all), then the others; ``named`` keeps named_parameters order (clipping's norms)
        ordered = ([(n, p) for n, p in trainable if id(p) in decay_ids]
                   + [(n, p) for n, p in trainable if id(p) not in decay_ids])
        self.segments: list[Segment] = []
        offset = 0
        for name, p in ordered:
            self.segments.append(Segment(name, tuple(p.shape), offset, p.numel(),
                                         id(p) in decay_ids))
            offset += p.numel()
        self.width = offset
        self.decay_width = sum(seg.numel for seg in self.segments if seg.decay)
        self.by_name = {seg.name: seg for seg in self.segments}
        self.named = [self.by_name[n] for n, _ in trainable]
        for name, _ in template.named_buffers():
            if not name.startswith("image_encoder."):
                raise NotStackable(f"head buffer {name}: stacked heads hold parameters only")
        self.const: dict[str, Tensor] = {n: torch.zeros(0, device=self.device)
                                         for n in self.fixed}
        self.dropout_p: dict[str, list[float]] = {n: [] for n, m in template.named_modules()
                                                   if isinstance(m, nn.Dropout)}
        self._bind(torch.zeros(0, self.width, device=self.device))

    def _bind(self, flat: Tensor) -> None:
        """Make ``flat`` (K x P, no grad) the parameters: one leaf per segment, a view of
        ``flat`` whose ``.grad`` is a view of the gradient buffer ``grad`` (K x P).
        Autograd adds each segment's gradient into its own slice in place; a leaf
        ``flat`` sliced into views would get every segment's gradient padded to K x P
        with zeros and summed, K x P x segments of memory traffic per step."""
        self.flat = flat.contiguous()
        self.grad = torch.zeros_like(self.flat)
        self.leaves: dict[str, Tensor] = {}
        k = self.flat.shape[0]
        for seg in self.segments:
            leaf = self.flat[:, seg.offset:seg.stop].view(k, *seg.shape).requires_grad_(True)
            leaf.grad = self.grad[:, seg.offset:seg.stop].view(k, *seg.shape)
            self.leaves[seg.name] = leaf

    def zero_grad(self) -> None:
        """Zero the gradient buffer (before each backward)."""
        self.grad.zero_()
        for seg in self.segments:  # autograd accumulates into these views in place
            leaf = self.leaves[seg.name]
            if leaf.grad is None or leaf.grad.data_ptr() != \
                    self.grad[:, seg.offset:seg.stop].data_ptr():
                raise RuntimeError(f"{seg.name}: gradient left the stack's buffer")

    # ------------------------------------------------------------------ membership
    @property
    def k(self) -> int:
        return int(self.flat.shape[0])

    def row_of(self, model: TwoTower) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
        """A member's flat row, its fixed head parameters and its dropout rates."""
        params = dict(head_parameters(model))
        missing = set(self.by_name) ^ {n for n, p in params.items() if p.requires_grad}
        if missing:
            raise NotStackable(f"member parameters differ from the stack's: {sorted(missing)}")
        parts = []
        for seg in self.segments:
            p = params[seg.name]
            if tuple(p.shape) != seg.shape:
                raise NotStackable(f"{seg.name}: shape {tuple(p.shape)} != stack {seg.shape}")
            parts.append(p.detach().reshape(-1))
        row = torch.cat(parts) if parts else torch.zeros(0, device=self.device)
        fixed = {n: params[n].detach().clone() for n in self.fixed}
        rates = {n: float(m.p) for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
        return row, fixed, rates

    def append(self, rows: list[tuple[Tensor, dict[str, Tensor], dict[str, float]]]) -> None:
        """Add members (rows from ``row_of``) at the end of the stack."""
        if not rows:
            return
        new = torch.stack([r[0].to(self.device) for r in rows])
        self._bind(torch.cat([self.flat, new]))
        for name in self.fixed:
            fixed = torch.stack([r[1][name].to(self.device) for r in rows])
            self.const[name] = torch.cat([self.const[name].reshape(-1, *fixed.shape[1:]),
                                          fixed])
        for name in self.dropout_p:
            self.dropout_p[name] += [r[2][name] for r in rows]

    def select(self, keep: list[int]) -> None:
        """Keep members ``keep`` (in that order), dropping the others."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._bind(self.flat.index_select(0, index))
        for name in self.fixed:
            self.const[name] = self.const[name].index_select(0, index)
        for name in self.dropout_p:
            self.dropout_p[name] = [self.dropout_p[name][i] for i in keep]

    def views(self) -> dict[str, Tensor]:
        """Every head parameter as a K x shape tensor (the trainable ones: the leaves)."""
        out = dict(self.leaves)
        out.update(self.const)
        return out

    @torch.no_grad()
    def load_member(self, k: int, model: TwoTower | None = None) -> TwoTower:
        """Copy member ``k``'s head parameters into ``model`` (default the template)."""
        model = model if model is not None else self.template
        params = dict(head_parameters(model))
        for seg in self.segments:
            params[seg.name].copy_(self.flat[k, seg.offset:seg.stop].view(seg.shape))
        for name in self.fixed:
            params[name].copy_(self.const[name][k])
        return model

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """``TwoTower.clamp_logit_scale_`` for every member (after each optimiser step)."""
        seg = self.by_name.get("logit_scale")
        if seg is not None:
            self.flat[:, seg.offset:seg.stop].clamp_(0.0, MAX_LOGIT_SCALE)
        elif "logit_scale" in self.const:
            self.const["logit_scale"].clamp_(0.0, MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ forward
    def forward(self, *, gene: Tensor, features: Tensor, neg_adv: Tensor,
                generators: list[torch.Generator] | None) -> dict[str, Any]:
        """TwoTower.forward for all members: ``gene`` K x B x G, ``features`` K x B x F;
        ``neg_adv`` K (``-adv_weight``); ``generators`` one per member (training: dropout
        on) or None (evaluation: dropout off). Outputs as TwoTower's, with a leading K."""
        run = _Runner(self.views(), self.dropout_p, generators)
        img = F.normalize(run.module(self.template.image_proj, "image_proj", features), dim=-1)
        g = run.module(self.template.gene_encoder, "gene_encoder", gene)
        gene_emb = F.normalize(run.module(self.template.gene_proj, "gene_proj", g), dim=-1)
        img, gene_emb = _ContiguousGrad.apply(img), _ContiguousGrad.apply(gene_emb)
        embs = {"image": img, "gene": gene_emb}
        donor_logits = {}
        for tower, head in self.template.adversaries.items():
            rev = _StackedGradReverse.apply(embs[tower], neg_adv)
            donor_logits[tower] = run.module(head.net, f"adversaries.{tower}.net", rev)
        scale = run.params["logit_scale"]
        scale = scale.clamp(scale.new_tensor(0.0), scale.new_tensor(MAX_LOGIT_SCALE))
        return {"img_emb": img, "gene_emb": gene_emb, "logit_scale": scale,
                "logit_bias": run.params.get("logit_bias"), "donor_logits": donor_logits}


class _Runner:
    """Applies template modules to K-stacked activations with the stacked parameters."""

    def __init__(self, params: dict[str, Tensor], dropout_p: dict[str, list[float]],
                 generators: list[torch.Generator] | None) -> None:
        self.params, self.dropout_p, self.generators = params, dropout_p, generators

    def module(self, m: nn.Module, name: str, x: Tensor) -> Tensor:
        kind = type(m)
        if kind is nn.Sequential:
            for i, child in enumerate(m):
                x = self.module(child, f"{name}.{i}", x)
            return x
        if kind is nn.Linear:
            w = self.params[f"{name}.weight"]
            if m.bias is None:
                return torch.bmm(x, w.transpose(1, 2))
            return torch.baddbmm(self.params[f"{name}.bias"].unsqueeze(1), x, w.transpose(1, 2))
        if kind is nn.LayerNorm:
            if len(m.normalized_shape) != 1:
                raise NotStackable(f"{name}: LayerNorm over {len(m.normalized_shape)} dims")
            if not m.elementwise_affine:
                return F.layer_norm(x, m.normalized_shape, eps=m.eps)
            return _StackedLayerNorm.apply(x, self.params[f"{name}.weight"],
                                           self.params.get(f"{name}.bias"),
                                           list(m.normalized_shape), m.eps)
        if kind is nn.GELU:
            return F.gelu(x, approximate=m.approximate)
        if kind is nn.Identity:
            return x
        if kind is nn.Dropout:
            return self.dropout(name, x)
        if kind is MLPEncoder:
            return self.module(m.net, f"{name}.net", x)
        if kind is LatentMLPEncoder:
            h = self.module(m.stem, f"{name}.stem", self.module(m.norm_in, f"{name}.norm_in", x))
            for i, block in enumerate(m.blocks):
                h = h + self.module(block, f"{name}.blocks.{i}", h)
            return h
        raise NotStackable(f"{name}: {kind.__name__} has no stacked implementation")

    def dropout(self, name: str, x: Tensor) -> Tensor:
        if self.generators is None:
            return x
        rates = self.dropout_p[name]
        if not any(p > 0 for p in rates):
            return x
        masks = torch.empty_like(x)
        for k, (p, gen) in enumerate(zip(rates, self.generators, strict=True)):
            if p == 0:  # torch.dropout returns its input without drawing
                masks[k].fill_(1.0)
            elif p == 1:
                masks[k].zero_()
            else:  # ATen's _dropout_impl on the CPU: empty_like(x).bernoulli_(1-p).div_(1-p)
                masks[k].bernoulli_(1 - p, generator=gen).div_(1 - p)
        return x * masks


# ---------------------------------------------------------------------------- losses
# Each loss gives (a K-vector to back-propagate, the K values the unbatched loss reports).
# Gradients come from batched ops (row-wise: the same numbers as the unbatched backward);
# the reported values are reduced per member with the unbatched reduction (``nll_loss``'s
# mean adds its rows in a cascade that a batched ``mean`` does not reproduce), without grad.
@dataclass
class StackedLoss:
    """Per-member losses: ``total`` carries the graph; the rest are the reported values."""

    total: Tensor
    loss: Tensor
    contrastive: Tensor
    adv: Tensor


def _cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``F.cross_entropy`` (mean) of each member's K x n x C logits against K x n targets."""
    logp = F.log_softmax(logits, dim=-1)
    picked = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        values = torch.stack([F.nll_loss(logp[k], targets[k]) for k in range(len(logits))])
    return picked.mean(dim=1), values


def clip_loss(img: Tensor, gene: Tensor, scale: Tensor,
              bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``ClipLoss`` of one worker for each member (``scale`` already exp()'d)."""
    k, n, _ = img.shape
    s = scale.view(k, 1, 1)
    logits_img = torch.bmm(s * img, gene.transpose(1, 2))
    logits_gene = torch.bmm(s * gene, img.transpose(1, 2))
    if bias is not None:
        logits_img = logits_img + bias.view(k, 1, 1)
        logits_gene = logits_gene + bias.view(k, 1, 1)
    labels = torch.arange(n, device=img.device).expand(k, n)
    ce_img, v_img = _cross_entropy(logits_img, labels)
    ce_gene, v_gene = _cross_entropy(logits_gene, labels)
    return 0.5 * (ce_img + ce_gene), 0.5 * (v_img + v_gene)


def siglip_loss(img: Tensor, gene: Tensor, scale: Tensor,
                bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``SigLipLoss`` of one worker for each member (``scale`` already exp()'d)."""
    if bias is None:
        raise ValueError("SigLIP needs logit_bias (build the model with loss.name: siglip)")
    k, n, _ = img.shape
    logits = torch.bmm(scale.view(k, 1, 1) * img, gene.transpose(1, 2)) + bias.view(k, 1, 1)
    targets = -torch.ones_like(logits)
    idx = torch.arange(n, device=img.device)
    targets[:, idx, idx] = 1.0
    terms = -F.logsigmoid(targets * logits)
    with torch.no_grad():
        values = torch.stack([terms[j].sum() for j in range(k)]) / n
    return terms.view(k, n * n).sum(dim=1) / n, values


CONTRASTIVE = {"clip": clip_loss, "siglip": siglip_loss}


def donor_loss(donor_logits: dict[str, Tensor], donors: Tensor) -> tuple[Tensor, Tensor]:
    """Per-member sum over towers of the donor cross-entropy (0 without an adversary)."""
    total: Any = 0
    values: Any = 0
    for logits in donor_logits.values():
        ce, v = _cross_entropy(logits, donors)
        total, values = total + ce, values + v
    if isinstance(total, int):
        zeros = torch.zeros(donors.shape[0], device=donors.device)
        return zeros, zeros
    return total, values


def stacked_loss(loss_name: str, out: dict[str, Any], donors: Tensor) -> StackedLoss:
    """The loop's ``contrastive + donor_loss`` for every member."""
    if loss_name not in CONTRASTIVE:
        raise NotStackable(f"loss {loss_name!r} has no stacked implementation")
    # the losses take the log-space scale and apply exp() (``_GatheredLoss.forward``)
    contrastive, c_val = CONTRASTIVE[loss_name](out["img_emb"], out["gene_emb"],
                                                out["logit_scale"].exp(), out["logit_bias"])
    adv, a_val = donor_loss(out["donor_logits"], donors)
    return StackedLoss(total=contrastive + adv, loss=c_val + a_val, contrastive=c_val,
                       adv=a_val)
