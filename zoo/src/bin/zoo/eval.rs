//! `zoo eval`: top-1 and top-5 of trained or pretrained weights on a validation split.

use crate::hub::WeightsSource;
use crate::parse_side;

/// `zoo eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// A run directory (its final, else best weights), a safetensors weights file, or a
    /// pretrained model (`quicknet-lab`, `org/name`, a local repo directory).
    weights: String,
    /// The architecture of a weights file: a registered name or a spec file (default:
    /// the run's or the repo's).
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
}

/// Evaluates weights on a validation split.
pub fn eval(args: EvalArgs) -> Result<(), zoo::Error> {
    let source = WeightsSource::resolve(&args.weights, args.spec)?;
    let weights = source.path;
    let run = zoo::train::RunWeights::open(&weights)?;
    let model = source
        .spec
        .or(run.config.as_ref().map(|c| c.model.clone()))
        .ok_or_else(|| {
            zoo::Error::Train(format!(
                "`{}` carries no run configuration: name its architecture with --spec",
                weights.display()
            ))
        })?;
    let data = args
        .data
        .or(run.config.as_ref().map(|c| c.data.clone()))
        .or(source.dataset)
        .unwrap_or_else(|| zoo::train::FASHION_MNIST.to_string());
    let spec = zoo::spec(&model)?;
    let side = args
        .input
        .or(run
            .config
            .as_ref()
            .and_then(|c| c.model_config().ok())
            .map(|c| c.input.height))
        .unwrap_or_else(|| zoo::train::default_side(&data, &spec));
    let dataset = zoo::train::open_dataset(&data, zoo::data::Split::Validation, side, false)?;
    let model = run.build(&model, &dataset)?;
    let session = zoo::train::Session {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let bar = zoo::train::bar_for(&session, dataset.len() as u64, "evaluating");
    let acc = zoo::train::evaluate(&*model, dataset, args.batch_size, 2, &bar)?;
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
