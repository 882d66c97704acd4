"""toffee.embed against `toffee embed`: the same tensors (bit for bit) for paths, arrays and PIL
images; bad input raises toffee.ToffeeError."""

import numpy as np
import pytest
from PIL import Image

import toffee
from conftest import FIXTURES, read_safetensors

SUBJECT = FIXTURES / "zero123" / "subject.png"  # RGBA: composited on white by both
IMAGES = [FIXTURES / "vision" / "images" / n for n in ("img0_37x53.png", "img1_64x40.png")]


@pytest.mark.parametrize("model", ["dinov2", "clip-vision-proj"])
def test_embed_equals_the_cli(cli, tmp_path, model):
    model = FIXTURES / "vision" / model
    out = tmp_path / "emb.safetensors"
    files = [SUBJECT, *IMAGES]
    cli("embed", "--model", model, "--images", *files, "--out", out)
    want = read_safetensors(out)
    by_path = toffee.embed(files, model=model)
    by_pixels = toffee.embed([Image.open(SUBJECT), np.asarray(Image.open(IMAGES[0])),
                              Image.open(IMAGES[1])], model=model)
    assert "pixel_values" in want and len(want) > 1
    for got in (by_path, by_pixels):
        assert set(got) == set(want)
        for name, w in want.items():
            assert got[name].dtype == np.float32 and got[name].shape == w.shape, name
            assert np.array_equal(got[name], w), name
    one = toffee.embed(IMAGES[0], model=model)
    assert one["pixel_values"].shape[0] == 1


def test_bad_embed_input_raises_toffee_error(tmp_path):
    model = FIXTURES / "vision" / "dinov2"
    with pytest.raises(toffee.ToffeeError, match="at least one image"):
        toffee.embed([], model=model)
    with pytest.raises(toffee.ToffeeError, match="nowhere.png"):
        toffee.embed(tmp_path / "nowhere.png", model=model)
    with pytest.raises(toffee.ToffeeError, match="expected an RGB image"):
        toffee.embed(np.zeros((8, 8), np.uint8), model=model)
    with pytest.raises(toffee.ToffeeError):
        toffee.embed(IMAGES[0], model=tmp_path)
