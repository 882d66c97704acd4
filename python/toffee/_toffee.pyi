# Stubs of the Rust extension toffee._toffee (python/src). Use the wrappers in toffee instead:
# they convert arrays and PIL images to the pixel tuples taken here.
from typing import Any, Callable, List, Optional, Tuple, Union

# (data, height, width, channels): row-major uint8 pixels.
RawImage = Tuple[bytes, int, int, int]
ImageArg = Union[str, RawImage]
Record = Tuple[ImageArg, ImageArg, str, Optional[ImageArg], Optional[ImageArg]]

class ToffeeError(Exception): ...

class Engine:
    def __init__(
        self,
        model: Optional[str] = None,
        device: str = "cpu",
        controlnet: Optional[str] = None,
        lora: List[str] = ...,
        adapter: List[str] = ...,
        adapter_encoder: List[str] = ...,
    ) -> None: ...
    @property
    def default_size(self) -> int: ...
    def generate(
        self,
        mode: str,
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
        strength: Optional[float] = None,
        image: Optional[RawImage] = None,
        mask: Optional[RawImage] = None,
        control_image: Optional[RawImage] = None,
        control_scale: float = 1.0,
        canny: bool = False,
        adapter_image: List[ImageArg] = ...,
        adapter_scale: List[float] = ...,
    ) -> Tuple[bytes, int, int, int]: ...

class Scorer:
    def __init__(self, dino: str, clip: str, device: str = "cpu") -> None: ...
    def score(self, records: List[Record], batch: int = 16) -> List[Tuple[float, float, float]]: ...

class Embedder:
    def __init__(self, model: str, device: str = "cpu") -> None: ...
    # (name, shape, little-endian float32 bytes) per output tensor.
    def embed(self, images: List[ImageArg]) -> List[Tuple[str, List[int], bytes]]: ...

class ViewGenerator:
    def __init__(self, model: str, device: str = "cpu") -> None: ...
    @property
    def size(self) -> int: ...
    # subject: (image path, mask path or None) or (image pixels, mask pixels or None).
    # Returns (bytes of [N, S, S, 3] uint8, N, S).
    def view(
        self,
        subject: Union[Tuple[str, Optional[str]], Tuple[RawImage, Optional[RawImage]]],
        *,
        elevation: List[float],
        azimuth: List[float],
        radius: List[float] = ...,
        steps: int = 50,
        guidance: float = 3.0,
        scheduler: Optional[str] = None,
        seed: int = 0,
        batch: int = 4,
    ) -> Tuple[bytes, int, int]: ...

# Returns the summary as JSON.
def pairs(
    out: str,
    *,
    config: Optional[str] = None,
    config_json: Optional[str] = None,
    subjects: Optional[str] = None,
    templates: Optional[str] = None,
    devices: List[str] = ...,
    batch: Optional[int] = None,
    keep_rejected: bool = False,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    show_progress: bool = False,
) -> str: ...
