//! `zoo train`: flags over the recipe, a new or resumed run.

use std::path::PathBuf;

use zoo::train::distill::{self, Distillation, KdLoss};

use crate::{parse_optimizer, parse_schedule, parse_side};

/// `zoo train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// A registered model name (see `zoo list`) or a spec file. Not needed with --resume.
    model: Option<String>,
    /// `fashion-mnist` (embedded), `imagenette` (after `zoo data fetch imagenette`), a folder
    /// with `train/<class>/*.JPEG` and `val/<class>/*.JPEG`, or one with Fashion-MNIST's files.
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Passes over the training set.
    #[arg(long)]
    epochs: Option<u64>,
    /// Images per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// `linear[:FINAL_LR]`, `cosine[:FINAL_LR]`, `step[:EVERY_EPOCHS[:FACTOR]]` or `constant`.
    #[arg(long, value_parser = parse_schedule)]
    schedule: Option<zoo::spec::Schedule>,
    /// Epochs of linear learning-rate warm-up.
    #[arg(long)]
    warmup: Option<f64>,
    /// `adam` or `adamw`.
    #[arg(long, value_parser = parse_optimizer)]
    optimizer: Option<zoo::spec::Optimizer>,
    /// AdamW's decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// L2 penalty on conv and dense kernels (Keras' kernel_regularizer).
    #[arg(long)]
    kernel_l2: Option<f64>,
    /// Label smoothing in [0, 1).
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Image size HxW (default 32x32 for Fashion-MNIST where the network fits it, else the
    /// spec's; the spec's for image folders).
    #[arg(long, value_parser = parse_side)]
    input: Option<usize>,
    /// Stop after this many optimizer steps (the schedule spans them).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Run directory (default: `runs/<model>-<n>`, the first free n).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint, exactly as configured.
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Seed of the initial weights, data order and augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// Also checkpoint every N steps (checkpoints are always written after every epoch).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Checkpoints to keep.
    #[arg(long)]
    keep: Option<usize>,
    /// Data loading threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Keep decoded images of an image folder in memory after the first epoch.
    #[arg(long)]
    cache: bool,
    /// Skip validation after each epoch.
    #[arg(long)]
    no_eval: bool,
    /// Also write TensorBoard event files under the run directory (`tensorboard/`): the
    /// per-epoch figures and every step's loss and learning rate.
    #[arg(long)]
    tensorboard: bool,
    /// Distil from this trained teacher: a run directory, a weights file of a zoo run, a hub
    /// repo directory or a hub name. It must take the same images and classes (float teachers:
    /// `specs/teachers/`).
    #[arg(long)]
    teacher: Option<String>,
    /// The distillation loss: `hinton` (soft targets at --kd-temperature, weighted by
    /// --kd-weight against the labels' cross-entropy) or `distributional` (ReActNet's: the
    /// teacher's distribution only).
    #[arg(long, requires = "teacher", value_parser = ["hinton", "distributional"])]
    kd: Option<String>,
    /// Softmax temperature of Hinton's loss [default: 4].
    #[arg(long, requires = "teacher")]
    kd_temperature: Option<f64>,
    /// Weight of Hinton's soft term, in [0, 1]; the labels' cross-entropy gets the rest
    /// [default: 0.5].
    #[arg(long, requires = "teacher")]
    kd_weight: Option<f64>,
}

impl TrainArgs {
    /// The flags that change a run, by name, when given.
    fn run_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--epochs", self.epochs.is_some()),
            ("--batch-size", self.batch_size.is_some()),
            ("--lr", self.lr.is_some()),
            ("--schedule", self.schedule.is_some()),
            ("--warmup", self.warmup.is_some()),
            ("--optimizer", self.optimizer.is_some()),
            ("--weight-decay", self.weight_decay.is_some()),
            ("--kernel-l2", self.kernel_l2.is_some()),
            ("--label-smoothing", self.label_smoothing.is_some()),
            ("--input", self.input.is_some()),
            ("--max-steps", self.max_steps.is_some()),
            ("--seed", self.seed.is_some()),
            ("--checkpoint-every", self.checkpoint_every.is_some()),
            ("--keep", self.keep.is_some()),
            ("--workers", self.workers.is_some()),
            ("--cache", self.cache),
            ("--no-eval", self.no_eval),
            ("--tensorboard", self.tensorboard),
            ("--teacher", self.teacher.is_some()),
            ("--kd", self.kd.is_some()),
            ("--kd-temperature", self.kd_temperature.is_some()),
            ("--kd-weight", self.kd_weight.is_some()),
        ];
        given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect()
    }

    /// The configuration of a new run.
    fn run_config(&self, model: &str) -> Result<zoo::train::RunConfig, zoo::Error> {
        let spec = zoo::spec(model)?;
        let on_fashion_mnist = zoo::train::is_fashion_mnist(&self.data);
        let recipe = if on_fashion_mnist {
            zoo::train::fashion_mnist_recipe()
        } else {
            spec.train.unwrap_or_default()
        };
        let mut c = zoo::train::RunConfig::new(model, &self.data, &recipe)?;
        if on_fashion_mnist && self.epochs.is_none() && self.max_steps.is_none() {
            c.max_steps = Some(zoo::train::FASHION_MNIST_DEFAULT_STEPS);
        }
        let set = |target: &mut f64, value: Option<f64>| *target = value.unwrap_or(*target);
        c.epochs = self.epochs.unwrap_or(c.epochs);
        c.batch_size = self.batch_size.unwrap_or(c.batch_size);
        set(&mut c.learning_rate, self.lr);
        set(&mut c.warmup_epochs, self.warmup);
        set(&mut c.weight_decay, self.weight_decay);
        set(&mut c.kernel_l2, self.kernel_l2);
        set(&mut c.label_smoothing, self.label_smoothing);
        if let Some(s) = self.schedule {
            c.schedule = s.to_string();
        }
        if let Some(o) = self.optimizer {
            c.optimizer = o.to_string();
        }
        if let Some(side) = self.input {
            c.input = format!("{side}x{side}");
        }
        c.max_steps = self.max_steps.or(c.max_steps);
        c.seed = self.seed.unwrap_or(c.seed);
        c.checkpoint_every = self.checkpoint_every;
        c.keep = self.keep.unwrap_or(c.keep);
        c.workers = self
            .workers
            .unwrap_or(if on_fashion_mnist { 1 } else { c.workers });
        c.cache = self.cache;
        c.eval = !self.no_eval;
        c.tensorboard = self.tensorboard;
        c.distill = self.distillation()?;
        Ok(c)
    }

    /// The distillation flags, when a teacher is given.
    fn distillation(&self) -> Result<Option<Distillation>, zoo::Error> {
        let Some(teacher) = &self.teacher else {
            return Ok(None);
        };
        let loss = if self.kd.as_deref() == Some("distributional") {
            if self.kd_temperature.is_some() || self.kd_weight.is_some() {
                return Err(zoo::Error::Train(
                    "--kd distributional has no temperature or weight: drop --kd-temperature and --kd-weight".into(),
                ));
            }
            KdLoss::Distributional
        } else {
            KdLoss::Hinton {
                temperature: self.kd_temperature.unwrap_or(distill::DEFAULT_TEMPERATURE),
                weight: self.kd_weight.unwrap_or(distill::DEFAULT_WEIGHT),
            }
        };
        Ok(Some(Distillation {
            teacher: teacher.clone(),
            teacher_sha256: String::new(),
            loss,
        }))
    }
}

/// `runs/<name>-<n>` for the first `n` not taken.
fn fresh_run_dir(name: &str) -> PathBuf {
    (1..)
        .map(|n| PathBuf::from("runs").join(format!("{name}-{n}")))
        .find(|p| !p.exists())
        .expect("some run number is free")
}

/// Trains a model, or resumes a run, on `device`.
pub fn train(args: TrainArgs, device: zoo::candle_core::Device) -> Result<(), zoo::Error> {
    let session = zoo::train::Session {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        device,
    };
    let (config, run_dir) = match (&args.resume, &args.model) {
        (Some(dir), _) => {
            let flags = args.run_flags();
            if !flags.is_empty() || args.model.is_some() || args.data != zoo::train::FASHION_MNIST {
                return Err(zoo::Error::Train(format!(
                    "--resume continues a run exactly as it was configured; drop {}",
                    if flags.is_empty() {
                        "the model and --data".to_string()
                    } else {
                        flags.join(", ")
                    }
                )));
            }
            (None, dir.clone())
        }
        (None, Some(model)) => {
            let config = args.run_config(model)?;
            let name = zoo::spec(model)?.name;
            (
                Some(config),
                args.out.clone().unwrap_or_else(|| fresh_run_dir(&name)),
            )
        }
        (None, None) => {
            return Err(zoo::Error::Train(
                "name a model or spec file to train (see `zoo list`), or --resume a run directory"
                    .into(),
            ))
        }
    };
    match &config {
        Some(c) => println!(
            "training {} on {} into {} ({} epoch(s){}, batch {}, {} lr {} {}, seed {}){}",
            c.model,
            c.data,
            run_dir.display(),
            c.epochs,
            c.max_steps
                .map(|s| format!(" capped at {s} steps"))
                .unwrap_or_default(),
            c.batch_size,
            c.optimizer,
            c.learning_rate,
            c.schedule,
            c.seed,
            c.distill
                .as_ref()
                .map(|d| format!("; distilled from {} with {}", d.teacher, d.loss))
                .unwrap_or_default()
        ),
        None => println!("resuming the run in {}", run_dir.display()),
    }
    let summary = zoo::train::train(config, &run_dir, &session)?;
    let split = if zoo::train::is_fashion_mnist(&summary.config.data) {
        "test"
    } else {
        "validation"
    };
    if let Some(v) = summary.final_val {
        println!(
            "{split} top-1 {:.2}%, top-5 {:.2}% on {} images after {} steps ({:.2} epochs)",
            v.top1, v.top5, v.images, summary.steps, summary.epochs
        );
    }
    println!(
        "trained at {:.1} images/s; run saved in {} (weights: {})",
        summary.train_images_per_second, summary.run_dir, summary.weights
    );
    Ok(())
}
