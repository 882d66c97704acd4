import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike[str]]
# A uint8 array (H, W, 3) or (H, W, 4), or a PIL.Image.Image.
_Image = Union[npt.NDArray[np.uint8], Any]
# A uint8 array (H, W), (H, W, 1) or colour (luminance taken), or a PIL.Image.Image.
_Mask = Union[npt.NDArray[np.uint8], Any]
_ScoreImage = Union[_Path, _Image]
Scores = Dict[str, float]
# One value for every view, or one per view.
_Angles = Union[float, Sequence[float]]
# One adapter subject image (an engine with one adapter) or one per adapter.
_AdapterImages = Union[_ScoreImage, Sequence[_ScoreImage]]

class ToffeeError(Exception): ...

class Engine:
    def __init__(
        self,
        model: Optional[_Path] = None,
        device: str = "cpu",
        controlnet: Optional[_Path] = None,
        lora: Sequence[Union[_Path, Tuple[_Path, float]]] = (),
        adapter: Union[None, _Path, Sequence[_Path]] = None,
        adapter_encoder: Union[None, _Path, Sequence[_Path]] = None,
    ) -> None: ...
    @property
    def default_size(self) -> int: ...
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
        control_image: Optional[_Image] = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: Optional[_AdapterImages] = None,
        adapter_scale: Union[None, float, Sequence[float]] = None,
    ) -> List[npt.NDArray[np.uint8]]: ...
    def img2img(
        self,
        prompt: str,
        image: _Image,
        *,
        strength: Optional[float] = None,
        mask: Optional[_Mask] = None,
        seed: int = 0,
        steps: int = 20,
        width: Optional[int] = None,
        height: Optional[int] = None,
        guidance: float = 7.5,
        negative_prompt: Optional[str] = None,
        num_images: int = 1,
        batch: int = 1,
        scheduler: Optional[str] = None,
        control_image: Optional[_Image] = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: Optional[_AdapterImages] = None,
        adapter_scale: Union[None, float, Sequence[float]] = None,
    ) -> List[npt.NDArray[np.uint8]]: ...
    def inpaint(
        self,
        prompt: str,
        image: _Image,
        mask: Optional[_Mask] = None,
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
        control_image: Optional[_Image] = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: Optional[_AdapterImages] = None,
        adapter_scale: Union[None, float, Sequence[float]] = None,
    ) -> List[npt.NDArray[np.uint8]]: ...

class Scorer:
    def __init__(self, dino: _Path, clip: _Path, device: str = "cpu") -> None: ...
    @overload
    def score(
        self,
        subject: _ScoreImage,
        target: _ScoreImage,
        prompt: str,
        subject_mask: Optional[Union[_Path, _Mask]] = None,
        target_mask: Optional[Union[_Path, _Mask]] = None,
        batch: int = 16,
    ) -> Scores: ...
    @overload
    def score(
        self,
        subject: List[_ScoreImage],
        target: List[_ScoreImage],
        prompt: Union[str, List[str]],
        subject_mask: Optional[List[Union[_Path, _Mask]]] = None,
        target_mask: Optional[List[Union[_Path, _Mask]]] = None,
        batch: int = 16,
    ) -> List[Scores]: ...

@overload
def score(
    subject: _ScoreImage,
    target: _ScoreImage,
    prompt: str,
    *,
    dino: _Path,
    clip: _Path,
    subject_mask: Optional[Union[_Path, _Mask]] = None,
    target_mask: Optional[Union[_Path, _Mask]] = None,
    device: str = "cpu",
    batch: int = 16,
) -> Scores: ...
@overload
def score(
    subject: List[_ScoreImage],
    target: List[_ScoreImage],
    prompt: Union[str, List[str]],
    *,
    dino: _Path,
    clip: _Path,
    subject_mask: Optional[List[Union[_Path, _Mask]]] = None,
    target_mask: Optional[List[Union[_Path, _Mask]]] = None,
    device: str = "cpu",
    batch: int = 16,
) -> List[Scores]: ...

class Embedder:
    def __init__(self, model: _Path, device: str = "cpu") -> None: ...
    def embed(
        self, images: Union[_ScoreImage, Sequence[_ScoreImage]]
    ) -> Dict[str, npt.NDArray[np.float32]]: ...

def embed(
    images: Union[_ScoreImage, Sequence[_ScoreImage]], *, model: _Path, device: str = "cpu"
) -> Dict[str, npt.NDArray[np.float32]]: ...

class ViewGenerator:
    def __init__(self, model: _Path, device: str = "cpu") -> None: ...
    @property
    def size(self) -> int: ...
    def view(
        self,
        image: _ScoreImage,
        *,
        elevation: _Angles,
        azimuth: _Angles,
        radius: _Angles = 0.0,
        mask: Optional[Union[_Path, _Mask]] = None,
        steps: int = 50,
        guidance: float = 3.0,
        scheduler: Optional[str] = None,
        seed: int = 0,
        batch: int = 4,
    ) -> List[npt.NDArray[np.uint8]]: ...

def view(
    image: _ScoreImage,
    *,
    model: _Path,
    elevation: _Angles,
    azimuth: _Angles,
    radius: _Angles = 0.0,
    mask: Optional[Union[_Path, _Mask]] = None,
    steps: int = 50,
    guidance: float = 3.0,
    scheduler: Optional[str] = None,
    seed: int = 0,
    batch: int = 4,
    device: str = "cpu",
) -> List[npt.NDArray[np.uint8]]: ...

def pairs(
    out: _Path,
    config: Union[None, _Path, Mapping[str, Any]] = None,
    *,
    subjects: Optional[_Path] = None,
    templates: Optional[_Path] = None,
    devices: Union[str, Sequence[str]] = "cpu",
    batch: Optional[int] = None,
    keep_rejected: bool = False,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
    progress: Union[None, bool, Callable[[int, int], Any]] = None,
) -> Dict[str, Any]: ...
