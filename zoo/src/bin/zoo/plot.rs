//! `zoo plot`: pictures of runs.

use std::path::PathBuf;

use zoo::plot::{RunCurves, XAxis};

/// `zoo plot`.
#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directories of `zoo train`: their curves, one colour per run.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The picture to write: `.png` or `.svg`.
    #[arg(short, long, default_value = "curves.png")]
    output: PathBuf,
    /// The horizontal axis: `epoch` or `step`.
    #[arg(long, default_value = "epoch", value_parser = ["epoch", "step"])]
    by: String,
}

/// Draws the curves of the runs.
pub fn plot(args: PlotArgs) -> Result<(), zoo::Error> {
    let runs = args
        .runs
        .iter()
        .map(|dir| RunCurves::open(dir))
        .collect::<Result<Vec<_>, _>>()?;
    let x = if args.by == "step" {
        XAxis::Step
    } else {
        XAxis::Epoch
    };
    zoo::plot::curves(&runs, x, &args.output)?;
    println!(
        "wrote {} ({} run(s): {})",
        args.output.display(),
        runs.len(),
        runs.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
