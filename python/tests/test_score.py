"""toffee.score against `toffee score`: the same numbers for paths, arrays and PIL images,
one record or a batch."""

import json

import numpy as np
import pytest
from PIL import Image

import toffee
from conftest import FIXTURES

DINO = FIXTURES / "vision" / "dinov2"
CLIP = FIXTURES / "vision" / "clip"
SUBJECT = FIXTURES / "zero123" / "subject.png"  # RGBA: composited on white by both
IMAGES = [FIXTURES / "vision" / "images" / n
          for n in ("img0_37x53.png", "img1_64x40.png", "img2_50x50.png")]
KEYS = ("dino", "clip_i", "clip_t")


def same(py, cli_line):
    """The CLI prints f32 values (shortest form): equal once both are f32 again."""
    return all(np.float32(py[k]) == np.float32(cli_line[k]) for k in KEYS)


def cli_score(cli, subject, target, prompt, *extra):
    out = cli("score", "--dino", DINO, "--clip", CLIP, "--subject", subject, "--target",
              target, "--prompt", prompt, "--json", *extra)
    return json.loads(out)


def test_one_record_equals_the_cli_for_paths_arrays_and_pil(cli):
    want = cli_score(cli, SUBJECT, IMAGES[1], "a toy")
    by_path = toffee.score(SUBJECT, IMAGES[1], "a toy", dino=DINO, clip=CLIP)
    by_array = toffee.score(np.asarray(Image.open(SUBJECT)), np.asarray(Image.open(IMAGES[1])),
                            "a toy", dino=DINO, clip=CLIP)
    by_pil = toffee.score(Image.open(SUBJECT), Image.open(IMAGES[1]), "a toy",
                          dino=DINO, clip=CLIP)
    assert set(by_path) == set(KEYS)
    for got in (by_path, by_array, by_pil):
        assert same(got, want), (got, want)


def test_masks_as_files_and_arrays_equal_the_cli(cli):
    mask = FIXTURES / "images" / "canny_shapes.gray.png"
    target = FIXTURES / "images" / "canny_shapes.png"
    want = cli_score(cli, target, IMAGES[0], "shapes", "--subject-mask", mask)
    by_path = toffee.score(target, IMAGES[0], "shapes", subject_mask=mask, dino=DINO, clip=CLIP)
    by_array = toffee.score(target, IMAGES[0], "shapes", subject_mask=np.asarray(Image.open(mask)),
                            dino=DINO, clip=CLIP)
    assert same(by_path, want) and same(by_array, want)


def test_a_batch_equals_the_cli_pairs_file(cli, tmp_path):
    records = [
        {"subject": str(SUBJECT), "target": str(IMAGES[0]), "prompt": "a toy"},
        {"subject": str(IMAGES[1]), "target": str(IMAGES[2]), "prompt": "a photo of a dog"},
        {"subject": str(IMAGES[2]), "target": str(SUBJECT), "prompt": "a red thing"},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    want = [json.loads(line) for line in
            cli("score", "--dino", DINO, "--clip", CLIP, "--pairs", pairs, "--batch", 2).splitlines()]
    got = toffee.score([r["subject"] for r in records], [r["target"] for r in records],
                       [r["prompt"] for r in records], dino=DINO, clip=CLIP, batch=2)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert same(g, w), (g, w)


def test_bad_score_input_raises_toffee_error(tmp_path):
    with pytest.raises(toffee.ToffeeError, match="nowhere.png"):
        toffee.score(tmp_path / "nowhere.png", IMAGES[0], "x", dino=DINO, clip=CLIP)
    with pytest.raises(toffee.ToffeeError, match="give one of each per record"):
        toffee.score([IMAGES[0], IMAGES[1]], [IMAGES[0]], "x", dino=DINO, clip=CLIP)
    with pytest.raises(toffee.ToffeeError, match="expected an RGB image"):
        toffee.score(np.zeros((8, 8), np.uint8), IMAGES[0], "x", dino=DINO, clip=CLIP)
    with pytest.raises(toffee.ToffeeError):
        toffee.score(IMAGES[0], IMAGES[0], "x", dino=tmp_path, clip=CLIP)
