"""CLIP / SigLIP: sanity, and 2-process gloo == 1 process on the concatenated batch."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from hescape.config import LossConfig
from hescape.losses import LOSSES, ClipLoss, SigLipLoss, create_loss, gather_with_grad

WORLD, LOCAL, IN_DIM, EMB = 2, 6, 10, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    return {
        "w_img": torch.nn.Parameter(torch.randn(IN_DIM, EMB, generator=g)),
        "w_gene": torch.nn.Parameter(torch.randn(IN_DIM, EMB, generator=g)),
        "logit_scale": torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))),
        "logit_bias": torch.nn.Parameter(torch.tensor(-10.0)),
    }


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(WORLD * LOCAL, IN_DIM, generator=g)
    return x_img, x_img + 0.5 * torch.randn(WORLD * LOCAL, IN_DIM, generator=g)


def _loss_and_grads(name: str, rank: int, world: int, x_img, x_gene):
    params = _model()
    img = F.normalize(x_img @ params["w_img"], dim=-1)
    gene = F.normalize(x_gene @ params["w_gene"], dim=-1)
    loss = create_loss(LossConfig(name=name), rank=rank, world_size=world)(
        img, gene, params["logit_scale"], params["logit_bias"] if _bias(name) else None
    )
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def _bias(name: str) -> bool:
    return LOSSES.get(name).learns_bias


def _worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        x_img, x_gene = _data()
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for name in LOSSES.names():
            loss, grads = _loss_and_grads(name, rank, WORLD, x_img[part], x_gene[part])
            for g in grads.values():  # what DDP does: average parameter gradients over workers
                dist.all_reduce(g)
                g /= WORLD
            dist.all_reduce(loss)
            queue.put((name, (loss / WORLD).item(), {k: v.numpy() for k, v in grads.items()}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_match_one_process() -> None:
    """Loss and DDP-averaged gradients of 2 workers == 1 process on the concatenated batch."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _worker, args=(_free_port(), queue), nprocs=WORLD, join=True, start_method="spawn"
    )
    results = [queue.get() for _ in range(len(LOSSES) * WORLD)]
    assert sorted(r[0] for r in results) == sorted(LOSSES.names() * WORLD)
    x_img, x_gene = _data()
    for name, loss, grads in results:
        ref_loss, ref_grads = _loss_and_grads(name, 0, 1, x_img, x_gene)
        assert set(ref_grads) == set(grads) and ("logit_bias" in grads) == _bias(name)
        assert loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
        for key, ref in ref_grads.items():
            torch.testing.assert_close(torch.from_numpy(grads[key]), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_perfect_alignment_beats_random(loss_cls) -> None:
    emb = torch.eye(32)  # perfectly aligned pairs, orthogonal negatives
    other = F.normalize(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    scale, bias = torch.tensor(math.log(100.0)), torch.tensor(-10.0)
    aligned = loss_cls()(emb, emb, scale, bias)
    shuffled = loss_cls()(emb, other, scale, bias)
    assert aligned < 0.1 < shuffled


def test_clip_matches_closed_form() -> None:
    img = F.normalize(torch.randn(5, 4), dim=-1)
    gene = F.normalize(torch.randn(5, 4), dim=-1)
    logits = 10.0 * img @ gene.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ClipLoss()(img, gene, torch.tensor(math.log(10.0))), expected)


def test_siglip_requires_bias_and_gather_is_identity_for_one_worker() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x, 1) is x
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(x, x, torch.tensor(0.0), None)
    with pytest.raises(ValueError, match="rank"):
        create_loss(LossConfig(), rank=2, world_size=2)


def test_loss_names_come_from_the_registry() -> None:
    """``loss.name`` is validated against LOSSES (no Literal to keep in step), and
    ``create_loss`` builds the class the spec names."""
    from hescape.config import ConfigError, StudyConfig, validate_config

    assert isinstance(create_loss(LossConfig(name="siglip")), SigLipLoss)
    with pytest.raises(ConfigError, match="loss.name: .*unknown loss 'clp'. Did you mean 'clip'"):
        validate_config({"loss": {"name": "clp"}})
    with pytest.raises(ValueError, match="unknown loss"):  # every validation, not only at load
        StudyConfig.model_validate({"loss": {"name": "clp"}})
