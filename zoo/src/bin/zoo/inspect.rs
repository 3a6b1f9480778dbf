//! `zoo inspect`: what each binarizer of trained weights does on validation images.

use std::path::PathBuf;

use crate::eval::{Judged, JudgedArgs};

/// `zoo inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    judged: JudgedArgs,
    /// Validation images to run (the first ones).
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Prints, per binarized activation, the share of +1 and its spread over channels.
pub fn inspect(args: InspectArgs) -> Result<(), zoo::Error> {
    let judged = Judged::open(args.judged)?;
    let network = judged.run.network(&judged.model, &judged.dataset)?;
    let stats = zoo::inspect::binarizer_statistics(&network, &judged.dataset, args.images, 100)?;
    println!(
        "{} on {} validation images of {}",
        judged.run.path.display(),
        args.images.min(judged.dataset.len()),
        judged.data
    );
    println!(
        "{:<32} {:<11} {:>8} {:>7} {:>7}  {:<23} {:>9} {:>8}",
        "layer",
        "binarizer",
        "channels",
        "map",
        "+1 %",
        "channel +1 % min/med/max",
        "constant",
        "beta"
    );
    for s in &stats {
        let [lo, mid, hi] = s.channel_plus.map(|x| 100.0 * x);
        println!(
            "{:<32} {:<11} {:>8} {:>7} {:>7.2}  {:>6.2} / {:>6.2} / {:>6.2} {:>9} {:>8}",
            s.layer,
            s.binarizer,
            s.channels,
            format!("{}x{}", s.map[0], s.map[1]),
            100.0 * s.plus,
            lo,
            mid,
            hi,
            s.constant_channels,
            s.beta.map_or("-".to_string(), |b| format!("{b:.4}"))
        );
    }
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&stats).expect("statistics serialise");
        zoo::io::write_bytes_atomically(&path, json.as_bytes())?;
    }
    Ok(())
}
