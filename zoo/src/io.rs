//! Atomic file writes: nothing is ever left half-written under the final name.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::Error;

/// Writes a file through `write` into a temporary file beside `path`, flushes it to disk and
/// renames it into place. On any error the temporary file is removed and `path` is untouched.
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
                .map_err(|e| e.to_string())
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()))
        .map_err(write_error);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(map, metadata, tmp).map_err(|e| e.to_string())
    })
}
