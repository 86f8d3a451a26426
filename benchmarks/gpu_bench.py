"""GPU readiness: ViT-B/16 image tower + MLP gene tower, batch 256, the project's data path.

    python benchmarks/gpu_bench.py                 # on a GPU (see benchmarks/gpu.sh)
    python benchmarks/gpu_bench.py --compile       # with torch.compile
    python benchmarks/gpu_bench.py --smoke         # CPU, seconds (ViT-Ti): proves the script works

Model: ``hescape.models.build_model`` with timm ``vit_base_patch16_224`` (pretrained=False,
fine-tuned) and the MLP gene tower; CLIP loss from ``hescape.losses``; AdamW. Data: a
memmapped uint8 patch store at 224 px read by the training path's ``PairedDataset`` +
``Collate`` (uint8 batches on CUDA, resized/normalised on the GPU by the loop's
``to_device``; on CPU the loader workers do it), pinned memory, persistent loader workers. bf16 autocast and channels_last on CUDA. Reported: samples/s (no syncs inside the
timed steps), a per-step split data / forward / backward / optimiser / gather (a second
pass that synchronises after each part), model FLOP utilisation (FLOPs of one training
step counted with ``torch.utils.flop_counter.FlopCounterMode``; peak = ``--peak-tflops``,
default 989 = H200 bf16 dense) and peak GPU memory. The gather is an ``all_gather`` of the
embeddings over a 1-rank process group (NCCL on CUDA, gloo on CPU): on one GPU it measures
the collective's fixed cost, not a multi-GPU exchange. Output: a markdown block to paste
into docs/benchmarks.md, and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ViT-B/16 two-tower training throughput on one GPU")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (seconds)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm image tower")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-patches", type=int, default=8192, help="rows in the patch store")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=60, help="timed steps (throughput pass)")
    p.add_argument("--split-steps", type=int, default=20, help="steps of the synchronised pass")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--loader-workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.batch, args.image_size, args.n_patches, args.genes = (
            "vit_tiny_patch16_224", 4, 32, 64, 50)
        args.steps, args.split_steps, args.warmup, args.loader_workers = 3, 2, 1, 1
    return args


def make_store(folder: Path, n: int, size: int, genes: int) -> tuple[np.ndarray, np.ndarray]:
    """A memmapped uint8 patch store (N x S x S x 3) and float32 expression (N x G)."""
    rng = np.random.default_rng(0)
    patches = np.lib.format.open_memmap(folder / "patches.npy", mode="w+", dtype=np.uint8,
                                        shape=(n, size, size, 3))
    for start in range(0, n, 512):
        stop = min(start + 512, n)
        patches[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), np.uint8)
    patches.flush()
    gene_x = np.log1p(rng.poisson(1.0, (n, genes))).astype(np.float32)
    return np.load(folder / "patches.npy", mmap_mode="r"), gene_x


def build(args: argparse.Namespace, device: Any) -> tuple[Any, Any, Any]:
    """(model, loss, optimiser) from the project's builders."""
    import torch

    from hescape.config import GeneEncoderConfig, ImageEncoderConfig, LossConfig, ModelConfig
    from hescape.losses import create_loss
    from hescape.models import build_model, param_groups

    mcfg = ModelConfig(image=ImageEncoderConfig(name=args.arch, pretrained=False,
                                                mode="finetune", image_size=args.image_size),
                       gene=GeneEncoderConfig(name="mlp", hidden_dim=1024, n_layers=2),
                       embed_dim=512)
    lcfg = LossConfig(name="clip")
    model = build_model(mcfg, lcfg, gene_in_dim=args.genes, n_donors=2).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    return model, create_loss(lcfg), opt


def loader(args: argparse.Namespace, patches: np.ndarray, gene_x: np.ndarray, encoder: Any,
           cuda: bool) -> Any:
    """The training data path: PairedDataset + Collate, pinned, persistent workers."""
    from torch.utils.data import DataLoader

    from hescape.train.dataset import Collate, PairedDataset

    ds = PairedDataset(np.arange(len(patches)), gene_x=gene_x,
                       donors=np.zeros(len(patches), np.int64), patches=patches)
    w = args.loader_workers
    return DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                      collate_fn=Collate(encoder, defer_normalize=cuda), num_workers=w, pin_memory=cuda,
                      persistent_workers=w > 0, prefetch_factor=4 if w > 0 else None)


def endless(dl: Any):
    while True:
        yield from dl


class Stepper:
    """One training step, optionally synchronising after each part to time it."""

    def __init__(self, model, loss_fn, opt, device, world_pg: bool) -> None:
        import torch

        self.model, self.loss_fn, self.opt, self.device = model, loss_fn, opt, device
        self.cuda = device.type == "cuda"
        self.world_pg = world_pg
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cuda)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __call__(self, it, split: dict[str, float] | None = None) -> None:
        import torch

        from hescape.train.loop import to_device

        t0 = time.perf_counter()
        batch = to_device(next(it), self.device, self.cuda, self.model.image_encoder)
        x, g = batch["image"], batch["gene"]
        marks = [t0]

        def mark() -> None:
            if split is not None:
                self.sync()
                marks.append(time.perf_counter())

        mark()
        with self.autocast:
            out = self.model(gene=g, image=x)
            loss = self.loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"],
                                out["logit_bias"])
        mark()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        self.opt.step()
        mark()
        if split is not None and self.world_pg:
            import torch.distributed as dist

            emb = out["img_emb"].detach().contiguous()
            parts = [torch.empty_like(emb)]
            dist.all_gather(parts, emb)
            dist.all_gather(parts, out["gene_emb"].detach().contiguous())
            mark()
        if split is not None:
            names = ["data", "forward", "backward", "optim", "gather"]
            for name, a, b in zip(names, marks, marks[1:], strict=False):
                split[name] = split.get(name, 0.0) + (b - a)


def count_flops(step: Stepper, it) -> float:
    """FLOPs of one full training step (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(it)
    return float(fc.get_total_flops())


def init_pg(cuda: bool) -> bool:
    """A 1-rank process group for timing the gather collective (False if unavailable)."""
    import torch.distributed as dist

    try:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        return True
    except Exception as exc:  # noqa: BLE001 - the rest of the benchmark still runs
        print(f"[gpu_bench] no process group ({exc}); gather not timed", file=sys.stderr)
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory(prefix="hescape-gpu-bench-") as tmp:
        patches, gene_x = make_store(Path(tmp), args.n_patches, args.image_size, args.genes)
        model, loss_fn, opt = build(args, device)
        net = torch.compile(model) if args.compile else model
        step = Stepper(net, loss_fn, opt, device, world_pg=init_pg(cuda))
        it = endless(loader(args, patches, gene_x, model.image_encoder, cuda))
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(it)
        step.sync()
        warmup_s = time.perf_counter() - t0
        flops = count_flops(Stepper(model, loss_fn, opt, device, False), it)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(it)
        step.sync()
        wall = time.perf_counter() - t0
        split: dict[str, float] = {}
        for _ in range(args.split_steps):
            step(it, split)
    steps_per_s = args.steps / wall
    achieved = flops * steps_per_s
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
        "torch": torch.__version__, "compile": args.compile, "batch": args.batch,
        "arch": args.arch, "bf16_channels_last": cuda,
        "image_size": args.image_size, "loader_workers": args.loader_workers,
        "samples_per_s": steps_per_s * args.batch, "step_ms": 1000 / steps_per_s,
        "split_ms": {k: 1000 * v / args.split_steps for k, v in split.items()},
        "flops_per_step": flops, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12) if cuda else None,
        "peak_tflops": args.peak_tflops, "warmup_s": warmup_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(r: dict[str, Any]) -> str:
    """A block to paste into docs/benchmarks.md."""
    split = " / ".join(f"{k} {v:.1f}" for k, v in r["split_ms"].items())
    mfu = "n/a (CPU)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
    return "\n".join([
        f"| {r['date']} | {r['device']} | {r['arch']} @ {r['image_size']} + MLP, batch "
        f"{r['batch']}{', bf16, channels_last' if r['bf16_channels_last'] else ', fp32'}"
        f"{', compile' if r['compile'] else ''} | "
        f"{r['samples_per_s']:,.0f} | {r['step_ms']:.1f} | {split} | "
        f"{r['achieved_tflops']:.1f} | {mfu} | {mem} | {r['loader_workers']} |",
    ])


HEADER = ("| date | device | config | samples/s | step ms | split ms (data / forward / backward"
          " / optim / gather) | TFLOP/s | MFU | peak mem | loader workers |\n"
          "|---|---|---|---:|---:|---|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    result = run(args)
    print(HEADER)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except ImportError:  # pragma: no cover
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
