//! The `--out` folder of `mcdm sample`, written as a unit. A lock file keeps a second run out
//! (the lock dies with its process, so a killed run's lock is never in the way); images are
//! written to a staging folder inside `--out` as their batches finish; at the end they replace
//! the earlier run's files and `record.json` is written last. At every moment the folder holds
//! either the earlier run untouched, or this run's record beside exactly the images it lists:
//! its `status` says `complete`, `partial` (stopped by a signal) or `writing` (killed while the
//! images were being moved in).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use mcdm::files::write_atomic;
use mcdm::image::write_png;

use super::output::image_number;

const LOCK: &str = ".mcdm.lock";
const STAGING: &str = ".mcdm-staging-";
pub(crate) const RECORD: &str = "record.json";
pub(crate) const GRID: &str = "grid.png";

/// `NNNNNN.png`: image k's file name.
pub(crate) fn image_name(k: usize) -> String {
    format!("{k:06}.png")
}

pub(crate) struct RunFolder {
    out: PathBuf,
    staging: PathBuf,
    lock_path: PathBuf,
    /// Held, not read: the lock lasts as long as the file is open.
    _lock: File,
    /// Whether the earlier run's files that this run does not make are gone (done by the first
    /// publish: the lock keeps any other run from adding more).
    earlier_removed: std::cell::Cell<bool>,
}

impl RunFolder {
    /// Takes the lock of `out` (an existing folder), clears what killed runs left, and makes
    /// this run's staging folder.
    pub fn open(out: &Path) -> Result<Self> {
        let lock_path = out.join(LOCK);
        let lock = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
                .with_context(|| {
                    format!("--out: creating the lock file {}", lock_path.display())
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                    let pid = holder.trim();
                    bail!(
                        "--out {}: another mcdm run{} is writing there; wait for it to end or \
                         choose another folder",
                        out.display(),
                        if pid.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {pid})")
                        }
                    );
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e)
                        .with_context(|| format!("--out: locking {}", lock_path.display()))
                }
            }
            // The run that held the lock removes the file as it ends: a lock taken on a file
            // that is no longer at the path keeps nobody out, so take the one there now.
            if super::super::same_file_as_open(&file, &lock_path) {
                break file;
            }
        };
        lock.set_len(0)
            .and_then(|()| writeln!(&lock, "{}", std::process::id()))
            .with_context(|| format!("--out: writing {}", lock_path.display()))?;
        clear_leftovers(out)?;
        let staging = out.join(format!("{STAGING}{}", std::process::id()));
        std::fs::create_dir(&staging)
            .with_context(|| format!("--out: creating {}", staging.display()))?;
        Ok(RunFolder {
            out: out.to_path_buf(),
            staging,
            lock_path,
            _lock: lock,
            earlier_removed: std::cell::Cell::new(false),
        })
    }

    /// Writes image k (8-bit RGB) to the staging folder.
    pub fn stage_image(&self, k: usize, rgb: &[u8], h: usize, w: usize) -> Result<()> {
        Ok(write_png(&self.staging.join(image_name(k)), rgb, h, w)?)
    }

    /// Stages image k as the file `from` (a finished image of another folder): linked where the
    /// file system allows, else copied.
    pub fn stage_file(&self, k: usize, from: &Path) -> Result<()> {
        let to = self.staging.join(image_name(k));
        std::fs::hard_link(from, &to)
            .or_else(|_| std::fs::copy(from, &to).map(|_| ()))
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))
    }

    /// Writes the grid to the staging folder.
    pub fn stage_grid(&self, rgb: &[u8], h: usize, w: usize) -> Result<()> {
        Ok(write_png(&self.staging.join(GRID), rgb, h, w)?)
    }

    /// Replaces the earlier run's files with the staged `images` and grid, then writes `record`
    /// (its `status` set to `status`) last. Returns how many numbered images of an earlier run
    /// were removed.
    pub fn commit(
        self,
        images: std::ops::Range<usize>,
        record: &mut serde_json::Value,
        status: &str,
    ) -> Result<usize> {
        self.publish(images, record, status, true)
    }

    /// [`RunFolder::commit`] of the images finished so far, while the run goes on: the folder
    /// then holds them with a `partial` record, so that a run killed (even by SIGKILL) keeps
    /// every batch it published, for `--resume`. Images of `images` not staged are already in
    /// the folder (published before, or kept by `--resume`); without `grid`, an earlier grid
    /// goes, as it shows other images.
    pub fn publish(
        &self,
        images: std::ops::Range<usize>,
        record: &mut serde_json::Value,
        status: &str,
        grid: bool,
    ) -> Result<usize> {
        let record_path = self.out.join(RECORD);
        let write_record = |record: &serde_json::Value| -> Result<()> {
            Ok(write_atomic(
                &record_path,
                serde_json::to_string_pretty(record)?.as_bytes(),
            )?)
        };
        // From here until the last record, the folder says it is being written.
        record["status"] = "writing".into();
        write_record(record)?;
        let mut removed = 0;
        if !self.earlier_removed.get() {
            for name in entries(&self.out)? {
                if image_number(&name).is_some_and(|k| !images.contains(&k)) {
                    let path = self.out.join(&name);
                    std::fs::remove_file(&path).with_context(|| {
                        format!("removing {} of an earlier run", path.display())
                    })?;
                    removed += 1;
                }
            }
            if !grid {
                match std::fs::remove_file(self.out.join(GRID)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).context("removing the grid of an earlier run")
                    }
                    _ => {}
                }
            }
            self.earlier_removed.set(true);
        }
        // Only what is staged moves: the images published before are in place already.
        for name in entries(&self.staging)? {
            let ours = image_number(&name).is_some_and(|k| images.contains(&k));
            if ours || (grid && name == GRID) {
                let (from, to) = (self.staging.join(&name), self.out.join(&name));
                std::fs::rename(&from, &to)
                    .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
            }
        }
        record["status"] = status.into();
        write_record(record)?;
        Ok(removed)
    }
}

impl Drop for RunFolder {
    /// The staging folder goes (what it still holds was not committed), then the lock file,
    /// removed before it is unlocked so that no run takes a lock on a file about to vanish.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.staging);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// The names in `dir`.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let read = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    Ok(read
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect())
}

/// Removes what runs killed before they could clean up left in `out` (the lock is held, so no
/// live run owns them): staging folders, and the temporary files of atomic writes whose process
/// is gone.
fn clear_leftovers(out: &Path) -> Result<()> {
    for name in entries(out)? {
        let path = out.join(&name);
        let removed = if name.starts_with(STAGING) {
            std::fs::remove_dir_all(&path)
        } else if temporary_of_dead_process(&name) {
            std::fs::remove_file(&path)
        } else {
            continue;
        };
        removed.with_context(|| {
            format!(
                "--out: removing {}, left by a run that was killed",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// `.NAME.tmpPID` (see `write_atomic`) of a process that no longer runs.
fn temporary_of_dead_process(name: &str) -> bool {
    let Some(pid) = name
        .strip_prefix('.')
        .and_then(|rest| rest.rsplit_once(".tmp"))
        .and_then(|(_, pid)| pid.parse::<libc::pid_t>().ok())
        .filter(|&pid| pid > 0)
    else {
        return false;
    };
    // SAFETY: signal 0 only asks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}
