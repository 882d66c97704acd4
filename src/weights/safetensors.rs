//! The safetensors format, read through a memory map and written atomically.
//!
//! Reading converts one tensor at a time to f32 and then tells the kernel it may drop the mapped
//! pages, so a checkpoint is never resident twice (mapped file + converted weights).

use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
    Bool,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U8 | Dtype::Bool => 1,
        }
    }
    /// The dtype as safetensors headers spell it.
    pub fn file_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            Dtype::F64 => "f64",
            Dtype::I64 => "i64",
            Dtype::I32 => "i32",
            Dtype::U8 => "u8",
            Dtype::Bool => "bool",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the memory map (header already accounted for).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            crate::input::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // Safety: the file is mapped read-only; modifying a checkpoint while it is loaded is outside
        // what this engine supports (as for every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let tensors = parse_header(&mmap)
            .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The tensor's stored bytes.
    pub fn bytes(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensors.get(name)?;
        Some((info, &self.mmap[info.start..info.end]))
    }

    /// The tensor converted to f32. The mapped pages are released afterwards.
    pub fn read_f32(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor named `{name}`", self.path.display()))?;
        let bytes = &self.mmap[info.start..info.end];
        let data = to_f32(bytes, info.dtype).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{name}` has dtype {}, which cannot be converted to f32",
                self.path.display(),
                info.dtype.name()
            )
        })?;
        // Safety: DONTNEED on a read-only file mapping only drops clean pages; they are re-read from
        // the file if touched again.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                info.start,
                info.end - info.start,
            );
        }
        Ok(Tensor::new(info.shape.clone(), data))
    }
}

/// The header's `__metadata__` string map (empty when absent).
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let mut f =
        crate::input::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: shorter than a safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{}: header length {n} exceeds the file size {size}",
            path.display()
        );
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)?;
    let v: serde_json::Value = serde_json::from_slice(&h)
        .with_context(|| format!("{}: header is not JSON", path.display()))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

fn parse_header(buf: &[u8]) -> Result<BTreeMap<String, TensorInfo>> {
    if buf.len() < 8 {
        bail!(
            "file is {} bytes, shorter than the 8-byte header length (truncated?)",
            buf.len()
        );
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > (buf.len() as u64 - 8) || n > 100 << 20 {
        bail!(
            "header length {n} exceeds the file size {} (truncated or not safetensors)",
            buf.len()
        );
    }
    let n = n as usize;
    let header: Entries =
        serde_json::from_slice(&buf[8..8 + n]).context("header is not a JSON object")?;
    let header = header.0;
    let data_len = buf.len() - 8 - n;
    let mut out = BTreeMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let info = parse_entry(&name, &v, n, data_len)?;
        out.insert(name, info);
    }
    check_tiling(&out, n, buf.len())?;
    Ok(out)
}

/// One header entry; `n` is the header length, `data_len` the size of the data section.
fn parse_entry(name: &str, v: &serde_json::Value, n: usize, data_len: usize) -> Result<TensorInfo> {
    let dtype_s = v
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| anyhow!("tensor `{name}`: missing dtype"))?;
    let dtype = Dtype::parse(dtype_s)
        .ok_or_else(|| anyhow!("tensor `{name}`: unsupported dtype {dtype_s}"))?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .ok_or_else(|| anyhow!("tensor `{name}`: missing or invalid shape"))?;
    let offs: Vec<usize> = v
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .ok_or_else(|| anyhow!("tensor `{name}`: missing data_offsets"))?;
    if offs.len() != 2 || offs[0] > offs[1] {
        bail!("tensor `{name}`: invalid data_offsets {offs:?}");
    }
    if offs[1] > data_len {
        bail!("tensor `{name}` needs bytes {}..{} of the data section but the file holds only {data_len} (truncated)", offs[0], offs[1]);
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow!("tensor `{name}`: shape {shape:?} overflows the element count"))?;
    if bytes != offs[1] - offs[0] {
        bail!(
            "tensor `{name}`: shape {shape:?} of {} does not fit its {} bytes",
            dtype.name(),
            offs[1] - offs[0]
        );
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start: 8 + n + offs[0],
        end: 8 + n + offs[1],
    })
}

/// The data section is the tensors back to back: an overlap would alias two tensors, a gap
/// hides bytes (the safetensors format forbids both). `n` is the header length, `file_len` the
/// size of the whole file.
fn check_tiling(tensors: &BTreeMap<String, TensorInfo>, n: usize, file_len: usize) -> Result<()> {
    let mut spans: Vec<(usize, usize, &str)> = tensors
        .iter()
        .map(|(k, i)| (i.start, i.end, k.as_str()))
        .collect();
    spans.sort();
    let mut at = 8 + n;
    for (start, end, name) in spans {
        if start != at {
            bail!(
                "tensor `{name}` starts at byte {} of the data section, expected {} ({})",
                start - 8 - n,
                at - 8 - n,
                if start < at {
                    "it overlaps the previous tensor"
                } else {
                    "a gap before it"
                }
            );
        }
        at = end;
    }
    if at != file_len {
        bail!(
            "{} bytes after the last tensor are not covered by the header",
            file_len - at
        );
    }
    Ok(())
}

/// The header's entries, refusing a name that appears twice (JSON parsers keep the last one
/// silently; two readers could then disagree on the tensor).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "`{k}` appears twice in the header"
                        )));
                    }
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    use half::{bf16, f16};
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        Dtype::U8 | Dtype::Bool => bytes.iter().map(|b| *b as f32).collect(),
    };
    Some(out)
}

/// Every tensor of a (small) safetensors file, as f32.
pub fn read_all(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = SafetensorsFile::open(path)?;
    f.tensors
        .keys()
        .map(|k| Ok((k.clone(), f.read_f32(k)?)))
        .collect()
}

/// One tensor to write: name, dtype, shape and its little-endian bytes.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Writes f32 tensors to `path` through a temporary file and a rename, so a failure never leaves a
/// half-written file behind.
pub fn write_f32(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, t)| RawTensor {
            name: name.clone(),
            dtype: Dtype::F32,
            shape: t.shape().to_vec(),
            bytes: t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    write_raw(path, &raw)
}

/// Writes tensors of any dtype, sorted by name, through a temporary file and a rename.
pub fn write_raw(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut sorted: Vec<&RawTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for t in &sorted {
        let len = t.bytes.len();
        if len != t.shape.iter().product::<usize>() * t.dtype.size() {
            bail!(
                "{}: tensor `{}` has {len} bytes for shape {:?}",
                path.display(),
                t.name,
                t.shape
            );
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.file_name(), "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    crate::atomic_file::write_with(path, |f| {
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for t in &sorted {
            f.write_all(&t.bytes)?;
        }
        Ok(())
    })
    .with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `bytes` to `path` atomically (`atomic_file`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic_file::write(path, bytes)
}
