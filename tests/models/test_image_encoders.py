"""Image encoders: presets, tiny timm models, weights (safe loading, effnet-lite0), modes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hescape.config import ImageEncoderConfig
from hescape.models import (
    IMAGE_PRESETS,
    UnsafeCheckpointError,
    check_image_encoder_name,
    create_image_encoder,
)
from hescape.models.image import _build_backbone

TINY = ["tiny_cnn", "resnet10t", "vit_tiny_patch16_224"]
MPL_PHOTO = "matplotlib/mpl-data/sample_data/grace_hopper.jpg"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("mode", ["frozen", "finetune", "last_n"])
def test_tiny_encoders_build_and_run(name: str, mode: str) -> None:
    enc = create_image_encoder(ImageEncoderConfig(name=name, mode=mode, image_size=32))
    x = enc.preprocess_images(np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), np.uint8))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    enc.train()
    out = enc(x)
    assert out.shape == (2, enc.out_dim)
    trainable = [p.requires_grad for p in enc.parameters()]
    if mode == "frozen":
        assert not any(trainable) and not enc.backbone.training and not out.requires_grad
    elif mode == "finetune":
        assert all(trainable)
    else:
        assert 0 < sum(trainable) < len(trainable)


@pytest.mark.parametrize("name", IMAGE_PRESETS.names())
def test_every_preset_has_metadata_and_builds(name: str) -> None:
    preset = IMAGE_PRESETS.get(name)
    assert preset.input_size >= 16 and len(preset.mean) == 3 and len(preset.std) == 3
    assert preset.weights_hint
    assert check_image_encoder_name(name) is None
    with torch.device("meta"):  # architecture only, no memory, no weights
        model = _build_backbone(preset, preset.input_size)
    assert model.num_features > 0


def test_h_optimus_normalisation_constants() -> None:
    p = IMAGE_PRESETS.get("h_optimus_0")
    assert p.arch == "vit_giant_patch14_reg4_dinov2" and p.input_size == 224
    assert p.mean == (0.707223, 0.578729, 0.703617) and p.std == (0.211883, 0.230117, 0.177517)
    assert IMAGE_PRESETS.get("uni").hf_hub_id == "MahmoodLab/UNI"


def test_unknown_name_suggests_close_match() -> None:
    msg = check_image_encoder_name("unii")
    assert msg and "'uni'" in msg and "Did you mean" in msg
    assert check_image_encoder_name("resnet10t") is None


def test_pretrained_preset_without_weights_names_file_and_place(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        create_image_encoder(ImageEncoderConfig(name="uni", pretrained=True))
    msg = str(err.value)
    assert "'uni'" in msg and "model.image.weights:" in msg and "MahmoodLab/UNI" in msg


def test_missing_weights_file_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.image.weights"):
        create_image_encoder(ImageEncoderConfig(name="tiny_cnn", weights=str(tmp_path / "no.pt")))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_refused_and_not_run(tmp_path) -> None:
    marker = tmp_path / "ran.txt"
    bad = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(str(marker))}, bad)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        create_image_encoder(ImageEncoderConfig(name="tiny_cnn", weights=str(bad)))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_roundtrip_and_feature_key(tmp_path, suffix: str) -> None:
    from safetensors.torch import save_file

    src = create_image_encoder(ImageEncoderConfig(name="resnet10t", image_size=32))
    state = src.backbone.state_dict()
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    enc = create_image_encoder(
        ImageEncoderConfig(name="resnet10t", image_size=32, weights=str(path))
    )
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), src.eval()(x))
    again = create_image_encoder(
        ImageEncoderConfig(name="resnet10t", image_size=32, weights=str(path))
    )
    assert enc.feature_key() == again.feature_key()
    other = create_image_encoder(
        ImageEncoderConfig(name="resnet10t", image_size=48, weights=str(path))
    )
    assert other.feature_key() != enc.feature_key()


def test_weights_that_do_not_fit_are_rejected(tmp_path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="do not fit"):
        create_image_encoder(ImageEncoderConfig(name="tiny_cnn", weights=str(path)))


def _site_file(rel: str):
    import pathlib

    import matplotlib

    return pathlib.Path(matplotlib.__file__).parents[1] / rel


def test_effnet_lite0_real_weights_map_exactly_and_classify() -> None:
    """Every key maps (strict load), outputs equal the package's own model, and a real photo
    (matplotlib's Grace Hopper sample) is classified as 'military uniform'."""
    from efficientnet_lite_pytorch import EfficientNet

    from hescape.models.presets import effnet_lite0_weights, map_effnet_lite_keys
    from hescape.models.weights import read_state_dict

    raw = read_state_dict(effnet_lite0_weights())
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours.load_state_dict(map_effnet_lite_keys(raw), strict=True)
    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(raw, strict=True)
    enc = create_image_encoder(ImageEncoderConfig(name="efficientnet_lite0", pretrained=True))
    photo = np.asarray(Image.open(_site_file(MPL_PHOTO)).convert("RGB"))[None]
    x = enc.preprocess_images(photo)
    with torch.no_grad():
        logits, ref_logits = ours(x), ref(x)
        feats = enc(x)
        ref_feats = ref.extract_features(x).mean(dim=(2, 3))
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats, ref_feats, atol=1e-4, rtol=1e-4)
    assert enc.out_dim == 1280 and enc.mode == "frozen"
    assert timm.data.ImageNetInfo().index_to_description(int(logits.argmax())) == "military uniform"


def test_preprocess_scales_normalises_and_resizes() -> None:
    enc = create_image_encoder(ImageEncoderConfig(name="efficientnet_lite0", image_size=64))
    white = np.full((1, 100, 100, 3), 255, np.uint8)
    x = enc.preprocess_images(white)
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess_images(np.zeros((1, 8, 8, 3), np.float32))


def test_last_n_trains_only_last_blocks_and_final_norm() -> None:
    enc = create_image_encoder(
        ImageEncoderConfig(name="vit_tiny_patch16_224", mode="last_n", last_n=2, image_size=32)
    )
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert {
        n.split(".")[0] + "." + n.split(".")[1] for n in trainable if n.startswith("blocks")
    } == {"blocks.10", "blocks.11"}
    assert "norm.weight" in trainable and "patch_embed.proj.weight" not in trainable
    with pytest.raises(ValueError, match="last_n=99"):
        create_image_encoder(ImageEncoderConfig(name="tiny_cnn", mode="last_n", last_n=99))
