"""toffee.Engine against the CLI: the same arguments give the same pixels, and bad arguments
raise toffee.ToffeeError with toffee's message."""

import numpy as np
import pytest
from PIL import Image

import toffee
from conftest import FIXTURES

# Few steps at the built-in model's smallest sizes: the comparison, not the picture, matters.
STEPS = 2


@pytest.fixture(scope="module")
def engine():
    return toffee.Engine()


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt2img_equals_the_cli(engine, cli, tmp_path):
    out = tmp_path / "cli.png"
    cli("txt2img", "--prompt", "a red cube", "--seed", 7, "--steps", STEPS,
        "--width", 64, "--height", 48, "--guidance", 5, "--out", out)
    [img] = engine.txt2img("a red cube", seed=7, steps=STEPS, width=64, height=48, guidance=5)
    assert img.dtype == np.uint8 and img.shape == (48, 64, 3)
    assert np.array_equal(img, png(out))


def test_several_images_equal_the_cli_files(engine, cli, tmp_path):
    out = tmp_path / "many.png"
    cli("txt2img", "--prompt", "two cats", "--negative", "blurry", "-n", 2, "--seed", 3,
        "--steps", STEPS, "--width", 32, "--height", 32, "--scheduler", "euler", "--out", out)
    imgs = engine.txt2img("two cats", negative_prompt="blurry", num_images=2, seed=3,
                          steps=STEPS, width=32, height=32, scheduler="euler")
    assert len(imgs) == 2
    for i, img in enumerate(imgs):
        assert np.array_equal(img, png(tmp_path / f"many-{i:04}.png"))
    assert not np.array_equal(imgs[0], imgs[1])


def test_img2img_from_an_array_and_from_pil_equals_the_cli(engine, cli, tmp_path):
    src = FIXTURES / "images" / "fit_src.png"
    out = tmp_path / "i2i.png"
    cli("img2img", "--prompt", "a house", "--image", src, "--strength", 0.6, "--seed", 1,
        "--steps", STEPS, "--out", out)
    from_pil = engine.img2img("a house", Image.open(src), strength=0.6, seed=1, steps=STEPS)[0]
    from_array = engine.img2img("a house", png(src), strength=0.6, seed=1, steps=STEPS)[0]
    assert np.array_equal(from_pil, png(out))
    assert np.array_equal(from_array, png(out))


def test_inpaint_with_an_rgba_subject_equals_the_cli(engine, cli, tmp_path):
    # No mask: the RGBA image's alpha marks what to keep.
    src = FIXTURES / "zero123" / "subject.png"
    out = tmp_path / "inpaint.png"
    cli("inpaint", "--prompt", "on a table", "--image", src, "--seed", 2, "--steps", STEPS,
        "--out", out)
    [img] = engine.inpaint("on a table", Image.open(src), seed=2, steps=STEPS)
    assert np.array_equal(img, png(out))


def test_inpaint_with_a_mask_equals_the_cli(engine, cli, tmp_path):
    src = FIXTURES / "images" / "canny_shapes.png"
    mask = FIXTURES / "images" / "canny_shapes.edges_100_200.png"
    out = tmp_path / "masked.png"
    cli("inpaint", "--prompt", "shapes", "--image", src, "--mask", mask, "--seed", 4,
        "--steps", STEPS, "--out", out)
    as_array = np.asarray(Image.open(mask))
    [img] = engine.inpaint("shapes", png(src), as_array, seed=4, steps=STEPS)
    assert np.array_equal(img, png(out))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be at least 1"),
        (dict(width=100), "width 100 is not a positive multiple of 8"),
        (dict(scheduler="nope"), "unknown scheduler `nope`"),
        (dict(guidance=float("nan")), "guidance NaN is not a finite number"),
        (dict(num_images=0), "images_per_prompt must be at least 1"),
    ],
)
def test_bad_arguments_raise_toffee_error(engine, kwargs, message):
    with pytest.raises(toffee.ToffeeError, match=message.replace("(", r"\(")):
        engine.txt2img("x", **kwargs)


def test_bad_images_raise_toffee_error(engine):
    with pytest.raises(toffee.ToffeeError, match="dtype float32"):
        engine.img2img("x", np.zeros((16, 16, 3), np.float32))
    with pytest.raises(toffee.ToffeeError, match="inpaint needs mask"):
        engine.inpaint("x", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(toffee.ToffeeError, match="txt2img takes no image"):
        engine._engine.generate("txt2img", "x", image=(bytes(16 * 16 * 3), 16, 16, 3))
    with pytest.raises(toffee.ToffeeError, match="has 5 bytes"):
        engine._engine.generate("img2img", "x", image=(bytes(5), 16, 16, 3))


def test_a_missing_model_folder_raises_toffee_error(tmp_path):
    with pytest.raises(toffee.ToffeeError, match=str(tmp_path / "nowhere")):
        toffee.Engine(model=tmp_path / "nowhere")


def test_the_builtin_model_takes_no_lora():
    with pytest.raises(toffee.ToffeeError, match="lora needs model"):
        toffee.Engine(lora=["some.safetensors"])


def test_an_adapter_engine_equals_the_cli(cli, tmp_path):
    # The CLI's adapter test's setup (tests/suite/adapters.rs): the SD1 fixture pipeline, an
    # IP-Adapter and its image encoder; the subject as a path and as pixels.
    model = FIXTURES / "sd1"
    adapter = FIXTURES / "adapters" / "ip-adapter-sd1.safetensors"
    encoder = FIXTURES / "vision" / "clip-vision-proj"
    subject = FIXTURES / "vision" / "images" / "img0_37x53.png"
    out = tmp_path / "ad.png"
    cli("txt2img", "--model", model, "--prompt", "a photo of a cat", "--steps", STEPS,
        "--seed", 3, "--adapter", adapter, "--adapter-image", subject, "--adapter-encoder",
        encoder, "--adapter-scale", 0.7, "--out", out)
    eng = toffee.Engine(model=model, adapter=adapter, adapter_encoder=encoder)
    kw = dict(steps=STEPS, seed=3, adapter_scale=0.7)
    [by_path] = eng.txt2img("a photo of a cat", adapter_image=subject, **kw)
    [by_pil] = eng.txt2img("a photo of a cat", adapter_image=Image.open(subject), **kw)
    assert np.array_equal(by_path, png(out)) and np.array_equal(by_pil, png(out))
    [other] = eng.txt2img("a photo of a cat", adapter_image=subject, steps=STEPS, seed=3,
                          adapter_scale=0.0)
    assert not np.array_equal(other, by_path), "the scale reaches the adapter"
    with pytest.raises(toffee.ToffeeError, match="1 adapter\\(s\\) but 0 adapter_image"):
        eng.txt2img("x", steps=STEPS)
    with pytest.raises(toffee.ToffeeError, match="adapter_scale inf is not a finite number"):
        eng.txt2img("x", steps=STEPS, adapter_image=subject, adapter_scale=float("inf"))


def test_adapters_need_a_model():
    with pytest.raises(toffee.ToffeeError, match="adapter needs model"):
        toffee.Engine(adapter="ip-adapter.safetensors")


def test_controlnet_and_loras_equal_the_cli(cli, tmp_path):
    model = FIXTURES / "sd1"
    controlnet = FIXTURES / "controlnet-sd1"
    control = FIXTURES / "images" / "canny_shapes.png"
    peft = FIXTURES / "lora" / "sd1-peft.safetensors"
    only_b = FIXTURES / "lora" / "sd1-unet-only-b.safetensors"
    out = tmp_path / "cn.png"
    cli("txt2img", "--model", model, "--prompt", "shapes", "--steps", STEPS, "--seed", 2,
        "--controlnet", controlnet, "--control-image", control, "--canny", "--control-scale",
        0.5, "--lora", peft, "--lora", f"{only_b}:0.5", "--out", out)
    eng = toffee.Engine(model=model, controlnet=controlnet, lora=[peft, (only_b, 0.5)])
    [img] = eng.txt2img("shapes", steps=STEPS, seed=2, control_image=Image.open(control),
                        canny=True, control_scale=0.5)
    assert np.array_equal(img, png(out))
