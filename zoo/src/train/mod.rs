//! Training and evaluation: the loop behind `zoo train` and `zoo eval`.
//!
//! A run lives in a directory:
//! - `config.json`: the resolved [`RunConfig`] (model, data, recipe, seed);
//! - `metrics.jsonl`: one line per epoch ([`EpochMetrics`]);
//! - `checkpoints/step-*.safetensors`: the last few [`checkpoint`]s (every epoch and, on
//!   request, every N steps), from which `--resume` continues exactly;
//! - `best.safetensors`: the weights with the best validation top-1 so far;
//! - `model.safetensors`: the final weights (plain tensor names: load them with
//!   [`crate::build`] and a `VarBuilder`), and `summary.json`.

pub mod checkpoint;
pub mod distill;
pub mod optim;
pub mod report;
mod run;
pub mod schedule;
pub mod tensorboard;

pub use run::train;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{self, Dataset, Loader, LoaderOptions, Split};
use crate::spec::{Optimizer, Schedule, TrainRecipe};
use crate::{Error, Model, ModelConfig};

/// The name of the embedded default dataset.
pub const FASHION_MNIST: &str = "fashion-mnist";

/// Steps excluded from throughput figures while caches and allocators warm up.
const WARMUP_STEPS: u64 = 2;

/// Everything that determines a run. Stored as `config.json` and in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// A registered model name or a spec file, as given.
    pub model: String,
    /// SHA-256 of the spec's YAML text when the run started.
    pub spec_sha256: String,
    /// `fashion-mnist`, `imagenette`, or a dataset folder, as given.
    pub data: String,
    /// Model input `HxWxC`.
    pub input: String,
    /// Number of classes.
    pub classes: usize,
    /// Passes over the training set.
    pub epochs: u64,
    /// Images per step.
    pub batch_size: usize,
    /// `adam` or `adamw`.
    pub optimizer: String,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// The schedule in its command-line form (`linear:0`, `cosine:0`, `step:30:0.1`, ...).
    pub schedule: String,
    /// Epochs of linear warm-up.
    pub warmup_epochs: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// L2 penalty on conv and dense kernels.
    pub kernel_l2: f64,
    /// Label smoothing.
    pub label_smoothing: f64,
    /// Stop after this many steps in total (the schedule spans them).
    pub max_steps: Option<u64>,
    /// Seed of the initial weights, the data order and the augmentation.
    pub seed: u64,
    /// Also checkpoint every this many steps (besides every epoch).
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    pub keep: usize,
    /// Evaluate on the validation split after every epoch.
    pub eval: bool,
    /// Data loading threads.
    pub workers: usize,
    /// Keep decoded images of a folder dataset in memory.
    pub cache: bool,
    /// Knowledge distillation from a teacher, when the run has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<distill::Distillation>,
    /// Also write TensorBoard event files (under `tensorboard/`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tensorboard: bool,
}

impl RunConfig {
    /// A run of `model` on `data` with `recipe` and defaults for the rest.
    pub fn new(model: &str, data: &str, recipe: &TrainRecipe) -> Result<RunConfig, Error> {
        Ok(RunConfig {
            model: model.to_string(),
            spec_sha256: spec_sha256(model)?,
            data: data.to_string(),
            input: String::new(),
            classes: 0,
            epochs: recipe.epochs as u64,
            batch_size: recipe.batch_size,
            optimizer: recipe.optimizer.to_string(),
            learning_rate: recipe.learning_rate,
            schedule: recipe.schedule.to_string(),
            warmup_epochs: recipe.warmup_epochs,
            weight_decay: recipe.weight_decay,
            kernel_l2: recipe.kernel_l2,
            label_smoothing: recipe.label_smoothing,
            max_steps: None,
            seed: 0,
            checkpoint_every: None,
            keep: 3,
            eval: true,
            workers: 2,
            cache: false,
            distill: None,
            tensorboard: false,
        })
    }

    /// Reads and checks a run's `config.json`.
    pub fn read(path: &Path) -> Result<RunConfig, Error> {
        let fail = |message: String| Error::Run {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let config: RunConfig = serde_json::from_str(&text)
            .map_err(|e| fail(format!("not a run configuration: {e}")))?;
        config.check().map_err(|e| fail(e.to_string()))?;
        Ok(config)
    }

    /// The model's input shape and class count.
    pub fn model_config(&self) -> Result<ModelConfig, Error> {
        Ok(ModelConfig {
            input: self.input.parse().map_err(Error::Train)?,
            classes: self.classes,
        })
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        let fail = |m: String| Err(Error::Train(m));
        if self.epochs == 0 || self.batch_size == 0 {
            return fail("epochs and batch size must be at least 1".into());
        }
        if self.batch_size > MAX_BATCH || self.workers > MAX_WORKERS {
            return fail(format!(
                "expected a batch size of at most {MAX_BATCH} and at most {MAX_WORKERS} loader workers, found {} and {}",
                self.batch_size, self.workers
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return fail(format!(
                "expected a positive learning rate, found {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return fail(format!(
                "expected a label smoothing in [0, 1), found {}",
                self.label_smoothing
            ));
        }
        if self.weight_decay > 0.0 && self.optimizer != "adamw" {
            return fail("weight decay needs the adamw optimizer (adam takes --kernel-l2)".into());
        }
        self.optimizer.parse::<Optimizer>().map_err(Error::Train)?;
        self.schedule.parse::<Schedule>().map_err(Error::Train)?;
        if let Some(d) = &self.distill {
            d.loss.check().map_err(Error::Train)?;
        }
        Ok(())
    }
}

/// The largest batch a run may ask for.
pub const MAX_BATCH: usize = 1 << 16;

/// The most data-loading threads a run may ask for.
pub const MAX_WORKERS: usize = 256;

/// The recipe `zoo train` uses on Fashion-MNIST when no flag says otherwise (with
/// [`FASHION_MNIST_DEFAULT_STEPS`] unless `--epochs` or `--max-steps` is given): the specs'
/// `train:` recipes are for ImageNet-scale data, this one fits a 2-core machine.
pub fn fashion_mnist_recipe() -> TrainRecipe {
    TrainRecipe {
        epochs: 1,
        batch_size: 64,
        optimizer: Optimizer::Adam,
        learning_rate: 2.5e-3,
        schedule: Schedule::Linear { final_lr: 0.0 },
        warmup_epochs: 0.0,
        weight_decay: 0.0,
        kernel_l2: 0.0,
        label_smoothing: 0.0,
    }
}

/// Steps of the embedded default budget (see [`fashion_mnist_recipe`]): three quarters of an
/// epoch, about 10 minutes for QuickNet-LAB on 2 cores.
pub const FASHION_MNIST_DEFAULT_STEPS: u64 = 700;

/// SHA-256 (hex) of a registered model's or spec file's YAML text.
pub fn spec_sha256(model: &str) -> Result<String, Error> {
    let text = crate::registry::spec_text(model)?;
    Ok(hex(&Sha256::digest(text.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens a split of `data`: `fashion-mnist` (embedded), `imagenette` (the folder
/// `zoo data fetch imagenette` writes under `data/`), a folder with Fashion-MNIST's IDX files,
/// or an image folder with `train/` and `val/`. `side` is the image size to produce.
pub fn open_dataset(
    data: &str,
    split: Split,
    side: usize,
    cache: bool,
) -> Result<Arc<dyn Dataset>, Error> {
    if data == FASHION_MNIST {
        let dir = data::fashion_mnist::embedded_dir();
        return Ok(Arc::new(data::FashionMnist::open(&dir, split, side)?));
    }
    let dir = if data == "imagenette" {
        ["imagenette2-160", "imagenette2-320", "imagenette2"]
            .iter()
            .map(|f| Path::new("data").join(f))
            .find(|p| p.is_dir())
            .ok_or_else(|| {
                Error::Train(
                    "no Imagenette under data/: run `zoo data fetch imagenette` first, or pass its folder".into(),
                )
            })?
    } else {
        PathBuf::from(data)
    };
    if !dir.is_dir() {
        return Err(Error::Train(format!(
            "--data `{data}`: expected `{FASHION_MNIST}`, `imagenette` or a dataset folder"
        )));
    }
    if dir.join("train-images-idx3-ubyte.gz").is_file() {
        return Ok(Arc::new(data::FashionMnist::open(&dir, split, side)?));
    }
    let options = data::folder::FolderOptions {
        cache,
        cache_side: None,
    };
    let folder = data::folder::ImageFolder::open(&dir, split, side, options)?;
    if !folder.ignored_files().is_empty() {
        eprintln!(
            "note: ignored {} file(s) without an image extension under {}, for example {}",
            folder.ignored_files().len(),
            dir.display(),
            folder.ignored_files()[0].display()
        );
    }
    Ok(Arc::new(folder))
}

/// Whether `data` names Fashion-MNIST: the embedded copy or a folder with its IDX files.
pub fn is_fashion_mnist(data: &str) -> bool {
    data == FASHION_MNIST || Path::new(data).join("train-images-idx3-ubyte.gz").is_file()
}

/// The image side a model of `spec` gets from `data` by default: Fashion-MNIST's 32 (its 28
/// padded) where the network fits it, else the spec's own side (XNOR-Net's 224); an image
/// folder's images come at the spec's side.
pub fn default_side(data: &str, spec: &crate::Spec) -> usize {
    let small = ModelConfig {
        input: crate::spec::InputShape {
            height: 32,
            width: 32,
            channels: 1,
        },
        classes: 10,
    };
    if is_fashion_mnist(data) && crate::spec::analyze(spec, &small).is_ok() {
        32
    } else {
        spec.input.height
    }
}

/// Per-epoch figures, one JSON line each in `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epochs completed (fractional when a step limit ends the run mid-epoch).
    pub epoch: f64,
    /// Optimizer steps taken.
    pub step: u64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training top-1 (%) over the epoch, on augmented images in training mode.
    pub train_top1: f64,
    /// Validation figures, when evaluated.
    pub val: Option<Accuracy>,
    /// Learning rate of the epoch's last step.
    pub learning_rate: f64,
    /// Training images per second (data waits included, evaluation excluded).
    pub images_per_second: f64,
    /// Seconds the epoch's training steps took.
    pub seconds: f64,
    /// Samples skipped as undecodable, over the whole run so far.
    pub skipped: u64,
}

/// Accuracy of a model on a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Top-1 accuracy (%).
    pub top1: f64,
    /// Top-5 accuracy (%).
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images evaluated.
    pub images: u64,
    /// Images skipped as undecodable.
    pub skipped: u64,
}

/// How long a run's training steps took, over every session of the run (evaluation, checkpoint
/// writes and each process's warm-up steps excluded).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingTime {
    /// Seconds of timed training steps.
    pub seconds: f64,
    /// Training images per second over those seconds.
    pub images_per_second: f64,
}

impl TrainingTime {
    /// The training time of the run directory `dir`: `None` without readable epochs or timed
    /// steps.
    pub fn of_run(dir: &Path) -> Option<TrainingTime> {
        TrainingTime::of_epochs(&read_epochs(dir).ok()?)
    }

    /// The sum over `epochs` (a run's `metrics.jsonl`); `None` when no step was timed.
    pub fn of_epochs(epochs: &[EpochMetrics]) -> Option<TrainingTime> {
        let seconds: f64 = epochs.iter().map(|m| m.seconds).sum();
        let images: f64 = epochs.iter().map(|m| m.seconds * m.images_per_second).sum();
        (seconds > 0.0).then(|| TrainingTime {
            seconds,
            images_per_second: images / seconds,
        })
    }
}

/// What a finished run reports (`summary.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: String,
    /// The final weights.
    pub weights: String,
    /// The configuration.
    pub config: RunConfig,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Epochs completed (fractional with a step limit).
    pub epochs: f64,
    /// Validation accuracy of the final weights, when evaluated.
    pub final_val: Option<Accuracy>,
    /// Best validation top-1 and the epoch that reached it.
    pub best: Option<(f64, u64)>,
    /// Training images per second over this process's steps, first steps excluded.
    pub train_images_per_second: f64,
    /// Wall-clock seconds of this process's training (evaluation included).
    pub wall_seconds: f64,
}

/// Cross-entropy of `logits` (`N x K`) against `labels` (`N`, u32), with label smoothing
/// `eps` (targets `1 - eps + eps/K` for the label, `eps/K` elsewhere).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_p
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?
        .mean_all()?;
    if eps == 0.0 {
        return Ok(nll);
    }
    let uniform = log_p.mean(D::Minus1)?.neg()?.mean_all()?;
    (nll * (1.0 - eps))? + (uniform * eps)?
}

/// For each row, how many logits are strictly larger than the label's (0 = top-1 hit).
fn ranks(logits: &Tensor, labels: &[u32]) -> candle_core::Result<Vec<usize>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(labels)
        .map(|(row, &l)| row.iter().filter(|&&x| x > row[l as usize]).count())
        .collect())
}

/// A batch's images and labels on `device`.
fn batch_tensors(
    batch: &data::Batch,
    shape: [usize; 3],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = batch.labels.len();
    let images = Tensor::from_slice(&batch.images, (n, shape[0], shape[1], shape[2]), device)?;
    let labels = Tensor::from_slice(&batch.labels, n, device)?;
    Ok((images, labels))
}

/// Evaluates `model` (whose weights are on `device`) in inference mode on all of `dataset`
/// (no augmentation).
pub fn evaluate(
    model: &dyn Model,
    dataset: Arc<dyn Dataset>,
    batch_size: usize,
    workers: usize,
    progress: &indicatif::ProgressBar,
    device: &Device,
) -> Result<Accuracy, Error> {
    let shape = dataset.shape();
    let order: Vec<usize> = (0..dataset.len()).collect();
    let options = LoaderOptions {
        batch_size,
        drop_last: false,
        augment: None,
        workers,
        prefetch: 2 * workers,
    };
    let (mut top1, mut top5, mut loss_sum, mut images, mut skipped) = (0u64, 0u64, 0.0, 0u64, 0u64);
    for batch in Loader::new(dataset, order, 0, &options) {
        let batch = batch?;
        skipped += batch.skipped.len() as u64;
        progress.inc((batch.labels.len() + batch.skipped.len()) as u64);
        if batch.labels.is_empty() {
            continue;
        }
        let (xs, ys) = batch_tensors(&batch, shape, device)?;
        let logits = model.forward(&xs, false)?;
        let n = batch.labels.len() as u64;
        loss_sum += cross_entropy(&logits, &ys, 0.0)?.to_scalar::<f32>()? as f64 * n as f64;
        for rank in ranks(&logits, &batch.labels)? {
            top1 += (rank == 0) as u64;
            top5 += (rank < 5) as u64;
        }
        images += n;
    }
    if images == 0 {
        return Err(Error::Train(
            "no image of the validation set could be evaluated".into(),
        ));
    }
    Ok(Accuracy {
        top1: 100.0 * top1 as f64 / images as f64,
        top5: 100.0 * top5 as f64 / images as f64,
        loss: loss_sum / images as f64,
        images,
        skipped,
    })
}

/// Named tensors moved to `device`.
pub(crate) fn to_device(
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(device)?)))
        .collect()
}

/// The model's tensors by name, in the analysis order.
fn named_tensors(varmap: &VarMap, names: &[String]) -> Vec<(String, Tensor)> {
    let data = varmap
        .data()
        .lock()
        .expect("the VarMap lock is not poisoned");
    names
        .iter()
        .map(|n| (n.clone(), data[n].as_tensor().clone()))
        .collect()
}

/// Fills `varmap` with `tensors` (on their device), which must be exactly the model's tensors
/// with their shapes.
pub fn load_into(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    params: &[crate::spec::Param],
    source: &Path,
) -> Result<(), Error> {
    let fail = |message: String| Error::Run {
        path: source.display().to_string(),
        message,
    };
    let mut data = varmap
        .data()
        .lock()
        .expect("the VarMap lock is not poisoned");
    for p in params {
        let t = tensors
            .get(&p.name)
            .ok_or_else(|| fail(format!("lacks the tensor `{}` {:?}", p.name, p.shape)))?;
        if t.dims() != p.shape.as_slice() {
            return Err(fail(format!(
                "`{}` has shape {:?}, the model needs {:?}",
                p.name,
                t.dims(),
                p.shape
            )));
        }
        data.insert(p.name.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?);
    }
    if tensors.len() != params.len() {
        let extra = tensors
            .keys()
            .find(|k| !params.iter().any(|p| &p.name == *k))
            .cloned()
            .unwrap_or_default();
        return Err(fail(format!(
            "holds the tensor `{extra}`, which the model does not have"
        )));
    }
    Ok(())
}

/// Trained weights read back: a run directory's final (else best, else newest checkpoint)
/// weights, or a safetensors file, with the run configuration when it carries one.
pub struct RunWeights {
    /// The file read.
    pub path: PathBuf,
    /// The run's configuration, when the file is a zoo run's.
    pub config: Option<RunConfig>,
    /// The model's tensors by name.
    pub tensors: HashMap<String, Tensor>,
}

impl RunWeights {
    /// Reads `path`: a run directory or a weights file.
    pub fn open(path: &Path) -> Result<RunWeights, Error> {
        let file = if path.is_dir() {
            ["model.safetensors", "best.safetensors"]
                .iter()
                .map(|f| path.join(f))
                .find(|f| f.is_file())
                .or_else(|| {
                    checkpoint::list(&path.join("checkpoints"))
                        .pop()
                        .map(|(_, f)| f)
                })
                .ok_or_else(|| Error::Run {
                    path: path.display().to_string(),
                    message: "holds no model.safetensors, best.safetensors or checkpoint".into(),
                })?
        } else {
            path.to_path_buf()
        };
        let fail = |message: String| Error::Run {
            path: file.display().to_string(),
            message,
        };
        let bytes = std::fs::read(&file).map_err(|e| fail(format!("cannot read: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
        let config = match header.metadata().as_ref().and_then(|m| m.get("zoo.config")) {
            Some(json) => Some(
                serde_json::from_str(json).map_err(|e| fail(format!("bad `zoo.config`: {e}")))?,
            ),
            None => None,
        };
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| fail(e.to_string()))?;
        if tensors.keys().any(|k| k.starts_with("adam.")) {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, t)| Some((k.strip_prefix("model.")?.to_string(), t)))
                .collect();
        }
        Ok(RunWeights {
            path: file,
            config,
            tensors,
        })
    }

    /// Builds `model` (a registered name or spec file) with these weights for the images and
    /// classes of `dataset`.
    pub fn build(&self, model: &str, dataset: &Arc<dyn Dataset>) -> Result<Box<dyn Model>, Error> {
        self.build_for(model, &dataset_config(dataset))
    }

    /// The weights moved to `device` (models built from them compute there).
    pub fn to_device(mut self, device: &Device) -> Result<RunWeights, Error> {
        self.tensors = to_device(self.tensors, device)?;
        Ok(self)
    }

    /// The device of the weights: the CPU unless moved with [`RunWeights::to_device`].
    fn device(&self) -> Device {
        self.tensors
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone())
    }

    /// Builds `model` with these weights for `config`'s input and classes.
    pub fn build_for(&self, model: &str, config: &ModelConfig) -> Result<Box<dyn Model>, Error> {
        let varmap = self.variables(model, config)?;
        crate::build(
            model,
            VarBuilder::from_varmap(&varmap, DType::F32, &self.device()),
            config,
        )
    }

    /// [`RunWeights::build`] through the runtime builder, whatever the model: a
    /// [`crate::Network`] computes the same function and can show its binarized activations.
    pub fn network(
        &self,
        model: &str,
        dataset: &Arc<dyn Dataset>,
    ) -> Result<crate::Network, Error> {
        self.network_for(model, &dataset_config(dataset))
    }

    /// [`RunWeights::network`] for `config`'s input and classes.
    pub fn network_for(&self, model: &str, config: &ModelConfig) -> Result<crate::Network, Error> {
        let varmap = self.variables(model, config)?;
        crate::Network::new(
            crate::spec(model)?,
            VarBuilder::from_varmap(&varmap, DType::F32, &self.device()),
            config,
        )
    }

    /// The weights as the variables of `model` for `config`.
    fn variables(&self, model: &str, config: &ModelConfig) -> Result<VarMap, Error> {
        let params: Vec<crate::spec::Param> = crate::spec::analyze(&crate::spec(model)?, config)?
            .params()
            .cloned()
            .collect();
        let varmap = VarMap::new();
        load_into(&varmap, &self.tensors, &params, &self.path)?;
        Ok(varmap)
    }
}

/// The input shape and classes of `dataset`'s images.
fn dataset_config(dataset: &Arc<dyn Dataset>) -> ModelConfig {
    let [c, h, w] = dataset.shape();
    ModelConfig {
        input: crate::spec::InputShape {
            height: h,
            width: w,
            channels: c,
        },
        classes: dataset.classes().len(),
    }
}

/// Options of one `train` call that do not change the run itself.
pub struct Session {
    /// Show progress bars (they draw only on a terminal).
    pub progress: bool,
    /// Where the model computes (see [`crate::device::parse`]); a run resumes on any device.
    pub device: Device,
}

impl Default for Session {
    /// No progress bars, on the CPU.
    fn default() -> Session {
        Session {
            progress: false,
            device: Device::Cpu,
        }
    }
}

/// One line for the terminal about a finished epoch.
pub fn describe_epoch(m: &EpochMetrics) -> String {
    let mut line = format!(
        "epoch {:.2} (step {}): train loss {:.4}, train top-1 {:.2}%, {:.1} img/s",
        m.epoch, m.step, m.train_loss, m.train_top1, m.images_per_second
    );
    if let Some(v) = m.val {
        line += &format!(
            ", val top-1 {:.2}%, top-5 {:.2}%, loss {:.4}",
            v.top1, v.top5, v.loss
        );
    }
    if m.skipped > 0 {
        line += &format!(", {} undecodable image(s) skipped", m.skipped);
    }
    line
}

/// The epochs of the run directory `dir` (its `metrics.jsonl`): at least one.
pub fn read_epochs(dir: &Path) -> Result<Vec<EpochMetrics>, Error> {
    let path = dir.join("metrics.jsonl");
    let fail = |message: String| Error::Run {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        fail(format!(
            "cannot read the run's per-epoch metrics ({e}): expected a run directory of \
             `zoo train` that has finished an epoch"
        ))
    })?;
    let epochs = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str::<EpochMetrics>(line)
                .map_err(|e| fail(format!("line {}: not an epoch's metrics: {e}", i + 1)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if epochs.is_empty() {
        return Err(fail("holds no epoch yet".into()));
    }
    Ok(epochs)
}

/// Drops lines of `metrics.jsonl` written after `step` (by a run that was interrupted after
/// its last checkpoint), so a resumed run does not report an epoch twice.
fn truncate_metrics(path: &Path, step: u64) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<EpochMetrics>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        crate::io::write_bytes_atomically(path, kept.as_bytes())?;
    }
    Ok(())
}

fn append_line(path: &Path, line: &str) -> Result<(), Error> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()))
        .map_err(|e| Error::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

fn bar(session: &Session, len: u64, prefix: &str) -> indicatif::ProgressBar {
    let bar = bar_for(session, len, prefix);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {msg} ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A progress bar drawn on stderr when it is a terminal and progress is wanted.
pub fn bar_for(session: &Session, len: u64, prefix: &str) -> indicatif::ProgressBar {
    let bar = if session.progress {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_prefix(prefix.to_string());
    bar
}
