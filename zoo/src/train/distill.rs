//! Knowledge distillation: a trained teacher's logits guide the student.
//!
//! Two losses, on the student's and the teacher's logits of the same (augmented) batch:
//! - [`KdLoss::Hinton`] (Hinton, Vinyals and Dean, 2015): `(1 - w) CE(labels, s) +
//!   w T² KL(softmax(t / T) ‖ softmax(s / T))`, the soft-target loss Larq Zoo's QuickNet recipe
//!   distils with;
//! - [`KdLoss::Distributional`] (ReActNet): the cross-entropy of the student's distribution
//!   against the teacher's, `-Σ softmax(t) log softmax(s)`, with no label term.
//!
//! The teacher runs in inference mode, once per batch, and no gradient reaches it.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use candle_nn::ops::log_softmax;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{cross_entropy, RunWeights};
use crate::{Error, Model, ModelConfig};

/// How a run distils from a teacher (stored in the run's configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distillation {
    /// The teacher: a run directory, a weights file of a zoo run, a hub repo directory or a
    /// hub name (local paths are stored absolute).
    pub teacher: String,
    /// SHA-256 of the teacher's weights file; a resumed run refuses another teacher.
    pub teacher_sha256: String,
    /// The loss.
    pub loss: KdLoss,
}

/// A distillation loss.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KdLoss {
    /// `(1 - weight) CE(labels, s) + weight T² KL(softmax(t/T) ‖ softmax(s/T))`.
    Hinton {
        /// The softmax temperature `T` (> 0).
        temperature: f64,
        /// The weight `w` of the soft term, in [0, 1].
        weight: f64,
    },
    /// ReActNet's `-Σ softmax(t) log softmax(s)`, averaged over the batch.
    Distributional,
}

/// The temperature of Hinton's loss unless `--kd-temperature` says otherwise.
pub const DEFAULT_TEMPERATURE: f64 = 4.0;

/// The weight of Hinton's soft term unless `--kd-weight` says otherwise.
pub const DEFAULT_WEIGHT: f64 = 0.5;

impl KdLoss {
    /// Checks the parameters.
    pub fn check(&self) -> Result<(), String> {
        if let KdLoss::Hinton {
            temperature,
            weight,
        } = *self
        {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(format!(
                    "--kd-temperature: expected a positive number, found {temperature}"
                ));
            }
            if !(0.0..=1.0).contains(&weight) {
                return Err(format!(
                    "--kd-weight: expected a number in [0, 1], found {weight}"
                ));
            }
        }
        Ok(())
    }

    /// The loss of `student` logits (`N x K`) against the `teacher`'s and the `labels` (`N`,
    /// u32); `label_smoothing` applies to Hinton's label term.
    pub fn loss(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        labels: &Tensor,
        label_smoothing: f64,
    ) -> candle_core::Result<Tensor> {
        match *self {
            KdLoss::Hinton {
                temperature,
                weight,
            } => {
                let soft = (kl_divergence(&(student / temperature)?, &(teacher / temperature)?)?
                    * (temperature * temperature))?;
                let hard = cross_entropy(student, labels, label_smoothing)?;
                (hard * (1.0 - weight))? + (soft * weight)?
            }
            KdLoss::Distributional => soft_cross_entropy(student, teacher),
        }
    }
}

impl std::fmt::Display for KdLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KdLoss::Hinton {
                temperature,
                weight,
            } => write!(
                f,
                "Hinton's loss, temperature {temperature}, weight {weight}"
            ),
            KdLoss::Distributional => write!(f, "the distributional loss"),
        }
    }
}

/// `KL(softmax(t) ‖ softmax(s))` per row, averaged over rows.
pub fn kl_divergence(student: &Tensor, teacher: &Tensor) -> candle_core::Result<Tensor> {
    let log_t = log_softmax(teacher, D::Minus1)?;
    let log_s = log_softmax(student, D::Minus1)?;
    (log_t.exp()? * (log_t - log_s)?)?
        .sum(D::Minus1)?
        .mean_all()
}

/// `-Σ softmax(t) log softmax(s)` per row, averaged over rows.
pub fn soft_cross_entropy(student: &Tensor, teacher: &Tensor) -> candle_core::Result<Tensor> {
    let p_t = candle_nn::ops::softmax(teacher, D::Minus1)?;
    (p_t * log_softmax(student, D::Minus1)?)?
        .sum(D::Minus1)?
        .mean_all()?
        .neg()
}

/// A trained model that gives soft targets: loaded once, run in inference mode.
pub struct Teacher {
    model: Box<dyn Model>,
    /// The teacher's architecture: a registered name or a spec file.
    pub architecture: String,
    /// The weights file read.
    pub weights: PathBuf,
    /// SHA-256 (hex) of the weights file.
    pub sha256: String,
}

impl Teacher {
    /// Loads `source` onto `device`: a zoo run directory, a weights file written by
    /// `zoo train`, a hub repo directory (`zoo pull`) or a hub name (`org/repo`,
    /// `quicknet-lab.fmnist`).
    pub fn open(source: &str, device: &Device) -> Result<Teacher, Error> {
        let path = Path::new(source);
        let is_repo_dir = path.join(crate::hub::repo::SPEC).is_file();
        let (model, architecture, weights) = if path.exists() && !is_repo_dir {
            let run = RunWeights::open(path)?.to_device(device)?;
            let config = run.config.as_ref().ok_or_else(|| Error::Run {
                path: run.path.display().to_string(),
                message: "a weights file without a zoo run configuration: pass the teacher's \
                          run directory, a hub repo directory or a hub name"
                    .into(),
            })?;
            (
                run.build_for(&config.model, &config.model_config()?)?,
                config.model.clone(),
                run.path.clone(),
            )
        } else {
            let loaded = crate::hub::Hub::from_env()
                .device(device.clone())
                .load(source)?;
            let architecture = loaded.repo.config.architecture.clone();
            (
                loaded.model,
                architecture,
                loaded.repo.dir.join(crate::hub::repo::WEIGHTS),
            )
        };
        let bytes = std::fs::read(&weights).map_err(|e| Error::Run {
            path: weights.display().to_string(),
            message: format!("cannot read the teacher's weights: {e}"),
        })?;
        Ok(Teacher {
            model,
            architecture,
            sha256: super::hex(&Sha256::digest(&bytes)),
            weights,
        })
    }

    /// Checks that the teacher takes the student's images and classes.
    pub fn check_fits(&self, student: &ModelConfig) -> Result<(), Error> {
        let own = self.model.config();
        if own != student {
            return Err(Error::Train(format!(
                "the teacher `{}` ({}) takes {} images of {} classes, the student {} images of {} classes",
                self.architecture,
                self.weights.display(),
                own.input,
                own.classes,
                student.input,
                student.classes
            )));
        }
        Ok(())
    }

    /// The teacher's logits of `images`, in inference mode and outside the gradient graph.
    pub fn logits(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.model.forward(images, false)?.detach())
    }
}

/// `source` as stored in a run: local paths made absolute, hub names as given.
pub fn stored_source(source: &str) -> String {
    std::fs::canonicalize(source).map_or_else(|_| source.to_string(), |p| p.display().to_string())
}
