//! `zoo plot`: pictures of runs and profiles.

use std::path::PathBuf;

use zoo::plot::{Profile, RunCurves, XAxis};

/// `zoo plot`.
#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directories of `zoo train` (their training curves, one colour per run), profiles of
    /// `zoo bench --profile` (`<prefix>.json`: per-layer latency bars, side by side), or one
    /// results file (a JSON list of `{model, top1, latency_ms}`, as the accuracy campaign's
    /// `results.json`: accuracy against latency, LAB joined to sign).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The picture to write: `.png` or `.svg` (default: `curves.png`, `profile.png` or
    /// `tradeoff.png`).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The horizontal axis of curves: `epoch` or `step`.
    #[arg(long, default_value = "epoch", value_parser = ["epoch", "step"])]
    by: String,
}

/// Draws curves of runs or latency bars of profiles, whichever the inputs are.
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
    } else if let [file] = args.inputs.as_slice() {
        if let Ok(points) = zoo::plot::open_results(file) {
            let output = args.output.unwrap_or_else(|| "tradeoff.png".into());
            zoo::plot::tradeoff(&points, &output)?;
            (output, points.into_iter().map(|p| p.model).collect())
        } else {
            let profile = Profile::open(file)?;
            let output = args.output.unwrap_or_else(|| "profile.png".into());
            zoo::plot::latency(std::slice::from_ref(&profile), &output)?;
            (output, vec![profile.name])
        }
    } else if args.inputs.iter().all(|p| p.is_file()) {
        let profiles = args
            .inputs
            .iter()
            .map(|file| Profile::open(file))
            .collect::<Result<Vec<_>, _>>()?;
        let output = args.output.unwrap_or_else(|| "profile.png".into());
        zoo::plot::latency(&profiles, &output)?;
        (output, profiles.into_iter().map(|p| p.name).collect())
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
