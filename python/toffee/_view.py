"""``toffee.view``: Zero123 novel views of a subject, as ``toffee view`` renders them."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _toffee
from ._images import _composite_on_white, _is_pil, _mask, _pil_to_array, _raw

_Path = Union[str, "os.PathLike[str]"]
_Angles = Union[float, Sequence[float]]


def _angles(v: _Angles) -> List[float]:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)]


def _is_path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike))


def _pixels(img: Any) -> np.ndarray:
    if _is_path(img):
        from PIL import Image  # type: ignore

        img = Image.open(img)
    return _pil_to_array(img, keep_alpha=True) if _is_pil(img) else np.asarray(img)


def _subject(image: Any, mask: Any):
    """The extension's subject: both paths (read by the CLI's own preparation), or pixels as
    the CLI prepares a file holding them: RGBA is composited on white by its alpha, unless a
    mask is given (then the mask alone marks the subject and the alpha is ignored)."""
    if _is_path(image) and (mask is None or _is_path(mask)):
        return (os.fspath(image), None if mask is None else os.fspath(mask))
    arr = _pixels(image)
    if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
        arr = arr[..., :3] if mask is not None else _composite_on_white(arr)
    raw_mask = None
    if mask is not None:
        raw_mask = _mask(_pixels(mask) if _is_path(mask) else mask, "mask")
    return (_raw(arr, "image"), raw_mask)


class ViewGenerator:
    """A Zero1to3-layout View Generator folder (unet, vae, image_encoder, cc_projection,
    scheduler) loaded once, as ``toffee view --model MODEL`` loads it."""

    def __init__(self, model: _Path, device: str = "cpu") -> None:
        self._gen = _toffee.ViewGenerator(os.fspath(model), device)

    @property
    def size(self) -> int:
        """The side of the (square) views."""
        return self._gen.size

    def view(
        self,
        image: Any,
        *,
        elevation: _Angles,
        azimuth: _Angles,
        radius: _Angles = 0.0,
        mask: Any = None,
        steps: int = 50,
        guidance: float = 3.0,
        scheduler: Optional[str] = None,
        seed: int = 0,
        batch: int = 4,
    ) -> List[np.ndarray]:
        """See :func:`toffee.view`."""
        data, n, size = self._gen.view(
            _subject(image, mask), elevation=_angles(elevation), azimuth=_angles(azimuth),
            radius=_angles(radius), steps=steps, guidance=guidance, scheduler=scheduler,
            seed=seed, batch=batch,
        )
        views = np.frombuffer(data, dtype=np.uint8).reshape(n, size, size, 3)
        return [views[i] for i in range(n)]


_generators: Dict[Tuple[str, str], ViewGenerator] = {}


def view(
    image: Any,
    *,
    model: _Path,
    elevation: _Angles,
    azimuth: _Angles,
    radius: _Angles = 0.0,
    mask: Any = None,
    steps: int = 50,
    guidance: float = 3.0,
    scheduler: Optional[str] = None,
    seed: int = 0,
    batch: int = 4,
    device: str = "cpu",
) -> List[np.ndarray]:
    """Novel views of the subject ``image`` (``toffee view``): one uint8 array (S, S, 3) per pose,
    the pixels the CLI writes. The angle arguments take one value (for every view) or one per
    view (degrees; radius is the camera distance change); view i uses seed + i. ``image``: a
    path, uint8 array or PIL image whose alpha (or ``mask``, white = subject) composites it on
    white. The model is loaded once per (model, device) and kept."""
    key = (os.fspath(model), device)
    if key not in _generators:
        _generators[key] = ViewGenerator(*key)
    return _generators[key].view(
        image, elevation=elevation, azimuth=azimuth, radius=radius, mask=mask, steps=steps,
        guidance=guidance, scheduler=scheduler, seed=seed, batch=batch,
    )
