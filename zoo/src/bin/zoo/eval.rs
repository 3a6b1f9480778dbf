//! `zoo eval`: top-1 and top-5 of trained or pretrained weights, or of a packed `.zoo` model
//! on the inference engine, on a validation split.

use crate::hub::WeightsSource;
use crate::parse_side;

/// The weights to judge and the data to judge them on (`zoo eval`, `zoo inspect`).
#[derive(clap::Args)]
pub struct JudgedArgs {
    /// A run directory (its final, else best weights), a safetensors weights file, a
    /// pretrained model (`quicknet-lab`, `org/name`, a local repo directory), or (`zoo eval`)
    /// a packed `.zoo` model, run by the inference engine.
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
}

/// `zoo eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    judged: JudgedArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
}

/// Trained weights with their architecture and the validation split they are judged on.
pub struct Judged {
    /// The weights read.
    pub run: zoo::train::RunWeights,
    /// The architecture: a registered name or a spec file.
    pub model: String,
    /// The dataset, as named.
    pub data: String,
    /// Its validation split, at the model's input size.
    pub dataset: std::sync::Arc<dyn zoo::data::Dataset>,
}

impl Judged {
    /// Resolves the weights (a run, weights file or pretrained model), their architecture
    /// (`--spec`, else the run's or repo's) and the validation split of `--data` (else the
    /// run's, the repo's, Fashion-MNIST) at `--input` (else the run's size, else the data's
    /// usual one).
    pub fn open(args: JudgedArgs) -> Result<Judged, zoo::Error> {
        let JudgedArgs {
            weights,
            spec,
            data,
            input,
        } = args;
        let (source, run, model) = open_weights(&weights, spec)?;
        let data = data
            .or(run.config.as_ref().map(|c| c.data.clone()))
            .or(source.dataset)
            .unwrap_or_else(|| zoo::train::FASHION_MNIST.to_string());
        let spec = zoo::spec(&model)?;
        let side = input
            .or(run
                .config
                .as_ref()
                .and_then(|c| c.model_config().ok())
                .map(|c| c.input.height))
            .unwrap_or_else(|| zoo::train::default_side(&data, &spec));
        let dataset = zoo::train::open_dataset(&data, zoo::data::Split::Validation, side, false)?;
        Ok(Judged {
            run,
            model,
            data,
            dataset,
        })
    }
}

/// Resolves and reads weights named on the command line (`spec` from `--spec`), with their
/// architecture: `spec`, else the repo's or the run's.
pub fn open_weights(
    arg: &str,
    spec: Option<String>,
) -> Result<(WeightsSource, zoo::train::RunWeights, String), zoo::Error> {
    let source = WeightsSource::resolve(arg, spec)?;
    let run = zoo::train::RunWeights::open(&source.path)?;
    let model = source
        .spec
        .clone()
        .or(run.config.as_ref().map(|c| c.model.clone()))
        .ok_or_else(|| {
            zoo::Error::Train(format!(
                "`{}` carries no run configuration: name its architecture with --spec",
                source.path.display()
            ))
        })?;
    Ok((source, run, model))
}

/// Evaluates weights, or a `.zoo` model, on a validation split, on `device`.
pub fn eval(args: EvalArgs, device: &str, threads: usize) -> Result<(), zoo::Error> {
    let packed = std::path::Path::new(&args.judged.weights);
    if packed.extension().is_some_and(|e| e == "zoo") && packed.is_file() {
        return eval_packed(args, device, threads);
    }
    let device = zoo::device::parse(device)?;
    let Judged {
        run,
        model,
        data,
        dataset,
    } = Judged::open(args.judged)?;
    let run = run.to_device(&device)?;
    let model = run.build(&model, &dataset)?;
    let session = zoo::train::Session {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        device,
    };
    let bar = zoo::train::bar_for(&session, dataset.len() as u64, "evaluating");
    let acc = zoo::train::evaluate(&*model, dataset, args.batch_size, 2, &bar, &session.device)?;
    bar.finish_and_clear();
    report(&run.path.display().to_string(), &acc, &data);
    Ok(())
}

/// `zoo eval` of a `.zoo` model: the packed engine on `device` over the validation split of
/// `--data` (default Fashion-MNIST) at `--input` (default the model's).
fn eval_packed(args: EvalArgs, device: &str, threads: usize) -> Result<(), zoo::Error> {
    let JudgedArgs {
        weights,
        spec,
        data,
        input,
    } = args.judged;
    if spec.is_some() {
        return Err(zoo::Error::Train(format!(
            "`{weights}` is a packed model, which carries its spec: drop --spec"
        )));
    }
    let mut model = zoo::engine::ZooModel::load(std::path::Path::new(&weights))?;
    if let Some(side) = input {
        model.config.input.height = side;
        model.config.input.width = side;
    }
    let data = data.unwrap_or_else(|| zoo::train::FASHION_MNIST.to_string());
    let side = model.config.input.height;
    let dataset = zoo::train::open_dataset(&data, zoo::data::Split::Validation, side, false)?;
    let engine = zoo::engine::Packed(zoo::engine::runner(&model, device, threads)?);
    let session = zoo::train::Session {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        device: zoo::candle_core::Device::Cpu,
    };
    let bar = zoo::train::bar_for(&session, dataset.len() as u64, "evaluating");
    let acc = zoo::train::evaluate(&engine, dataset, args.batch_size, 2, &bar, &session.device)?;
    bar.finish_and_clear();
    report(&weights, &acc, &data);
    Ok(())
}

/// Prints an evaluation's figures.
fn report(what: &str, acc: &zoo::train::Accuracy, data: &str) {
    println!(
        "{}: top-1 {:.2}%, top-5 {:.2}%, loss {:.4} on {} images of {}{}",
        what,
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
}
