//! Memory-mapped safetensors files: tensor lookup, dtype upcast to f32, and checks.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::files::write_atomic;

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
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: StorageDtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// A safetensors file, memory-mapped; tensors are read on demand.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

/// What a header that safetensors cannot read says about the file, in words.
fn header_problem(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::InvalidHeaderLength | E::MetadataIncompleteBuffer => format!(
            "truncated, or not safetensors: its {file_len} bytes do not end where the header \
             or the data it declares ends ({e:?})"
        ),
        E::HeaderTooLarge
        | E::InvalidHeaderStart
        | E::InvalidHeader
        | E::InvalidHeaderDeserialization => format!(
            "not safetensors: it does not start with an 8-byte header length and a JSON header \
             ({e:?}); a PyTorch checkpoint (.pt) converts with tools/convert_pt.py"
        ),
        E::InvalidOffset(name) => {
            format!("tensor `{name}` does not start where the tensor before it ends")
        }
        E::TensorInvalidInfo | E::ValidationOverflow => {
            format!("a tensor's byte range does not hold its shape and dtype ({e:?})")
        }
        _ => format!("{e:?}"),
    }
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (offsets, sizes, dtypes).
    pub fn open(path: &Path) -> Result<Self> {
        // Opening a FIFO would block; a directory would fail with an obscure mmap error.
        let kind = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !kind.is_file() {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                reason: format!(
                    "it is {}",
                    if kind.is_dir() {
                        "a directory"
                    } else {
                        "not a regular file"
                    }
                ),
            });
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; a concurrent truncation by another process is the
        // usual mmap caveat and is outside what we can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, meta) =
            SafeTensors::read_metadata(&map).map_err(|e| bad(header_problem(&e, map.len())))?;
        // read_metadata has checked that the tensors' byte ranges follow one another, hold
        // their shapes and end where the file does.
        let data_start = 8 + header_len;
        let mut entries = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => StorageDtype::F32,
                Dtype::F16 => StorageDtype::F16,
                Dtype::BF16 => StorageDtype::BF16,
                Dtype::I64 => StorageDtype::I64,
                other => {
                    return Err(Error::UnsupportedDtype {
                        path: path.to_path_buf(),
                        name,
                        dtype: format!("{other:?}"),
                        expected: "F32, F16, BF16 (or I64 for labels and timesteps)",
                    })
                }
            };
            let (a, b) = info.data_offsets;
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + a,
                    end: data_start + b,
                },
            );
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            entries,
            metadata,
        })
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

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor(format!("{name}` in `{}", self.path.display())))
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

/// Writes f32 / i64 tensors to `path` atomically (a temporary file beside it, then rename).
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
}
