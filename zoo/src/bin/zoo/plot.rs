//! `zoo plot`: pictures of runs, results, binarizers and profiles.

use std::path::PathBuf;

use zoo::plot::{Inspection, Profile, RunCurves, XAxis};

/// `zoo plot`.
#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directories of `zoo train` (their training curves, one colour per run), profiles of
    /// `zoo bench --profile` (`<prefix>.json`: per-layer latency bars, side by side), files of
    /// `zoo inspect --json` (per binarized layer: the channels stuck at one sign, the share of
    /// +1 and LAB's beta, one colour per model), or one results file (a JSON list of `{model,
    /// top1, latency_ms}`, as the accuracy campaign's `results.json`: accuracy against latency,
    /// LAB joined to sign).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The picture to write: `.png` or `.svg` (default: `curves.png`, `profile.png`,
    /// `binarizers.png` or `tradeoff.png`).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The horizontal axis of curves: `epoch` or `step`.
    #[arg(long, default_value = "epoch", value_parser = ["epoch", "step"])]
    by: String,
}

/// Draws curves of runs, the accuracy/latency trade-off of a results file, binarizer
/// statistics or latency bars of profiles, whichever the inputs are.
pub fn plot(args: PlotArgs) -> Result<(), zoo::Error> {
    let (output, names) = if args.inputs.iter().all(|p| p.is_dir()) {
        let runs = args
            .inputs
            .iter()
            .map(|dir| RunCurves::open(dir))
            .collect::<Result<Vec<_>, _>>()?;
        let x = if args.by == "step" {
            XAxis::Step
        } else {
            XAxis::Epoch
        };
        let output = args.output.unwrap_or_else(|| "curves.png".into());
        zoo::plot::curves(&runs, x, &output)?;
        (output, runs.into_iter().map(|r| r.name).collect::<Vec<_>>())
    } else if args.inputs.iter().all(|p| p.is_file()) {
        plot_files(&args.inputs, args.output)?
    } else {
        let missing = args.inputs.iter().find(|p| !p.exists());
        return Err(zoo::Error::Train(match missing {
            Some(p) => format!("{}: no such file or directory", p.display()),
            None => "expected run directories only, or profile JSON files only".into(),
        }));
    };
    println!(
        "wrote {} ({} input(s): {})",
        output.display(),
        names.len(),
        names.join(", ")
    );
    Ok(())
}

/// Draws files: one results file (accuracy against latency), `zoo inspect --json` files (the
/// binarizers layer by layer) or `zoo bench --profile` files (latency bars); returns the
/// picture and the names drawn.
fn plot_files(
    files: &[PathBuf],
    output: Option<PathBuf>,
) -> Result<(PathBuf, Vec<String>), zoo::Error> {
    let output = |default: &str| output.clone().unwrap_or_else(|| default.into());
    if let [file] = files {
        if let Ok(points) = zoo::plot::open_results(file) {
            let output = output("tradeoff.png");
            zoo::plot::tradeoff(&points, &output)?;
            return Ok((output, points.into_iter().map(|p| p.model).collect()));
        }
    }
    let not_inspection = match Inspection::open(&files[0]) {
        Ok(first) => {
            let mut inspections = vec![first];
            for file in &files[1..] {
                inspections.push(Inspection::open(file)?);
            }
            // Layers are matched by position: say so where the models' layers differ.
            let names =
                |i: &Inspection| i.layers.iter().map(|l| l.layer.clone()).collect::<Vec<_>>();
            for other in &inspections[1..] {
                if names(other) != names(&inspections[0]) {
                    eprintln!(
                        "note: {} and {} binarize different layers; they are drawn by position",
                        inspections[0].name, other.name
                    );
                }
            }
            let output = output("binarizers.png");
            zoo::plot::binarizers(&inspections, &output)?;
            return Ok((output, inspections.into_iter().map(|i| i.name).collect()));
        }
        Err(e) => e,
    };
    let profiles = files
        .iter()
        .map(|file| Profile::open(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| match (e, not_inspection) {
            // The first file is neither: say both what it is not.
            (zoo::Error::Run { path, message }, zoo::Error::Run { message: other, .. })
                if path == files[0].display().to_string() =>
            {
                zoo::Error::Run {
                    path,
                    message: format!("{message}; {other}"),
                }
            }
            (e, _) => e,
        })?;
    let output = output("profile.png");
    zoo::plot::latency(&profiles, &output)?;
    Ok((output, profiles.into_iter().map(|p| p.name).collect()))
}
