//! Memory-mapped weights files: safetensors, and PyTorch checkpoints read as safetensors are
//! (`pt`): tensor lookup, dtype upcast to f32, and checks.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Dtype;

use crate::error::{Error, Result};
use crate::files::{open_limited, write_atomic, StrictJson, SAFETENSORS_LIMIT};

mod pt;

/// Storage type of a tensor in a weights file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
    I64,
}

impl StorageDtype {
    pub fn name(self) -> &'static str {
        match self {
            StorageDtype::F32 => "f32",
            StorageDtype::F16 => "f16",
            StorageDtype::BF16 => "bf16",
            StorageDtype::I64 => "i64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
            StorageDtype::I64 => 8,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: StorageDtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// A tensor of a [`SafetensorsFile::derived`] file: its name, the source tensors it joins, and
/// its shape.
pub type Derived = (String, Vec<String>, Vec<usize>);

/// A safetensors file, memory-mapped; tensors are read on demand.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
    /// The file as opened, with its length and modification time then, to tell whether it has
    /// changed since (None for a file made in memory).
    opened: Option<(File, Stamp)>,
    /// For a file derived from another ([`SafetensorsFile::derived`]): that file's hash.
    source_hash: Option<String>,
}

/// A file's length and modification time.
type Stamp = (u64, Option<std::time::SystemTime>);

fn stamp(file: &File) -> std::io::Result<Stamp> {
    let meta = file.metadata()?;
    Ok((meta.len(), meta.modified().ok()))
}

/// The largest header the safetensors format allows.
const MAX_HEADER: u64 = 100_000_000;

/// The dtypes of the safetensors format (those mcdm does not read are refused by name).
const SAFETENSORS_DTYPES: &[&str] = &[
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "I16", "U16",
    "F16", "BF16", "I32", "U32", "F32", "F64", "C64", "I64", "U64",
];

/// A header's top-level entries; a name given twice is an error (serde_json, and so the
/// safetensors crate, keep the last one silently), and so is a key given twice within a value.
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                use serde::de::Error as _;
                let mut entries: Vec<(String, serde_json::Value)> = Vec::new();
                let mut names = std::collections::BTreeSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !names.insert(name.clone()) {
                        return Err(A::Error::custom(format!(
                            "tensor `{name}` is given twice in the header"
                        )));
                    }
                    let StrictJson(value) = map.next_value()?;
                    entries.push((name, value));
                }
                Ok(HeaderEntries(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// A non-negative integer of a header (a size or an offset).
fn header_usize(v: &serde_json::Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// The tensors and metadata of the safetensors file `bytes` (at `path`), each entry checked:
/// its dtype, its shape, and byte ranges that tile the data after the header to the file's end.
fn parse_header(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Entry>, BTreeMap<String, String>)> {
    let bad = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let len = bytes.len();
    let truncated = |why: String| {
        bad(format!(
            "truncated, or not safetensors: its {len} bytes do not end where the header or the \
             data it declares ends ({why})"
        ))
    };
    let not_safetensors = |why: String| {
        bad(format!(
            "not safetensors: it does not start with an 8-byte header length and a JSON header \
             ({why}); a PyTorch checkpoint (.pt) converts with tools/convert_pt.py"
        ))
    };
    let Some(head) = bytes.get(..8) else {
        return Err(truncated("no 8-byte header length".into()));
    };
    let header_len = u64::from_le_bytes(head.try_into().unwrap_or_default());
    if header_len > MAX_HEADER {
        return Err(not_safetensors(format!(
            "its first 8 bytes give a header of {header_len} bytes, more than the \
             {MAX_HEADER} safetensors allows"
        )));
    }
    let data_start = 8 + header_len as usize;
    let Some(header) = bytes.get(8..data_start) else {
        return Err(truncated(format!("a header of {header_len} bytes")));
    };
    if header.first() != Some(&b'{') {
        return Err(not_safetensors("the header is not a JSON object".into()));
    }
    let text = std::str::from_utf8(header)
        .map_err(|e| not_safetensors(format!("the header is not UTF-8: {e}")))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = serde::Deserialize::deserialize(&mut de).and_then(|h| de.end().map(|()| h));
    let HeaderEntries(header) = parsed.map_err(|e| match e.classify() {
        // A data error is a well-formed header that breaks a rule (a name given twice).
        serde_json::error::Category::Data => bad(format!("{e}")),
        _ => not_safetensors(format!("the header is not valid JSON: {e}")),
    })?;

    let data_len = len - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors: Vec<(String, Entry)> = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            let items = match &value {
                serde_json::Value::Null => continue,
                serde_json::Value::Object(items) => items,
                other => {
                    return Err(bad(format!(
                        "`__metadata__` must be an object, got {other}"
                    )))
                }
            };
            for (key, v) in items {
                let text = v.as_str().ok_or_else(|| {
                    bad(format!(
                        "`__metadata__` values must be strings, but `{key}` is {v} (a config \
                         is stored as JSON text)"
                    ))
                })?;
                metadata.insert(key.clone(), text.to_string());
            }
            continue;
        }
        let field = |key: &str| {
            value.get(key).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has no `{key}`: expected {{\"dtype\", \"shape\", \
                 \"data_offsets\"}}, got {value}"
                ))
            })
        };
        let dtype_value = field("dtype")?;
        let dtype = match dtype_value.as_str() {
            Some("F32") => StorageDtype::F32,
            Some("F16") => StorageDtype::F16,
            Some("BF16") => StorageDtype::BF16,
            Some("I64") => StorageDtype::I64,
            Some(known) if SAFETENSORS_DTYPES.contains(&known) => {
                return Err(Error::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: known.to_string(),
                    expected: "F32, F16, BF16 (or I64 for labels and timesteps)",
                })
            }
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` has unknown dtype {dtype_value} (safetensors dtypes: {}; \
                     mcdm reads F32, F16, BF16 and I64)",
                    SAFETENSORS_DTYPES.join(", ")
                )))
            }
        };
        let shape_value = field("shape")?;
        let shape: Vec<usize> = shape_value
            .as_array()
            .and_then(|dims| dims.iter().map(header_usize).collect())
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has shape {shape_value}: a shape is a list of sizes \
                     (non-negative integers)"
                ))
            })?;
        let offsets_value = field("data_offsets")?;
        let offsets: Option<Vec<usize>> = offsets_value
            .as_array()
            .and_then(|o| o.iter().map(header_usize).collect());
        let (begin, end) = match offsets.as_deref() {
            Some(&[begin, end]) if begin <= end => (begin, end),
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` has data_offsets {offsets_value}: expected [begin, end], \
                     byte offsets into the data (non-negative integers, begin <= end)"
                )))
            }
        };
        let size = dtype.size();
        let bytes_needed = shape.iter().try_fold(size, |p: usize, &d| p.checked_mul(d));
        if bytes_needed != Some(end - begin) {
            return Err(bad(format!(
                "tensor `{name}`: its byte range [{begin}, {end}] ({} bytes) does not hold its \
                 shape {shape:?} of {} ({})",
                end - begin,
                dtype.name().to_uppercase(),
                bytes_needed.map_or("more bytes than a file holds".into(), |b| format!(
                    "{b} bytes"
                ))
            )));
        }
        tensors.push((
            name,
            Entry {
                dtype,
                shape,
                start: begin,
                end,
            },
        ));
    }
    // The byte ranges tile the data: each starts where the one before ends.
    tensors.sort_by_key(|(_, e)| (e.start, e.end));
    let mut at = 0;
    for (name, e) in &tensors {
        if e.end > data_len {
            return Err(truncated(format!(
                "tensor `{name}` ends at byte {} of the data, which holds {data_len}",
                e.end
            )));
        }
        if e.start != at {
            return Err(bad(format!(
                "tensor `{name}` does not start where the tensor before it ends (it starts at \
                 byte {} of the data, the one before ends at {at})",
                e.start
            )));
        }
        at = e.end;
    }
    if at != data_len {
        return Err(truncated(format!(
            "the tensors end at byte {at} of the data, which holds {data_len}"
        )));
    }
    let entries = tensors
        .into_iter()
        .map(|(name, e)| {
            let entry = Entry {
                start: data_start + e.start,
                end: data_start + e.end,
                ..e
            };
            (name, entry)
        })
        .collect();
    Ok((entries, metadata))
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (offsets, sizes, dtypes). The file must be a
    /// regular file within [`SAFETENSORS_LIMIT`].
    pub fn open(path: &Path) -> Result<Self> {
        let (file, _) = open_limited(path, SAFETENSORS_LIMIT, "safetensors file")?;
        let opened = stamp(&file).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; a concurrent change by another process is the usual
        // mmap caveat: `sha256` tells when one happened while the file was in use.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (entries, metadata) = if map.starts_with(pt::ZIP_MAGIC) {
            (pt::parse(path, &map)?, BTreeMap::new())
        } else if map.starts_with(b"\x80\x02\x8a") {
            // What torch.save wrote before 1.6: a pickled magic number, then the tensors.
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "it is in the legacy format of torch < 1.6: convert it with \
                         tools/convert_pt.py (or re-save it with a newer torch)"
                    .into(),
            });
        } else {
            parse_header(path, &map)?
        };
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            entries,
            metadata,
            opened: Some((file, opened)),
            source_hash: None,
        })
    }

    /// The SHA-256 of the file's bytes as mapped, in hex. An error when the file's length or
    /// modification time is no longer what it was when opened: what was read from the file
    /// may then differ from what was hashed. Call it once the tensors needed are read.
    pub fn sha256(&self) -> Result<String> {
        use sha2::Digest;
        if let Some(hash) = &self.source_hash {
            return Ok(hash.clone());
        }
        let digest = sha2::Sha256::digest(&self.map[..]);
        if let Some((file, then)) = &self.opened {
            let now = stamp(file).map_err(|e| Error::io(&self.path, e))?;
            if now != *then {
                return Err(Error::io(
                    &self.path,
                    std::io::Error::other(
                        "the file changed while it was being loaded (its length or \
                         modification time differs from when it was opened): load it again \
                         once it is written",
                    ),
                ));
            }
        }
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A file with no tensors, standing for a model made in memory (random weights for
    /// benchmarks); `label` names it in messages.
    pub fn empty(label: &str) -> Result<Self> {
        let map = memmap2::MmapMut::map_anon(1)
            .and_then(|m| m.make_read_only())
            .map_err(|e| Error::io(label, e))?;
        Ok(SafetensorsFile {
            path: PathBuf::from(label),
            map,
            entries: BTreeMap::new(),
            metadata: BTreeMap::new(),
            opened: None,
            source_hash: None,
        })
    }

    /// A file made in memory from this one's tensors: each `(name, parts, shape)` of `layout`
    /// is the concatenation of the tensors `parts` (one dtype, together `shape`'s size), given
    /// `shape`. Its path is `label`; its hash is this file's, checked as [`Self::sha256`] does.
    pub fn derived(
        &self,
        label: &Path,
        layout: &[(String, Vec<String>, Vec<usize>)],
    ) -> Result<Self> {
        let mut entries = BTreeMap::new();
        let mut total = 0usize;
        for (name, parts, shape) in layout {
            let dtypes: Vec<StorageDtype> = parts
                .iter()
                .map(|p| self.entry(p).map(|e| e.dtype))
                .collect::<Result<_>>()?;
            let dtype = dtypes[0];
            if dtypes.iter().any(|&d| d != dtype) {
                return Err(Error::Input(format!(
                    "{}: {} have different dtypes, so `{name}` cannot be made of them",
                    self.path.display(),
                    parts.join(", ")
                )));
            }
            let bytes: usize = parts
                .iter()
                .map(|p| self.entries[p].end - self.entries[p].start)
                .sum();
            let want = shape.iter().product::<usize>() * dtype.size();
            if bytes != want {
                return Err(Error::Input(format!(
                    "{}: {} hold {bytes} bytes, but `{name}` {shape:?} needs {want}",
                    self.path.display(),
                    parts.join(", ")
                )));
            }
            entries.insert(
                name.clone(),
                Entry {
                    dtype,
                    shape: shape.clone(),
                    start: total,
                    end: total + bytes,
                },
            );
            total += bytes;
        }
        let mut map = memmap2::MmapMut::map_anon(total.max(1)).map_err(|e| Error::io(label, e))?;
        let mut at = 0;
        for (_, parts, _) in layout {
            for p in parts {
                let e = &self.entries[p];
                map[at..at + e.end - e.start].copy_from_slice(&self.map[e.start..e.end]);
                at += e.end - e.start;
            }
        }
        // After the copy: an error if the source changed since it was opened.
        let source_hash = self.sha256()?;
        Ok(SafetensorsFile {
            path: label.to_path_buf(),
            map: map.make_read_only().map_err(|e| Error::io(label, e))?,
            entries,
            metadata: BTreeMap::new(),
            opened: None,
            source_hash: Some(source_hash),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shapes of all tensors by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.shape.clone()))
            .collect()
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    pub fn dtype(&self, name: &str) -> Result<StorageDtype> {
        Ok(self.entry(name)?.dtype)
    }

    /// Total bytes of tensor data per storage dtype.
    pub fn bytes_by_dtype(&self) -> BTreeMap<StorageDtype, usize> {
        let mut out = BTreeMap::new();
        for e in self.entries.values() {
            *out.entry(e.dtype).or_default() += e.end - e.start;
        }
        out
    }

    /// The tensor names, the first few of a long list, to say what a file holds.
    pub fn names_for_message(&self) -> String {
        const SHOWN: usize = 8;
        let names: Vec<String> = self
            .entries
            .keys()
            .take(SHOWN)
            .map(|n| format!("`{n}`"))
            .collect();
        match self.entries.len() {
            0 => "no tensors".into(),
            n if n > SHOWN => format!("{n} tensors: {}, ...", names.join(", ")),
            _ => names.join(", "),
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            present: self.names_for_message(),
        })
    }

    /// A float tensor upcast to f32. Non-finite values are an error naming the tensor.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bytes = &self.map[e.start..e.end];
        let values: Vec<f32> = match e.dtype {
            StorageDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StorageDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StorageDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StorageDtype::I64 => {
                return Err(Error::UnsupportedDtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype: "I64".into(),
                    expected: "F32, F16 or BF16",
                })
            }
        };
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::NonFinite {
                path: self.path.clone(),
                name: name.to_string(),
                count: bad,
            });
        }
        Ok(values)
    }

    /// An integer tensor (i64 storage), e.g. class labels or integer timesteps.
    pub fn i64(&self, name: &str) -> Result<Vec<i64>> {
        let e = self.entry(name)?;
        if e.dtype != StorageDtype::I64 {
            return Err(Error::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: e.dtype.name().to_uppercase(),
                expected: "I64 (integers)",
            });
        }
        Ok(self.map[e.start..e.end]
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect())
    }
}

/// Writes f32 / f16 / bf16 / i64 tensors to `path` atomically (a temporary file beside it, then
/// rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, TensorData<'_>)],
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    let mut names = std::collections::BTreeSet::new();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            if !names.insert(*name) {
                return Err(Error::Input(format!("tensor `{name}` is given twice")));
            }
            let (dtype, bytes, shape, len) = match t {
                TensorData::F32(shape, v) => (Dtype::F32, bytemuck::cast_slice(v), shape, v.len()),
                TensorData::F16(shape, v) => (Dtype::F16, bytemuck::cast_slice(v), shape, v.len()),
                TensorData::BF16(shape, v) => {
                    (Dtype::BF16, bytemuck::cast_slice(v), shape, v.len())
                }
                TensorData::I64(shape, v) => (Dtype::I64, bytemuck::cast_slice(v), shape, v.len()),
            };
            // Checked here: safetensors multiplies the shape with wrapping arithmetic.
            let count = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d));
            if count != Some(len) {
                return Err(Error::Input(format!(
                    "tensor `{name}`: shape {shape:?} does not hold its {len} values"
                )));
            }
            TensorView::new(dtype, shape.clone(), bytes)
                .map(|view| (name.to_string(), view))
                .map_err(|e| Error::Input(format!("tensor `{name}`: {e:?}")))
        })
        .collect::<Result<_>>()?;
    let meta = metadata.map(|m| m.into_iter().collect());
    let bytes = safetensors::serialize(views, &meta).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("{e:?}"),
    })?;
    write_atomic(path, &bytes)
}

/// Tensor contents for [`write_safetensors`].
pub enum TensorData<'a> {
    F32(Vec<usize>, &'a [f32]),
    F16(Vec<usize>, &'a [f16]),
    BF16(Vec<usize>, &'a [bf16]),
    I64(Vec<usize>, &'a [i64]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{serialize, TensorView};

    /// `tensors` serialised by the safetensors crate into a temporary file, opened.
    fn written(tensors: &[(&str, TensorView<'_>)]) -> (tempfile::TempDir, SafetensorsFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, serialize(tensors.to_vec(), &None).unwrap()).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        (dir, file)
    }

    /// A tensor with no elements is valid safetensors: it opens and reads as empty.
    #[test]
    fn empty_tensors_are_read() {
        let values: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let tensors = [
            (
                "empty",
                TensorView::new(Dtype::F32, vec![0, 3], &[]).unwrap(),
            ),
            (
                "two",
                TensorView::new(Dtype::F32, vec![2], &values).unwrap(),
            ),
        ];
        let (_dir, file) = written(&tensors);
        assert_eq!(file.shape("empty").unwrap(), [0, 3]);
        assert!(file.f32("empty").unwrap().is_empty());
        assert_eq!(file.f32("two").unwrap(), [1.5, -2.0]);
    }

    /// Reading a tensor as the wrong kind names the dtype it holds.
    #[test]
    fn wrong_kind_reads_name_the_stored_dtype() {
        let halves: Vec<u8> = [0.5f32, -3.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let labels: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            ("h", TensorView::new(Dtype::F16, vec![2], &halves).unwrap()),
            (
                "b",
                TensorView::new(Dtype::BF16, vec![1], &halves[..2]).unwrap(),
            ),
            (
                "labels",
                TensorView::new(Dtype::I64, vec![2], &labels).unwrap(),
            ),
        ];
        let (_dir, file) = written(&tensors);
        assert_eq!(file.f32("h").unwrap(), [0.5, -3.0]);
        assert_eq!(file.i64("labels").unwrap(), [7, -1]);
        for (name, stored) in [("h", "F16"), ("b", "BF16")] {
            let err = file.i64(name).unwrap_err().to_string();
            assert!(err.contains(&format!("dtype {stored}")), "{err}");
        }
        let err = file.f32("labels").unwrap_err().to_string();
        assert!(err.contains("dtype I64"), "{err}");
        let names: Vec<_> = [StorageDtype::F32, StorageDtype::BF16, StorageDtype::I64]
            .map(StorageDtype::name)
            .into();
        assert_eq!(names, ["f32", "bf16", "i64"]);
    }

    /// A file of `header` (JSON) and `data_len` bytes of data, opened: the error, or "ok".
    fn open_header(header: &str, data_len: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        std::fs::write(&path, bytes).unwrap();
        SafetensorsFile::open(&path).map_or_else(|e| e.to_string(), |_| "ok".into())
    }

    /// Each way a header can break the format has its own message; none of them is taken for
    /// a file that is not safetensors at all.
    #[test]
    fn bad_headers_are_named_precisely() {
        let a = r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
        assert_eq!(open_header(&format!("{{{a}}}"), 8), "ok");
        for (header, data_len, needle) in [
            (
                format!(r#"{{{a},"b":{{"dtype":"F32","shape":[1],"data_offsets":[8,12]}},{a}}}"#),
                12,
                "tensor `a` is given twice in the header",
            ),
            (
                r#"{"a":{"dtype":"F32","dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#.into(),
                8,
                "key `dtype` is given twice",
            ),
            (
                r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#.into(),
                8,
                "tensor `a` has unknown dtype \"Q7\" (safetensors dtypes: BOOL",
            ),
            (
                r#"{"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}"#.into(),
                8,
                "tensor `a` has unknown dtype 7",
            ),
            (
                r#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#.into(),
                8,
                "tensor `a` has dtype F64, expected F32, F16, BF16",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#.into(),
                8,
                "tensor `a` has shape [-2]: a shape is a list of sizes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}"#.into(),
                8,
                "tensor `a` has shape [2.5]",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}"#.into(),
                8,
                "tensor `a` has data_offsets [-8,0]: expected [begin, end]",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#.into(),
                8,
                "tensor `a` has data_offsets [8,0]",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#.into(),
                8,
                "tensor `a` has data_offsets [0]",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}}"#.into(),
                8,
                "its byte range [0, 80] (80 bytes) does not hold its shape [2] of F32 (8 bytes)",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.into(),
                4,
                "tensor `a` ends at byte 8 of the data, which holds 4",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}}"#
                    .into(),
                8,
                "(more bytes than a file holds)",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2]}}"#.into(),
                8,
                "tensor `a` has no `data_offsets`",
            ),
            (
                r#"{"__metadata__":{"config":{"image_size":64}}}"#.into(),
                0,
                "`__metadata__` values must be strings, but `config` is {\"image_size\":64}",
            ),
            (
                r#"{"__metadata__":[1]}"#.into(),
                0,
                "`__metadata__` must be an object, got [1]",
            ),
        ] {
            let err = open_header(&header, data_len);
            assert!(err.contains(needle), "{header}: {err}");
            assert!(!err.contains("convert_pt"), "{header}: {err}");
        }
        for (header, needle) in [
            ("[1, 2]", "the header is not a JSON object"),
            ("{\"a\": 1", "the header is not valid JSON"),
            ("{} {}", "the header is not valid JSON"),
        ] {
            let err = open_header(header, 0);
            assert!(err.contains(needle), "{header}: {err}");
            assert!(err.contains("convert_pt"), "{header}: {err}");
        }
    }

    /// The hash is of the file's bytes; a file rewritten after it was opened is refused.
    #[test]
    fn a_file_changed_after_opening_is_refused_when_hashed() {
        use sha2::Digest;
        let values: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [("v", TensorView::new(Dtype::F32, vec![2], &values).unwrap())];
        let (dir, file) = written(&tensors);
        let path = dir.path().join("t.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let want: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(file.sha256().unwrap(), want);
        // Appended to in place: the length changes under the map.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"  ").unwrap();
        let err = file.sha256().unwrap_err().to_string();
        assert!(err.contains("changed while it was being loaded"), "{err}");
    }
}
