"""Toffee adapter: decoupled image cross-attention (the IP-Adapter mechanism) fed with DINO / DINOv2 tokens.

The Refiner and ToffeeNet of Toffee (2024) condition a Stable-Diffusion UNet on the patch embeddings of a
DINO image encoder through extra, per-cross-attention-layer keys and values:

    attn2(h) = to_out( SDPA(q, K_text, V_text) + scale * SDPA(q, to_k_ip(E), to_v_ip(E)) ),
    E = image_proj(select_tokens(DINO(subject)))                      # [B, T', cross_attention_dim]

Their weights were never published; this module defines the on-disk layout that toffee (the Rust engine)
loads, and is the PyTorch reference implementation that users train (see README.md next to this file and
docs/models.md, "Toffee adapter (Refiner / ToffeeNet)"):

    <folder>/adapter_config.json     ToffeeAdapterConfig
    <folder>/adapter.safetensors     image_proj.*  +  ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight

Only torch, diffusers (checked with 0.42.1) and safetensors are needed; transformers only to run
the image encoder. The attention processors installed by `attach` are diffusers' own
`IPAdapterAttnProcessor2_0`, and the projection reaches them through diffusers' own
`unet.encoder_hid_proj` path (`MultiIPAdapterImageProjection`, `encoder_hid_dim_type = "ip_image_proj"`), so
an attached UNet runs inside the stock StableDiffusion{,Img2Img,Inpaint,ControlNet*}Pipelines with
`ip_adapter_image_embeds=[...]` (see `pipeline_image_embeds`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ResamplerConfig",
    "ToffeeAdapterConfig",
    "TokenProjection",
    "Resampler",
    "ToffeeAdapter",
    "cross_attention_layers",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"

ENCODER_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state")
TOKEN_MODES = ("all", "patch")
PROJECTIONS = ("linear", "resampler")
LAYER_NORM_EPS = 1e-5  # every LayerNorm of image_proj (torch's default, as in the public IP-Adapter code)


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


def _req_int(d, key, where, minimum=1):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where}: `{key}` must be an integer >= {minimum}, got {v!r}")
    return v


@dataclasses.dataclass
class ResamplerConfig:
    """Shape of the IP-Adapter-Plus Resampler (public values: depth 4, dim_head 64, ff_mult 4).
    Attention inner width = heads * dim_head (need not equal hidden_dims)."""

    heads: int
    hidden_dims: int
    depth: int = 4
    dim_head: int = 64
    ff_mult: int = 4

    FIELDS = ("depth", "dim_head", "heads", "hidden_dims", "ff_mult")

    @classmethod
    def from_dict(cls, d, where="resampler"):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be an object, got {d!r}")
        missing = [k for k in cls.FIELDS if k not in d]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        unknown = [k for k in d if k not in cls.FIELDS and not k.startswith("_")]
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        return cls(**{k: _req_int(d, k, where) for k in cls.FIELDS})

    def to_dict(self):
        return {k: getattr(self, k) for k in self.FIELDS}


@dataclasses.dataclass
class ToffeeAdapterConfig:
    """adapter_config.json. Every field is required except `image_encoder` (informational, may be absent or
    null) and `scale` (default 1.0); `resampler` is required when projection == "resampler" and must be
    absent (or null) when projection == "linear". Keys starting with "_" are ignored; any other unknown key
    is an error."""

    image_encoder_output: str
    tokens: str
    num_prefix_tokens: int
    projection: str
    image_embed_dim: int
    cross_attention_dim: int
    num_tokens: int
    resampler: ResamplerConfig | None = None
    image_encoder: str | None = None
    scale: float = 1.0
    adapter_type: str = "toffee"

    ORDER = (
        "adapter_type",
        "image_encoder",
        "image_encoder_output",
        "tokens",
        "num_prefix_tokens",
        "projection",
        "image_embed_dim",
        "cross_attention_dim",
        "num_tokens",
        "resampler",
        "scale",
    )
    REQUIRED = (
        "adapter_type",
        "image_encoder_output",
        "tokens",
        "num_prefix_tokens",
        "projection",
        "image_embed_dim",
        "cross_attention_dim",
        "num_tokens",
    )

    def __post_init__(self):
        if isinstance(self.resampler, dict):
            self.resampler = ResamplerConfig.from_dict(self.resampler)
        self.validate()

    def validate(self, where="adapter_config.json"):
        if self.adapter_type != "toffee":
            raise ValueError(f'{where}: `adapter_type` must be "toffee", got {self.adapter_type!r}')
        if self.image_encoder is not None and not isinstance(self.image_encoder, str):
            raise ValueError(f"{where}: `image_encoder` must be a string or null")
        if self.image_encoder_output not in ENCODER_OUTPUTS:
            raise ValueError(f"{where}: `image_encoder_output` must be one of {ENCODER_OUTPUTS}, got {self.image_encoder_output!r}")
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"{where}: `tokens` must be one of {TOKEN_MODES}, got {self.tokens!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"{where}: `projection` must be one of {PROJECTIONS}, got {self.projection!r}")
        d = dataclasses.asdict(self)
        _req_int(d, "num_prefix_tokens", where, minimum=0)
        for k in ("image_embed_dim", "cross_attention_dim", "num_tokens"):
            _req_int(d, k, where)
        if self.projection == "resampler" and self.resampler is None:
            raise ValueError(f'{where}: projection "resampler" needs the `resampler` object')
        if self.projection == "linear" and self.resampler is not None:
            raise ValueError(f'{where}: `resampler` must be absent for projection "linear"')
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"{where}: `scale` must be a finite number, got {self.scale!r}")
        self.scale = float(self.scale)

    @classmethod
    def from_dict(cls, d, where="adapter_config.json"):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be a JSON object")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        unknown = [k for k in d if k not in cls.ORDER and not k.startswith("_")]
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        kw = {k: d[k] for k in cls.ORDER if k in d}
        if kw.get("resampler") is not None:
            kw["resampler"] = ResamplerConfig.from_dict(kw["resampler"], f"{where}: resampler")
        if kw.get("scale") is None:
            kw["scale"] = 1.0
        return cls(**kw)

    def to_dict(self):
        out = {}
        for k in self.ORDER:
            v = getattr(self, k)
            if k == "resampler":
                if v is None:
                    continue
                v = v.to_dict()
            if k == "image_encoder" and v is None:
                continue
            out[k] = v
        return out

    @classmethod
    def load(cls, folder):
        path = os.path.join(folder, CONFIG_NAME)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), where=path)

    def save(self, folder):
        _atomic_write_text(os.path.join(folder, CONFIG_NAME), json.dumps(self.to_dict(), indent=2) + "\n")


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# projections (state-dict names = the public IP-Adapter names below `image_proj.`)
# ---------------------------------------------------------------------------


class TokenProjection(nn.Module):
    """projection "linear": per token LayerNorm(Linear(x)): [B, T, D] -> [B, T, cross].
    Keys: proj.weight [cross, D], proj.bias [cross], norm.weight [cross], norm.bias [cross]."""

    def __init__(self, image_embed_dim, cross_attention_dim):
        super().__init__()
        self.proj = nn.Linear(image_embed_dim, cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim, eps=LAYER_NORM_EPS)

    def forward(self, x):
        return self.norm(self.proj(x))


class PerceiverAttention(nn.Module):
    """layers.{i}.0 of the public Resampler: norm1 (tokens), norm2 (latents), to_q, to_kv (rows: K then V),
    to_out; no biases. Computed like diffusers' IPAdapterPlusImageProjectionBlock (separate K / V matmuls,
    SDPA with scale 1/sqrt(dim_head)); the public code's fused to_kv + two sqrt(sqrt) scalings is the same
    function up to rounding."""

    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        kv_in = torch.cat([x, latents], dim=-2)
        inner = self.heads * self.dim_head
        w_k, w_v = self.to_kv.weight[:inner], self.to_kv.weight[inner:]
        q = self.to_q(latents)
        k = F.linear(kv_in, w_k)
        v = F.linear(kv_in, w_v)
        q = q.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, q_len, inner).to(q.dtype)
        return self.to_out(out)


def _feed_forward(dim, mult):
    # layers.{i}.1: 0 LayerNorm, 1 Linear(dim -> mult*dim, no bias), 2 GELU (erf), 3 Linear(mult*dim -> dim, no bias)
    return nn.Sequential(
        nn.LayerNorm(dim, eps=LAYER_NORM_EPS),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """projection "resampler": the IP-Adapter-Plus Resampler (public key names), [B, T, D] -> [B, Q, cross].

        x = proj_in(tokens); lat = latents.repeat(B, 1, 1)
        for each layer: lat = attn(x, lat) + lat; lat = ff(lat) + lat
        out = norm_out(proj_out(lat))
    """

    def __init__(self, image_embed_dim, cross_attention_dim, num_queries, rc: ResamplerConfig):
        super().__init__()
        h = rc.hidden_dims
        self.latents = nn.Parameter(torch.randn(1, num_queries, h) / h**0.5)
        self.proj_in = nn.Linear(image_embed_dim, h)
        self.proj_out = nn.Linear(h, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(h, rc.dim_head, rc.heads), _feed_forward(h, rc.ff_mult)]) for _ in range(rc.depth)]
        )

    def forward(self, x, return_intermediates=False):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        inter = {"proj_in": x}
        for i, (attn, ff) in enumerate(self.layers):
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
            inter[f"layers.{i}"] = latents
        latents = self.proj_out(latents)
        inter["proj_out"] = latents
        out = self.norm_out(latents)
        return (out, inter) if return_intermediates else out


# ---------------------------------------------------------------------------
# UNet cross-attention layers (the ip_adapter.{N} numbering)
# ---------------------------------------------------------------------------


def cross_attention_layers(unet):
    """[(N, attention module name, hidden size)] for the UNet's cross-attention (attn2) layers, in diffusers'
    `unet.attn_processors` order (down blocks, up blocks, mid block last), N = 1, 3, 5, ... -- exactly the
    numbering of diffusers' `_convert_ip_adapter_attn_to_diffusers` and of the public IP-Adapter files."""
    ch = list(unet.config.block_out_channels)
    out = []
    n = 1
    for name in unet.attn_processors.keys():
        if not name.startswith(("down_blocks.", "up_blocks.", "mid_block.")):
            continue  # e.g. attentions inside an encoder_hid_proj
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = ch[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(ch))[int(name[len("up_blocks.") :].split(".")[0])]
        else:
            hidden = ch[int(name[len("down_blocks.") :].split(".")[0])]
        out.append((n, name[: -len(".processor")], hidden))
        n += 2
    return out


class _IPLayer(nn.Module):
    def __init__(self, cross_attention_dim, hidden_size):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


# ---------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------


class ToffeeAdapter(nn.Module):
    """image_proj (TokenProjection | Resampler) + one (to_k_ip, to_v_ip) pair per UNet cross-attention layer.

    state_dict():  image_proj.*  and  ip_adapter.{N}.to_k_ip.weight / ip_adapter.{N}.to_v_ip.weight
    (N = 1, 3, 5, ...), i.e. exactly what adapter.safetensors holds.
    """

    def __init__(self, config: ToffeeAdapterConfig, layer_hidden_sizes):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        if c.projection == "linear":
            self.image_proj = TokenProjection(c.image_embed_dim, c.cross_attention_dim)
        else:
            self.image_proj = Resampler(c.image_embed_dim, c.cross_attention_dim, c.num_tokens, c.resampler)
        self.ip_adapter = nn.ModuleDict(
            {str(2 * i + 1): _IPLayer(c.cross_attention_dim, h) for i, h in enumerate(layer_hidden_sizes)}
        )
        self._attached = []  # (unet, [processors]) -- plain list: not registered as submodules

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def for_unet(cls, config: ToffeeAdapterConfig, unet, init_from_unet=True):
        """A fresh (trainable) adapter sized for `unet`. With init_from_unet, to_k_ip / to_v_ip start as copies
        of each layer's text to_k / to_v (as the original IP-Adapter training script does)."""
        if unet.config.cross_attention_dim != config.cross_attention_dim:
            raise ValueError(
                f"UNet cross_attention_dim {unet.config.cross_attention_dim} != adapter {config.cross_attention_dim}"
            )
        layers = cross_attention_layers(unet)
        ad = cls(config, [h for _, _, h in layers])
        if init_from_unet:
            mods = dict(unet.named_modules())
            with torch.no_grad():
                for n, name, _ in layers:
                    attn = mods[name]
                    ad.ip_adapter[str(n)].to_k_ip.weight.copy_(attn.to_k.weight)
                    ad.ip_adapter[str(n)].to_v_ip.weight.copy_(attn.to_v.weight)
        return ad.to(dtype=unet.dtype, device=unet.device)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device=None):
        """Load adapter_config.json + adapter.safetensors. dtype None keeps the stored dtype."""
        from safetensors.torch import load_file

        config = ToffeeAdapterConfig.load(folder)
        path = os.path.join(folder, WEIGHTS_NAME)
        sd = load_file(path)
        ns = sorted({int(k.split(".")[1]) for k in sd if k.startswith("ip_adapter.")})
        if ns != list(range(1, 2 * len(ns), 2)):
            raise ValueError(f"{path}: ip_adapter indices must be 1, 3, 5, ...; got {ns}")
        hidden = []
        for n in ns:
            for w in ("to_k_ip", "to_v_ip"):
                key = f"ip_adapter.{n}.{w}.weight"
                if key not in sd:
                    raise ValueError(f"{path}: missing {key}")
                if sd[key].ndim != 2 or sd[key].shape[1] != config.cross_attention_dim:
                    raise ValueError(f"{path}: {key} has shape {list(sd[key].shape)}, want [hidden, {config.cross_attention_dim}]")
            hk, hv = sd[f"ip_adapter.{n}.to_k_ip.weight"].shape[0], sd[f"ip_adapter.{n}.to_v_ip.weight"].shape[0]
            if hk != hv:
                raise ValueError(f"{path}: ip_adapter.{n}: to_k_ip has {hk} rows, to_v_ip {hv}")
            hidden.append(hk)
        ad = cls(config, hidden)
        want = ad.state_dict()
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        if missing or unexpected:
            raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
        for k, v in want.items():
            if list(v.shape) != list(sd[k].shape):
                raise ValueError(f"{path}: {k} has shape {list(sd[k].shape)}, config implies {list(v.shape)}")
        ad.load_state_dict(sd, strict=True)
        if dtype is not None:
            ad = ad.to(dtype=dtype)
        else:
            dts = {v.dtype for v in sd.values()}
            if len(dts) == 1:
                ad = ad.to(dtype=dts.pop())
        if device is not None:
            ad = ad.to(device=device)
        return ad

    def save_pretrained(self, folder, dtype=None):
        """Write adapter_config.json and adapter.safetensors (optionally cast to `dtype`, e.g. torch.float16)."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        self.config.save(folder)
        sd = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).cpu().contiguous() for k, v in self.state_dict().items()}
        path = os.path.join(folder, WEIGHTS_NAME)
        save_file(sd, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)

    # -- tokens and projection ------------------------------------------------------------------------------

    def select_tokens(self, encoder_output_hidden_states):
        """Encoder output -> the adapter's input tokens [B, T, D].

        Accepts the [B, S, D] tensor of the configured output (`last_hidden_state` or
        `penultimate_hidden_state` = hidden_states[-2]) or a transformers model output (then run the encoder
        with output_hidden_states=True for "penultimate_hidden_state"). tokens "all" keeps every token
        (CLS, registers, patches); "patch" keeps the last S - num_prefix_tokens (the grid_h * grid_w patches).
        """
        h = encoder_output_hidden_states
        if not torch.is_tensor(h):
            if self.config.image_encoder_output == "last_hidden_state":
                h = h.last_hidden_state
            else:
                hs = getattr(h, "hidden_states", None)
                if hs is None:
                    raise ValueError("penultimate_hidden_state needs the encoder run with output_hidden_states=True")
                h = hs[-2]
        if h.ndim != 3 or h.shape[-1] != self.config.image_embed_dim:
            raise ValueError(f"encoder hidden states must be [B, S, {self.config.image_embed_dim}], got {list(h.shape)}")
        if self.config.tokens == "patch":
            p = self.config.num_prefix_tokens
            if h.shape[1] <= p:
                raise ValueError(f"{h.shape[1]} tokens, but tokens 'patch' drops the first {p}")
            h = h[:, p:]
        return h

    def encode_image(self, image_encoder, pixel_values):
        """Run a transformers image encoder (ViTModel / Dinov2Model / Dinov2WithRegistersModel / ...) on
        preprocessed pixel_values and select the tokens."""
        cfg = getattr(image_encoder, "config", None)
        if self.config.tokens == "patch" and cfg is not None:
            want = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
            if want != self.config.num_prefix_tokens:
                raise ValueError(f"encoder has {want} prefix tokens, adapter num_prefix_tokens is {self.config.num_prefix_tokens}")
        out = image_encoder(
            pixel_values=pixel_values, output_hidden_states=self.config.image_encoder_output == "penultimate_hidden_state"
        )
        return self.select_tokens(out)

    def forward(self, tokens):
        """Selected tokens [B, T, image_embed_dim] -> image_prompt_embeds [B, T', cross_attention_dim]
        (T' = T for "linear", num_tokens for "resampler")."""
        return self.image_proj(tokens)

    @staticmethod
    def negative_tokens(tokens):
        """The unconditional image input for classifier-free guidance: all-zero tokens (its projection is the
        negative image prompt)."""
        return torch.zeros_like(tokens)

    # -- UNet -----------------------------------------------------------------------------------------------

    def attach(self, unet, scale=None):
        """Install diffusers' IPAdapterAttnProcessor2_0 on every cross-attention (attn2) layer of `unet`, with
        this adapter's to_k_ip / to_v_ip modules (shared, not copied: they train with the adapter), and make
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_proj]) (encoder_hid_dim_type
        "ip_image_proj"). Then call the UNet with added_cond_kwargs={"image_embeds": [tokens[:, None]]}
        (`unet_added_cond_kwargs`), or a pipeline with ip_adapter_image_embeds (`pipeline_image_embeds`).
        scale None = config.scale. Freeze the UNet (unet.requires_grad_(False)) BEFORE attaching: afterwards
        the shared adapter parameters are reachable from the UNet too."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        if unet.config.cross_attention_dim != self.config.cross_attention_dim:
            raise ValueError(
                f"UNet cross_attention_dim {unet.config.cross_attention_dim} != adapter {self.config.cross_attention_dim}"
            )
        if unet.encoder_hid_proj is not None:
            raise ValueError("the UNet already has an encoder_hid_proj (another adapter attached?); detach it first")
        scale = self.config.scale if scale is None else float(scale)
        layers = cross_attention_layers(unet)
        if len(layers) != len(self.ip_adapter):
            raise ValueError(f"UNet has {len(layers)} cross-attention layers, adapter has {len(self.ip_adapter)}")
        procs = dict(unet.attn_processors)
        installed = []
        for n, name, hidden in layers:
            ip = self.ip_adapter[str(n)]
            if ip.to_k_ip.out_features != hidden:
                raise ValueError(f"ip_adapter.{n} ({name}): width {ip.to_k_ip.out_features}, UNet layer {hidden}")
            p = IPAdapterAttnProcessor2_0(
                hidden_size=hidden,
                cross_attention_dim=self.config.cross_attention_dim,
                num_tokens=(self.config.num_tokens,),
                scale=scale,
            )
            p.to_k_ip = nn.ModuleList([ip.to_k_ip])
            p.to_v_ip = nn.ModuleList([ip.to_v_ip])
            procs[name + ".processor"] = p
            installed.append(p)
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_proj])
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        self._attached.append((unet, installed))
        return unet

    def set_scale(self, scale):
        """Change λ on every UNet this adapter is attached to (0 skips the image branch exactly)."""
        for _, procs in self._attached:
            for p in procs:
                p.scale = [float(scale)]

    def detach(self, unet):
        """Undo attach: plain SDPA processors on the cross-attention layers, no encoder_hid_proj."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        procs = dict(unet.attn_processors)
        for _, name, _ in cross_attention_layers(unet):
            procs[name + ".processor"] = AttnProcessor2_0()
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None
        self._attached = [(u, p) for u, p in self._attached if u is not unet]
        return unet

    @staticmethod
    def unet_added_cond_kwargs(tokens):
        """added_cond_kwargs for an attached UNet: tokens [B, T, D] -> {"image_embeds": [[B, 1, T, D]]}."""
        return {"image_embeds": [tokens[:, None]]}

    @staticmethod
    def pipeline_image_embeds(tokens, negative_tokens=None, do_classifier_free_guidance=True):
        """`ip_adapter_image_embeds` for diffusers' SD pipelines with an attached UNet. tokens [P, T, D] with P =
        the number of prompts (one subject per prompt). With CFG: [cat([negative, positive])[:, None]] =
        [[2P, 1, T, D]]; the pipeline chunks it and repeats each half num_images_per_prompt times."""
        if not do_classifier_free_guidance:
            return [tokens[:, None]]
        if negative_tokens is None:
            negative_tokens = torch.zeros_like(tokens)
        return [torch.cat([negative_tokens, tokens])[:, None]]

