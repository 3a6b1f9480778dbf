//! Atomic, durable file writes: nothing is ever left half-written under the final name, and a
//! file once written survives a crash or power loss.
//!
//! A file is written into a temporary file beside it, `.NAME.PID.tmp`, flushed to disk and
//! renamed into place; the folder is then flushed so that the rename lasts too. A writer killed
//! mid-write leaves at most such a temporary file, which [`remove_stale_temporaries`] clears.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::Error;

/// Writes a file through `write` into a temporary file beside `path`, flushes it to disk,
/// renames it into place and flushes the folder. On any error before the rename the temporary
/// file is removed and `path` is untouched. Errors name `path` and say why.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), Error> {
    let write_error = |message: String| Error::Write {
        path: path.display().to_string(),
        message,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_error("the path does not name a file".into()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp)
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("cannot flush it to disk: {e}"))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()))
        .map_err(write_error);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir).map_err(|e| {
        write_error(format!(
            "written, but its folder `{}` cannot be flushed to disk: {e}",
            dir.display()
        ))
    })
}

/// Flushes a folder's entries (a rename into it) to disk. Filesystems that cannot flush a
/// folder say so with `EINVAL`, which is not an error here.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Whether `name` is that of a temporary file of [`write_atomically`]: `.NAME.PID.tmp`.
pub fn is_temporary(name: &str) -> bool {
    let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    matches!(inner.rsplit_once('.'), Some((file, pid))
        if !file.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether the process `pid` is another one that is still running (and might be writing).
#[cfg(unix)]
fn another_live_process(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing, it only asks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn another_live_process(_pid: u32) -> bool {
    false
}

/// Removes the temporary files of [`write_atomically`] in `dir` (not below it) that writers
/// killed mid-write left behind, those of processes still running excepted. Returns what was
/// removed; nothing else in `dir` is touched.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_temporary(&name) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let pid = name
            .strip_suffix(".tmp")
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if pid.is_some_and(another_live_process) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Writes bytes atomically (see [`write_atomically`]).
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_atomically(path, |tmp| {
        std::fs::File::create(tmp)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| e.to_string())
    })
}

/// Writes named tensors, with optional string metadata, as a safetensors file atomically.
/// A name given twice is an error.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<(), Error> {
    let mut map: HashMap<&str, &Tensor> = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if map.insert(name.as_str(), tensor).is_some() {
            return Err(Error::Write {
                path: path.display().to_string(),
                message: format!("the tensor `{name}` is given twice"),
            });
        }
    }
    // Serialised in memory and written by `write_atomically`: `safetensors::serialize_to_file`
    // would go through a temporary file of its own, which a killed process leaves behind.
    let bytes = safetensors::serialize(map, metadata).map_err(|e| Error::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_bytes_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names() {
        assert!(is_temporary(".step-000000010.safetensors.1234.tmp"));
        assert!(is_temporary(".model.safetensors.7.tmp"));
        for name in [
            "step-000000010.safetensors",
            ".model.safetensors.tmp",
            ".1234.tmp",
            "model.safetensors.1234.tmp",
            ".model.safetensors.12a4.tmp",
            ".tmpAbC123",
        ] {
            assert!(!is_temporary(name), "{name}");
        }
    }
}
