"""AdamW and gradient-norm clipping for K stacked members, each with its own settings.

``StackedAdamW`` updates ``HeadStack.flat`` (K x P) with torch's single-tensor AdamW
arithmetic (``torch.optim.adam._single_tensor_adam`` with ``decoupled_weight_decay``: the
path ``torch.optim.AdamW`` takes for CPU tensors), member k with its own learning rate and
weight decay, over the whole stack in a handful of elementwise ops. The per-member scalars
(``1 - lr * wd``, ``-lr / bias_correction1``) are computed in double precision and rounded
to float32 once, as torch does with a python scalar, so each member's update equals the
unbatched optimiser's bit for bit on the CPU (tested). Betas (0.9, 0.98) and eps 1e-6 are
the loop's (``loop.build_model_and_optimizer``).

``clip_grad_norm`` is ``torch.nn.utils.clip_grad_norm_`` per member: a norm per parameter,
the norm of those norms, ``min(max_norm / (total + 1e-6), 1)``; a member without clipping
(``train.grad_clip: null``) is left alone.

State crosses to and from the loop's checkpoint format through a real ``torch.optim.AdamW``
over the template model (``member_state_dict`` / ``load_member_state``), so a stacked
member's ``optim.pt`` is what the unbatched loop writes and either can resume the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hescape.models.two_tower import TwoTower, param_groups
from hescape.train.stack_model import HeadStack, head_parameters

BETAS = (0.9, 0.98)
EPS = 1e-6
BLOCK_ELEMENTS = 1 << 18  # floats per buffer block of the CPU update (1 MiB)


def make_adamw(model: TwoTower, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """The loop's optimiser over ``model`` (``loop.build_model_and_optimizer``)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=BETAS, eps=EPS)


def _scalar_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype: the dtype of AdamW's "step" state
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class StackedAdamW:
    """AdamW moments for every member of a ``HeadStack`` (rows aligned with its ``flat``).

    All members in the stack have taken the same number of steps (``steps``): members join
    a running stack only at the step they resume from.
    """

    def __init__(self, stack: HeadStack) -> None:
        self.stack = stack
        dev = stack.device
        self.exp_avg = torch.zeros(0, stack.width, device=dev)
        self.exp_avg_sq = torch.zeros(0, stack.width, device=dev)
        self.steps = 0
        self._clip: Tensor | None = None  # K x 1 clipping coefficients for the next step

    # ------------------------------------------------------------- membership
    def append(self, moments: list[tuple[Tensor, Tensor]]) -> None:
        """Add members' (exp_avg, exp_avg_sq) rows (zeros for a fresh member)."""
        if not moments:
            return
        dev = self.stack.device
        self.exp_avg = torch.cat([self.exp_avg, torch.stack([m[0].to(dev) for m in moments])])
        self.exp_avg_sq = torch.cat([self.exp_avg_sq,
                                     torch.stack([m[1].to(dev) for m in moments])])

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.stack.device)
        self.exp_avg = self.exp_avg.index_select(0, index)
        self.exp_avg_sq = self.exp_avg_sq.index_select(0, index)

    def fresh(self) -> tuple[Tensor, Tensor]:
        """The moments of a member that has not trained yet."""
        zeros = torch.zeros(self.stack.width, device=self.stack.device)
        return zeros, zeros.clone()

    # ------------------------------------------------------------- the update
    @torch.no_grad()
    def clip_grad_norm(self, max_norms: list[float | None]) -> Tensor:
        """Each member's clipping coefficient for its ``max_norm`` (None: no clipping),
        applied to the gradient by the next ``step``; returns the per-member total norms."""
        grad = self.stack.grad
        norms = torch.stack([torch.linalg.vector_norm(grad[:, s.offset:s.stop], 2.0, dim=1)
                             for s in self.stack.named], dim=1)
        total = torch.linalg.vector_norm(norms, 2.0, dim=1)
        self._clip = None
        if all(m is None for m in max_norms):
            return total
        max_norm = torch.tensor([1.0 if m is None else float(m) for m in max_norms],
                                device=grad.device)
        # clip_grad_norm_: max_norm / (total + 1e-6) is reciprocal(total + 1e-6) * max_norm
        coef = torch.clamp((total + 1e-6).reciprocal() * max_norm, max=1.0)
        unclipped = torch.tensor([m is None for m in max_norms], device=grad.device)
        self._clip = torch.where(unclipped, coef.new_ones(()), coef).unsqueeze(1)
        return total

    @torch.no_grad()
    def step(self, lrs: list[float], weight_decays: list[float]) -> None:
        """One AdamW step of every member with its learning rate and weight decay (and the
        gradient clipping ``clip_grad_norm`` decided).

        Column block by column block (~1 MiB of each buffer per block): the dozen
        elementwise passes of AdamW then run on data in the CPU's cache instead of
        streaming K x P floats through memory a dozen times. Elementwise, so the values are
        those of the whole-buffer ops (and of the unbatched optimiser's)."""
        flat, grad = self.stack.flat, self.stack.grad
        k, width = flat.shape
        dev = flat.device
        self.steps += 1
        beta1, beta2 = BETAS
        factor = None
        if any(lr * wd != 0 for lr, wd in zip(lrs, weight_decays, strict=True)):
            factor = torch.tensor([1 - lr * wd for lr, wd in zip(lrs, weight_decays,
                                                                  strict=True)],
                                  dtype=torch.float32, device=dev).unsqueeze(1)
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2 = 1 - beta2 ** self.steps
        bias_correction2_sqrt = bias_correction2 ** 0.5
        neg_step = torch.tensor([-(lr / bias_correction1) for lr in lrs], dtype=torch.float32,
                                device=dev).unsqueeze(1)
        clip, decay_width = self._clip, self.stack.decay_width
        cols = width if dev.type != "cpu" else max(4096, BLOCK_ELEMENTS // max(k, 1))
        denom_buf = torch.empty(k, min(cols, width), device=dev)
        update_buf = torch.empty_like(denom_buf)
        for a in range(0, width, cols):
            b = min(width, a + cols)
            p, g = flat[:, a:b], grad[:, a:b]
            m, v = self.exp_avg[:, a:b], self.exp_avg_sq[:, a:b]
            if clip is not None:
                g.mul_(clip)  # clip_grad_norm_'s scaling
            if factor is not None and a < decay_width:
                p[:, :min(b, decay_width) - a].mul_(factor)  # param.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            denom = torch.sqrt(v, out=denom_buf[:, :b - a])
            denom.div_(bias_correction2_sqrt).add_(EPS)
            # param.addcdiv_(exp_avg, denom, value=-step_size): (value * exp_avg) / denom
            update = torch.mul(m, neg_step, out=update_buf[:, :b - a])
            p.add_(update.div_(denom))
        self._clip = None

    # ------------------------------------------------------------- checkpoint format
    def member_state_dict(self, k: int, optimizer: torch.optim.AdamW, *, lr: float,
                          weight_decay: float) -> dict:
        """Member ``k``'s state as the loop's ``optimizer.state_dict()`` (``optimizer``:
        ``make_adamw`` over the stack's template, reused)."""
        params = dict(head_parameters(self.stack.template))
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] = lr
            if _is_decay_group(group, self.stack):
                group["weight_decay"] = weight_decay
        step = torch.tensor(float(self.steps), dtype=_scalar_dtype())
        for seg in self.stack.segments:
            optimizer.state[params[seg.name]] = {
                "step": step.clone(),
                "exp_avg": self.exp_avg[k, seg.offset:seg.stop].view(seg.shape).clone(),
                "exp_avg_sq": self.exp_avg_sq[k, seg.offset:seg.stop].view(seg.shape).clone()}
        state = optimizer.state_dict()
        optimizer.state.clear()
        return state

    def moments_from(self, state_dict: dict, optimizer: torch.optim.AdamW) -> tuple[Tensor,
                                                                                     Tensor,
                                                                                     int]:
        """(exp_avg row, exp_avg_sq row, steps) of a saved ``optimizer.state_dict()``."""
        optimizer.state.clear()
        optimizer.load_state_dict(state_dict)
        params = dict(head_parameters(self.stack.template))
        avg, sq, steps = [], [], set()
        for seg in self.stack.segments:
            st = optimizer.state.get(params[seg.name])
            if not st:  # a parameter never stepped (resumed before its first step)
                avg.append(torch.zeros(seg.numel, device=self.stack.device))
                sq.append(torch.zeros(seg.numel, device=self.stack.device))
                steps.add(0)
                continue
            avg.append(st["exp_avg"].reshape(-1).to(self.stack.device))
            sq.append(st["exp_avg_sq"].reshape(-1).to(self.stack.device))
            steps.add(int(float(st["step"])))
        optimizer.state.clear()
        if len(steps) > 1:
            raise ValueError(f"optimiser state with different step counts per parameter "
                             f"({sorted(steps)}): cannot resume it in a stack")
        return torch.cat(avg), torch.cat(sq), steps.pop() if steps else 0


def _is_decay_group(group: dict, stack: HeadStack) -> bool:
    params = dict(head_parameters(stack.template))
    decay_ids = {id(params[s.name]) for s in stack.segments if s.decay}
    return any(id(p) in decay_ids for p in group["params"])
