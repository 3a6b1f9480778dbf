//! `zoo list`, `zoo summary` and `zoo import-larq`: the registry, model tables and Keras weights.

use std::path::Path;

use zoo::spec::InputShape;

use crate::config_of;

/// Prints the registered models and the pretrained variants.
pub fn list() -> Result<(), zoo::Error> {
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
    println!();
    println!(
        "{:<28} {:<14} {:<10} {:>8} {:>15}  source",
        "pretrained", "dataset", "input", "classes", "top-1 / top-5"
    );
    for v in zoo::hub::PRETRAINED {
        let accuracy = v
            .accuracy
            .map_or("-".to_string(), |(t1, t5)| format!("{t1:.2} / {t5:.2}"));
        let source = match v.source {
            zoo::hub::Source::Hub => "hub".to_string(),
            zoo::hub::Source::LarqRelease { path, .. } => format!("Larq Zoo release {path}"),
        };
        println!(
            "{:<28} {:<14} {:<10} {:>8} {:>15}  {source}{}",
            v.name(),
            v.dataset,
            v.input,
            v.classes,
            accuracy,
            if v.default { " (default)" } else { "" }
        );
    }
    Ok(())
}

/// Prints a model's per-layer table.
pub fn summary(
    model: &str,
    input: Option<InputShape>,
    classes: Option<usize>,
) -> Result<(), zoo::Error> {
    let spec = zoo::spec(model)?;
    let config = config_of(&spec, input, classes);
    print!("{}", zoo::summary::render(&spec, &config)?);
    Ok(())
}

/// Converts Keras weights.
pub fn import_larq(
    weights: &Path,
    spec: &str,
    input: Option<InputShape>,
    classes: Option<usize>,
    output: &Path,
) -> Result<(), zoo::Error> {
    let spec = zoo::spec(spec)?;
    let config = config_of(&spec, input, classes);
    let tensors = zoo::import::read_keras_h5(weights, &spec, &config)?;
    zoo::import::write_safetensors_atomically(&tensors, output)?;
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
    Ok(())
}
