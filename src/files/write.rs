//! Writing files so that a reader never sees half of one.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to a temporary file beside `path`, then renames it into place, so a reader
/// never sees a half-written file and a failure leaves nothing behind. Only a regular file is
/// ever replaced: a device, FIFO, socket or directory at `path` is an error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("`{}` is not a file path", path.display())))?;
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::Input(format!(
            "{}: is not a regular file (a directory, device, FIFO or socket); only a regular \
             file is replaced",
            path.display()
        )));
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
