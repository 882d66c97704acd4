"""toffee: Python bindings of the toffee inference engine.

The work is done by the Rust library through ``toffee._toffee`` (the same functions as the
``toffee`` CLI and the C ABI); this package only converts between numpy arrays / PIL images and
the raw pixel tuples the extension takes, and shapes its results.

Images come back as numpy ``uint8`` arrays of shape (H, W, 3), holding the pixels the CLI writes
to its PNG files for the same arguments. The GIL is released while models load and run.
"""

from ._embed import Embedder, embed
from ._engine import Engine
from ._pairs import pairs
from ._score import Scorer, score
from ._toffee import ToffeeError
from ._view import ViewGenerator, view

__all__ = [
    "Embedder",
    "Engine",
    "Scorer",
    "ToffeeError",
    "ViewGenerator",
    "embed",
    "pairs",
    "score",
    "view",
]
