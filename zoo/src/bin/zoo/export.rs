//! `zoo export`: trained or pretrained weights folded and packed into a `.zoo` file.

use std::path::PathBuf;

use zoo::spec::InputShape;

use crate::hub::WeightsSource;
use crate::{parse_classes, parse_input};

/// `zoo export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// A run directory (its final, else best weights), a safetensors weights file, or a
    /// pretrained model (`quicknet-lab`, `org/name`, a local repo directory).
    weights: String,
    /// The architecture: a registered name or a spec file (default: the run's or the repo's).
    #[arg(long)]
    spec: Option<String>,
    /// Input shape HxWxC (default: the run's, else the spec's).
    #[arg(long, value_parser = parse_input)]
    input: Option<InputShape>,
    /// Number of classes (default: the run's, else the spec's).
    #[arg(long, value_parser = parse_classes)]
    classes: Option<usize>,
    /// Class names, one per line (default: the run's dataset's or the repo's, when known).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The `.zoo` file to write (atomically).
    #[arg(short, long)]
    output: PathBuf,
}

/// Writes a `.zoo` file.
pub fn export(args: ExportArgs) -> Result<(), zoo::Error> {
    let source = WeightsSource::resolve(&args.weights, args.spec)?;
    let weights = source.path.as_path();
    let (input, classes, labels, output) = (
        args.input,
        args.classes,
        args.labels.as_deref(),
        args.output.as_path(),
    );
    let run = zoo::train::RunWeights::open(weights)?;
    let name = match (source.spec, &run.config) {
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
        None => source.class_names.or_else(|| {
            run.config
                .as_ref()
                .filter(|c| zoo::train::is_fashion_mnist(&c.data))
                .map(|_| {
                    zoo::data::fashion_mnist::CLASSES
                        .iter()
                        .map(|c| c.to_string())
                        .collect()
                })
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
