//! Reading input files: regular files only, below a size limit checked before any byte is read,
//! so that a FIFO cannot hang a run nor `/dev/zero` exhaust the machine's memory; and JSON
//! read with a key given twice refused.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use serde_json::Value;

use crate::error::{human_bytes, Error, Result};

/// Environment variable that replaces every input size limit, in MiB.
pub const LIMIT_ENV: &str = "MCDM_MAX_INPUT_MB";

/// Generous limits, far past any real input of each kind, by default.
pub const JSON_LIMIT: u64 = 64 << 20;
pub const TEXT_LIMIT: u64 = 256 << 20;
pub const PNG_LIMIT: u64 = 512 << 20;
/// Safetensors files are mapped, not read whole: the limit only stops a mistaken path.
pub const SAFETENSORS_LIMIT: u64 = 256 << 30;

/// What a file that is not a regular file is, in words.
fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

fn refuse(path: &Path, kind: std::io::ErrorKind, message: String) -> Error {
    Error::io(path, std::io::Error::new(kind, message))
}

fn check_regular(path: &Path, meta: &Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    Err(refuse(
        path,
        std::io::ErrorKind::InvalidInput,
        format!(
            "not a regular file: it is {}; mcdm reads its inputs from regular files only",
            kind(meta)
        ),
    ))
}

/// The limit for files of a kind whose default is `default` bytes: `$MCDM_MAX_INPUT_MB` MiB
/// when set.
pub fn input_limit(default: u64) -> Result<u64> {
    match std::env::var_os(LIMIT_ENV) {
        None => Ok(default),
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&mb| mb > 0)
            .and_then(|mb| mb.checked_mul(1 << 20))
            .ok_or_else(|| {
                Error::Input(format!(
                    "{LIMIT_ENV}={}: expected a positive number of MiB",
                    v.to_string_lossy()
                ))
            }),
    }
}

/// Opens `path` for reading if it is a regular file of at most `limit` bytes (see
/// [`input_limit`]); `what` names the file in the message of one too large. Returns the file
/// and its length.
pub fn open_limited(path: &Path, limit: u64, what: &str) -> Result<(File, u64)> {
    open_below(path, input_limit(limit)?, what)
}

/// [`open_limited`] with the limit resolved.
fn open_below(path: &Path, limit: u64, what: &str) -> Result<(File, u64)> {
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    check_regular(
        path,
        &std::fs::metadata(path).map_err(|e| Error::io(path, e))?,
    )?;
    // The path may have been replaced since: O_NONBLOCK keeps a FIFO from blocking the open,
    // and the handle's own metadata is checked again.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    check_regular(path, &meta)?;
    let len = meta.len();
    if len > limit {
        return Err(refuse(
            path,
            std::io::ErrorKind::InvalidData,
            format!(
                "the {what} is {}, more than the {} mcdm reads (set {LIMIT_ENV} to raise the \
                 limit)",
                human_bytes(len as usize),
                human_bytes(limit as usize)
            ),
        ));
    }
    Ok((file, len))
}

/// The bytes of `path`, a regular file of at most `limit` bytes (see [`open_limited`]).
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let limit = input_limit(limit)?;
    let (file, len) = open_below(path, limit, what)?;
    let mut bytes = Vec::with_capacity(len as usize);
    // A file that grew since it was measured is read no further than the limit allows.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(refuse(
            path,
            std::io::ErrorKind::InvalidData,
            format!("the {what} grew past the size limit while it was read"),
        ));
    }
    Ok(bytes)
}

/// The text of `path`, UTF-8, a regular file of at most `limit` bytes (see [`open_limited`]).
pub fn read_string_limited(path: &Path, limit: u64, what: &str) -> Result<String> {
    String::from_utf8(read_limited(path, limit, what)?).map_err(|e| {
        refuse(
            path,
            std::io::ErrorKind::InvalidData,
            format!("the {what} is not UTF-8 text: {}", e.utf8_error()),
        )
    })
}

/// A JSON value deserialised with a key given twice in one object refused (serde_json keeps
/// the last one silently), as a `serde_json` data error, not a syntax error.
pub struct StrictJson(pub Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = StrictJson;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_unit<E>(self) -> std::result::Result<StrictJson, E> {
        Ok(StrictJson(Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<StrictJson, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(StrictJson(Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<StrictJson, A::Error> {
        use serde::de::Error as _;
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(A::Error::custom(format!("key `{key}` is given twice")));
            }
            let StrictJson(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(StrictJson(Value::Object(object)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO and a device are refused without blocking; a symlink to a file is read; a file
    /// past the limit is refused naming both sizes.
    #[test]
    fn only_regular_files_below_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let err = read_limited(path, JSON_LIMIT, "job file")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("not a regular file: it is {kind}")),
                "{err}"
            );
            assert!(err.starts_with(&path.display().to_string()), "{err}");
        }
        let file = dir.path().join("f.json");
        std::fs::write(&file, "{}").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(
            read_string_limited(&link, JSON_LIMIT, "job file").unwrap(),
            "{}"
        );
        let err = read_limited(&file, 1, "job file").unwrap_err().to_string();
        assert!(
            err.contains("the job file is 2 B, more than the 1 B mcdm reads"),
            "{err}"
        );
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        let err = read_string_limited(&file, JSON_LIMIT, "job file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("the job file is not UTF-8 text"), "{err}");
    }
}
