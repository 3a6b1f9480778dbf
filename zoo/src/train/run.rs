//! The loop behind [`train`], in phases: open (or resume) the run, open its data, build the
//! model, the teacher and the optimizer, then train epoch by epoch (steps, validation, the best
//! weights, checkpoints) and write the final weights and summary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::checkpoint::{self, Checkpoint, Progress};
use super::distill::{self, Teacher};
use super::optim::{Adam, Slot};
use super::report;
use super::schedule::LearningRate;
use super::tensorboard::EventWriter;
use super::{
    append_line, bar, bar_for, batch_tensors, cross_entropy, default_side, describe_epoch,
    evaluate, load_into, named_tensors, open_dataset, ranks, spec_sha256, truncate_metrics,
    Accuracy, EpochMetrics, RunConfig, RunSummary, Session, WARMUP_STEPS,
};
use crate::data::{self, Dataset, Loader, LoaderOptions, Split};
use crate::{Error, Model};

/// Trains: starts a new run in `run_dir` from `config`, or with `config` `None` continues the
/// run there from its newest checkpoint (the stored configuration then applies).
pub fn train(
    config: Option<RunConfig>,
    run_dir: &Path,
    session: &Session,
) -> Result<RunSummary, Error> {
    let started = Instant::now();
    let (config, resumed) = open_run(config, run_dir)?;
    let mut run = Run::prepare(config, resumed, run_dir, session)?;
    let mut clock = Clock::default();
    let mut final_val = None;
    while run.progress.step < run.rate.total_steps {
        final_val = run.epoch(&mut clock).map_err(|e| run.stopped(e))?;
    }
    let hint = run.resume_hint();
    run.finish(final_val, &clock, started)
        .map_err(|e| with_hint(e, hint))
}

fn run_error(dir: &Path, message: String) -> Error {
    Error::Run {
        path: dir.display().to_string(),
        message,
    }
}

/// A write error with how to go on: `hint` says where the run can resume from.
fn with_hint(error: Error, hint: String) -> Error {
    match error {
        Error::Write { path, message } => Error::Write {
            path,
            message: format!("{message}; the run stopped: {hint}"),
        },
        other => other,
    }
}

/// A new run's checked configuration, or a resumed run's stored one and its newest checkpoint.
/// Resuming first removes the temporary files that a process killed mid-write left behind, and
/// starts a run that was killed before its first checkpoint over from its `config.json`.
fn open_run(
    config: Option<RunConfig>,
    dir: &Path,
) -> Result<(RunConfig, Option<Checkpoint>), Error> {
    let checkpoints = dir.join("checkpoints");
    if let Some(config) = config {
        if dir.join("config.json").exists() {
            return Err(run_error(
                dir,
                "already holds a run: pass --resume to continue it, or choose another --out".into(),
            ));
        }
        config.check()?;
        std::fs::create_dir_all(&checkpoints).map_err(|e| run_error(dir, e.to_string()))?;
        return Ok((config, None));
    }
    for folder in [dir, checkpoints.as_path()] {
        for stale in crate::io::remove_stale_temporaries(folder) {
            eprintln!(
                "note: removed {}, left by a process killed while writing",
                stale.display()
            );
        }
    }
    let check_spec = |config: &RunConfig| -> Result<(), Error> {
        let current = spec_sha256(&config.model)?;
        if current != config.spec_sha256 {
            return Err(run_error(dir, format!(
                "the spec `{}` changed since the run started (SHA-256 {} then, {} now); resuming would train a different network",
                config.model, config.spec_sha256, current
            )));
        }
        Ok(())
    };
    let Some((_, latest)) = checkpoint::list(&checkpoints).pop() else {
        let stored = dir.join("config.json");
        if !stored.is_file() {
            return Err(run_error(
                dir,
                "has no checkpoint to resume from (checkpoints/step-*.safetensors)".into(),
            ));
        }
        // The run was stopped before its first checkpoint: it starts over, as configured.
        let config = RunConfig::read(&stored)?;
        check_spec(&config)?;
        eprintln!(
            "note: {} has no checkpoint yet: the run starts over from step 0",
            dir.display()
        );
        return Ok((config, None));
    };
    let ckpt = checkpoint::load(&latest)?;
    check_spec(&ckpt.config)?;
    Ok((ckpt.config.clone(), Some(ckpt)))
}

/// Whether every value of `t` is finite. Its sum is, unless a NaN or an infinity is among
/// them or the sum overflows; only then is every value looked at.
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if t.sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .is_finite()
    {
        return Ok(true);
    }
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .iter()
        .all(|x| x.is_finite()))
}

/// The name of the first tensor that holds a NaN or an infinity.
fn first_non_finite<'t>(
    tensors: impl IntoIterator<Item = (&'t str, &'t Tensor)>,
) -> Result<Option<&'t str>, Error> {
    for (name, t) in tensors {
        if !all_finite(t)? {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// The training set and, when the run validates, the validation set.
type Splits = (Arc<dyn Dataset>, Option<Arc<dyn Dataset>>);

/// The training and validation sets; a new run takes its input shape and classes from them,
/// a resumed one checks they did not change.
fn open_data(
    config: &mut RunConfig,
    spec: &crate::Spec,
    resumed: bool,
    dir: &Path,
) -> Result<Splits, Error> {
    // A new run may ask for an image side (`--input`); the data decides channels and classes.
    let side = match config.input.split('x').next().map(str::parse::<usize>) {
        Some(Ok(side)) if side > 0 => side,
        _ if config.input.is_empty() => default_side(&config.data, spec),
        _ => {
            return Err(Error::Train(format!(
                "expected an input size HxW, found `{}`",
                config.input
            )))
        }
    };
    let train_set = open_dataset(&config.data, Split::Train, side, config.cache)?;
    let val_set = if config.eval {
        Some(open_dataset(
            &config.data,
            Split::Validation,
            side,
            config.cache,
        )?)
    } else {
        None
    };
    let shape = train_set.shape();
    let resolved = (
        format!("{}x{}x{}", shape[1], shape[2], shape[0]),
        train_set.classes().len(),
    );
    if !resumed {
        (config.input, config.classes) = resolved;
    } else if (config.input.clone(), config.classes) != resolved {
        return Err(run_error(
            dir,
            format!(
                "the data now gives {} images of {} classes, the run was started with {} and {}",
                resolved.0, resolved.1, config.input, config.classes
            ),
        ));
    }
    Ok((train_set, val_set))
}

/// The run's teacher: a new run records its absolute source and weights' SHA-256, a resumed
/// run checks it is still the same teacher.
fn open_teacher(
    config: &mut RunConfig,
    resumed: bool,
    dir: &Path,
    device: &Device,
) -> Result<Option<Teacher>, Error> {
    let student = config.model_config()?;
    let Some(d) = config.distill.as_mut() else {
        return Ok(None);
    };
    let teacher = Teacher::open(&d.teacher, device)?;
    teacher.check_fits(&student)?;
    if !resumed {
        d.teacher = distill::stored_source(&d.teacher);
        d.teacher_sha256 = teacher.sha256.clone();
    } else if d.teacher_sha256 != teacher.sha256 {
        return Err(run_error(
            dir,
            format!(
                "the teacher `{}` changed since the run started (weights SHA-256 {} then, {} now)",
                d.teacher, d.teacher_sha256, teacher.sha256
            ),
        ));
    }
    Ok(Some(teacher))
}

/// Adam over the trainable tensors, with a resumed run's moments.
fn build_optimizer(
    varmap: &VarMap,
    params: &[crate::spec::Param],
    config: &RunConfig,
    resumed: Option<&Checkpoint>,
    dir: &Path,
) -> Result<Adam, Error> {
    let data = varmap
        .data()
        .lock()
        .expect("the VarMap lock is not poisoned");
    let mut slots = Vec::new();
    for p in params.iter().filter(|p| p.trainable) {
        let var = data[&p.name].clone();
        let moments = match resumed.map(|c| c.moments.get(&p.name)) {
            Some(Some((m, v))) => Slot::moments(&var, Some((m, v)))?,
            Some(None) => {
                return Err(run_error(
                    dir,
                    format!("the checkpoint lacks Adam's moments of `{}`", p.name),
                ));
            }
            None => Slot::moments(&var, None)?,
        };
        slots.push(Slot {
            name: p.name.clone(),
            var,
            clip: p.weight_clip,
            // Keras' kernel_regularizer: conv and dense kernels only.
            l2: if p.shape.len() >= 2 && p.name.ends_with("weight") {
                config.kernel_l2
            } else {
                0.0
            },
            moments,
        });
    }
    Ok(Adam {
        kind: config.optimizer.parse().map_err(Error::Train)?,
        weight_decay: config.weight_decay,
        slots,
        t: resumed.map_or(0, |c| c.progress.step),
    })
}

/// Training throughput of this process, its first steps excluded.
#[derive(Default)]
struct Clock {
    steps: u64,
    images: u64,
    seconds: f64,
}

impl Clock {
    /// Counts a step of `images` that took `seconds`; whether it was timed.
    fn record(&mut self, images: u64, seconds: f64) -> bool {
        self.steps += 1;
        let timed = self.steps > WARMUP_STEPS;
        if timed {
            self.images += images;
            self.seconds += seconds;
        }
        timed
    }

    fn images_per_second(images: u64, seconds: f64) -> f64 {
        if seconds > 0.0 {
            images as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Everything a run needs between steps.
struct Run<'a> {
    config: RunConfig,
    dir: &'a Path,
    session: &'a Session,
    train_set: Arc<dyn Dataset>,
    val_set: Option<Arc<dyn Dataset>>,
    varmap: VarMap,
    names: Vec<String>,
    model: Box<dyn Model>,
    teacher: Option<Teacher>,
    optimizer: Adam,
    rate: LearningRate,
    progress: Progress,
    last_lr: f64,
    /// `zoo summary`'s table of the model, for the report.
    model_summary: String,
    /// TensorBoard's event file, when the run writes one.
    events: Option<EventWriter>,
}

impl<'a> Run<'a> {
    /// Opens the data, builds (or restores) the model, teacher and optimizer and writes a new
    /// run's `config.json`.
    fn prepare(
        mut config: RunConfig,
        resumed: Option<Checkpoint>,
        dir: &'a Path,
        session: &'a Session,
    ) -> Result<Run<'a>, Error> {
        let is_new = resumed.is_none();
        let spec = crate::spec(&config.model)?;
        let (train_set, val_set) = open_data(&mut config, &spec, !is_new, dir)?;
        let model_config = config.model_config()?;
        let params: Vec<crate::spec::Param> = crate::spec::analyze(&spec, &model_config)?
            .params()
            .cloned()
            .collect();
        let (varmap, device) = (VarMap::new(), &session.device);
        match &resumed {
            Some(ckpt) => {
                let tensors = super::to_device(ckpt.model.clone(), device)?;
                load_into(&varmap, &tensors, &params, dir)?
            }
            None => crate::init::initialize(
                &varmap,
                &spec,
                &model_config,
                config.seed,
                DType::F32,
                device,
            )?,
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = crate::build(&config.model, vb, &model_config)?;
        let model_summary = crate::summary::render(&spec, &model_config)?;
        let teacher = open_teacher(&mut config, !is_new, dir, device)?;
        let optimizer = build_optimizer(&varmap, &params, &config, resumed.as_ref(), dir)?;

        let steps_per_epoch = (train_set.len() / config.batch_size) as u64;
        if steps_per_epoch == 0 {
            return Err(Error::Train(format!(
                "the training set has {} images, fewer than one batch of {}",
                train_set.len(),
                config.batch_size
            )));
        }
        let total_steps =
            (config.epochs * steps_per_epoch).min(config.max_steps.unwrap_or(u64::MAX));
        let rate = LearningRate {
            peak: config.learning_rate,
            schedule: config.schedule.parse().map_err(Error::Train)?,
            warmup_steps: (config.warmup_epochs * steps_per_epoch as f64).round() as u64,
            total_steps,
            steps_per_epoch,
        };
        let progress = resumed.map(|c| c.progress).unwrap_or_default();
        if is_new {
            crate::io::write_bytes_atomically(
                &dir.join("config.json"),
                serde_json::to_string_pretty(&config)
                    .expect("a run config serialises")
                    .as_bytes(),
            )?;
        }
        truncate_metrics(&dir.join("metrics.jsonl"), progress.step)?;
        let last_lr = rate.at(progress.step.saturating_sub(1));
        let events = match config.tensorboard {
            true => Some(EventWriter::create(dir)?),
            false => None,
        };
        Ok(Run {
            names: params.into_iter().map(|p| p.name).collect(),
            config,
            dir,
            session,
            train_set,
            val_set,
            varmap,
            model,
            teacher,
            optimizer,
            rate,
            progress,
            last_lr,
            model_summary,
            events,
        })
    }

    /// Rewrites `report.html` from `metrics.jsonl`; a failure is a warning, never the end of
    /// a run.
    fn write_report(&self, finished: Option<&RunSummary>) {
        let written = crate::plot::RunCurves::open(self.dir).and_then(|curves| {
            report::write(
                self.dir,
                &self.config,
                &curves.epochs,
                &self.model_summary,
                finished,
            )
        });
        if let Err(e) = written {
            eprintln!("warning: {} not written: {e}", report::REPORT);
        }
    }

    /// Where the run can go on from: its newest checkpoint, which holds only finite numbers
    /// (every checkpoint is checked before it is written, and none is written after a failure).
    fn resume_hint(&self) -> String {
        match checkpoint::list(&self.dir.join("checkpoints")).pop() {
            Some((step, path)) => format!(
                "the last good checkpoint is step {step} ({}), and `zoo train --resume {}` continues from it",
                path.display(),
                self.dir.display()
            ),
            None => format!(
                "no checkpoint was written yet, and `zoo train --resume {}` starts the run over",
                self.dir.display()
            ),
        }
    }

    /// A failed write (a full disk, say) with where the run can resume from.
    fn stopped(&self, error: Error) -> Error {
        with_hint(error, self.resume_hint())
    }

    /// The error that stops a run whose numbers stopped being finite at `step`; nothing is
    /// written from that state.
    fn diverged(&self, what: &str, step: u64) -> Error {
        Error::Train(format!(
            "{what} at step {step}: the run stopped, writing nothing from that state; {} with the same settings (if it diverges again, start a new run, with another --out, and a lower --lr)",
            self.resume_hint()
        ))
    }

    /// The model's tensors, checked to be finite before they are written anywhere.
    fn checked_model(&self) -> Result<Vec<(String, Tensor)>, Error> {
        let tensors = named_tensors(&self.varmap, &self.names);
        if let Some(name) = first_non_finite(tensors.iter().map(|(n, t)| (n.as_str(), t)))? {
            return Err(self.diverged(
                &format!("the model's tensor `{name}` holds NaN or infinite values"),
                self.progress.step,
            ));
        }
        Ok(tensors)
    }

    fn save_checkpoint(&self) -> Result<PathBuf, Error> {
        let model = self.checked_model()?;
        let moments: Vec<(String, Tensor, Tensor)> = self
            .optimizer
            .slots
            .iter()
            .map(|s| Ok((s.name.clone(), s.m()?, s.v()?)))
            .collect::<candle_core::Result<_>>()?;
        let all_moments = moments
            .iter()
            .flat_map(|(name, m, v)| [(name.as_str(), m), (name.as_str(), v)]);
        if let Some(name) = first_non_finite(all_moments)? {
            return Err(self.diverged(
                &format!("Adam's moments of `{name}` hold NaN or infinite values"),
                self.progress.step,
            ));
        }
        checkpoint::save(
            &self.dir.join("checkpoints"),
            &self.config,
            &self.progress,
            &model,
            &moments,
            self.config.keep,
        )
    }

    /// One optimizer step on `batch`: the loss (distilled when the run has a teacher), the
    /// gradients, the update and the epoch's running figures. A loss that is not finite stops
    /// the run before the update, weights that are not finite right after it.
    fn step(&mut self, batch: &data::Batch) -> Result<(), Error> {
        let step = self.progress.step + 1;
        let (xs, ys) = batch_tensors(batch, self.train_set.shape(), &self.session.device)?;
        let logits = self.model.forward(&xs, true)?;
        let loss = match (&self.teacher, &self.config.distill) {
            (Some(teacher), Some(d)) => d.loss.loss(
                &logits,
                &teacher.logits(&xs)?,
                &ys,
                self.config.label_smoothing,
            )?,
            _ => cross_entropy(&logits, &ys, self.config.label_smoothing)?,
        };
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(self.diverged(&format!("the loss became {value}"), step));
        }
        let grads = loss.backward()?;
        self.last_lr = self.rate.at(self.progress.step);
        self.optimizer.step(&grads, self.last_lr)?;
        let updated = self
            .optimizer
            .slots
            .iter()
            .map(|s| (s.name.as_str(), s.var.as_tensor()));
        if let Some(name) = first_non_finite(updated)? {
            return Err(self.diverged(&format!("the weight `{name}` became NaN or infinite"), step));
        }
        let p = &mut self.progress;
        p.epoch_correct += ranks(&logits, &batch.labels)?
            .iter()
            .filter(|&&r| r == 0)
            .count() as u64;
        p.epoch_images += batch.labels.len() as u64;
        p.epoch_loss_sum += value;
        p.epoch_steps += 1;
        p.step += 1;
        if let Some(events) = &mut self.events {
            events.scalars(
                p.step,
                &[
                    ("step/train_loss", value),
                    ("step/learning_rate", self.last_lr),
                ],
            )?;
        }
        Ok(())
    }

    /// Trains to the end of the current epoch (or of the step budget), then validates, logs
    /// the epoch, keeps the best weights and checkpoints. Returns the validation figures.
    fn epoch(&mut self, clock: &mut Clock) -> Result<Option<Accuracy>, Error> {
        let (images, seconds) = self.train_to_epoch_end(clock)?;
        let val = self.validate()?;
        let p = &self.progress;
        let metrics = EpochMetrics {
            epoch: p.step as f64 / self.rate.steps_per_epoch as f64,
            step: p.step,
            train_loss: p.epoch_loss_sum / p.epoch_steps.max(1) as f64,
            train_top1: 100.0 * p.epoch_correct as f64 / p.epoch_images.max(1) as f64,
            val,
            learning_rate: self.last_lr,
            images_per_second: Clock::images_per_second(images, seconds),
            seconds,
            skipped: p.skipped,
        };
        self.log_epoch(&metrics)?;
        if let Some(acc) = val {
            self.keep_if_best(acc, metrics.epoch.ceil() as u64)?;
        }
        let p = &mut self.progress;
        p.epoch += 1;
        p.epoch_loss_sum = 0.0;
        p.epoch_correct = 0;
        p.epoch_images = 0;
        p.epoch_steps = 0;
        self.save_checkpoint()?;
        Ok(val)
    }

    /// The steps from where the run stands to the end of its epoch (or of the step budget),
    /// checkpointing every `checkpoint_every` steps. Returns the images and seconds of the
    /// timed steps.
    fn train_to_epoch_end(&mut self, clock: &mut Clock) -> Result<(u64, f64), Error> {
        let steps_per_epoch = self.rate.steps_per_epoch;
        let epoch = self.progress.epoch;
        let first_batch = (self.progress.step - epoch * steps_per_epoch) as usize;
        let epoch_end = ((epoch + 1) * steps_per_epoch).min(self.rate.total_steps);
        let order = data::shuffled_order(self.train_set.len(), self.config.seed, epoch);
        let options = LoaderOptions {
            batch_size: self.config.batch_size,
            drop_last: true,
            augment: Some((self.config.seed, epoch)),
            workers: self.config.workers,
            prefetch: 2 * self.config.workers.max(1),
        };
        let bar = bar(
            self.session,
            epoch_end - epoch * steps_per_epoch,
            &format!("epoch {}/{}", epoch + 1, self.config.epochs),
        );
        bar.set_position(first_batch as u64);
        let mut loader = Loader::new(self.train_set.clone(), order, first_batch, &options);
        let (mut epoch_images, mut epoch_seconds) = (0u64, 0.0f64);
        let mut tick = Instant::now();
        while self.progress.step < epoch_end {
            let batch = loader
                .next()
                .ok_or_else(|| Error::Train("the data loader stopped early".into()))??;
            for skip in &batch.skipped {
                bar.suspend(|| eprintln!("warning: {skip}"));
            }
            self.progress.skipped += batch.skipped.len() as u64;
            if batch.labels.is_empty() {
                continue;
            }
            self.step(&batch)?;
            let seconds = tick.elapsed().as_secs_f64();
            tick = Instant::now();
            if clock.record(batch.labels.len() as u64, seconds) {
                epoch_images += batch.labels.len() as u64;
                epoch_seconds += seconds;
            }
            let p = &self.progress;
            bar.set_position(p.step - epoch * steps_per_epoch);
            bar.set_message(format!(
                "loss {:.3} acc {:.1}% {:.1} img/s lr {:.2e}",
                p.epoch_loss_sum / p.epoch_steps as f64,
                100.0 * p.epoch_correct as f64 / p.epoch_images as f64,
                Clock::images_per_second(epoch_images, epoch_seconds),
                self.last_lr
            ));
            if let Some(every) = self.config.checkpoint_every {
                if p.step.is_multiple_of(every) && p.step < epoch_end {
                    self.save_checkpoint()?;
                    if let Some(events) = &mut self.events {
                        events.flush()?;
                    }
                    tick = Instant::now();
                }
            }
        }
        drop(loader);
        bar.finish_and_clear();
        Ok((epoch_images, epoch_seconds))
    }

    /// An epoch's figures on standard output, in `metrics.jsonl`, the report and the
    /// TensorBoard events.
    fn log_epoch(&mut self, metrics: &EpochMetrics) -> Result<(), Error> {
        println!("{}", describe_epoch(metrics));
        append_line(
            &self.dir.join("metrics.jsonl"),
            &serde_json::to_string(metrics).expect("metrics serialise"),
        )?;
        self.write_report(None);
        if let Some(events) = &mut self.events {
            let mut scalars = vec![
                ("epoch/train_loss", metrics.train_loss),
                ("epoch/train_top1", metrics.train_top1),
                ("epoch/learning_rate", metrics.learning_rate),
                ("epoch/images_per_second", metrics.images_per_second),
            ];
            if let Some(v) = metrics.val {
                scalars.extend([
                    ("epoch/val_top1", v.top1),
                    ("epoch/val_top5", v.top5),
                    ("epoch/val_loss", v.loss),
                ]);
            }
            events.scalars(metrics.step, &scalars)?;
            events.flush()?;
        }
        Ok(())
    }

    /// Writes `best.safetensors` when validation top-1 `acc` beats the best so far.
    fn keep_if_best(&mut self, acc: Accuracy, epoch: u64) -> Result<(), Error> {
        if !self.progress.best.is_none_or(|(best, _)| acc.top1 > best) {
            return Ok(());
        }
        self.progress.best = Some((acc.top1, epoch));
        crate::io::save_safetensors(
            &self.checked_model()?,
            Some(checkpoint::metadata(&self.config, &self.progress)),
            &self.dir.join("best.safetensors"),
        )
    }

    /// The validation figures of the current weights, when the run evaluates.
    fn validate(&self) -> Result<Option<Accuracy>, Error> {
        let Some(v) = &self.val_set else {
            return Ok(None);
        };
        let eval_bar = bar_for(self.session, v.len() as u64, "validation");
        let acc = evaluate(
            &*self.model,
            v.clone(),
            self.config.batch_size.max(64),
            self.config.workers,
            &eval_bar,
            &self.session.device,
        )?;
        eval_bar.finish_and_clear();
        Ok(Some(acc))
    }

    /// Writes the final weights and `summary.json`.
    fn finish(
        self,
        final_val: Option<Accuracy>,
        clock: &Clock,
        started: Instant,
    ) -> Result<RunSummary, Error> {
        let weights = self.dir.join("model.safetensors");
        crate::io::save_safetensors(
            &self.checked_model()?,
            Some(checkpoint::metadata(&self.config, &self.progress)),
            &weights,
        )?;
        let summary = RunSummary {
            run_dir: self.dir.display().to_string(),
            weights: weights.display().to_string(),
            steps: self.progress.step,
            epochs: self.progress.step as f64 / self.rate.steps_per_epoch as f64,
            final_val,
            best: self.progress.best,
            train_images_per_second: Clock::images_per_second(clock.images, clock.seconds),
            wall_seconds: started.elapsed().as_secs_f64(),
            config: self.config.clone(),
        };
        crate::io::write_bytes_atomically(
            &self.dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)
                .expect("a summary serialises")
                .as_bytes(),
        )?;
        self.write_report(Some(&summary));
        Ok(summary)
    }
}
