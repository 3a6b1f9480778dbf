//! The `zoo` command line: one module per command.

mod data;
mod eval;
mod export;
mod hub;
mod infer;
mod info;
mod inspect;
mod plot;
mod show;
mod train;

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
    /// Where `train`, `eval`, `bench` and `predict` compute: `cpu`, `cuda` or `cuda:N` (a GPU
    /// needs a zoo built with its `cuda` feature; `bench` and `predict` run the packed engine
    /// on it).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
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
    Train(Box<train::TrainArgs>),
    /// Print the top-1 and top-5 accuracy of a run's weights, a weights file or a pretrained
    /// model on the validation split of a dataset.
    Eval(eval::EvalArgs),
    /// Show what each binarizer of trained weights does on validation images: the share of +1,
    /// its spread over channels, channels stuck at one sign, LAB's beta.
    Inspect(inspect::InspectArgs),
    /// Draw the training curves of one or more runs (loss, validation and training top-1,
    /// learning rate; one colour per run), per-layer latency bars of `zoo bench --profile`
    /// files side by side, what the binarizers of models do layer by layer from `zoo inspect
    /// --json` files, or accuracy against latency from a results file, as PNG or SVG.
    Plot(plot::PlotArgs),
    /// Draw, for chosen layers of one or more models side by side (a sign model beside its LAB
    /// twin), each binarizer's real-valued input and the binary map it gives on one image, and
    /// the share of +1 per channel.
    Show(show::ShowArgs),
    /// Fold and pack trained weights into a `.zoo` model for the inference engine: batch norm
    /// and kernel scales become per-channel multipliers, binary kernels bits, LAB one kernel
    /// and threshold per channel (a safetensors file with the spec inside).
    Export(export::ExportArgs),
    /// Time the inference engine: batch-1 latency (median, min, max after warm-up) and
    /// throughput with a batch. A `.zoo` file or pretrained model runs its weights; a model
    /// name or spec file runs random weights of that architecture.
    Bench(infer::BenchArgs),
    /// Classify an image with a `.zoo` model or a pretrained model: the top classes and their
    /// probabilities.
    Predict(infer::PredictArgs),
    /// Download a pretrained model or hub repo into the Hugging Face cache (verified); prints
    /// the snapshot directory as its last line.
    Pull(hub::PullArgs),
    /// Publish a run, weights file or `.zoo` model to a hub repo in one commit, with a model
    /// card (`HF_TOKEN`, `HF_ENDPOINT`).
    Push(hub::PushArgs),
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

pub(crate) fn parse_input(s: &str) -> Result<InputShape, String> {
    s.parse()
}

pub(crate) fn parse_side(s: &str) -> Result<usize, String> {
    let numbers: Vec<Option<usize>> = s.split(['x', 'X']).map(|p| p.trim().parse().ok()).collect();
    match numbers.as_slice() {
        [Some(h), Some(w)] | [Some(h), Some(w), Some(_)] if h == w && *h > 0 => Ok(*h),
        [Some(side)] if *side > 0 => Ok(*side),
        _ => Err(format!(
            "expected a square image size HxW (like 32x32), found `{s}`"
        )),
    }
}

pub(crate) fn parse_schedule(s: &str) -> Result<zoo::spec::Schedule, String> {
    s.parse()
}

pub(crate) fn parse_optimizer(s: &str) -> Result<zoo::spec::Optimizer, String> {
    s.parse()
}
pub(crate) fn parse_classes(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a positive number of classes, found `{s}`"
        )),
    }
}

/// The spec's default configuration with the flags given on the command line.
pub(crate) fn config_of(
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
    zoo::device::tune_runtime();
    let threads = cli.threads.unwrap_or_else(default_threads);
    match cli.command {
        Command::List => info::list(),
        Command::Summary {
            model,
            input,
            classes,
        } => info::summary(&model, input, classes),
        Command::ImportLarq {
            weights,
            spec,
            input,
            classes,
            output,
        } => info::import_larq(&weights, &spec, input, classes, &output),
        Command::Train(args) => train::train(*args, zoo::device::parse(&cli.device)?),
        Command::Eval(args) => eval::eval(args, &cli.device, threads),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Plot(args) => plot::plot(args),
        Command::Show(args) => show::show(args),
        Command::Export(args) => export::export(args),
        Command::Bench(args) => infer::bench(args, &cli.device, threads),
        Command::Predict(args) => infer::predict(args, &cli.device, threads),
        Command::Pull(args) => hub::pull(args),
        Command::Push(args) => hub::push(args),
        Command::Data {
            command:
                DataCommand::Fetch {
                    dataset,
                    size,
                    dest,
                    mirror,
                },
        } => data::fetch(&dataset, &size, &dest, mirror.as_deref()),
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> ExitCode {
    // A closed pipe (`zoo list | head -1`) ends the process quietly, as it ends other Unix
    // tools, instead of a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
