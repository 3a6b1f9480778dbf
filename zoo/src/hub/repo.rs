//! The zoo's repository layout, shared by hub repos, snapshots in the cache and local
//! directories:
//!
//! | file | what |
//! |---|---|
//! | `model.safetensors` | the latent (trainable) weights and batch-norm statistics, zoo names |
//! | `spec.yaml` | the architecture |
//! | `config.json` | [`RepoConfig`]: input, classes, class names, normalisation, recipe, metrics |
//! | `model.zoo` | the packed inference model (`zoo export`) |
//! | `README.md` | the model card |
//!
//! A repo needs `config.json`, `spec.yaml` and at least one of the two weight files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::engine::ZooModel;
use crate::spec::InputShape;
use crate::train::{RunConfig, TrainingTime};
use crate::{Error, Model, ModelConfig, Spec};

/// The latent weights.
pub const WEIGHTS: &str = "model.safetensors";
/// The architecture.
pub const SPEC: &str = "spec.yaml";
/// The [`RepoConfig`].
pub const CONFIG: &str = "config.json";
/// The packed inference model.
pub const PACKED: &str = "model.zoo";
/// The model card.
pub const CARD: &str = "README.md";

/// `config.json`: what a user needs to feed the model and read its output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// The architecture's name (the spec's `name`, a registered name for shipped specs).
    pub architecture: String,
    /// Input `HxWxC`, images in NCHW order.
    pub input: String,
    /// Number of classes.
    pub classes: usize,
    /// Class names, index = class, when known.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// How images are turned into the model's input.
    pub preprocessing: Preprocessing,
    /// The training data (`fashion-mnist`, `imagenet-1k`, a folder's name).
    pub dataset: String,
    /// The run's configuration, for weights trained by `zoo train`.
    #[serde(default)]
    pub recipe: Option<RunConfig>,
    /// Accuracy of these weights, when measured.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// How long the run's training steps took, for weights of a `zoo train` run directory.
    #[serde(default)]
    pub training: Option<TrainingTime>,
    /// Where the weights come from, when not trained by the zoo (a URL).
    #[serde(default)]
    pub source: Option<String>,
    /// The zoo version that wrote the repo.
    pub zoo_version: String,
}

/// Input normalisation: `(pixel / 255 - mean[c]) / std[c]` per channel, after `resize`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// How an image is sized to the input, in words.
    pub resize: String,
    /// Per-channel mean of pixels scaled to 0..1.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixels scaled to 0..1.
    pub std: Vec<f32>,
}

impl Preprocessing {
    /// What the zoo's loaders do for `data` (`zoo train --data`).
    pub fn of_dataset(data: &str) -> Preprocessing {
        use crate::data::{fashion_mnist, folder};
        if crate::train::is_fashion_mnist(data) {
            Preprocessing {
                resize: "grayscale, resized to 28x28 and placed in the middle of the input on \
                         the background value (Fashion-MNIST's test transform)"
                    .into(),
                mean: vec![fashion_mnist::MEAN],
                std: vec![fashion_mnist::STD],
            }
        } else {
            Preprocessing {
                resize: "RGB, shorter side resized to input/0.875, centre crop (ImageNet's \
                         evaluation transform)"
                    .into(),
                mean: folder::IMAGENET_MEAN.to_vec(),
                std: folder::IMAGENET_STD.to_vec(),
            }
        }
    }
}

/// Accuracy on a held-out split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Top-1 accuracy, %.
    pub top1: f64,
    /// Top-5 accuracy, %.
    pub top5: f64,
    /// Which split (`test`, `validation`).
    pub split: String,
    /// Images evaluated, when known.
    #[serde(default)]
    pub images: Option<u64>,
    /// Who measured it, when not the zoo.
    #[serde(default)]
    pub measured_by: Option<String>,
}

impl RepoConfig {
    /// The input shape and class count.
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        Ok(ModelConfig {
            input: self.input.parse::<InputShape>()?,
            classes: self.classes,
        })
    }

    fn check(&self) -> Result<(), String> {
        self.model_config()?;
        if let Some(names) = &self.class_names {
            if names.len() != self.classes {
                return Err(format!(
                    "`class_names` has {} names for {} classes",
                    names.len(),
                    self.classes
                ));
            }
        }
        let channels = self.model_config()?.input.channels;
        let p = &self.preprocessing;
        if p.mean.len() != channels || p.std.len() != channels {
            return Err(format!(
                "`preprocessing` needs one mean and std per input channel ({channels})"
            ));
        }
        Ok(())
    }
}

/// A directory in the zoo's layout: a hub snapshot, a local repo, or staged files.
#[derive(Clone, Debug)]
pub struct RepoDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: RepoConfig,
    /// Its `spec.yaml`, verbatim.
    pub spec_text: String,
    /// The parsed spec.
    pub spec: Spec,
}

impl RepoDir {
    /// Reads and checks a directory's `config.json` and `spec.yaml`, and that it holds
    /// weights.
    pub fn open(dir: &Path) -> Result<RepoDir, Error> {
        let fail = |file: &str, message: String| Error::Run {
            path: dir.join(file).display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(dir.join(CONFIG))
            .map_err(|e| fail(CONFIG, format!("cannot read the repo's configuration: {e}")))?;
        let config: RepoConfig = serde_json::from_str(&text)
            .map_err(|e| fail(CONFIG, format!("not a zoo repo configuration: {e}")))?;
        config.check().map_err(|m| fail(CONFIG, m))?;
        let spec_text = std::fs::read_to_string(dir.join(SPEC))
            .map_err(|e| fail(SPEC, format!("cannot read the architecture: {e}")))?;
        let spec_path = dir.join(SPEC).display().to_string();
        let spec = zoo_spec::parse_str(&spec_text, &spec_path)?;
        if !dir.join(WEIGHTS).is_file() && !dir.join(PACKED).is_file() {
            return Err(Error::Run {
                path: dir.display().to_string(),
                message: format!("holds neither `{WEIGHTS}` nor `{PACKED}`"),
            });
        }
        Ok(RepoDir {
            dir: dir.to_path_buf(),
            config,
            spec_text,
            spec,
        })
    }

    /// The input shape and class count.
    pub fn model_config(&self) -> ModelConfig {
        self.config
            .model_config()
            .expect("checked when the directory was opened")
    }

    /// The latent weights, on the CPU.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, Error> {
        let path = self.dir.join(WEIGHTS);
        if !path.is_file() {
            return Err(Error::Run {
                path: self.dir.display().to_string(),
                message: format!(
                    "holds only the packed `{PACKED}`, no `{WEIGHTS}`: use the inference engine \
                     (`zoo predict`, `Pretrained::engine`)"
                ),
            });
        }
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::Run {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Builds the candle model on `device` from `model.safetensors`: the generated struct
    /// when the spec is a shipped one, verbatim, else the runtime builder.
    pub fn build(&self, device: &Device) -> Result<Box<dyn Model>, Error> {
        let weights = self.weights()?;
        let config = self.model_config();
        let params: Vec<crate::spec::Param> = crate::spec::analyze(&self.spec, &config)?
            .params()
            .cloned()
            .collect();
        let varmap = candle_nn::VarMap::new();
        crate::train::load_into(&varmap, &weights, &params, &self.dir.join(WEIGHTS))?;
        let on_device: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .expect("no other user of a fresh varmap")
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(on_device, DType::F32, device);
        match crate::list().iter().find(|e| e.yaml == self.spec_text) {
            Some(entry) => (entry.build)(vb, &config),
            None => Ok(Box::new(crate::Network::new(
                self.spec.clone(),
                vb,
                &config,
            )?)),
        }
    }

    /// The packed inference model: `model.zoo` when present, else exported from
    /// `model.safetensors`. Class names come from `config.json`.
    pub fn packed(&self) -> Result<ZooModel, Error> {
        let path = self.dir.join(PACKED);
        let mut model = if path.is_file() {
            ZooModel::load(&path)?
        } else {
            crate::engine::export(
                &self.spec_text,
                &self.spec,
                &self.model_config(),
                &self.weights()?,
            )?
        };
        if model.labels.is_none() {
            model.labels = self.config.class_names.clone();
        }
        Ok(model)
    }
}
