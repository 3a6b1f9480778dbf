//! The `zoo` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zoo::spec::InputShape;

/// A model zoo of binary neural networks with the Learnable Activation Binarizer (LAB).
#[derive(Parser)]
#[command(name = "zoo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// List the registered models.
    List,
    /// Print a per-layer table and totals of parameters, MACs and model size.
    Summary {
        /// A registered model name (see `zoo list`) or a spec file.
        model: String,
        /// Input shape HxWxC (default: the spec's).
        #[arg(long, value_parser = parse_input)]
        input: Option<InputShape>,
        /// Number of classes (default: the spec's).
        #[arg(long, value_parser = parse_classes)]
        classes: Option<usize>,
    },
    /// Import Larq / Keras weights (an HDF5 file written by `model.save_weights("x.h5")`) into
    /// a safetensors file with the zoo's tensor names and layouts.
    #[command(name = "import-larq")]
    ImportLarq {
        /// The Keras weights file (`.h5`).
        weights: PathBuf,
        /// The architecture: a registered model name (see `zoo list`) or a spec file.
        #[arg(long)]
        spec: String,
        /// Input shape HxWxC (default: the spec's). Weight shapes depend on it only through a
        /// dense layer after `flatten`.
        #[arg(long, value_parser = parse_input)]
        input: Option<InputShape>,
        /// Number of classes the weights were trained for (default: the spec's).
        #[arg(long, value_parser = parse_classes)]
        classes: Option<usize>,
        /// The safetensors file to write (written atomically: nothing is written on error).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Train a model. Without flags on the embedded Fashion-MNIST a short budget for a small
    /// machine; on other data the spec's `train:` recipe. Flags override either.
    Train(Box<TrainArgs>),
    /// Print the top-1 and top-5 accuracy of a run's weights (or of a weights file) on the
    /// validation split of a dataset.
    Eval {
        /// A run directory (its final, else best weights) or a safetensors weights file.
        weights: PathBuf,
        /// The architecture of a weights file: a registered name or a spec file (default:
        /// the run's).
        #[arg(long)]
        spec: Option<String>,
        /// `fashion-mnist`, `imagenette` or a dataset folder (default: the run's).
        #[arg(long)]
        data: Option<String>,
        /// Image size HxW (default: the run's, else the data's usual size).
        #[arg(long, value_parser = parse_side)]
        input: Option<usize>,
        /// Images per forward pass.
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
    },
    /// Fold and pack trained weights into a `.zoo` model for the inference engine: batch norm
    /// and kernel scales become per-channel multipliers, binary kernels bits, LAB one kernel
    /// and threshold per channel (a safetensors file with the spec inside).
    Export {
        /// A run directory (its final, else best weights) or a safetensors weights file.
        weights: PathBuf,
        /// The architecture: a registered name or a spec file (default: the run's).
        #[arg(long)]
        spec: Option<String>,
        /// Input shape HxWxC (default: the run's, else the spec's).
        #[arg(long, value_parser = parse_input)]
        input: Option<InputShape>,
        /// Number of classes (default: the run's, else the spec's).
        #[arg(long, value_parser = parse_classes)]
        classes: Option<usize>,
        /// Class names, one per line (default: the run's dataset's, when known).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// The `.zoo` file to write (atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Time the inference engine: batch-1 latency (median, min, max after warm-up) and
    /// throughput with a batch. A `.zoo` file runs its weights; a model name or spec file runs
    /// random weights of that architecture.
    Bench {
        /// A `.zoo` file, a registered model name or a spec file.
        model: String,
        /// Input shape HxWxC (default: the model's).
        #[arg(long, value_parser = parse_input)]
        input: Option<InputShape>,
        /// Number of classes of a named model (default: the spec's).
        #[arg(long, value_parser = parse_classes)]
        classes: Option<usize>,
        /// Timed batch-1 runs.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Images per call for the throughput figure.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Also time every layer and print a table (op, shape, ms, share), written as CSV and
        /// JSON too.
        #[arg(long)]
        profile: bool,
        /// Where the profile goes: `<PREFIX>.csv` and `<PREFIX>.json` (default:
        /// `runs/profiles/<model>-<input>-<threads>t`).
        #[arg(long)]
        profile_out: Option<PathBuf>,
        /// Write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Classify an image with a `.zoo` model: the top classes and their probabilities.
    Predict {
        /// The `.zoo` model.
        model: PathBuf,
        /// A JPEG or PNG image.
        image: PathBuf,
        /// How many classes to print.
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
    /// Datasets: download Imagenette.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download, verify (SHA-256) and unpack a dataset; an interrupted download resumes.
    Fetch {
        /// The dataset: `imagenette`.
        dataset: String,
        /// Imagenette's image size: 160, 320 or full.
        #[arg(long, default_value = "160")]
        size: String,
        /// Folder to unpack into (`zoo train --data imagenette` looks in `data/`).
        #[arg(long, default_value = "data")]
        dest: PathBuf,
        /// Fetch from this base URL (a mirror) instead of the official host.
        #[arg(long)]
        mirror: Option<String>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
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
    /// Image size HxW (default 32x32 for Fashion-MNIST, the spec's for image folders).
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
        Ok(c)
    }
}

fn parse_input(s: &str) -> Result<InputShape, String> {
    s.parse()
}

fn parse_side(s: &str) -> Result<usize, String> {
    let numbers: Vec<Option<usize>> = s.split(['x', 'X']).map(|p| p.trim().parse().ok()).collect();
    match numbers.as_slice() {
        [Some(h), Some(w)] | [Some(h), Some(w), Some(_)] if h == w && *h > 0 => Ok(*h),
        [Some(side)] if *side > 0 => Ok(*side),
        _ => Err(format!(
            "expected a square image size HxW (like 32x32), found `{s}`"
        )),
    }
}

fn parse_schedule(s: &str) -> Result<zoo::spec::Schedule, String> {
    s.parse()
}

fn parse_optimizer(s: &str) -> Result<zoo::spec::Optimizer, String> {
    s.parse()
}

/// `runs/<name>-<n>` for the first `n` not taken.
fn fresh_run_dir(name: &str) -> PathBuf {
    (1..)
        .map(|n| PathBuf::from("runs").join(format!("{name}-{n}")))
        .find(|p| !p.exists())
        .expect("some run number is free")
}

fn train(args: TrainArgs) -> Result<(), zoo::Error> {
    let session = zoo::train::Session {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
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
            "training {} on {} into {} ({} epoch(s){}, batch {}, {} lr {} {}, seed {})",
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
            c.seed
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

fn eval(
    weights: PathBuf,
    spec: Option<String>,
    data: Option<String>,
    input: Option<usize>,
    batch_size: usize,
) -> Result<(), zoo::Error> {
    let run = zoo::train::RunWeights::open(&weights)?;
    let model = spec
        .or(run.config.as_ref().map(|c| c.model.clone()))
        .ok_or_else(|| {
            zoo::Error::Train(format!(
                "`{}` carries no run configuration: name its architecture with --spec",
                weights.display()
            ))
        })?;
    let data = data
        .or(run.config.as_ref().map(|c| c.data.clone()))
        .unwrap_or_else(|| zoo::train::FASHION_MNIST.to_string());
    let spec_side = zoo::spec(&model)?.input.height;
    let side = input
        .or(run
            .config
            .as_ref()
            .and_then(|c| c.model_config().ok())
            .map(|c| c.input.height))
        .unwrap_or_else(|| zoo::train::default_side(&data, spec_side));
    let dataset = zoo::train::open_dataset(&data, zoo::data::Split::Validation, side, false)?;
    let model = run.build(&model, &dataset)?;
    let session = zoo::train::Session {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let bar = zoo::train::bar_for(&session, dataset.len() as u64, "evaluating");
    let acc = zoo::train::evaluate(&*model, dataset, batch_size, 2, &bar)?;
    bar.finish_and_clear();
    println!(
        "{}: top-1 {:.2}%, top-5 {:.2}%, loss {:.4} on {} images of {}{}",
        run.path.display(),
        acc.top1,
        acc.top5,
        acc.loss,
        acc.images,
        data,
        if acc.skipped > 0 {
            format!(" ({} undecodable, skipped)", acc.skipped)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn fetch(
    dataset: &str,
    size: &str,
    dest: &std::path::Path,
    mirror: Option<&str>,
) -> Result<(), zoo::Error> {
    if dataset != "imagenette" {
        return Err(zoo::Error::Train(format!(
            "unknown dataset `{dataset}`: expected `imagenette`"
        )));
    }
    let size: zoo::data::fetch::ImagenetteSize = size.parse()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:25}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(size.folder());
    let root = zoo::data::fetch::fetch_imagenette(size, dest, mirror, &mut |done, total| {
        if let Some(total) = total {
            bar.set_length(total);
        }
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    println!(
        "Imagenette is in {} (train with `--data {}`)",
        root.display(),
        root.display()
    );
    Ok(())
}

fn parse_classes(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a positive number of classes, found `{s}`"
        )),
    }
}

/// The spec's default configuration with the flags given on the command line.
fn config_of(
    spec: &zoo::Spec,
    input: Option<InputShape>,
    classes: Option<usize>,
) -> zoo::ModelConfig {
    zoo::ModelConfig {
        input: input.unwrap_or(spec.input),
        classes: classes.unwrap_or(spec.classes),
    }
}

fn run(cli: Cli) -> Result<(), zoo::Error> {
    if let Some(threads) = cli.threads {
        if threads == 0 {
            return Err(zoo::Error::Train("--threads must be at least 1".into()));
        }
        // candle's CPU kernels size their thread pools from this variable; set it before any
        // pool starts.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    tune_runtime();
    match cli.command {
        Command::Train(args) => train(*args)?,
        Command::Eval {
            weights,
            spec,
            data,
            input,
            batch_size,
        } => eval(weights, spec, data, input, batch_size)?,
        Command::Data {
            command:
                DataCommand::Fetch {
                    dataset,
                    size,
                    dest,
                    mirror,
                },
        } => fetch(&dataset, &size, &dest, mirror.as_deref())?,
        Command::Export {
            weights,
            spec,
            input,
            classes,
            labels,
            output,
        } => export(&weights, spec, input, classes, labels.as_deref(), &output)?,
        Command::Bench {
            model,
            input,
            classes,
            runs,
            warmup,
            batch,
            profile,
            profile_out,
            json,
        } => {
            let threads = cli.threads.unwrap_or_else(default_threads);
            let engine = engine_for(&model, input, classes, threads)?;
            let report = zoo::engine::bench::bench(&engine, runs, warmup, batch, profile)?;
            let l = &report.latency_ms;
            println!(
                "{} at {}, {} thread(s), {} kernel: batch 1 median {:.3} ms (min {:.3}, max {:.3}, {} runs); batch {}: {:.1} images/s",
                report.model, report.input, report.threads, report.kernel, l.median, l.min, l.max,
                l.runs, report.throughput.batch, report.throughput.images_per_s
            );
            if let Some(ops) = &report.profile {
                print!("{}", zoo::engine::bench::render_profile(ops));
                let prefix = profile_out.unwrap_or_else(|| {
                    PathBuf::from("runs/profiles").join(format!(
                        "{}-{}-{}t",
                        report.model, report.input, report.threads
                    ))
                });
                if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| zoo::Error::Write {
                        path: dir.display().to_string(),
                        message: e.to_string(),
                    })?;
                }
                let csv = prefix.with_extension("csv");
                let json_path = prefix.with_extension("json");
                zoo::io::write_bytes_atomically(
                    &csv,
                    zoo::engine::bench::profile_csv(ops).as_bytes(),
                )?;
                let body = serde_json::to_string_pretty(ops).expect("profile serialises");
                zoo::io::write_bytes_atomically(&json_path, body.as_bytes())?;
                println!(
                    "profile written to {} and {}",
                    csv.display(),
                    json_path.display()
                );
            }
            if let Some(path) = json {
                let body = serde_json::to_string_pretty(&report).expect("report serialises");
                zoo::io::write_bytes_atomically(&path, body.as_bytes())?;
            }
        }
        Command::Predict { model, image, top } => {
            let threads = cli.threads.unwrap_or_else(default_threads);
            let zoo_model = zoo::engine::ZooModel::load(&model)?;
            let engine = zoo::engine::Engine::new(&zoo_model, threads)?;
            let input = engine.config().input;
            let pixels = if input.channels == 1 {
                zoo::data::fashion_mnist::eval_image(&image, input.height)?
            } else {
                zoo::data::folder::eval_image(&image, input.height)?
            };
            let logits = engine.run(&pixels, 1)?;
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
            let sum: f64 = exp.iter().sum();
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            for (rank, &class) in order.iter().take(top).enumerate() {
                let name = zoo_model
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(class))
                    .map_or(String::new(), |n| format!(" {n}"));
                println!(
                    "{}. class {class}{name}: {:.2}% (logit {:.4})",
                    rank + 1,
                    100.0 * exp[class] / sum,
                    logits[class]
                );
            }
        }
        Command::List => {
            println!(
                "{:<16} {:<12} {:>8} {:>11}  description",
                "name", "input", "classes", "params"
            );
            for entry in zoo::list() {
                let spec = zoo::spec(entry.name)?;
                let totals = zoo::spec::analyze(&spec, &spec.default_config())?.totals();
                println!(
                    "{:<16} {:<12} {:>8} {:>11}  {}",
                    spec.name,
                    spec.input.to_string(),
                    spec.classes,
                    zoo::summary::si(totals.params),
                    spec.description
                );
            }
        }
        Command::Summary {
            model,
            input,
            classes,
        } => {
            let spec = zoo::spec(&model)?;
            let config = config_of(&spec, input, classes);
            print!("{}", zoo::summary::render(&spec, &config)?);
        }
        Command::ImportLarq {
            weights,
            spec,
            input,
            classes,
            output,
        } => {
            let spec = zoo::spec(&spec)?;
            let config = config_of(&spec, input, classes);
            let tensors = zoo::import::read_keras_h5(&weights, &spec, &config)?;
            zoo::import::write_safetensors_atomically(&tensors, &output)?;
            let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
            println!(
                "imported {} tensors, {} parameters ({}), of `{}` at {} with {} classes from {} into {}",
                tensors.len(),
                params,
                zoo::summary::si(params as u64),
                spec.name,
                config.input,
                config.classes,
                weights.display(),
                output.display()
            );
        }
    }
    Ok(())
}

/// Process settings that keep small training steps fast on few cores (measured: about 1.3x
/// the images/s of quicknet-lab on 2 cores). Both can be overridden from the environment.
fn tune_runtime() {
    // candle's elementwise thread pool spins 25,000 times after every op before sleeping,
    // competing with the rayon threads that run the zoo's kernels.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // Keep freed activation buffers in the heap instead of returning them to the OS (and
    // faulting fresh zeroed pages in) at every step.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only changes allocator thresholds; called before any threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// An engine for a `.zoo` file, or for random weights of a registered model or spec file.
fn engine_for(
    model: &str,
    input: Option<InputShape>,
    classes: Option<usize>,
    threads: usize,
) -> Result<zoo::engine::Engine, zoo::Error> {
    let path = std::path::Path::new(model);
    let zoo_model = if path.is_file() && zoo::spec(model).is_err() {
        let mut m = zoo::engine::ZooModel::load(path)?;
        if let Some(input) = input {
            m.config.input = input;
        }
        m
    } else {
        let spec = zoo::spec(model)?;
        let config = config_of(&spec, input, classes);
        zoo::engine::bench::random_model(model, &config, 0)?
    };
    zoo::engine::Engine::new(&zoo_model, threads)
}

fn export(
    weights: &std::path::Path,
    spec: Option<String>,
    input: Option<InputShape>,
    classes: Option<usize>,
    labels: Option<&std::path::Path>,
    output: &std::path::Path,
) -> Result<(), zoo::Error> {
    let run = zoo::train::RunWeights::open(weights)?;
    let name = match (spec, &run.config) {
        (Some(s), _) => s,
        (None, Some(c)) => c.model.clone(),
        (None, None) => {
            return Err(zoo::Error::Run {
                path: weights.display().to_string(),
                message: "a plain weights file: name its architecture with --spec".into(),
            })
        }
    };
    let spec = zoo::spec(&name)?;
    let text = zoo::spec_text(&name)?;
    let run_input = run.config.as_ref().and_then(|c| c.input.parse().ok());
    let config = zoo::ModelConfig {
        input: input.or(run_input).unwrap_or(spec.input),
        classes: classes
            .or(run.config.as_ref().map(|c| c.classes))
            .unwrap_or(spec.classes),
    };
    let mut model = zoo::engine::export(&text, &spec, &config, &run.tensors)?;
    model.labels = match labels {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| zoo::Error::Run {
                    path: file.display().to_string(),
                    message: format!("cannot read the class names: {e}"),
                })?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        ),
        None => run
            .config
            .as_ref()
            .filter(|c| zoo::train::is_fashion_mnist(&c.data))
            .map(|_| {
                zoo::data::fashion_mnist::CLASSES
                    .iter()
                    .map(|c| c.to_string())
                    .collect()
            }),
    };
    if let Some(l) = &model.labels {
        if l.len() != config.classes {
            return Err(zoo::Error::Run {
                path: labels.map_or(weights, |p| p).display().to_string(),
                message: format!("{} class names for {} classes", l.len(), config.classes),
            });
        }
    }
    model.save(output)?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "exported `{}` at {} with {} classes to {} ({} bytes, {:.2} MiB)",
        spec.name,
        config.input,
        config.classes,
        output.display(),
        size,
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
