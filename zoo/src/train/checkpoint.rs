//! Checkpoints: the model's tensors, the optimizer's state and where training stands, in one
//! safetensors file written atomically.
//!
//! Tensor names: `model.<name>` for the model (batch-norm moving statistics included),
//! `adam.m.<name>` / `adam.v.<name>` for the optimizer moments. Metadata: `zoo.format`,
//! `zoo.config` (the run's [`RunConfig`] as JSON) and `zoo.progress` ([`Progress`] as JSON).
//! Every random draw of a run derives from its seed, the epoch and the position in the epoch
//! (see [`crate::data::shuffled_order`]), so the step count and seed are the whole RNG state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::RunConfig;
use crate::Error;

/// The format tag stored in every checkpoint.
pub const FORMAT: &str = "zoo-checkpoint-1";

/// Where a run stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch the next step belongs to (0-based).
    pub epoch: u64,
    /// Sum of the training losses of the current epoch's steps so far.
    pub epoch_loss_sum: f64,
    /// Correctly classified training images of the current epoch so far.
    pub epoch_correct: u64,
    /// Training images of the current epoch so far.
    pub epoch_images: u64,
    /// Steps of the current epoch so far.
    pub epoch_steps: u64,
    /// Best validation top-1 so far, and after which epoch (1-based).
    pub best: Option<(f64, u64)>,
    /// Samples that could not be decoded, over the whole run.
    pub skipped: u64,
}

/// A checkpoint read back.
pub struct Checkpoint {
    /// The run's configuration.
    pub config: RunConfig,
    /// Where the run stood.
    pub progress: Progress,
    /// The model's tensors by name.
    pub model: HashMap<String, Tensor>,
    /// The optimizer's first and second moments by tensor name.
    pub moments: HashMap<String, (Tensor, Tensor)>,
}

/// The checkpoint file of `step` in `dir`.
pub fn path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:09}.safetensors"))
}

/// The checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
            Some((step.parse().ok()?, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Writes a checkpoint atomically, then deletes all but the newest `keep` in its folder.
pub fn save(
    dir: &Path,
    config: &RunConfig,
    progress: &Progress,
    model: &[(String, Tensor)],
    moments: &[(String, Tensor, Tensor)],
    keep: usize,
) -> Result<PathBuf, Error> {
    let file = path(dir, progress.step);
    let mut tensors: Vec<(String, Tensor)> = model
        .iter()
        .map(|(name, t)| (format!("model.{name}"), t.clone()))
        .collect();
    for (name, m, v) in moments {
        tensors.push((format!("adam.m.{name}"), m.clone()));
        tensors.push((format!("adam.v.{name}"), v.clone()));
    }
    crate::io::save_safetensors(&tensors, Some(metadata(config, progress)), &file)?;
    let all = list(dir);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_file(old);
    }
    Ok(file)
}

/// The metadata stored with checkpoints and weights files of a run.
pub fn metadata(config: &RunConfig, progress: &Progress) -> HashMap<String, String> {
    HashMap::from([
        ("zoo.format".to_string(), FORMAT.to_string()),
        (
            "zoo.config".to_string(),
            serde_json::to_string(config).expect("a run config serialises"),
        ),
        (
            "zoo.progress".to_string(),
            serde_json::to_string(progress).expect("progress serialises"),
        ),
    ])
}

/// Reads a checkpoint written by [`save`].
pub fn load(file: &Path) -> Result<Checkpoint, Error> {
    let fail = |message: String| Error::Run {
        path: file.display().to_string(),
        message,
    };
    let bytes = std::fs::read(file).map_err(|e| fail(format!("cannot read: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("zoo.format").map(String::as_str) != Some(FORMAT) {
        return Err(fail(format!(
            "not a zoo checkpoint (expected metadata zoo.format = {FORMAT})"
        )));
    }
    let field = |key: &str| {
        meta.get(key)
            .ok_or_else(|| fail(format!("the metadata lacks `{key}`")))
    };
    let config: RunConfig = serde_json::from_str(field("zoo.config")?)
        .map_err(|e| fail(format!("bad `zoo.config`: {e}")))?;
    config
        .check()
        .map_err(|e| fail(format!("bad `zoo.config`: {e}")))?;
    let progress: Progress = serde_json::from_str(field("zoo.progress")?)
        .map_err(|e| fail(format!("bad `zoo.progress`: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| fail(e.to_string()))?;
    let mut model = HashMap::new();
    let mut firsts = HashMap::new();
    let mut seconds = HashMap::new();
    for (name, tensor) in tensors {
        if let Some(n) = name.strip_prefix("model.") {
            model.insert(n.to_string(), tensor);
        } else if let Some(n) = name.strip_prefix("adam.m.") {
            firsts.insert(n.to_string(), tensor);
        } else if let Some(n) = name.strip_prefix("adam.v.") {
            seconds.insert(n.to_string(), tensor);
        } else {
            return Err(fail(format!("unexpected tensor `{name}`")));
        }
    }
    let mut moments = HashMap::new();
    for (name, m) in firsts {
        let v = seconds
            .remove(&name)
            .ok_or_else(|| fail(format!("`adam.m.{name}` has no `adam.v.{name}`")))?;
        moments.insert(name, (m, v));
    }
    if let Some(name) = seconds.keys().next() {
        return Err(fail(format!("`adam.v.{name}` has no `adam.m.{name}`")));
    }
    Ok(Checkpoint {
        config,
        progress,
        model,
        moments,
    })
}
