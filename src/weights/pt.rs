//! PyTorch checkpoints (`torch.save`, the zip format of torch >= 1.6) read without Python: the
//! pickle in `data.pkl` is interpreted for the few operations a state_dict needs (ordered
//! dicts, tensors rebuilt over storages, the common `state_dict` / `model` / `ema` wrappers) and
//! nothing else: any other callable or opcode is refused by name, so no code in the file runs.
//! Each tensor becomes a byte range of the memory-mapped file, as a safetensors tensor does
//! (torch stores the storages uncompressed).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use super::{Entry, StorageDtype};
use crate::error::{Error, Result};

/// The bytes a zip file starts with.
pub(super) const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// What the pickle machine holds.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A dict or an OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// One of the allowed callables or storage types, by name.
    Global(&'static str),
    /// A storage: its dtype and its file in the archive (`data/<key>`).
    Storage {
        dtype: StorageDtype,
        key: String,
    },
    Tensor(Tensor),
    Mark,
}

#[derive(Clone, Debug)]
struct Tensor {
    dtype: StorageDtype,
    key: String,
    /// In elements.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The globals a state_dict pickle may name.
const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
];

fn storage_dtype(global: &str) -> Option<StorageDtype> {
    match global {
        "torch.FloatStorage" => Some(StorageDtype::F32),
        "torch.HalfStorage" => Some(StorageDtype::F16),
        "torch.BFloat16Storage" => Some(StorageDtype::BF16),
        "torch.LongStorage" => Some(StorageDtype::I64),
        _ => None,
    }
}

/// Runs the pickle `data` with only the operations above; returns the object it builds.
fn unpickle(data: &[u8]) -> std::result::Result<Value, String> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: BTreeMap<u64, Value> = BTreeMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let bytes = data
            .get(*at..at.saturating_add(n))
            .ok_or("the pickle ends in the middle of an operation")?;
        *at += n;
        Ok(bytes)
    };
    let uint = |b: &[u8]| b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x));
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or("the pickle pops an empty stack");
    // The items above the topmost mark, which is removed.
    let pop_mark = |stack: &mut Vec<Value>| -> std::result::Result<Vec<Value>, String> {
        let mark = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("the pickle has no mark to pop to")?;
        let items = stack.split_off(mark + 1);
        stack.pop();
        Ok(items)
    };
    let int = |v: &Value| match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("negative size {i}")),
        other => Err(format!("expected an integer, got {other:?}")),
    };
    let ints = |v: &Value| match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(int).collect(),
        other => Err(format!("expected a tuple of integers, got {other:?}")),
    };
    loop {
        let op = take(&mut at, 1)?[0];
        match op {
            0x80 => {
                take(&mut at, 1)?; // PROTO
            }
            0x95 => {
                take(&mut at, 8)?; // FRAME
            }
            b'.' => return pop(&mut stack).map_err(str::to_string),
            b'(' => stack.push(Value::Mark),
            b'c' => {
                let line = |at: &mut usize| -> std::result::Result<String, String> {
                    let rest = &data[*at..];
                    let end = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("an unterminated GLOBAL")?;
                    *at += end + 1;
                    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
                };
                let module = line(&mut at)?;
                let name = line(&mut at)?;
                let full = format!("{module}.{name}");
                let global = ALLOWED.iter().find(|g| **g == full).ok_or_else(|| {
                    format!(
                        "it calls `{full}`, which a state_dict does not: only tensors, storages \
                         and dicts are read, and no code in the file runs"
                    )
                })?;
                stack.push(Value::Global(global));
            }
            b'q' => {
                let k = uint(take(&mut at, 1)?);
                memo.insert(k, stack.last().ok_or("BINPUT on an empty stack")?.clone());
            }
            b'r' => {
                let k = uint(take(&mut at, 4)?);
                memo.insert(
                    k,
                    stack.last().ok_or("LONG_BINPUT on an empty stack")?.clone(),
                );
            }
            0x94 => {
                let k = memo.len() as u64;
                memo.insert(k, stack.last().ok_or("MEMOIZE on an empty stack")?.clone());
            }
            b'h' | b'j' => {
                let k = uint(take(&mut at, if op == b'h' { 1 } else { 4 })?);
                stack.push(memo.get(&k).ok_or(format!("memo {k} is unset"))?.clone());
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("a TUPLE of more items than the stack holds".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                match stack.last_mut() {
                    Some(Value::List(list)) => list.extend(items),
                    _ => return Err("APPEND to something not a list".into()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    vec![pop(&mut stack)?, v]
                } else {
                    pop_mark(&mut stack)?
                };
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with a key and no value".into());
                }
                let Some(Value::Dict(dict)) = stack.last_mut() else {
                    return Err("SETITEM on something not a dict".into());
                };
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    dict.push((k, v));
                }
            }
            b'X' | 0x8c | 0x8d => {
                let width = match op {
                    b'X' => 4,
                    0x8c => 1,
                    _ => 8,
                };
                let n = usize::try_from(uint(take(&mut at, width)?))
                    .map_err(|_| "a string longer than memory")?;
                let s = std::str::from_utf8(take(&mut at, n)?)
                    .map_err(|_| "a string that is not UTF-8")?;
                stack.push(Value::Str(s.to_string()));
            }
            b'J' => {
                let b = take(&mut at, 4)?;
                stack.push(Value::Int(i64::from(i32::from_le_bytes([
                    b[0], b[1], b[2], b[3],
                ]))));
            }
            b'K' => stack.push(Value::Int(i64::from(take(&mut at, 1)?[0]))),
            b'M' => stack.push(Value::Int(uint(take(&mut at, 2)?) as i64)),
            0x8a => {
                let n = usize::from(take(&mut at, 1)?[0]);
                if n > 8 {
                    return Err(format!("an integer of {n} bytes"));
                }
                let b = take(&mut at, n)?;
                // Little-endian two's complement, sign-extended from its top byte.
                let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut full = [fill; 8];
                full[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(full)));
            }
            b'N' => stack.push(Value::None),
            0x88 | 0x89 => stack.push(Value::Bool),
            b'G' => {
                take(&mut at, 8)?;
                stack.push(Value::Float);
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let storage = match &pid {
                    Value::Tuple(items) => match &items[..] {
                        [Value::Str(kind), Value::Global(g), Value::Str(key), _, _]
                            if kind == "storage" =>
                        {
                            storage_dtype(g).map(|dtype| Value::Storage {
                                dtype,
                                key: key.clone(),
                            })
                        }
                        _ => None,
                    },
                    _ => None,
                };
                stack.push(storage.ok_or(format!("an unknown persistent id {pid:?}"))?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                let Value::Tuple(args) = args else {
                    return Err(format!("REDUCE with arguments {args:?}"));
                };
                let made = match (callable, &args[..]) {
                    (Value::Global("collections.OrderedDict"), []) => Value::Dict(Vec::new()),
                    (
                        Value::Global("torch._utils._rebuild_tensor_v2"),
                        [Value::Storage { dtype, key }, offset, shape, stride, ..],
                    ) => Value::Tensor(Tensor {
                        dtype: *dtype,
                        key: key.clone(),
                        offset: int(offset)?,
                        shape: ints(shape)?,
                        stride: ints(stride)?,
                    }),
                    (Value::Global("torch._utils._rebuild_parameter"), [Value::Tensor(t), ..]) => {
                        Value::Tensor(t.clone())
                    }
                    (callable, args) => {
                        return Err(format!("it calls {callable:?} with {args:?}"));
                    }
                };
                stack.push(made);
            }
            b'b' => {
                // BUILD: a state_dict's `_metadata` (module versions) set on its OrderedDict.
                let _state = pop(&mut stack)?;
                if !matches!(stack.last(), Some(Value::Dict(_))) {
                    return Err("BUILD on something not a dict".into());
                }
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {}, which a state_dict does not use",
                    at - 1
                ))
            }
        }
    }
}

/// The tensors of the checkpoint: the dict itself, or the dict under `state_dict`, `model` or
/// `ema` (the first present), with a `module.` prefix common to every name dropped.
fn state_dict(top: Value) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let Value::Dict(items) = top else {
        return Err("the checkpoint holds no dict of tensors".into());
    };
    let wrapped = ["state_dict", "model", "ema"].iter().find_map(|key| {
        items.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(inner)) if k == key => Some(inner.clone()),
            _ => None,
        })
    });
    let items = wrapped.unwrap_or(items);
    let mut tensors = Vec::new();
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(format!("a key {k:?} that is not a string"));
        };
        match v {
            Value::Tensor(t) => tensors.push((name, t)),
            other => {
                return Err(format!(
                    "`{name}` holds {other:?}, not a tensor (a state_dict maps names to tensors)"
                ))
            }
        }
    }
    let all_prefixed = !tensors.is_empty() && tensors.iter().all(|(n, _)| n.starts_with("module."));
    if all_prefixed {
        for (name, _) in &mut tensors {
            name.drain(.."module.".len());
        }
    }
    Ok(tensors)
}

/// The tensors of the zip checkpoint `bytes` (at `path`), as byte ranges of `bytes`.
pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Entry>> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| bad(format!("not a whole zip file ({e}): truncated or damaged")))?;
    // Every name is `<archive>/...`; the archive's folder name is the saved file's stem.
    let mut files: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut pickle = None;
    for i in 0..zip.len() {
        let file = zip
            .by_index_raw(i)
            .map_err(|e| bad(format!("zip entry {i}: {e}")))?;
        let name = file
            .name()
            .map_err(|e| bad(format!("zip entry {i}: {e}")))?
            .into_owned();
        let start = file
            .data_start()
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| bad(format!("{name}: no data offset")))?;
        let len = usize::try_from(file.size()).map_err(|_| bad(format!("{name}: too large")))?;
        if file.compression() != zip::CompressionMethod::Stored {
            return Err(bad(format!(
                "{name} is compressed ({}); torch.save stores its files uncompressed",
                file.compression()
            )));
        }
        if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
            return Err(bad(format!(
                "{name} runs past the end of the file: truncated"
            )));
        }
        let Some((_, inner)) = name.split_once('/') else {
            continue;
        };
        match inner {
            "data.pkl" => pickle = Some((start, len)),
            "byteorder" if &bytes[start..start + len] != b"little" => {
                return Err(bad("its tensors are big-endian".into()))
            }
            _ => {
                if let Some(key) = inner.strip_prefix("data/") {
                    files.insert(key.to_string(), (start, len));
                }
            }
        }
    }
    let (start, len) =
        pickle.ok_or_else(|| bad("no data.pkl in the zip: not a torch.save checkpoint".into()))?;
    let top = unpickle(&bytes[start..start + len]).map_err(&bad)?;
    let mut entries = BTreeMap::new();
    for (name, t) in state_dict(top).map_err(&bad)? {
        let size = t.dtype.size();
        let (file_start, file_len) = *files
            .get(&t.key)
            .ok_or_else(|| bad(format!("`{name}`: its storage data/{} is missing", t.key)))?;
        // Row-major and dense (a dimension of size 1 may have any stride).
        let mut want = 1usize;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != want {
                return Err(bad(format!(
                    "`{name}` is not contiguous (shape {:?}, strides {:?}): save it after \
                     .contiguous(), or convert with tools/convert_pt.py",
                    t.shape, t.stride
                )));
            }
            want = want.saturating_mul(d);
        }
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let range = numel
            .and_then(|n| n.checked_add(t.offset))
            .and_then(|n| n.checked_mul(size));
        if t.shape.len() != t.stride.len() || range.is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "`{name}` (shape {:?} at element {}) runs past the end of its storage of {} \
                 bytes",
                t.shape, t.offset, file_len
            )));
        }
        let begin = file_start + t.offset * size;
        let end = file_start + range.unwrap_or_default();
        entries.insert(
            name,
            Entry {
                dtype: t.dtype,
                shape: t.shape,
                start: begin,
                end,
            },
        );
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pickle of `{"w": 1}` built through `os.system` instead: refused by name.
    #[test]
    fn only_the_allowed_callables_run() {
        let evil = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let err = unpickle(evil).unwrap_err();
        assert!(err.contains("it calls `os.system`"), "{err}");
        let err = unpickle(b"\x80\x02\x93.").unwrap_err();
        assert!(err.contains("pickle opcode 0x93"), "{err}");
        let err = unpickle(b"\x80\x02X\x05\x00\x00\x00ab").unwrap_err();
        assert!(err.contains("ends in the middle"), "{err}");
    }

    #[test]
    fn long_integers_are_sign_extended() {
        // LONG1 of -2 (0xfe) and of 300 (0x2c 0x01), in a tuple.
        let v = unpickle(b"\x80\x02\x8a\x01\xfe\x8a\x02\x2c\x01\x86.").unwrap();
        assert!(
            matches!(&v, Value::Tuple(t) if matches!(t[..], [Value::Int(-2), Value::Int(300)])),
            "{v:?}"
        );
    }
}
