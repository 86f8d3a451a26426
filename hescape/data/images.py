"""Safe image decoding and patch cutting (PIL for PNG/JPEG, tifffile for TIFF/SVS)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hescape.data.errors import DataError

PATCH_MAX_PIXELS = 4096 * 4096
SLIDE_MAX_PIXELS = 2**31
_TIFF = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf"}


def _to_rgb(arr: np.ndarray, *, where: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise DataError(f"{where}: image has shape {arr.shape}; expected H x W x 3 (RGB)")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255:
            arr = (arr / (arr.max() / 255.0)).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _open_pil(im: Image.Image, *, where: str, max_pixels: int) -> np.ndarray:
    w, h = im.size
    if w * h > max_pixels:
        raise DataError(
            f"{where}: image claims {w} x {h} = {w * h:,} pixels, above the limit "
            f"{max_pixels:,} (possible decompression bomb); if it is genuine, raise max_pixels")
    return _to_rgb(np.asarray(im.convert("RGB")), where=where)


def decode_image(data: bytes, *, where: str, max_pixels: int = PATCH_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (PNG/JPEG/TIFF) to uint8 H x W x 3; DataError names ``where``."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise DataError(f"{where}: image bytes are empty or not bytes ({type(data).__name__}); "
                        "re-export the patch")
    return _decode_pil(io.BytesIO(bytes(data)), where=where, max_pixels=max_pixels,
                       bomb_hint="raise max_pixels only if the image is genuine",
                       bad="image bytes cannot be decoded ({exc}); the file is truncated or "
                       "not an image: re-export this patch or drop the row")


def read_image(path: str | Path, *, max_pixels: int = SLIDE_MAX_PIXELS) -> np.ndarray:
    """Read a slide image (TIFF/SVS level 0 via tifffile; PNG/JPEG via PIL) as uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found; pass the full-resolution H&E image path")
    where = str(path)
    if path.suffix.lower() in _TIFF:
        return _read_tiff(path, max_pixels=max_pixels)
    return _decode_pil(path, where=where, max_pixels=max_pixels,
                       bomb_hint="pass a larger max_pixels only if the image is genuine",
                       bad="cannot decode image ({exc}); the file is truncated or not an image: "
                       "re-export it")


def _decode_pil(source, *, where: str, max_pixels: int, bomb_hint: str, bad: str) -> np.ndarray:
    """Open ``source`` with PIL; bombs and undecodable data become a DataError naming ``where``.

    ``bad`` is the message for undecodable data, with ``{exc}`` for the decoder's reason.
    """
    try:
        with Image.open(source) as im:
            return _open_pil(im, where=where, max_pixels=max_pixels)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{where}: decompression bomb refused ({exc}); {bomb_hint}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: " + bad.format(exc=exc)) from None


def _read_tiff(path: Path, *, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = series.levels[0].shape
            h, w = (shape[0], shape[1]) if shape[-1] in (3, 4) else shape[-2:]
            if h * w > max_pixels:
                raise DataError(f"{path}: level 0 is {w} x {h} pixels, above max_pixels "
                                f"{max_pixels:,}; raise max_pixels if it is genuine")
            arr = series.levels[0].asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"{path}: cannot read TIFF/SVS ({type(exc).__name__}: {exc}); the file "
                        "is truncated or uses an unsupported codec (install imagecodecs)") from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    return _to_rgb(arr, where=str(path))


def cut_patches(image: np.ndarray, centers_xy: np.ndarray, side_px: float, out_px: int, *,
                fill: int = 255) -> np.ndarray:
    """Cut square windows of ``side_px`` around (x, y) centres, resized to ``out_px``.

    Windows reaching past the border are padded with ``fill`` (white background).
    """
    n = len(centers_xy)
    out = np.empty((n, out_px, out_px, 3), dtype=np.uint8)
    half = side_px / 2.0
    pad = int(np.ceil(side_px)) + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    for i, (x, y) in enumerate(np.asarray(centers_xy, dtype=np.float64)):
        size = max(1, int(round(side_px)))
        x0 = min(max(int(round(x - half)) + pad, 0), padded.shape[1] - size)
        y0 = min(max(int(round(y - half)) + pad, 0), padded.shape[0] - size)
        win = padded[y0:y0 + size, x0:x0 + size]
        if win.shape[0] != out_px or win.shape[1] != out_px:
            win = np.asarray(Image.fromarray(win).resize((out_px, out_px), Image.BILINEAR))
        out[i] = win
    return out
