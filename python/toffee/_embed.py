"""``toffee.embed``: an image encoder's inputs and outputs, as ``toffee embed`` writes them."""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple, Union

import numpy as np

from . import _toffee
from ._images import _encoder_image, _listed

_Path = Union[str, "os.PathLike[str]"]


class Embedder:
    """An image encoder loaded once, as ``toffee embed --model MODEL`` loads it: an image-encoder
    folder (with its preprocessor_config.json), a CLIPModel folder or a pipeline with an
    image_encoder."""

    def __init__(self, model: _Path, device: str = "cpu") -> None:
        self._embedder = _toffee.Embedder(os.fspath(model), device)

    def embed(self, images: Any) -> Dict[str, np.ndarray]:
        """See :func:`toffee.embed`."""
        raw = [_encoder_image(img, f"images[{i}]") for i, img in enumerate(_listed(images))]
        return {
            name: np.frombuffer(data, dtype="<f4").reshape(shape)
            for name, shape, data in self._embedder.embed(raw)
        }


_embedders: Dict[Tuple[str, str], Embedder] = {}


def embed(images: Any, *, model: _Path, device: str = "cpu") -> Dict[str, np.ndarray]:
    """``toffee embed``'s tensors for ``images`` (a path, uint8 array (H, W, 3|4) or PIL image, or
    a list of them; one row each, in order): ``pixel_values`` (N, 3, H, W) and the encoder's
    outputs (e.g. ``last_hidden_state``, ``pooler_output``, ``image_embeds``), float32 arrays
    keyed by the names the CLI's safetensors file uses. The model is loaded once per
    (model, device) and kept."""
    key = (os.fspath(model), device)
    if key not in _embedders:
        _embedders[key] = Embedder(*key)
    return _embedders[key].embed(images)
