//! `report.html`: one self-contained page per run (the curves as inline SVG, the per-epoch
//! figures, the final metrics, the configuration and the model summary), rewritten after every
//! epoch and at the end.

use std::fmt::Write as _;
use std::path::Path;

use super::{EpochMetrics, RunConfig, RunSummary, TrainingTime};
use crate::plot::{Curves, RunCurves, XAxis};
use crate::Error;

/// The report's file name in the run directory.
pub const REPORT: &str = "report.html";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes `report.html` into `dir` from the run's configuration, its epochs so far, the model
/// summary and, once finished, its summary.
pub fn write(
    dir: &Path,
    config: &RunConfig,
    epochs: &[EpochMetrics],
    model_summary: &str,
    finished: Option<&RunSummary>,
) -> Result<(), Error> {
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let runs = [RunCurves {
        name: name.clone(),
        epochs: epochs.to_vec(),
    }];
    let curves = crate::plot::svg(
        &Curves {
            runs: &runs,
            x: XAxis::Epoch,
        },
        (1280, 900),
    )
    .map_err(|message| Error::Write {
        path: dir.join(REPORT).display().to_string(),
        message,
    })?;
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{0}: {1}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em auto; max-width: 1320px; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: 1em 0; }}\n\
         td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}\n\
         th {{ background: #f3f3f3; }}\n\
         pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }}\n\
         </style>\n</head>\n<body>\n<h1>{0}: {1} on {2}</h1>\n",
        escape(&name),
        escape(&config.model),
        escape(&config.data)
    );
    let status = status(config, epochs, finished);
    let _ = writeln!(html, "<p id=\"status\">{}</p>", escape(&status));
    html += &latest_metrics(epochs);
    let _ = writeln!(html, "<h2>Curves</h2>\n<div id=\"curves\">{curves}</div>");
    html += &epochs_table(epochs);
    let config_json = serde_json::to_string_pretty(config).expect("a run config serialises");
    let _ = writeln!(
        html,
        "<h2>Configuration</h2>\n<pre id=\"config\">{}</pre>\n<h2>Model</h2>\n<pre id=\"model\">{}</pre>\n</body>\n</html>",
        escape(&config_json),
        escape(model_summary)
    );
    crate::io::write_bytes_atomically(&dir.join(REPORT), html.as_bytes())
}

/// Where the run stands: the epochs done, or the steps and time of a finished run.
fn status(config: &RunConfig, epochs: &[EpochMetrics], finished: Option<&RunSummary>) -> String {
    let Some(s) = finished else {
        return format!(
            "In progress: {} of {} epochs done.",
            epochs.last().map_or(0.0, |m| m.epoch),
            config.epochs
        );
    };
    // Every session's steps: `s` times only the last process of a resumed run.
    let run = TrainingTime::of_epochs(epochs).unwrap_or(TrainingTime {
        seconds: 0.0,
        images_per_second: 0.0,
    });
    format!(
        "Finished: {} steps ({:.2} epochs); training steps took {:.0} s at {:.1} images/s \
         over the run (this process: {:.0} s wall-clock, {:.1} training images/s).",
        s.steps,
        s.epochs,
        run.seconds,
        run.images_per_second,
        s.wall_seconds,
        s.train_images_per_second
    )
}

/// The last validation and the best top-1 so far, as a table (empty before any validation).
fn latest_metrics(epochs: &[EpochMetrics]) -> String {
    let Some(v) = epochs.last().and_then(|m| m.val) else {
        return String::new();
    };
    let best = epochs
        .iter()
        .filter_map(|m| m.val.map(|v| (v.top1, m.epoch)))
        .fold((f64::MIN, 0.0), |a, b| if b.0 > a.0 { b } else { a });
    format!(
        "<h2>Metrics</h2>\n<table id=\"metrics\"><tr><th>validation top-1</th><th>top-5</th>\
         <th>loss</th><th>images</th><th>best top-1 (epoch)</th></tr>\n\
         <tr><td>{:.2}%</td><td>{:.2}%</td><td>{:.4}</td><td>{}</td><td>{:.2}% ({})</td></tr></table>\n",
        v.top1, v.top5, v.loss, v.images, best.0, best.1
    )
}

/// One table row per epoch.
fn epochs_table(epochs: &[EpochMetrics]) -> String {
    let mut html = String::from(
        "<h2>Per epoch</h2>\n<table id=\"epochs\"><tr><th>epoch</th><th>step</th>\
         <th>train loss</th><th>train top-1</th><th>val top-1</th><th>val top-5</th>\
         <th>val loss</th><th>learning rate</th><th>images/s</th><th>seconds</th></tr>\n",
    );
    for m in epochs {
        let (top1, top5, loss) = m.val.map_or(("-".into(), "-".into(), "-".into()), |v| {
            (
                format!("{:.2}%", v.top1),
                format!("{:.2}%", v.top5),
                format!("{:.4}", v.loss),
            )
        });
        let _ = writeln!(
            html,
            "<tr><td>{:.2}</td><td>{}</td><td>{:.4}</td><td>{:.2}%</td><td>{top1}</td>\
             <td>{top5}</td><td>{loss}</td><td>{:.3e}</td><td>{:.1}</td><td>{:.0}</td></tr>",
            m.epoch,
            m.step,
            m.train_loss,
            m.train_top1,
            m.learning_rate,
            m.images_per_second,
            m.seconds
        );
    }
    html += "</table>\n";
    html
}
