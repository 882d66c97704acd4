"""Conversions between the caller's images (numpy uint8 arrays, PIL images, paths) and the raw
pixel tuples ``(bytes, height, width, channels)`` that ``toffee._toffee`` takes, reproducing what
the CLI's file loaders do with a file holding the same pixels."""

from __future__ import annotations

import os
from typing import Any, Tuple, Union

import numpy as np

from ._toffee import ToffeeError

Raw = Tuple[bytes, int, int, int]


def _pil_module():
    """PIL.Image when Pillow is installed (it is optional), else None."""
    try:
        from PIL import Image  # type: ignore
    except ImportError:
        return None
    return Image


def _is_pil(obj: Any) -> bool:
    image = _pil_module()
    return image is not None and isinstance(obj, image.Image)


def _pil_to_array(img: Any, keep_alpha: bool) -> np.ndarray:
    """A PIL image as the CLI's loader sees the same file: EXIF orientation applied, RGB, or
    RGBA when it has transparency and ``keep_alpha``."""
    from PIL import ImageOps  # type: ignore

    img = ImageOps.exif_transpose(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    mode = "RGBA" if keep_alpha and has_alpha else "RGB"
    return np.asarray(img.convert(mode))


def _raw(arr: np.ndarray, what: str) -> Raw:
    """The extension's pixel tuple (bytes, height, width, channels) of a uint8 array."""
    if arr.dtype != np.uint8:
        raise ToffeeError(f"{what} has dtype {arr.dtype}: expected uint8 pixels (0-255)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ToffeeError(f"{what} has shape {arr.shape}: expected (H, W, C)")
    h, w, c = arr.shape
    return (np.ascontiguousarray(arr).tobytes(), h, w, c)


def _image(img: Any, what: str, keep_alpha: bool = True) -> Raw:
    """An RGB(A) image: a PIL image or a uint8 array (H, W, 3) or (H, W, 4)."""
    if _is_pil(img):
        return _raw(_pil_to_array(img, keep_alpha), what)
    return _raw(np.asarray(img), what)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")`` (ITU-R 601, 8-bit integer rounding), the CLI's rule for colour masks."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


def _mask(mask: Any, what: str) -> Raw:
    """A mask (white = 1): a PIL image, or a uint8 array (H, W), (H, W, 1) or colour (H, W, 3|4)
    whose luminance is taken as the CLI takes a colour mask file's (alpha ignored)."""
    if _is_pil(mask):
        from PIL import ImageOps  # type: ignore

        m = ImageOps.exif_transpose(mask)
        arr = np.asarray(m if m.mode == "L" else m.convert("L"))
        return _raw(arr, what)
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        arr = _luminance(arr[..., :3])
    return _raw(arr, what)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Pillow's integer ``alpha_composite`` of RGBA over opaque white, alpha dropped: what the CLI's
    scorer does to an image file with transparency (``image_proc::load_rgb8_on_white``)."""
    precision = 7
    a = rgba[..., 3:4].astype(np.int64)
    src = rgba[..., :3].astype(np.int64)
    blend = 255 * (255 - a)
    outa255 = a * 255 + blend
    coef1 = a * 255 * 255 * (1 << precision) // outa255
    coef2 = 255 * (1 << precision) - coef1
    t = src * coef1 + 255 * coef2 + (0x80 << precision)
    out = ((((t >> 8) + t) >> 8) >> precision).astype(np.uint8)
    return np.where(a == 0, np.uint8(255), out)


def _encoder_image(img: Any, what: str) -> Union[str, Raw]:
    """An image for an encoder (scores, embeddings, adapter subjects): a path (read by the CLI's
    loader), or pixels as the CLI would read them from a file holding them (transparency
    composited on white)."""
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    arr = _pil_to_array(img, keep_alpha=True) if _is_pil(img) else np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
        arr = _composite_on_white(arr)
    return _raw(arr, what)


def _score_mask(mask: Any, what: str) -> Union[None, str, Raw]:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        return os.fspath(mask)
    return _mask(mask, what)


def _path_or_none(p: Any) -> Any:
    return None if p is None else os.fspath(p)


def _listed(v: Any) -> list:
    """One item or a list/tuple of them, as a list (None: empty)."""
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]
