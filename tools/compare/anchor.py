#!/usr/bin/env python3
"""The diffusers / transformers side of tools/compare: calls per second of the real model
configurations that `toffee bench` uses (src/configs.rs), built with random weights, in fp16,
in three modes, and a correctness set for `toffee forward`.

Runs ON THE GPU MACHINE (from tools/compare/run.sh, with the diffusers wheel on PYTHONPATH), or
here on the CPU with `--device cpu --tiny` (tiny configurations, for testing this script and the
forward check end to end).

Modes (each: warm-up, then `--repeats` timed runs of N calls, CUDA events, the median reported):
  eager    the model called from Python, as a diffusers user calls it (SDPA attention,
           torch.backends.cudnn.benchmark on).
  graph    the same eager call captured once in a torch.cuda.CUDAGraph and replayed.
  compile  torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False) on a
           channels_last model, as diffusers' "accelerate inference" docs recommend for the
           UNet (reduce-overhead = Inductor kernels replayed through CUDA graphs; max-autotune
           would add minutes of autotuning per shape). The first call's time is reported as
           compile_s. `--compile-mode` picks another mode.

Output: one JSON object per line on stdout (and appended to --jsonl):
  {"kind": "env", ...}                         versions and device
  {"kind": "config-verify", "ok": ..., ...}    the configs below vs src/configs.rs
  {"kind": "anchor", "config", "mode", "ms_per_call", "calls_per_s", ...} or with "error"
  {"kind": "check", "check", "component", "model", "inputs", "ref", "diffusers_fp16", ...}

Correctness set (--checks-dir DIR): for each model, DIR/<check>/model/ is the random-weight model
saved with save_pretrained (fp16 safetensors, a standalone model folder toffee loads);
in.safetensors holds one set of random inputs in the names `toffee forward` reads (fp32 values
that are exact in fp16; input_ids int64); diffusers_fp16.safetensors is the fp16 model's output
and ref_fp32.safetensors the output of the same (fp16-rounded) weights upcast to fp32, TF32 off:
the reference that toffee's output is held to (relative L2 < 1e-2, tools/compare/report.py).
"""

import argparse
import copy
import gc
import json
import math
import os
import re
import statistics
import sys
import time

# ---------------------------------------------------------------------------------------------
# The configurations: the same values as src/configs.rs (checked by verify_configs at run time).
# ---------------------------------------------------------------------------------------------

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20], "norm_num_groups": 32, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "scaling_factor": 0.18215,
}
CLIP_L = {
    "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2,
}

# Tiny stand-ins of the same shapes of configuration (CPU tests only).
TINY_SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [16, 32], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 24, "attention_head_dim": 4, "norm_num_groups": 8,
}
TINY_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [16, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2], "cross_attention_dim": 32,
    "attention_head_dim": [2, 4], "norm_num_groups": 8, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
}
TINY_SD_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "scaling_factor": 0.18215,
}
TINY_CLIP_L = {
    "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2,
}

# model key -> component, config, latent side (UNet / VAE), the check's batch.
MODELS = {
    "sd15-unet": dict(component="unet", cfg=SD15_UNET, tiny=TINY_SD15_UNET, check_batch=2),
    "sdxl-unet": dict(component="unet", cfg=SDXL_UNET, tiny=TINY_SDXL_UNET, check_batch=2),
    "sd-vae": dict(component="vae-decode", cfg=SD_VAE, tiny=TINY_SD_VAE, check_batch=2),
    "clip-l": dict(component="text-encoder", cfg=CLIP_L, tiny=TINY_CLIP_L, check_batch=4),
}

# name, model, batch, image side (pixels; latent = side / 8), `toffee bench --config` name.
CONFIGS = [
    ("sd15-unet-b2", "sd15-unet", 2, 512, "sd15"),
    ("sd15-unet-b32", "sd15-unet", 32, 512, "sd15"),
    ("sdxl-unet-b8", "sdxl-unet", 8, 1024, "sdxl"),
    ("sd15-vae-decode-b8", "sd-vae", 8, 512, "sd15"),
    ("sd15-text-encoder-b64", "clip-l", 64, 512, "sd15"),
]
TINY_SIDE = {"sd15-unet": 64, "sdxl-unet": 64, "sd-vae": 64, "clip-l": 64}
TOKENS = 77
# The checks run at the side of the first config of their model (full) or TINY_SIDE (tiny).


def config_rows(tiny, checks_dir):
    """One dict per configuration, with the matching `toffee bench` arguments."""
    rows = []
    for name, model, batch, side, known in CONFIGS:
        comp = MODELS[model]["component"]
        if tiny:
            side = TINY_SIDE[model]
            batch = max(1, min(batch, 4))
            if not checks_dir:
                raise SystemExit("--tiny needs --checks-dir: toffee benches the saved tiny models")
            src = os.path.join(checks_dir, model, "model")
        else:
            src = known
        rows.append(dict(config=name, model=model, component=comp, batch=batch, resolution=side,
                         toffee_bench=["--config", src, "--component", comp, "--batch", str(batch),
                                       "--resolution", str(side), "--iters", "20" if batch <= 2 or
                                       comp == "text-encoder" else "10", "--warmup", "3"]))
    return rows


# ---------------------------------------------------------------------------------------------
# src/configs.rs: the same values?
# ---------------------------------------------------------------------------------------------

def _balanced(src, i):
    """src[i] is '{': the index just past its matching '}' (strings skipped)."""
    depth, j, in_str = 0, i, False
    while j < len(src):
        c = src[j]
        if in_str:
            if c == "\\":
                j += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError("unbalanced braces")


def _fn_body(src, fn):
    i = src.index(f"pub fn {fn}(")
    b = src.index("{", i)
    return src[b:_balanced(src, b)]


def _json_arms(body):
    """`Known::A | Known::B => json!({...})` arms (or a lone `json!({...})`): {variant: text}."""
    arms = {}
    for m in re.finditer(r"((?:Known::\w+\s*\|?\s*)*)=>\s*json!\(\s*\{|json!\(\s*\{", body):
        start = m.end() - 1
        text = body[start:_balanced(body, start)]
        variants = re.findall(r"Known::(\w+)", m.group(1) or "") or ["*"]
        for v in variants:
            arms[v] = text
    return arms


def rust_configs(path):
    src = open(path, encoding="utf-8").read()
    out = {}
    for fn, key, variant in [("unet", "sd15-unet", "Sd15"), ("unet", "sdxl-unet", "Sdxl"),
                             ("vae", "sd-vae", "Sd15"), ("text_encoder", "clip-l", "Sd15")]:
        arms = _json_arms(_fn_body(src, fn))
        text = arms.get(variant, arms.get("*"))
        if text is None:
            raise ValueError(f"{path}: no json! arm for Known::{variant} in fn {fn}")
        # the VAE's `if self == Known::Sdxl { a } else { b }`
        text = re.sub(r"if\s+self\s*==\s*Known::(\w+)\s*\{\s*([^{}]+?)\s*\}\s*else\s*\{\s*([^{}]+?)\s*\}",
                      lambda m: m.group(2) if m.group(1) == variant else m.group(3), text)
        out[key] = json.loads(text)
    return out


def verify_configs(path):
    if not os.path.isfile(path):
        return {"kind": "config-verify", "ok": None, "note": f"{path} not found; not checked"}
    try:
        rs = rust_configs(path)
    except Exception as e:  # a reformatted configs.rs must not stop the benchmark
        return {"kind": "config-verify", "ok": None, "note": f"could not parse {path}: {e!r}"}
    diffs = []
    for key, spec in MODELS.items():
        a, b = spec["cfg"], rs[key]
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                diffs.append(f"{key}.{k}: anchor {a.get(k, '<missing>')!r} vs configs.rs {b.get(k, '<missing>')!r}")
    return {"kind": "config-verify", "ok": not diffs, "file": path, "diffs": diffs}


# ---------------------------------------------------------------------------------------------
# Models, inputs, calls
# ---------------------------------------------------------------------------------------------

def emit(obj, jsonl):
    line = json.dumps(obj, sort_keys=False)
    print(line, flush=True)
    if jsonl:
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def randomize_(model, seed, device):
    """Every parameter random, scaled like toffee's random weights (src/weights/mod.rs):
    tensors of rank >= 2 N(0, 1/fan_in), biases N(0, 0.02^2), other 1-D (norm scales) 1 + N(0, 0.1^2)."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.numel() / p.shape[0]), generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(1.0, 0.1, generator=g)


def build(model_key, cfg, device, dtype, seed):
    import torch
    comp = MODELS[model_key]["component"]
    kw = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
    with torch.device(device):
        if comp == "unet":
            from diffusers import UNet2DConditionModel
            m = UNet2DConditionModel(**kw)
        elif comp == "vae-decode":
            from diffusers import AutoencoderKL
            m = AutoencoderKL(**kw)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel
            m = CLIPTextModel(CLIPTextConfig(**kw))
    randomize_(m, seed, device)
    return m.to(dtype).eval().requires_grad_(False)


def make_inputs(model_key, cfg, batch, side, seed):
    """Random inputs on the CPU, fp32 (rounded through fp16) / int64, in `toffee forward` names."""
    import torch
    g = torch.Generator().manual_seed(seed)
    comp = MODELS[model_key]["component"]
    r16 = lambda t: t.to(torch.float16).to(torch.float32)  # noqa: E731
    lat = side // 8
    if comp == "unet":
        ctx = cfg["cross_attention_dim"]
        inp = {
            "sample": r16(torch.randn(batch, cfg["in_channels"], lat, lat, generator=g)),
            "timestep": torch.linspace(999.0, 1.0, batch).round() if batch > 1 else torch.tensor([500.0]),
            "encoder_hidden_states": r16(torch.randn(batch, TOKENS, ctx, generator=g)),
        }
        if cfg.get("addition_embed_type") == "text_time":
            dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            inp["text_embeds"] = r16(torch.randn(batch, dim, generator=g))
            inp["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)
        return inp
    if comp == "vae-decode":
        return {"latent": r16(torch.randn(batch, cfg["latent_channels"], lat, lat, generator=g))}
    # CLIP ids: BOS, random words, EOS, padding (EOS id); varying lengths.
    ids = torch.full((batch, TOKENS), 49407, dtype=torch.int64)
    for i in range(batch):
        n = 4 + (i * 13) % 60
        ids[i, 0] = 49406
        ids[i, 1:1 + n] = torch.randint(0, 49406, (n,), generator=g)
    return {"input_ids": ids}


def to_device(inp, device, dtype):
    out = {}
    for k, v in inp.items():
        if k == "timestep":
            out[k] = v.to(device)  # diffusers casts the timestep embedding itself
        elif v.is_floating_point():
            out[k] = v.to(device=device, dtype=dtype)
        else:
            out[k] = v.to(device)
    return out


def caller(comp, model, inp, full_outputs=False):
    """A zero-argument call of the model on the (device) inputs."""
    if comp == "unet":
        added = None
        if "text_embeds" in inp:
            added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
        return lambda: model(inp["sample"], inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"],
                             added_cond_kwargs=added, return_dict=False)[0]
    if comp == "vae-decode":
        return lambda: model.decode(inp["latent"], return_dict=False)[0]
    if full_outputs:
        return lambda: model(input_ids=inp["input_ids"], output_hidden_states=True)
    return lambda: model(input_ids=inp["input_ids"]).last_hidden_state


def named_outputs(comp, out):
    if comp == "unet":
        return {"out": out}
    if comp == "vae-decode":
        return {"image": out}
    return {"last_hidden_state": out.last_hidden_state,
            "penultimate_hidden_state": out.hidden_states[-2],
            "pooler_output": out.pooler_output}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device, warmup, target_s, repeats, max_iters):
    """Median ms per call over `repeats` runs of N calls (N sized so a run takes ~target_s)."""
    import torch
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(2, math.ceil(target_s / one))))
    per = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            per.append(a.elapsed_time(b) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per.append((time.perf_counter() - t0) * 1000.0 / iters)
    return statistics.median(per), iters, per


def graph_replay(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream): (replay, (graph, static out))."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g.replay, (g, out)


def compiled_caller(comp, model, inp, mode, fullgraph=True):
    import torch
    if comp in ("unet", "vae-decode"):
        model.to(memory_format=torch.channels_last)
    kw = dict(mode=mode, fullgraph=fullgraph, dynamic=False)
    if comp == "unet":
        cm = torch.compile(model, **kw)
    elif comp == "vae-decode":
        cm = torch.compile(lambda z: model.decode(z, return_dict=False)[0], **kw)
    else:
        cm = torch.compile(model, **kw)
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def fn():
        mark()
        if comp == "unet":
            added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]} if "text_embeds" in inp else None
            return cm(inp["sample"], inp["timestep"], encoder_hidden_states=inp["encoder_hidden_states"],
                      added_cond_kwargs=added, return_dict=False)[0]
        if comp == "vae-decode":
            return cm(inp["latent"])
        return cm(input_ids=inp["input_ids"]).last_hidden_state
    return fn


# ---------------------------------------------------------------------------------------------
# The correctness set
# ---------------------------------------------------------------------------------------------

def rel_l2(a, b):
    import torch
    a, b = a.double().cpu(), b.double().cpu()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def save_check(model_key, model, cfg, side, device, dtype, root, seed):
    import torch
    from safetensors.torch import save_file
    comp = MODELS[model_key]["component"]
    d = os.path.join(root, model_key)
    mdir = os.path.join(d, "model")
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    model.save_pretrained(mdir)  # fp16 safetensors, config.json: a standalone model folder
    save_s = time.perf_counter() - t0
    batch = MODELS[model_key]["check_batch"]
    inp = make_inputs(model_key, cfg, batch, side, seed)
    with torch.no_grad():
        out16 = named_outputs(comp, caller(comp, model, to_device(inp, device, dtype), True)())
        out16 = {k: v.float().cpu().contiguous() for k, v in out16.items()}
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            m32 = copy.deepcopy(model).float()
            out32 = named_outputs(comp, caller(comp, m32, to_device(inp, device, torch.float32), True)())
            out32 = {k: v.float().cpu().contiguous() for k, v in out32.items()}
            del m32
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    files = {"inputs": os.path.join(d, "in.safetensors"), "ref": os.path.join(d, "ref_fp32.safetensors"),
             "diffusers_fp16": os.path.join(d, "diffusers_fp16.safetensors")}
    save_file({k: v.contiguous() for k, v in inp.items()}, files["inputs"])
    save_file(out32, files["ref"])
    save_file(out16, files["diffusers_fp16"])
    return {"kind": "check", "check": model_key, "component": comp, "batch": batch, "resolution": side,
            "model": mdir, **files, "save_s": round(save_s, 2),
            "diffusers_fp16_vs_fp32_rel_l2": {k: rel_l2(out16[k], out32[k]) for k in out32},
            "ref_rms": {k: float(v.double().pow(2).mean().sqrt()) for k, v in out32.items()}}


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configurations (CPU tests)")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--configs", default="all", help="comma-separated names (see --list), or all")
    ap.add_argument("--modes", default="eager,graph", help="comma-separated: eager, graph, compile (none: "
                    "only the correctness sets)")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--checks-dir", help="write the correctness set of each model here")
    ap.add_argument("--check-side", type=int, help="image side (px) of the correctness sets (default: the "
                    "first config's of each model)")
    ap.add_argument("--no-checks", action="store_true", help="with --checks-dir: only read it (--list)")
    ap.add_argument("--jsonl", help="also append every JSON line to this file")
    ap.add_argument("--rust-configs", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "..", "..", "src", "configs.rs"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=0.4, help="seconds per timed run")
    ap.add_argument("--max-iters", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--list", action="store_true",
                    help="print the configurations (with their toffee bench arguments) and exit")
    ap.add_argument("--list-tsv", action="store_true",
                    help="the same as tab-separated lines: config, model, toffee bench arguments")
    a = ap.parse_args()

    rows = config_rows(a.tiny, a.checks_dir)
    if a.list or a.list_tsv:
        for r in rows:
            print("\t".join([r["config"], r["model"]] + r["toffee_bench"]) if a.list_tsv else json.dumps(r))
        return 0
    want = [r["config"] for r in rows] if a.configs == "all" else [c for c in a.configs.split(",") if c]
    unknown = [c for c in want if c not in {r["config"] for r in rows}]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {[r['config'] for r in rows]}")
    modes = [m for m in a.modes.split(",") if m and m != "none"]
    for m in modes:
        if m not in ("eager", "graph", "compile"):
            raise SystemExit(f"unknown mode {m}")

    import torch
    import diffusers
    import transformers
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, a.dtype)
    dev_name = torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda") else "cpu"
    emit({"kind": "env", "device": dev_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
          "transformers": transformers.__version__, "diffusers_path": os.path.dirname(diffusers.__file__),
          "python": sys.version.split()[0], "dtype": a.dtype,
          "tiny": a.tiny, "compile_mode": a.compile_mode}, a.jsonl)
    emit(verify_configs(a.rust_configs), a.jsonl)

    sel = [r for r in rows if r["config"] in want]
    models = []
    for r in sel:
        if r["model"] not in models:
            models.append(r["model"])
    for mk in models:
        spec = MODELS[mk]
        cfg = spec["tiny"] if a.tiny else spec["cfg"]
        comp = spec["component"]
        mrows = [r for r in sel if r["model"] == mk]
        t0 = time.perf_counter()
        try:
            model = build(mk, cfg, a.device, dtype, a.seed)
        except Exception as e:
            for r in mrows:
                emit({"kind": "anchor", "config": r["config"], "mode": "build", "error": repr(e)[:2000]}, a.jsonl)
            continue
        build_s = time.perf_counter() - t0
        if a.checks_dir and not a.no_checks:
            try:
                emit(save_check(mk, model, cfg, a.check_side or mrows[0]["resolution"], a.device, dtype, a.checks_dir, a.seed + 1),
                     a.jsonl)
            except Exception as e:
                emit({"kind": "check", "check": mk, "component": comp, "error": repr(e)[:2000]}, a.jsonl)
            gc.collect()
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
        # eager and graph for every batch first, then compile (which makes the model channels_last)
        order = [(r, m) for m in modes if m != "compile" for r in mrows]
        order += [(r, "compile") for r in mrows if "compile" in modes]
        for r, mode in order:
            inp = to_device(make_inputs(mk, cfg, r["batch"], r["resolution"], a.seed + 2), a.device, dtype)
            rec = {"kind": "anchor", "config": r["config"], "model": mk, "component": comp, "batch": r["batch"],
                   "resolution": r["resolution"], "mode": mode, "device": dev_name, "dtype": a.dtype,
                   "build_s": round(build_s, 2)}
            keep = None
            try:
                with torch.no_grad():
                    if mode == "eager":
                        fn = caller(comp, model, inp)
                    elif mode == "graph":
                        if not a.device.startswith("cuda"):
                            emit(dict(rec, skipped="CUDA graphs need a CUDA device"), a.jsonl)
                            continue
                        fn, keep = graph_replay(caller(comp, model, inp))
                    else:
                        rec["compile_mode"] = a.compile_mode
                        t1 = time.perf_counter()
                        try:
                            fn = compiled_caller(comp, model, inp, a.compile_mode)
                            fn()
                            rec["fullgraph"] = True
                        except Exception as e:  # a graph break: compile the pieces instead
                            rec["fullgraph"], rec["fullgraph_error"] = False, repr(e)[:500]
                            fn = compiled_caller(comp, model, inp, a.compile_mode, fullgraph=False)
                            fn()
                        sync(a.device)
                        rec["compile_s"] = round(time.perf_counter() - t1, 2)
                    ms, iters, per = time_calls(fn, a.device, a.warmup, a.target_s, a.repeats, a.max_iters)
                rec.update(ms_per_call=ms, calls_per_s=1000.0 / ms, iters=iters,
                           repeats_ms=[round(x, 4) for x in per])
                if a.device.startswith("cuda"):
                    rec["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except Exception as e:
                rec["error"] = repr(e)[:2000]
            emit(rec, a.jsonl)
            del keep, inp
            fn = None
            gc.collect()
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        del model
        gc.collect()
        if "compile" in modes:
            torch._dynamo.reset()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
