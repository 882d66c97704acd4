"""txt2img with the built-in demo model through libtoffee's C ABI (ctypes, standard library only).

Usage: TOFFEE_LIB=target/release/libtoffee.so python3 txt2img.py out.ppm [seed]
"""
import ctypes
import os
import sys

lib = ctypes.CDLL(os.environ.get("TOFFEE_LIB", "libtoffee.so"))


class Image(ctypes.Structure):
    _fields_ = [("width", ctypes.c_uint32), ("height", ctypes.c_uint32),
                ("channels", ctypes.c_uint32), ("data", ctypes.POINTER(ctypes.c_uint8))]


class EngineOptions(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32)] + [(n, ctypes.c_char_p) for n in (
        "device", "model", "controlnet", "adapter", "adapter_encoder", "view_model", "dino", "clip")]


class GenerateOptions(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("mode", ctypes.c_uint32), ("prompt", ctypes.c_char_p),
                ("negative_prompt", ctypes.c_char_p), ("num_images", ctypes.c_uint32),
                ("steps", ctypes.c_uint32), ("guidance", ctypes.c_float), ("seed", ctypes.c_uint64),
                ("width", ctypes.c_uint32), ("height", ctypes.c_uint32), ("scheduler", ctypes.c_char_p),
                ("init_image", ctypes.POINTER(Image)), ("mask", ctypes.POINTER(Image)),
                ("strength", ctypes.c_float), ("control_image", ctypes.POINTER(Image)),
                ("control_scale", ctypes.c_float), ("adapter_image", ctypes.POINTER(Image)),
                ("adapter_scale", ctypes.c_float)]


lib.toffee_last_error.restype = ctypes.c_char_p
lib.toffee_engine_open.argtypes = [ctypes.POINTER(EngineOptions), ctypes.POINTER(ctypes.c_void_p)]
lib.toffee_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(GenerateOptions), ctypes.POINTER(Image)]
lib.toffee_image_free.argtypes = [ctypes.POINTER(Image)]
lib.toffee_engine_close.argtypes = [ctypes.c_void_p]


def check(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: {lib.toffee_last_error().decode()}")


def main():
    out, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    engine = ctypes.c_void_p()
    opts = EngineOptions(size=ctypes.sizeof(EngineOptions))  # no model: the built-in demo model
    check(lib.toffee_engine_open(ctypes.byref(opts), ctypes.byref(engine)), "open")
    g = GenerateOptions(size=ctypes.sizeof(GenerateOptions), mode=0, prompt=b"a red fox", num_images=1,
                        steps=3, guidance=7.5, seed=seed, adapter_scale=-1.0)
    img = Image()
    check(lib.toffee_generate(engine, ctypes.byref(g), ctypes.byref(img)), "generate")
    pixels = ctypes.string_at(img.data, img.width * img.height * 3)
    with open(out, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (img.width, img.height) + pixels)
    lib.toffee_image_free(ctypes.byref(img))
    lib.toffee_engine_close(engine)


if __name__ == "__main__":
    main()
