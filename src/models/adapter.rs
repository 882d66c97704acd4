//! Image-prompt adapters: decoupled image cross-attention on a UNet (diffusers'
//! `IPAdapterAttnProcessor2_0`) fed by an image projection.
//!
//! - IP-Adapter (public single-file layout, `image_proj.proj` + `image_proj.norm`): CLIP image
//!   embedding [D] → Linear(D → T·cross) → T tokens → LayerNorm; diffusers always makes T = 4.
//! - IP-Adapter-Plus (`image_proj.latents`, `proj_in`, `layers.{i}.{0,1}`, `proj_out`, `norm_out`):
//!   the perceiver Resampler over the image encoder's penultimate hidden states.
//! - The Toffee adapter (Refiner / ToffeeNet; a folder with `adapter_config.json` and
//!   `adapter.safetensors`, docs/models.md): DINO tokens (all, or patch tokens only) through a
//!   per-token Linear + LayerNorm or a Resampler, with the same `ip_adapter.N` layer weights.
//!
//! The per-layer `to_k_ip` / `to_v_ip` weights are moved into the UNet's cross-attention layers
//! (`Unet::attach_adapter`); what stays here is the projection that makes the image tokens.

use super::nn::LayerNorm;
use super::unet::Unet;
use crate::backend::{self as ops, Activation, Device, LinearW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};

/// One perceiver-attention + feed-forward layer of the Resampler.
struct ResamplerLayer {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: LinearW,
    to_k: LinearW,
    to_v: LinearW,
    to_out: LinearW,
    ff_norm: LayerNorm,
    ff1: LinearW,
    ff2: LinearW,
}

/// IP-Adapter-Plus' Resampler: learned latent queries attend to the projected image tokens and
/// themselves, `depth` times.
pub struct Resampler {
    /// [Q, H]
    latents: Tensor,
    proj_in: LinearW,
    layers: Vec<ResamplerLayer>,
    proj_out: LinearW,
    norm_out: LayerNorm,
    heads: usize,
    queries: usize,
    hidden: usize,
}

/// Concatenation of [B, N, D] and [B, M, D] along the tokens.
fn cat_tokens(a: &Tensor, b: &Tensor) -> Tensor {
    let (bs, n, d) = (a.shape()[0], a.shape()[1], a.shape()[2]);
    let m = b.shape()[1];
    ops::concat_channels(&[&a.reshape(vec![bs, n * d]), &b.reshape(vec![bs, m * d])]).reshape(vec![
        bs,
        n + m,
        d,
    ])
}

/// The rows `start..start+len` of a host linear layer's outputs (a fused to_kv split in two).
fn rows(l: &LinearW, start: usize, len: usize) -> LinearW {
    let inp = l.weight.shape()[1];
    LinearW {
        weight: Tensor::new(
            vec![len, inp],
            l.weight.data()[start * inp..(start + len) * inp].to_vec(),
        ),
        bias: None,
    }
}

impl Resampler {
    /// `heads`: None derives them as diffusers' converter does for the public files (query
    /// width / 64).
    fn load(vb: &Vb, heads: Option<usize>) -> Result<Resampler> {
        let store = vb.store();
        let name = |n: &str| format!("{}.{n}", vb.prefix());
        let shape = |n: &str| -> Result<Vec<usize>> {
            store
                .info(&name(n))
                .map(|(i, _)| i.shape.clone())
                .with_context(|| format!("missing tensor `{}`", name(n)))
        };
        let ls = shape("latents")?;
        if ls.len() != 3 || ls[0] != 1 {
            bail!(
                "`{}` has shape {ls:?}, expected [1, queries, dim]",
                name("latents")
            );
        }
        let (queries, hidden) = (ls[1], ls[2]);
        let pin = shape("proj_in.weight")?;
        let pout = shape("proj_out.weight")?;
        let (embed_dim, out_dim) = (pin[1], pout[0]);
        let mut layers = Vec::new();
        while store.contains(&name(&format!("layers.{}.0.to_q.weight", layers.len()))) {
            let l = vb.pp(format!("layers.{}", layers.len()));
            let inner = shape(&format!("layers.{}.0.to_q.weight", layers.len()))?[0];
            let kv = l.pp("0.to_kv").linear_host(hidden, 2 * inner, false)?;
            let ff_inner = shape(&format!("layers.{}.1.1.weight", layers.len()))?[0];
            layers.push(ResamplerLayer {
                norm1: LayerNorm::load(&l.pp("0.norm1"), hidden, 1e-5)?,
                norm2: LayerNorm::load(&l.pp("0.norm2"), hidden, 1e-5)?,
                to_q: l.pp("0.to_q").linear(hidden, inner, false)?,
                to_k: vb.put_linear(rows(&kv, 0, inner)),
                to_v: vb.put_linear(rows(&kv, inner, inner)),
                to_out: l.pp("0.to_out").linear(inner, hidden, false)?,
                ff_norm: LayerNorm::load(&l.pp("1.0"), hidden, 1e-5)?,
                ff1: l.pp("1.1").linear(hidden, ff_inner, false)?,
                ff2: l.pp("1.3").linear(ff_inner, hidden, false)?,
            });
        }
        if layers.is_empty() {
            bail!("no Resampler layers (`{}`)", name("layers.0.0.to_q.weight"));
        }
        let inner = layers[0].to_q.out_features();
        let heads = heads.unwrap_or(inner / 64);
        if heads == 0 || !inner.is_multiple_of(heads) {
            bail!("Resampler: attention width {inner} does not split into {heads} heads");
        }
        Ok(Resampler {
            latents: vb
                .get("latents", &[1, queries, hidden])?
                .reshape(vec![queries, hidden]),
            proj_in: vb.pp("proj_in").linear(embed_dim, hidden, true)?,
            layers,
            proj_out: vb.pp("proj_out").linear(hidden, out_dim, true)?,
            norm_out: LayerNorm::load(&vb.pp("norm_out"), out_dim, 1e-5)?,
            heads,
            queries,
            hidden,
        })
    }

    /// x [B, N, D] → [B, Q, out].
    fn forward(&self, x: &Tensor) -> Tensor {
        let b = x.shape()[0];
        let x = ops::linear(x, &self.proj_in);
        let mut lat =
            Tensor::cat0(&vec![&self.latents; b]).reshape(vec![b, self.queries, self.hidden]);
        for l in &self.layers {
            let xn = l.norm1.forward(&x);
            let ln = l.norm2.forward(&lat);
            let q = ops::linear(&ln, &l.to_q);
            let kv_in = cat_tokens(&xn, &ln);
            let k = ops::linear(&kv_in, &l.to_k);
            let v = ops::linear(&kv_in, &l.to_v);
            let a = ops::linear(&ops::attention(&q, &k, &v, self.heads, false), &l.to_out);
            lat = ops::add(&lat, &a);
            let f = ops::linear(
                &Activation::Gelu.apply(&ops::linear(&l.ff_norm.forward(&lat), &l.ff1)),
                &l.ff2,
            );
            lat = ops::add(&lat, &f);
        }
        self.norm_out.forward(&ops::linear(&lat, &self.proj_out))
    }
}

/// How image features become the tokens the UNet attends to.
pub enum Projection {
    /// IP-Adapter: [.., D] → Linear → `tokens` × cross → LayerNorm.
    Plain {
        proj: LinearW,
        norm: LayerNorm,
        tokens: usize,
        cross: usize,
    },
    /// Toffee linear: every token through Linear(D → cross), then LayerNorm.
    PerToken { proj: LinearW, norm: LayerNorm },
    /// IP-Adapter-Plus / Toffee Resampler.
    Resampler(Resampler),
}

/// Which image-encoder output a Toffee adapter reads, and which of its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSelection {
    /// `last_hidden_state` or `penultimate_hidden_state`.
    pub output: String,
    /// Drop the CLS and register tokens (the first `prefix` tokens).
    pub patch_only: bool,
    pub prefix: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    /// IP-Adapter: pooled CLIP image embeddings (`image_embeds`).
    Plain,
    /// IP-Adapter-Plus: the penultimate hidden states of a CLIP vision model.
    Plus,
    /// Toffee Refiner / ToffeeNet adapter: DINO tokens.
    Toffee,
}

/// A loaded adapter: its projection and its per-layer key/value projections (until attached).
pub struct Adapter {
    pub kind: AdapterKind,
    pub source: PathBuf,
    pub projection: Projection,
    /// (to_k_ip, to_v_ip) per cross-attention layer in processor order.
    pub layers: Vec<(LinearW, LinearW)>,
    /// Input width of the projection (image embedding or token width).
    pub image_embed_dim: usize,
    /// Width of the tokens the UNet attends to.
    pub cross_dim: usize,
    /// Tokens per image.
    pub tokens: Option<usize>,
    pub default_scale: f32,
    pub selection: Option<TokenSelection>,
    /// Toffee adapters: the image encoder named in adapter_config.json (informational).
    pub image_encoder: Option<String>,
}

/// (kind, projection, image_embed_dim, cross_dim, tokens) of an adapter's image projection.
type ProjectionParts = (AdapterKind, Projection, usize, usize, Option<usize>);

/// The `ip_adapter.{1,3,5,…}` layer weights of an adapter file, in order.
fn load_layers(vb: &Vb, file: &Path) -> Result<Vec<(LinearW, LinearW)>> {
    let store = vb.store();
    let mut layers = Vec::new();
    loop {
        let n = 2 * layers.len() + 1;
        let k_name = format!("ip_adapter.{n}.to_k_ip.weight");
        let Some((info, _)) = store.info(&k_name) else {
            break;
        };
        if info.shape.len() != 2 {
            bail!(
                "{}: `{k_name}` has shape {:?}, expected [out, in]",
                file.display(),
                info.shape
            );
        }
        let (out, inp) = (info.shape[0], info.shape[1]);
        let l = vb.pp(format!("ip_adapter.{n}"));
        layers.push((
            l.pp("to_k_ip").linear(inp, out, false)?,
            l.pp("to_v_ip").linear(inp, out, false)?,
        ));
    }
    if layers.is_empty() {
        bail!(
            "{}: no `ip_adapter.1.to_k_ip.weight`: not an IP-Adapter layout",
            file.display()
        );
    }
    Ok(layers)
}

impl Adapter {
    /// A public IP-Adapter `.safetensors` file, or a Toffee adapter folder.
    pub fn load(path: &Path, device: &Device) -> Result<Adapter> {
        if path.is_dir() {
            return Self::load_toffee(path, device);
        }
        if !path.is_file() {
            bail!("{}: no such adapter file or folder", path.display());
        }
        if path
            .extension()
            .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
        {
            bail!(
                "{}: PyTorch pickles are not read; convert the adapter to safetensors \
                 (safetensors.torch.save_file over the flattened `image_proj.` / `ip_adapter.` keys)",
                path.display()
            );
        }
        let store = WeightStore::open_file(path)?;
        Self::from_store(&store, path, device, None)
            .with_context(|| format!("loading the adapter {}", path.display()))
    }

    fn from_store(
        store: &WeightStore,
        path: &Path,
        device: &Device,
        toffee: Option<(&ToffeeConfig, &Config)>,
    ) -> Result<Adapter> {
        let vb = Vb::root_on(store, device);
        let layers = load_layers(&vb, path)?;
        let p = vb.pp("image_proj");
        let (kind, projection, image_embed_dim, cross, tokens) = match toffee {
            Some((tc, cfg)) => Self::toffee_projection(&p, tc, cfg, path)?,
            None => Self::public_projection(store, &p, path)?,
        };
        check_no_extra_tensors(store, &expected_names(layers.len(), &projection), path)?;
        for (i, (k, _)) in layers.iter().enumerate() {
            if k.in_features() != cross {
                bail!(
                    "{}: `ip_adapter.{}.to_k_ip.weight` takes {}-wide tokens, the projection makes {cross}",
                    path.display(),
                    2 * i + 1,
                    k.in_features()
                );
            }
        }
        Ok(Adapter {
            kind,
            source: path.to_path_buf(),
            projection,
            layers,
            image_embed_dim,
            cross_dim: cross,
            tokens,
            default_scale: toffee.map_or(1.0, |(t, _)| t.scale),
            selection: toffee.map(|(t, _)| t.selection.clone()),
            image_encoder: toffee.and_then(|(t, _)| t.image_encoder.clone()),
        })
    }

    /// The projection adapter_config.json names, under `image_proj`.
    fn toffee_projection(
        p: &Vb,
        tc: &ToffeeConfig,
        cfg: &Config,
        file: &Path,
    ) -> Result<ProjectionParts> {
        let d = tc.image_embed_dim;
        let cross = tc.cross_attention_dim;
        check_projection_kind(p.store(), &tc.projection, cfg, file)?;
        match tc.projection.as_str() {
            "linear" => Ok((
                AdapterKind::Toffee,
                Projection::PerToken {
                    proj: p.pp("proj").linear(d, cross, true)?,
                    norm: LayerNorm::load(&p.pp("norm"), cross, 1e-5)?,
                },
                d,
                cross,
                None,
            )),
            "resampler" => {
                let r = Resampler::load(p, tc.resampler.as_ref().map(|rc| rc.heads))?;
                check_resampler(&r, tc, cfg, file)?;
                let (q, out) = (r.queries, r.norm_out.gamma.numel());
                if out != cross {
                    bail!(
                        "{}: the Resampler makes {out}-wide tokens, cross_attention_dim is {cross}",
                        cfg.path.display()
                    );
                }
                Ok((
                    AdapterKind::Toffee,
                    Projection::Resampler(r),
                    d,
                    cross,
                    Some(q),
                ))
            }
            other => Err(cfg.unsupported("projection", other, "linear, resampler")),
        }
    }

    /// A public IP-Adapter file's projection, told apart by its `image_proj` weight names.
    fn public_projection(store: &WeightStore, p: &Vb, path: &Path) -> Result<ProjectionParts> {
        let shape = |n: &str| {
            store
                .info(&format!("image_proj.{n}"))
                .map(|(i, _)| i.shape.clone())
        };
        if let Some(s) = shape("proj.weight") {
            // IP-Adapter: diffusers hard-codes 4 tokens.
            let (rows_, d) = (s[0], s[1]);
            if !rows_.is_multiple_of(4) {
                bail!("`image_proj.proj.weight` has {rows_} rows, not 4 tokens × width");
            }
            let cross = rows_ / 4;
            Ok((
                AdapterKind::Plain,
                Projection::Plain {
                    proj: p.pp("proj").linear(d, rows_, true)?,
                    norm: LayerNorm::load(&p.pp("norm"), cross, 1e-5)?,
                    tokens: 4,
                    cross,
                },
                d,
                cross,
                Some(4),
            ))
        } else if shape("latents").is_some() {
            let r = Resampler::load(p, None)?;
            let d = r.proj_in.in_features();
            let (q, cross) = (r.queries, r.norm_out.gamma.numel());
            Ok((
                AdapterKind::Plus,
                Projection::Resampler(r),
                d,
                cross,
                Some(q),
            ))
        } else {
            bail!(
                "{}: unknown image projection (expected `image_proj.proj.weight` of IP-Adapter \
                 or `image_proj.latents` of IP-Adapter-Plus; Full-face and FaceID variants are \
                 not supported)",
                path.display()
            );
        }
    }

    fn load_toffee(dir: &Path, device: &Device) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            bail!(
                "{}: missing: a Toffee adapter folder holds adapter_config.json and adapter.safetensors",
                cfg_path.display()
            );
        }
        let cfg = Config::read(&cfg_path)?;
        let tc = ToffeeConfig::parse(&cfg)?;
        let file = dir.join("adapter.safetensors");
        let store = WeightStore::open_file(&file)?;
        Self::from_store(&store, &file, device, Some((&tc, &cfg)))
            .with_context(|| format!("loading the Toffee adapter {}", dir.display()))
    }

    /// Image features → tokens [B, T, cross]. Plain: `image_embeds` [B, D] or [B, n, D] (n images
    /// per prompt, their tokens concatenated); Plus / Toffee: hidden states [B, N, D] or
    /// [B, n, N, D].
    pub fn project(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let d = self.image_embed_dim;
        match &self.projection {
            Projection::Plain {
                proj,
                norm,
                tokens,
                cross,
            } => {
                if s.len() < 2 || s.len() > 3 || s[s.len() - 1] != d {
                    bail!("image embeds of shape {s:?}; this IP-Adapter takes [B, {d}] or [B, images, {d}]");
                }
                let b = s[0];
                let n: usize = s[1..s.len() - 1].iter().product();
                let t = ops::linear(&x.reshape(vec![b * n, d]), proj).reshape(vec![
                    b,
                    n * tokens,
                    *cross,
                ]);
                Ok(norm.forward(&t))
            }
            Projection::PerToken { proj, norm } => {
                let (b, t) = Self::tokens_of(&s, d)?;
                Ok(norm.forward(&ops::linear(&x.reshape(vec![b, t, d]), proj)))
            }
            Projection::Resampler(r) => {
                if s.len() < 3 || s.len() > 4 || s[s.len() - 1] != d {
                    bail!("hidden states of shape {s:?}; this adapter takes [B, tokens, {d}] or [B, images, tokens, {d}]");
                }
                let (b, n, t) = (s[0], if s.len() == 4 { s[1] } else { 1 }, s[s.len() - 2]);
                let out = r.forward(&x.reshape(vec![b * n, t, d]));
                let cross = out.shape()[2];
                Ok(out.reshape(vec![b, n * r.queries, cross]))
            }
        }
    }

    fn tokens_of(s: &[usize], d: usize) -> Result<(usize, usize)> {
        if s.len() < 3 || s.len() > 4 || s[s.len() - 1] != d {
            bail!("tokens of shape {s:?}; this adapter takes [B, tokens, {d}] or [B, images, tokens, {d}]");
        }
        let t: usize = s[1..s.len() - 1].iter().product();
        Ok((s[0], t))
    }

    /// Checks the layer weights against the UNet and moves them into it; the adapter keeps its
    /// projection. Errors name the adapter file.
    pub fn attach(&mut self, unet: &mut Unet) -> Result<()> {
        let dims = unet.cross_attention_dims();
        let f = self.source.display();
        if dims.len() != self.layers.len() {
            bail!(
                "{f}: the adapter has {} cross-attention layers, the UNet {}: an adapter for another UNet",
                self.layers.len(),
                dims.len()
            );
        }
        for (i, ((q_dim, ctx_dim), (k, _))) in dims.iter().zip(&self.layers).enumerate() {
            if k.out_features() != *q_dim {
                bail!(
                    "{f}: `ip_adapter.{}.to_k_ip.weight` makes {} features, the UNet's layer {i} attends with {q_dim}: an adapter for another UNet",
                    2 * i + 1,
                    k.out_features()
                );
            }
            if self.cross_dim != *ctx_dim {
                bail!(
                    "{f}: the adapter's tokens are {}-wide, the UNet's cross_attention_dim is {ctx_dim}: an adapter for another UNet",
                    self.cross_dim
                );
            }
        }
        if self.layers.is_empty() {
            bail!("{f}: already attached");
        }
        unet.attach_adapter(std::mem::take(&mut self.layers));
        Ok(())
    }

    /// Describes the adapter (inspect).
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            AdapterKind::Plain => "IP-Adapter (ImageProjection)",
            AdapterKind::Plus => "IP-Adapter-Plus (Resampler)",
            AdapterKind::Toffee => "Toffee adapter (DINO tokens)",
        };
        let tokens = self.tokens.map_or("one per image token".to_string(), |t| {
            format!("{t} per image")
        });
        format!(
            "{kind}: image features {}-wide → tokens {} ({tokens}), {} cross-attention layers",
            self.image_embed_dim,
            self.cross_dim,
            self.layers.len()
        )
    }
}

/// Every tensor name an adapter with `layers` cross-attention layers and `projection` reads.
fn expected_names(layers: usize, projection: &Projection) -> Vec<String> {
    let mut names: Vec<String> = (0..layers)
        .flat_map(|i| {
            ["to_k_ip", "to_v_ip"].map(|kv| format!("ip_adapter.{}.{kv}.weight", 2 * i + 1))
        })
        .collect();
    let both = |m: &str| [format!("{m}.weight"), format!("{m}.bias")];
    let proj: Vec<String> = match projection {
        Projection::Plain { .. } | Projection::PerToken { .. } => {
            [both("proj"), both("norm")].concat()
        }
        Projection::Resampler(r) => {
            let mut v = vec!["latents".to_string()];
            v.extend([both("proj_in"), both("proj_out"), both("norm_out")].concat());
            for i in 0..r.layers.len() {
                let l = |m: &str| format!("layers.{i}.{m}");
                v.extend([both(&l("0.norm1")), both(&l("0.norm2")), both(&l("1.0"))].concat());
                v.extend(["0.to_q", "0.to_kv", "0.to_out", "1.1", "1.3"].map(|m| l(m) + ".weight"));
            }
            v
        }
    };
    names.extend(proj.into_iter().map(|n| format!("image_proj.{n}")));
    names
}

/// A tensor the adapter does not read is an error: it means a layout this loader does not know
/// (a variant with more modules, a merged file), which would otherwise run without it.
fn check_no_extra_tensors(store: &WeightStore, expected: &[String], file: &Path) -> Result<()> {
    let expected: std::collections::HashSet<&str> = expected.iter().map(|s| s.as_str()).collect();
    let mut extra: Vec<&str> = store.names().filter(|n| !expected.contains(n)).collect();
    if extra.is_empty() {
        return Ok(());
    }
    extra.sort_unstable();
    bail!(
        "{}: unknown tensor `{}` ({} not part of this adapter's layout: `image_proj.*` of one \
         projection and `ip_adapter.N.to_k_ip` / `to_v_ip`)",
        file.display(),
        extra[0],
        match extra.len() {
            1 => "it is".to_string(),
            n => format!("it and {} more are", n - 1),
        }
    );
}

/// The projection adapter_config.json names must be the one the file holds: the linear one's
/// `image_proj.proj.weight` or the Resampler's `image_proj.latents`.
fn check_projection_kind(
    store: &WeightStore,
    projection: &str,
    cfg: &Config,
    file: &Path,
) -> Result<()> {
    let (other, tensor) = match projection {
        "linear" => ("a Resampler", "image_proj.latents"),
        "resampler" => ("the linear projection", "image_proj.proj.weight"),
        _ => return Ok(()),
    };
    if store.contains(tensor) {
        bail!(
            "{}: `projection` is {projection:?}, but {} holds {other} (`{tensor}`)",
            cfg.path.display(),
            file.display()
        );
    }
    Ok(())
}

/// adapter_config.json's Resampler numbers against the tensors of `file`.
fn check_resampler(r: &Resampler, tc: &ToffeeConfig, cfg: &Config, file: &Path) -> Result<()> {
    let Some(rc) = &tc.resampler else {
        return Ok(());
    };
    let ff_inner = r.layers[0].ff1.out_features();
    let checks = [
        (
            "num_tokens",
            tc.num_tokens,
            r.queries,
            "`image_proj.latents` queries",
        ),
        (
            "resampler.depth",
            rc.depth,
            r.layers.len(),
            "`image_proj.layers.N`",
        ),
        (
            "resampler.hidden_dims",
            rc.hidden_dims,
            r.hidden,
            "`image_proj.latents` width",
        ),
        (
            "resampler.heads × resampler.dim_head",
            rc.heads * rc.dim_head,
            r.layers[0].to_q.out_features(),
            "`image_proj.layers.0.0.to_q.weight` rows",
        ),
        (
            "resampler.ff_mult × resampler.hidden_dims",
            rc.ff_mult * rc.hidden_dims,
            ff_inner,
            "`image_proj.layers.0.1.1.weight` rows",
        ),
        (
            "image_embed_dim",
            tc.image_embed_dim,
            r.proj_in.in_features(),
            "`image_proj.proj_in.weight` columns",
        ),
    ];
    for (field, config, tensors, what) in checks {
        if config != tensors {
            bail!(
                "{}: `{field}` is {config}, but {} has {tensors} {what}",
                cfg.path.display(),
                file.display()
            );
        }
    }
    Ok(())
}

/// `adapter_config.json` of a Toffee adapter folder (docs/models.md).
#[derive(Clone, Debug)]
pub struct ToffeeConfig {
    pub image_encoder: Option<String>,
    pub selection: TokenSelection,
    pub projection: String,
    pub image_embed_dim: usize,
    pub cross_attention_dim: usize,
    /// Q for a Resampler; informational for the linear projection.
    pub num_tokens: usize,
    /// The `resampler` object, for projection "resampler".
    pub resampler: Option<ResamplerConfig>,
    pub scale: f32,
}

/// `resampler` of adapter_config.json: all five fields required, each ≥ 1 (docs/models.md).
#[derive(Clone, Debug, PartialEq)]
pub struct ResamplerConfig {
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub hidden_dims: usize,
    pub ff_mult: usize,
}

impl ResamplerConfig {
    /// The `resampler` field: required for projection "resampler", absent or null otherwise.
    fn parse(cfg: &Config, projection: &str) -> Result<Option<ResamplerConfig>> {
        let value = cfg.get("resampler").filter(|v| !v.is_null());
        let path = cfg.path.display();
        let r = match (projection, value) {
            ("resampler", None) => bail!("{path}: field `resampler` is missing"),
            ("resampler", Some(r)) => r,
            (_, None) => return Ok(None),
            (other, Some(_)) => {
                bail!("{path}: field `resampler` is given, but `projection` is {other:?}")
            }
        };
        let field = |k: &str| -> Result<usize> {
            match r.get(k).and_then(|v| v.as_u64()) {
                Some(n) if n >= 1 => Ok(n as usize),
                _ => bail!("{path}: field `resampler.{k}` is missing or not a whole number ≥ 1"),
            }
        };
        Ok(Some(ResamplerConfig {
            depth: field("depth")?,
            dim_head: field("dim_head")?,
            heads: field("heads")?,
            hidden_dims: field("hidden_dims")?,
            ff_mult: field("ff_mult")?,
        }))
    }
}

impl ToffeeConfig {
    pub fn parse(cfg: &Config) -> Result<ToffeeConfig> {
        Self::check_fields(cfg)?;
        let output = cfg.str("image_encoder_output")?.to_string();
        if !matches!(
            output.as_str(),
            "last_hidden_state" | "penultimate_hidden_state"
        ) {
            return Err(cfg.unsupported(
                "image_encoder_output",
                output.as_str(),
                "last_hidden_state, penultimate_hidden_state",
            ));
        }
        let tokens = cfg.str("tokens")?;
        let patch_only = match tokens {
            "all" => false,
            "patch" => true,
            other => return Err(cfg.unsupported("tokens", other, "all, patch")),
        };
        let projection = cfg.str("projection")?.to_string();
        let resampler = ResamplerConfig::parse(cfg, &projection)?;
        Ok(ToffeeConfig {
            image_encoder: cfg.opt_str("image_encoder")?.map(String::from),
            selection: TokenSelection {
                output,
                patch_only,
                prefix: cfg.usize("num_prefix_tokens")?,
            },
            projection,
            image_embed_dim: cfg.usize("image_embed_dim")?,
            cross_attention_dim: cfg.usize("cross_attention_dim")?,
            num_tokens: cfg.usize("num_tokens")?,
            resampler,
            scale: cfg.f64_or("scale", 1.0)? as f32,
        })
    }

    /// Errors unless `cfg` is a Toffee adapter's, with no field this version does not know.
    fn check_fields(cfg: &Config) -> Result<()> {
        let t = cfg.str("adapter_type")?;
        if t != "toffee" {
            return Err(cfg.unsupported("adapter_type", t, "toffee"));
        }
        const KNOWN: [&str; 11] = [
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
        ];
        if let Some(k) = cfg
            .json
            .keys()
            .find(|k| !k.starts_with('_') && !KNOWN.contains(&k.as_str()))
        {
            bail!(
                "{}: unknown field `{k}` (known: {})",
                cfg.path.display(),
                KNOWN.join(", ")
            );
        }
        Ok(())
    }
}
