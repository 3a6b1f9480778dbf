//! The registry of compiled-in models, keyed by name, and lookup of spec files.

use std::path::Path;

use candle_nn::VarBuilder;

use crate::models::*;
use crate::{Error, Model, ModelConfig, Network, Spec};

/// Builds a registered model from its weights and configuration.
pub type Builder = fn(VarBuilder, &ModelConfig) -> Result<Box<dyn Model>, Error>;

/// A registered model.
pub struct Entry {
    /// Registry name, for example `quicknet-lab`.
    pub name: &'static str,
    /// The spec file it was compiled from, relative to the repository.
    pub file: &'static str,
    /// The spec's YAML text.
    pub yaml: &'static str,
    /// Builds the generated struct.
    pub build: Builder,
}

macro_rules! entries {
    ($($model:ident),* $(,)?) => {
        &[$(Entry {
            name: $model::NAME,
            file: $model::FILE,
            yaml: $model::YAML,
            build: |vb, config| Ok(Box::new($model::new(vb, config)?)),
        }),*]
    };
}

static REGISTRY: &[Entry] = entries![
    QuickNet,
    QuickNetLab,
    QuickNetSmall,
    QuickNetLarge,
    BiRealNet,
    BiRealNetLab,
    ReActNet,
    ReActNetLab,
    XnorNet,
    XnorNetLab,
    LabBnn,
];

/// The registered models, in registry order.
pub fn list() -> &'static [Entry] {
    REGISTRY
}

fn entry(name: &str) -> Option<&'static Entry> {
    REGISTRY.iter().find(|e| e.name == name)
}

/// Looks a model up: a registered name (`quicknet-lab`) or the path of a spec file.
pub fn spec(name_or_path: &str) -> Result<Spec, Error> {
    if let Some(e) = entry(name_or_path) {
        return Ok(zoo_spec::parse_str(e.yaml, e.file)?);
    }
    if Path::new(name_or_path).is_file() {
        return Ok(zoo_spec::load_file(name_or_path)?);
    }
    Err(Error::UnknownModel {
        name: name_or_path.to_string(),
        known: REGISTRY
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The YAML text of a registered model's spec or of a spec file.
pub fn spec_text(name_or_path: &str) -> Result<String, Error> {
    if let Some(e) = entry(name_or_path) {
        return Ok(e.yaml.to_string());
    }
    std::fs::read_to_string(name_or_path).map_err(|_| {
        spec(name_or_path)
            .err()
            .unwrap_or_else(|| Error::UnknownModel {
                name: name_or_path.to_string(),
                known: String::new(),
            })
    })
}

/// Builds a model by registered name (the generated struct) or spec file path (the runtime
/// [`Network`]), creating or loading its tensors through `vb`.
pub fn build(
    name_or_path: &str,
    vb: VarBuilder,
    config: &ModelConfig,
) -> Result<Box<dyn Model>, Error> {
    match entry(name_or_path) {
        Some(e) => (e.build)(vb, config),
        None => Ok(Box::new(Network::new(spec(name_or_path)?, vb, config)?)),
    }
}
