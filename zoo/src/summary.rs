//! `zoo summary`: a per-layer table and totals of parameters, MACs and model size.

use std::fmt::Write;

use crate::spec::{self, ModelConfig, Spec};
use crate::Error;

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `1849688064` as `1.85 G`, three significant digits.
pub fn si(n: u64) -> String {
    let x = n as f64;
    let (value, unit) = match x {
        x if x >= 1e9 => (x / 1e9, " G"),
        x if x >= 1e6 => (x / 1e6, " M"),
        x if x >= 1e3 => (x / 1e3, " k"),
        x => (x, ""),
    };
    let decimals = match value {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    };
    if unit.is_empty() {
        format!("{n}")
    } else {
        format!("{value:.decimals$}{unit}")
    }
}

/// The summary of `spec` at `config` as text: one row per layer, then the totals.
pub fn render(spec: &Spec, config: &ModelConfig) -> Result<String, Error> {
    let analysis = spec::analyze(spec, config)?;
    let mut out = String::new();
    let w = |out: &mut String, s: String| {
        writeln!(out, "{s}").expect("writing to a String cannot fail")
    };
    w(
        &mut out,
        format!("Model: {} ({})", spec.name, spec.description),
    );
    w(
        &mut out,
        format!(
            "Input: {} (HxWxC), {} classes",
            config.input, config.classes
        ),
    );
    w(&mut out, String::new());
    let header = format!(
        "{:<44} {:<16} {:>14} {:>12} {:>14} {:>14} {:>11}",
        "Layer", "Kind", "Output", "Params", "Binary MACs", "Float MACs", "Size (KiB)"
    );
    w(&mut out, header.clone());
    w(&mut out, "-".repeat(header.len()));
    for layer in &analysis.layers {
        let params: u64 = layer.params.iter().map(|p| p.len() as u64).sum();
        let bits: u64 = layer
            .params
            .iter()
            .map(|p| p.len() as u64 * if p.binary { 1 } else { 32 })
            .sum();
        let dash = |n: u64, s: String| if n == 0 { "-".to_string() } else { s };
        w(
            &mut out,
            format!(
                "{:<44} {:<16} {:>14} {:>12} {:>14} {:>14} {:>11}",
                format!("{}{}", "  ".repeat(layer.depth), layer.name),
                layer.kind,
                layer.output.to_string(),
                dash(params, grouped(params)),
                dash(layer.binary_macs, grouped(layer.binary_macs)),
                dash(layer.float_macs, grouped(layer.float_macs)),
                dash(bits, format!("{:.2}", bits as f64 / 8.0 / 1024.0)),
            ),
        );
    }
    w(&mut out, "-".repeat(header.len()));
    let t = analysis.totals();
    let macs = t.binary_macs + t.float_macs;
    let lines = [
        (
            "Parameters",
            format!("{} ({})", grouped(t.params), si(t.params)),
        ),
        ("  trainable", grouped(t.trainable_params)),
        ("  non-trainable", grouped(t.params - t.trainable_params)),
        (
            "  binary (1 bit)",
            format!(
                "{} ({:.1}%)",
                grouped(t.binary_params),
                100.0 * t.binary_params as f64 / t.params as f64
            ),
        ),
        (
            "Binary MACs",
            format!("{} ({})", grouped(t.binary_macs), si(t.binary_macs)),
        ),
        (
            "Float MACs",
            format!("{} ({})", grouped(t.float_macs), si(t.float_macs)),
        ),
        (
            "Total MACs",
            format!(
                "{} ({}), {:.1}% binary",
                grouped(macs),
                si(macs),
                100.0 * t.binary_macs as f64 / macs.max(1) as f64
            ),
        ),
        (
            "Model size (1-bit weights)",
            format!("{:.2} MiB", t.model_size_bytes() / (1024.0 * 1024.0)),
        ),
        (
            "Model size (float32)",
            format!("{:.2} MiB", 4.0 * t.params as f64 / (1024.0 * 1024.0)),
        ),
    ];
    for (label, value) in lines {
        w(&mut out, format!("{label:<28} {value}"));
    }
    Ok(out)
}
