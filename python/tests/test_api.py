"""The package's surface: the stubs (toffee/__init__.pyi) declare every public name with the
runtime's parameters, and the GIL is released while toffee works."""

import ast
import inspect
import pathlib
import threading
import time

import toffee

STUBS = pathlib.Path(toffee.__file__).with_name("__init__.pyi")


def stub_signatures():
    """name (or Class.method) → parameter names, from the .pyi (the last of overloads)."""
    out = {}
    for node in ast.parse(STUBS.read_text()).body:
        defs = [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            out[node.name] = None
            defs = [(f"{node.name}.{f.name}", f) for f in node.body
                    if isinstance(f, ast.FunctionDef)]
        for name, f in defs:
            a = f.args
            out[name] = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return out


def test_the_stubs_declare_the_runtime_api():
    stubs = stub_signatures()
    for name in toffee.__all__:
        assert name in stubs, f"{name} is not in {STUBS.name}"
        obj = getattr(toffee, name)
        members = [(name, obj)]
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            members = []
        elif inspect.isclass(obj):
            members = [(f"{name}.{m}", f) for m, f in vars(obj).items()
                       if inspect.isfunction(f) and (not m.startswith("_") or m == "__init__")]
        for key, f in members:
            params = list(inspect.signature(f).parameters)
            assert stubs.get(key) == params, (key, stubs.get(key), params)


def test_the_gil_is_released_while_generating():
    engine = toffee.Engine()
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    start = time.monotonic()
    engine.txt2img("a cat", steps=6, width=64, height=64)
    end = time.monotonic()
    stop.set()
    t.join()
    during = [x for x in ticks if start < x < end]
    # Holding the GIL would stop the other thread for the whole call.
    assert end - start > 0.05 and len(during) >= 10, (end - start, len(during))
