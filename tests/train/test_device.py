"""hescape.train.device: the one rule for device, bf16 autocast and channels_last."""

from __future__ import annotations

import pytest
import torch

from hescape.config import TrainConfig
from hescape.train.device import Compute, autocast_dtype, resolve_device, use_channels_last

BF16 = torch.bfloat16


@pytest.mark.parametrize(("precision", "device", "expected"), [
    ("auto", "cpu", None), ("auto", "cuda", BF16), ("auto", "cuda:1", BF16),
    ("bf16", "cpu", BF16), ("bf16", "cuda", BF16),
    ("fp32", "cpu", None), ("fp32", "cuda", None),
])
def test_autocast_rule_table(precision, device, expected):
    assert autocast_dtype(precision, device) is expected
    assert autocast_dtype(precision, torch.device(device)) is expected


def test_unknown_precision_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"train.precision='fp16'"):
        autocast_dtype("fp16", "cpu")


@pytest.mark.parametrize(("enabled", "device", "expected"), [
    (True, "cuda", True), (True, "cpu", False), (False, "cuda", False), (False, "cpu", False),
])
def test_channels_last_rule_table(enabled, device, expected):
    assert use_channels_last(enabled, device) is expected


@pytest.mark.parametrize(("use_gpu", "available", "gpu", "expected"), [
    (False, False, None, "cpu"), (False, True, None, "cpu"), (True, False, None, "cpu"),
    (True, True, None, "cuda"), (True, True, "cuda:1", "cuda:1"), (True, False, "cuda:1", "cpu"),
])
def test_device_rule_table(monkeypatch, use_gpu, available, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device(use_gpu, gpu=gpu) == torch.device(expected)


def test_compute_of_training_config():
    auto = Compute.of(TrainConfig(), "cuda")
    assert (auto.autocast, auto.channels_last, auto.precision) == (BF16, True, "bfloat16")
    cpu = Compute.of(TrainConfig(), "cpu")
    assert (cpu.autocast, cpu.channels_last, cpu.precision) == (None, False, "float32")
    fp32 = Compute.of(TrainConfig(precision="fp32", channels_last=False), "cuda")
    assert (fp32.autocast, fp32.channels_last) == (None, False)
    assert Compute.of(TrainConfig(precision="bf16"), "cpu").autocast is BF16


def test_as_trained_takes_the_training_devices_autocast_wherever_it_runs():
    """The feature cache computed by a driver without a GPU for a GPU study autocasts as
    the GPU training does (and so gets the same key as the one a GPU task computes)."""
    gpu_study = Compute.as_trained(TrainConfig(use_gpu=True), "cpu")
    assert gpu_study.device == torch.device("cpu") and gpu_study.autocast is BF16
    assert Compute.as_trained(TrainConfig(use_gpu=False), "cpu").autocast is None
    assert Compute.as_trained(TrainConfig(use_gpu=True, precision="fp32"), "cuda").autocast is None


def test_autocast_context_really_autocasts():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with Compute(torch.device("cpu"), BF16).autocast_context():
        assert (a @ b).dtype == BF16
    with Compute(torch.device("cpu")).autocast_context():
        assert (a @ b).dtype == torch.float32


def test_place_and_image_use_the_memory_format():
    nhwc = Compute(torch.device("cpu"), channels_last=True)
    conv = nhwc.place(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.image(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    x = Compute(torch.device("cpu")).image(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
