"""``toffee.Engine``: generation (txt2img, img2img, inpaint) with the CLI's models and rules."""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from . import _toffee
from ._images import Raw, _encoder_image, _image, _listed, _mask, _path_or_none

_Path = Union[str, "os.PathLike[str]"]


def _lora_arg(item: Any) -> str:
    """``FILE``, ``FILE:WEIGHT`` or ``(FILE, WEIGHT)`` as the CLI's ``--lora`` string."""
    if isinstance(item, tuple):
        path, weight = item
        return f"{os.fspath(path)}:{float(weight)!r}"
    return os.fspath(item)


def _images(result: Raw) -> List[np.ndarray]:
    data, n, h, w = result
    batch = np.frombuffer(data, dtype=np.uint8).reshape(n, h, w, 3)
    return [batch[i] for i in range(n)]


class Engine:
    """A generation model loaded once.

    ``model``: a diffusers pipeline folder; None loads the CLI's built-in demo model (tiny, random
    weights). ``device``: "cpu", or "cuda" / "cuda:N" in a CUDA build. ``controlnet``: a ControlNet
    folder. ``lora``: LoRA files, each ``FILE``, ``"FILE:WEIGHT"`` or ``(FILE, WEIGHT)``.

    Each call returns a list of ``num_images`` uint8 arrays (H, W, 3).
    """

    def __init__(
        self,
        model: Optional[_Path] = None,
        device: str = "cpu",
        controlnet: Optional[_Path] = None,
        lora: Sequence[Any] = (),
        adapter: Any = None,
        adapter_encoder: Any = None,
    ) -> None:
        self._engine = _toffee.Engine(
            model=_path_or_none(model),
            device=device,
            controlnet=_path_or_none(controlnet),
            lora=[_lora_arg(item) for item in lora],
            adapter=[os.fspath(a) for a in _listed(adapter)],
            adapter_encoder=[os.fspath(e) for e in _listed(adapter_encoder)],
        )

    @property
    def default_size(self) -> int:
        """The side used when neither width nor height is given (and no input image sets it)."""
        return self._engine.default_size

    def _run(self, mode: str, prompt: str, image=None, mask=None, control_image=None,
             adapter_image=None, adapter_scale=None, **kw):
        images = _listed(adapter_image)
        return _images(
            self._engine.generate(
                mode,
                prompt,
                adapter_image=[_encoder_image(a, f"adapter_image[{i}]") for i, a in enumerate(images)],
                adapter_scale=[float(v) for v in _listed(adapter_scale)],
                image=None if image is None else _image(image, "image"),
                mask=None if mask is None else _mask(mask, "mask"),
                control_image=None
                if control_image is None
                else _image(control_image, "control_image", keep_alpha=False),
                **kw,
            )
        )

    def txt2img(
        self,
        prompt: str,
        *,
        seed: int = 0,
        steps: int = 20,
        width: Optional[int] = None,
        height: Optional[int] = None,
        guidance: float = 7.5,
        negative_prompt: Optional[str] = None,
        num_images: int = 1,
        batch: int = 1,
        scheduler: Optional[str] = None,
        control_image: Any = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: Any = None,
        adapter_scale: Any = None,
    ) -> List[np.ndarray]:
        """Text to image (``toffee txt2img``); image i uses seed + i."""
        return self._run(
            "txt2img", prompt, control_image=control_image, seed=seed, steps=steps,
            width=width, height=height, guidance=guidance, negative_prompt=negative_prompt,
            num_images=num_images, batch=batch, scheduler=scheduler,
            control_scale=control_scale, canny=canny, adapter_image=adapter_image,
            adapter_scale=adapter_scale,
        )

    def img2img(
        self,
        prompt: str,
        image: Any,
        *,
        strength: Optional[float] = None,
        mask: Any = None,
        seed: int = 0,
        steps: int = 20,
        width: Optional[int] = None,
        height: Optional[int] = None,
        guidance: float = 7.5,
        negative_prompt: Optional[str] = None,
        num_images: int = 1,
        batch: int = 1,
        scheduler: Optional[str] = None,
        control_image: Any = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: Any = None,
        adapter_scale: Any = None,
    ) -> List[np.ndarray]:
        """Image to image (``toffee img2img``): strength 0.8 by default; with a mask, only inside it."""
        return self._run(
            "img2img", prompt, image=image, mask=mask, control_image=control_image,
            strength=strength, seed=seed, steps=steps, width=width, height=height,
            guidance=guidance, negative_prompt=negative_prompt, num_images=num_images,
            batch=batch, scheduler=scheduler, control_scale=control_scale, canny=canny,
            adapter_image=adapter_image, adapter_scale=adapter_scale,
        )

    def inpaint(
        self,
        prompt: str,
        image: Any,
        mask: Any = None,
        *,
        strength: Optional[float] = None,
        seed: int = 0,
        steps: int = 20,
        width: Optional[int] = None,
        height: Optional[int] = None,
        guidance: float = 7.5,
        negative_prompt: Optional[str] = None,
        num_images: int = 1,
        batch: int = 1,
        scheduler: Optional[str] = None,
        control_image: Any = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: Any = None,
        adapter_scale: Any = None,
    ) -> List[np.ndarray]:
        """Inpainting (``toffee inpaint``): white in ``mask`` is repainted; without a mask, an RGBA
        image's alpha marks what to keep."""
        return self._run(
            "inpaint", prompt, image=image, mask=mask, control_image=control_image,
            strength=strength, seed=seed, steps=steps, width=width, height=height,
            guidance=guidance, negative_prompt=negative_prompt, num_images=num_images,
            batch=batch, scheduler=scheduler, control_scale=control_scale, canny=canny,
            adapter_image=adapter_image, adapter_scale=adapter_scale,
        )
