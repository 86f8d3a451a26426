"""5. Data loading vs encoder: can the patch store + transforms feed the image tower?

Loader side: the training loader exactly as ``train_loop_per_worker`` builds it
(``make_train_loader``: memmapped ``patches.npy`` -> ``PairedDataset`` -> ``Collate`` with the
encoder's resize + normalisation), ``train.loader_workers`` = 0 (in the training process)
and 2 (background processes, what a GPU run uses). Encoder side: forward throughput of
the same image encoder (EfficientNet-Lite0 at 64 px, eval, no grad) on ready inputs. The
ratio loader / encoder must stay > 1 (data loading is not the bottleneck).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, command, main_for
from benchmarks.studycfg import bench_config, quiet_eval, small_data

KEY = "data_loading"


def config(workdir: Path, smoke: bool, loader_workers: int) -> Any:
    """Fine-tuned EfficientNet-Lite0 at 64 px (so the loader reads patches, not features)."""
    return bench_config(workdir, {
        **small_data(smoke), **quiet_eval(), "model.image.name": "efficientnet_lite0",
        "model.image.pretrained": True, "model.image.mode": "finetune",
        "model.image.image_size": 32 if smoke else 64, "train.batch_size": 64,
        "train.loader_workers": loader_workers})


def loader_rate(cfg: Any, paths: dict[str, Any], encoder: Any, batches: int) -> float:
    """Samples/s of the training loader (first batch, incl. worker start-up, excluded)."""
    import torch

    from hescape.train.inputs import load_train_inputs, make_train_loader

    data = load_train_inputs(paths, cfg)
    loader, sampler = make_train_loader(cfg, data, encoder=encoder, rank=0, world_size=1,
                                        device=torch.device("cpu"))
    n, t0, epoch = 0, None, 0
    while n < batches:
        sampler.set_position(epoch)
        for _batch in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += 1
            if n >= batches:
                break
        epoch += 1
    return batches * cfg.train.batch_size / (time.perf_counter() - t0)


def encoder_rate(encoder: Any, batch: int, batches: int) -> float:
    """Forward samples/s of ``encoder`` (eval, no grad) at its input size."""
    import torch

    x = torch.randn(batch, 3, encoder.input_size, encoder.input_size)
    encoder.eval()
    with torch.no_grad():
        encoder(x)
        t0 = time.perf_counter()
        for _ in range(batches):
            encoder(x)
    return batches * batch / (time.perf_counter() - t0)


def run(smoke: bool, workdir: Path) -> list[Row]:
    """Loader samples/s (0 and 2 loader workers) vs encoder forward samples/s."""
    from hescape.models import create_image_encoder
    from hescape.train.inputs import prepare_inputs

    batches = 3 if smoke else 20
    cfg0 = config(workdir, smoke, 0)
    paths = {**prepare_inputs(cfg0, progress=False), "cfg": cfg0.model_dump(mode="json")}
    encoder = create_image_encoder(cfg0.model.image)
    enc = encoder_rate(encoder, cfg0.train.batch_size, max(2, batches // 4))
    rate0 = loader_rate(cfg0, paths, encoder, batches)
    rate2 = loader_rate(config(workdir, smoke, 2), paths, encoder, batches)
    best = max(rate0, rate2)
    return [Row(
        key=KEY, title="Data loading vs encoder forward", unit="samples/s",
        baseline="encoder forward", baseline_value=enc, ours="patch store + transforms",
        ours_value=best, ratio=best / enc, target="> 1 (loader not the bottleneck)",
        command=command(KEY, smoke),
        notes=(f"loader {rate0:.0f}/s in-process, {rate2:.0f}/s with 2 loader workers; "
               f"{encoder.name} at {encoder.input_size} px from {cfg0.data.simulate.patch_size} px "
               "patches (memmapped), batch 64, CPU"),
        details={"loader_workers_0": rate0, "loader_workers_2": rate2, "encoder": enc,
                 "batches": batches},
    )]


if __name__ == "__main__":
    main_for(run)
