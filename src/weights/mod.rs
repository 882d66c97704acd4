//! Checkpoint loading: safetensors files (single or sharded) behind one name → tensor map, with
//! the name normalisations real checkpoints need, and a path-prefix builder the models load through.

pub mod layout;
pub mod lora;
pub mod safetensors;
pub mod single_file;

use crate::backend::{Conv2dW, Device, LinearW};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafetensorsFile, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How a stored tensor becomes the tensor a model reads. Single-file checkpoints store some
/// weights fused or transposed relative to the diffusers layout (OpenCLIP's `in_proj_weight` holds
/// q, k and v; its `text_projection` is the transpose of a Linear weight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Whole,
    /// Rows `start..start + len` of dimension 0.
    Rows {
        start: usize,
        len: usize,
    },
    /// The transpose of a 2-D tensor.
    Transpose,
    /// A 1×1 convolution weight [O, I, 1, 1] read as the Linear weight [O, I].
    SqueezeConv1x1,
}

impl Op {
    fn shape(self, stored: &[usize]) -> Vec<usize> {
        match self {
            Op::Whole => stored.to_vec(),
            Op::Rows { len, .. } => {
                let mut s = stored.to_vec();
                if let Some(d) = s.first_mut() {
                    *d = len;
                }
                s
            }
            Op::Transpose => stored.iter().rev().copied().collect(),
            Op::SqueezeConv1x1 => match stored {
                [o, i, 1, 1] => vec![*o, *i],
                _ => stored.to_vec(),
            },
        }
    }

    fn apply(self, t: Tensor, what: &str) -> Result<Tensor> {
        match self {
            Op::Whole => Ok(t),
            Op::SqueezeConv1x1 => {
                let shape = self.shape(t.shape());
                Ok(t.reshape(shape))
            }
            Op::Rows { start, len } => {
                let shape = t.shape().to_vec();
                let rows = *shape.first().unwrap_or(&0);
                if start + len > rows {
                    bail!(
                        "{what}: rows {start}..{} of a tensor with {rows}",
                        start + len
                    );
                }
                let row: usize = shape[1..].iter().product();
                let data = t.data()[start * row..(start + len) * row].to_vec();
                Ok(Tensor::new(self.shape(&shape), data))
            }
            Op::Transpose => {
                let shape = t.shape().to_vec();
                if shape.len() != 2 {
                    bail!("{what}: a transpose needs a 2-D tensor, this one is {shape:?}");
                }
                let (r, c) = (shape[0], shape[1]);
                let d = t.data();
                let mut out = vec![0f32; r * c];
                for i in 0..r {
                    for j in 0..c {
                        out[j * r + i] = d[i * c + j];
                    }
                }
                Ok(Tensor::new(vec![c, r], out))
            }
        }
    }
}

/// All tensors of one model (one or more safetensors files), addressed by normalised name.
#[derive(Clone)]
pub struct WeightStore {
    /// What the user pointed at (a file or a folder), for error messages.
    pub origin: PathBuf,
    /// Shared so that `view` can hand one model's sub-models their own stores without a copy.
    files: std::sync::Arc<Vec<SafetensorsFile>>,
    /// normalised name -> (file index, name inside the file, how the stored tensor becomes this one)
    names: BTreeMap<String, (usize, String, Op)>,
    /// Synthesised weights (no files): every requested tensor is made from this seed and its name.
    random: Option<u64>,
    /// LoRA deltas fused into weights as they are read (name → deltas, in file order).
    deltas: BTreeMap<String, Vec<lora::Delta>>,
    /// What a `view` stripped: synthesised weights are drawn under the full name.
    random_prefix: String,
    /// Opened under `shapes_only`: tensors are checked against the headers and come back as
    /// zeros (untouched pages), nothing is read or converted.
    shapes_only: bool,
}

thread_local! {
    static SHAPES_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every weight store it opens on this thread reading shapes only: each model is
/// built as a run builds it — configs parsed, every tensor it asks for checked by name and shape
/// against the file headers, the stages fitted together — but the weights are zeros that are
/// never read from disk or converted, so checking a multi-gigabyte recipe takes seconds and
/// little memory (`toffee pairs --check`). A scope rather than a flag on every loader: the check
/// must take exactly the loaders' paths, and a thread-local cannot leak into other work.
pub fn shapes_only<T>(f: impl FnOnce() -> T) -> T {
    let was = SHAPES_ONLY.replace(true);
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SHAPES_ONLY.set(self.0);
        }
    }
    let _restore = Restore(was);
    f()
}

impl WeightStore {
    /// One safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let f = SafetensorsFile::open(path)?;
        let names = f
            .tensors
            .keys()
            .map(|k| (k.clone(), (0, k.clone(), Op::Whole)))
            .collect();
        Ok(WeightStore::from_files(path.to_path_buf(), vec![f], names))
    }

    /// A sharded checkpoint: `*.safetensors.index.json` with a `weight_map` of name -> shard file.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = crate::input::read_to_string(index)
            .with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_ids: HashMap<String, usize> = HashMap::new();
        let mut files = Vec::new();
        let mut names = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| anyhow!("{}: shard of `{name}` is not a string", index.display()))?;
            // Shards live in the model folder: a name that leaves it is refused.
            let sp = Path::new(shard);
            if sp.is_absolute()
                || sp
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bail!(
                    "{}: shard `{shard}` of `{name}` is not a file name inside the model folder",
                    index.display()
                );
            }
            let id = match shard_ids.get(shard) {
                Some(&id) => id,
                None => {
                    files.push(SafetensorsFile::open(&dir.join(shard))?);
                    shard_ids.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if files[id].info(name).is_none() {
                bail!(
                    "{}: the index puts `{name}` in {shard}, which does not contain it",
                    index.display()
                );
            }
            names.insert(name.clone(), (id, name.clone(), Op::Whole));
        }
        Ok(WeightStore::from_files(index.to_path_buf(), files, names))
    }

    /// Selected tensors of one file under new names (a single-file checkpoint's component):
    /// `map` is (name the model reads, name in the file, op).
    pub fn open_mapped(
        path: &Path,
        origin: &str,
        map: impl IntoIterator<Item = (String, String, Op)>,
    ) -> Result<Self> {
        let f = SafetensorsFile::open(path)?;
        let mut names = BTreeMap::new();
        for (name, stored, op) in map {
            if f.info(&stored).is_none() {
                bail!("{}: no tensor named `{stored}`", path.display());
            }
            names.insert(name, (0, stored, op));
        }
        Ok(WeightStore::from_files(
            PathBuf::from(origin),
            vec![f],
            names,
        ))
    }

    fn from_files(
        origin: PathBuf,
        files: Vec<SafetensorsFile>,
        names: BTreeMap<String, (usize, String, Op)>,
    ) -> Self {
        WeightStore {
            origin,
            files: std::sync::Arc::new(files),
            names,
            random: None,
            deltas: BTreeMap::new(),
            random_prefix: String::new(),
            shapes_only: SHAPES_ONLY.get(),
        }
    }

    /// Random weights for any configuration (benchmarks, the built-in demo model): each tensor is
    /// drawn from `seed` and its name, scaled like a trained network's (norm scales near 1, small
    /// biases, weights ~ 1/sqrt(fan_in)) so activations stay in a realistic range.
    pub fn random(seed: u64) -> Self {
        WeightStore {
            origin: PathBuf::from("<random weights>"),
            files: std::sync::Arc::new(Vec::new()),
            names: BTreeMap::new(),
            random: Some(seed),
            deltas: BTreeMap::new(),
            random_prefix: String::new(),
            shapes_only: SHAPES_ONLY.get(),
        }
    }

    /// Whether this store reads shapes only (`shapes_only`): its tensors are zeros.
    pub fn is_shapes_only(&self) -> bool {
        self.shapes_only
    }

    fn synthesise(seed: u64, name: &str, shape: &[usize]) -> Tensor {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let n: usize = shape.iter().product();
        let mut v = crate::rng::normal(seed, h, n);
        let (scale, shift) = if shape.len() >= 2 {
            ((shape[0] as f32 / n as f32).sqrt(), 0.0)
        } else if name.ends_with(".bias") {
            (0.02, 0.0)
        } else {
            (0.1, 1.0)
        };
        for x in v.iter_mut() {
            *x = *x * scale + shift;
        }
        Tensor::new(shape.to_vec(), v)
    }

    /// The tensors under `prefix` (`clip.vision_model.`), renamed without it, as a store of their
    /// own: a composite model (CLIPSeg's two CLIP towers, Depth Anything's backbone) hands each
    /// part the bare names its loader expects. The files stay shared and mapped once.
    pub fn view(&self, prefix: &str) -> WeightStore {
        fn under<V: Clone>(m: &BTreeMap<String, V>, prefix: &str) -> BTreeMap<String, V> {
            m.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect()
        }
        let (names, deltas) = (under(&self.names, prefix), under(&self.deltas, prefix));
        WeightStore {
            origin: self.origin.clone(),
            files: self.files.clone(),
            names,
            // Synthesised weights keep the full name, so a view draws what the whole would.
            random: self.random,
            deltas,
            random_prefix: format!("{}{prefix}", self.random_prefix),
            shapes_only: self.shapes_only,
        }
    }

    /// Renames tensors: `f` returns the normalised name for a stored one, or None to keep it.
    pub fn normalise_names(&mut self, f: impl Fn(&str) -> Option<String>) {
        let old = std::mem::take(&mut self.names);
        for (k, v) in old {
            let k2 = f(&k).unwrap_or(k);
            self.names.insert(k2, v);
        }
    }

    /// Drops tensors the models never read (e.g. `position_ids` buffers).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.names.retain(|k, _| keep(k));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(|s| s.as_str())
    }

    /// The stored tensor behind `name` (before any op) and its file.
    pub fn info(&self, name: &str) -> Option<(&TensorInfo, &Path)> {
        let (fi, stored, _) = self.names.get(name)?;
        Some((self.files[*fi].info(stored)?, &self.files[*fi].path))
    }

    /// The shape the model reads under `name` (after the op).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (fi, stored, op) = self.names.get(name)?;
        Some(op.shape(&self.files[*fi].info(stored)?.shape))
    }

    fn file_of(&self, name: &str) -> &Path {
        self.names
            .get(name)
            .map(|(fi, _, _)| self.files[*fi].path.as_path())
            .unwrap_or(&self.origin)
    }

    /// A tensor as f32, any shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        if self.shapes_only {
            let shape = self
                .shape(name)
                .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.origin.display()))?;
            return Ok(Tensor::zeros(shape));
        }
        let (fi, stored, op) = self
            .names
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.origin.display()))?;
        let t = self.files[*fi].read_f32(stored)?;
        let mut t = op.apply(
            t,
            &format!("{}: `{stored}`", self.files[*fi].path.display()),
        )?;
        if let Some(ds) = self.deltas.get(name) {
            for d in ds {
                let p = d
                    .product(t.shape())
                    .with_context(|| format!("{}: LoRA on `{name}`", self.origin.display()))?;
                for (w, x) in t.data_mut().iter_mut().zip(p.data()) {
                    *w += x;
                }
            }
        }
        Ok(t)
    }

    /// Adds a LoRA delta to the weight `name` (fused when the weight is read). Shapes are checked
    /// here, before any model is built.
    pub fn add_delta(&mut self, name: &str, d: lora::Delta) -> Result<()> {
        let shape = self
            .shape(name)
            .ok_or_else(|| anyhow!("{}: no weight `{name}` for the LoRA", self.origin.display()))?;
        let (o, k) = (
            d.up.shape()[0],
            d.down.shape()[1..].iter().product::<usize>(),
        );
        if shape.first() != Some(&o) || shape.iter().product::<usize>() != o * k {
            bail!(
                "{}: the LoRA for `{name}` makes a {o}×{k} update, the weight is {:?}: a LoRA for another model?",
                self.origin.display(),
                shape
            );
        }
        self.deltas.entry(name.to_string()).or_default().push(d);
        Ok(())
    }

    /// Names of the weights a LoRA changes.
    pub fn adapted(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(|s| s.as_str())
    }

    /// A tensor in its stored dtype (op applied), for writing it elsewhere unchanged.
    pub fn get_raw(&self, name: &str) -> Result<safetensors::RawTensor> {
        let (fi, stored, op) = self
            .names
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.origin.display()))?;
        let f = &self.files[*fi];
        let (info, bytes) = f
            .bytes(stored)
            .ok_or_else(|| anyhow!("{}: no tensor named `{stored}`", f.path.display()))?;
        let e = info.dtype.size();
        let shape = op.shape(&info.shape);
        let bytes = match *op {
            Op::Whole | Op::SqueezeConv1x1 => bytes.to_vec(),
            Op::Rows { start, len } => {
                let row = info.shape[1..].iter().product::<usize>() * e;
                if (start + len) * row > bytes.len() {
                    bail!(
                        "{}: `{stored}` has fewer than {} rows",
                        f.path.display(),
                        start + len
                    );
                }
                bytes[start * row..(start + len) * row].to_vec()
            }
            Op::Transpose => {
                let [r, c] = info.shape[..] else {
                    bail!("{}: `{stored}` is not 2-D", f.path.display());
                };
                let mut out = vec![0u8; bytes.len()];
                for i in 0..r {
                    for j in 0..c {
                        out[(j * r + i) * e..(j * r + i + 1) * e]
                            .copy_from_slice(&bytes[(i * c + j) * e..(i * c + j + 1) * e]);
                    }
                }
                out
            }
        };
        Ok(safetensors::RawTensor {
            name: name.to_string(),
            dtype: info.dtype,
            shape,
            bytes,
        })
    }

    /// A tensor as f32 that must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_one_of(name, &[shape])
    }

    /// A tensor as f32 with one of `shapes` (stored layouts vary); random stores use the first.
    pub fn get_one_of(&self, name: &str, shapes: &[&[usize]]) -> Result<Tensor> {
        if let Some(seed) = self.random {
            return Ok(Self::synthesise(
                seed,
                &format!("{}{name}", self.random_prefix),
                shapes[0],
            ));
        }
        let stored = self
            .shape(name)
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.origin.display()))?;
        if !shapes.contains(&stored.as_slice()) {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                self.file_of(name).display(),
                stored,
                shapes[0]
            );
        }
        self.get_any(name)
    }

    /// Total parameter count (elements over all tensors).
    pub fn param_count(&self) -> usize {
        self.names
            .keys()
            .filter_map(|n| self.shape(n))
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Bytes and elements per dtype.
    pub fn dtype_summary(&self) -> BTreeMap<Dtype, (usize, usize)> {
        let mut m = BTreeMap::new();
        for n in self.names.keys() {
            if let (Some((i, _)), Some(s)) = (self.info(n), self.shape(n)) {
                let numel: usize = s.iter().product();
                let e = m.entry(i.dtype).or_insert((0, 0));
                e.0 += numel * i.dtype.size();
                e.1 += numel;
            }
        }
        m
    }
}

/// Loads weights under a name prefix, the way the models address them ("down_blocks.0.resnets.1").
#[derive(Clone)]
pub struct Vb<'a> {
    store: &'a WeightStore,
    prefix: String,
    device: Device,
}

impl<'a> Vb<'a> {
    /// Weights on the CPU.
    pub fn root(store: &'a WeightStore) -> Vb<'a> {
        Vb::root_on(store, &Device::Cpu)
    }

    /// Weights uploaded to `device` as they are loaded (fp16/bf16 on a GPU).
    pub fn root_on(store: &'a WeightStore, device: &Device) -> Vb<'a> {
        Vb {
            store,
            prefix: String::new(),
            device: device.clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Vb {
            store: self.store,
            prefix,
            device: self.device.clone(),
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn store(&self) -> &'a WeightStore {
        self.store
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.full(name))
    }

    /// A tensor of `shape`, on this builder's device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.device.put(self.store.get(&self.full(name), shape)?))
    }

    /// A [out, in] linear layer; 1×1 convolution weights ([out, in, 1, 1]) are accepted too, as old
    /// checkpoints store some projections that way.
    pub fn linear(&self, inp: usize, out: usize, bias: bool) -> Result<LinearW> {
        Ok(self.put_linear(self.linear_host(inp, out, bias)?))
    }

    /// `linear`, kept on the host so the model can fold something into it before `put_linear`.
    pub fn linear_host(&self, inp: usize, out: usize, bias: bool) -> Result<LinearW> {
        let weight = self
            .store
            .get_one_of(&self.full("weight"), &[&[out, inp], &[out, inp, 1, 1]])?
            .reshape(vec![out, inp]);
        let bias = if bias {
            Some(self.store.get(&self.full("bias"), &[out])?)
        } else {
            None
        };
        Ok(LinearW { weight, bias })
    }

    /// A host linear layer moved to this builder's device.
    pub fn put_linear(&self, l: LinearW) -> LinearW {
        LinearW {
            weight: self.device.put(l.weight),
            bias: l.bias.map(|b| self.device.put(b)),
        }
    }

    /// A square-kernel convolution with bias; a linear weight is accepted for 1×1 kernels (SD2's
    /// linear projections are loaded through `linear`, this covers the converse).
    pub fn conv2d(
        &self,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Conv2dW> {
        self.conv2d_bias(inp, out, k, stride, pad, true)
    }

    /// `conv2d` with the bias optional (CLIP's patch embedding has none).
    pub fn conv2d_bias(
        &self,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Conv2dW> {
        let alt: &[usize] = if k == 1 {
            &[out, inp]
        } else {
            &[out, inp, k, k]
        };
        let w = self
            .store
            .get_one_of(&self.full("weight"), &[&[out, inp, k, k], alt])?
            .reshape(vec![out, inp, k, k]);
        let b = if bias {
            Some(self.get("bias", &[out])?)
        } else {
            None
        };
        let mut c = if self.store.is_shapes_only() {
            Conv2dW::unread(out, inp, k, b, stride, pad, !self.device.is_cpu())
        } else if self.device.is_cpu() {
            Conv2dW::from_oihw(&w, b, stride, pad)
        } else {
            Conv2dW::krsc_from_oihw(&w, b, stride, pad)
        };
        c.weight = self.device.put(c.weight);
        Ok(c)
    }
}
