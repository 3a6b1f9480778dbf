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
}

fn parse_input(s: &str) -> Result<InputShape, String> {
    s.parse()
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
    match cli.command {
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
