"""toffee.view against `toffee view` on the Zero123 fixture: the same pixels for paths, arrays
and PIL images, with the subject's alpha or a mask; bad input raises toffee.ToffeeError."""

import numpy as np
import pytest
from PIL import Image

import toffee
from conftest import FIXTURES

MODEL = FIXTURES / "zero123"
SUBJECT = FIXTURES / "zero123" / "subject.png"  # RGBA
STEPS = 2


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_views_equal_the_cli(cli, tmp_path):
    out = tmp_path / "v.png"
    cli("view", "--model", MODEL, "--image", SUBJECT, "--elevation", "0,15", "--azimuth", 30,
        "--steps", STEPS, "--seed", 5, "--batch", 1, "--out", out)
    want = [png(tmp_path / f"v-{i:04}.png") for i in range(2)]
    for image in (SUBJECT, Image.open(SUBJECT), np.asarray(Image.open(SUBJECT))):
        got = toffee.view(image, model=MODEL, elevation=[0, 15], azimuth=30, steps=STEPS,
                          seed=5, batch=1)
        assert len(got) == 2
        for g, w in zip(got, want):
            assert g.dtype == np.uint8 and g.shape == w.shape
            assert np.array_equal(g, w)
    assert not np.array_equal(want[0], want[1])


def test_a_mask_as_file_and_as_array_equals_the_cli(cli, tmp_path):
    rgba = np.asarray(Image.open(SUBJECT))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(rgba[..., 3] > 127, 255, 0).astype(np.uint8)).save(mask)
    out = tmp_path / "m.png"
    cli("view", "--model", MODEL, "--image", SUBJECT, "--mask", mask, "--elevation", 10,
        "--azimuth", -20, "--steps", STEPS, "--out", out)
    want = png(out)
    [by_path] = toffee.view(SUBJECT, mask=mask, model=MODEL, elevation=10, azimuth=-20,
                            steps=STEPS)
    [by_array] = toffee.view(rgba, mask=np.asarray(Image.open(mask)), model=MODEL,
                             elevation=10, azimuth=-20, steps=STEPS)
    assert np.array_equal(by_path, want) and np.array_equal(by_array, want)


def test_bad_view_input_raises_toffee_error(tmp_path):
    kw = dict(model=MODEL, steps=STEPS)
    with pytest.raises(toffee.ToffeeError, match="give one value or 3"):
        toffee.view(SUBJECT, elevation=[0, 1], azimuth=[0, 1, 2], **kw)
    with pytest.raises(toffee.ToffeeError, match="not a finite number"):
        toffee.view(SUBJECT, elevation=float("nan"), azimuth=0, **kw)
    with pytest.raises(toffee.ToffeeError, match="steps must be at least 1"):
        toffee.view(SUBJECT, elevation=0, azimuth=0, model=MODEL, steps=0)
    with pytest.raises(toffee.ToffeeError, match="the mask is"):
        toffee.view(np.zeros((16, 16, 3), np.uint8), mask=np.zeros((8, 8), np.uint8),
                    elevation=0, azimuth=0, **kw)
    with pytest.raises(toffee.ToffeeError):
        toffee.view(SUBJECT, model=tmp_path, elevation=0, azimuth=0)
